"""Helpers shared by the tests and the benchmarks: seeding and error reports."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_all(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative error ||out - ref|| / ||ref|| (Frobenius), computed in float64."""
    ref64 = ref.detach().to(torch.float64 if not ref.is_complex() else torch.complex128)
    out64 = out.detach().to(ref64.dtype).to(ref64.device)
    num = torch.linalg.vector_norm(out64 - ref64).item()
    den = torch.linalg.vector_norm(ref64).item()
    if den == 0.0:
        return num
    return num / den


def assert_close(
    name: str,
    ref: torch.Tensor | None,
    out: torch.Tensor | None,
    rel: float = 1e-5,
    atol: float = 0.0,
) -> float:
    """Assert ``out`` matches ``ref``: relative (Frobenius) error <= ``rel`` or max abs <= ``atol``.

    Returns the relative error; the failure message names the tensor and reports both errors.
    """
    if ref is None or out is None:
        if ref is None and out is None:
            return 0.0
        raise AssertionError(f"{name}: one side is None (ref={ref is None}, out={out is None})")
    if tuple(ref.shape) != tuple(out.shape):
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: output has non-finite values")
    err = rel_err(ref, out)
    max_abs = (out.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item() if ref.numel() else 0.0
    if err > rel and not (atol > 0 and max_abs <= atol):
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {rel:.1e} (max abs error {max_abs:.3e}, "
            f"|ref| max {ref.detach().abs().max().item():.3e})"
        )
    return err


def matmul_error_bound(a: torch.Tensor, w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Worst-case rounding error of ``a @ w.T`` summed in ``dtype`` (default: ``a``'s), elementwise.

    Any summation order of a length-``k`` dot product in a floating-point type with unit roundoff
    ``u`` is within ``gamma_k * sum_i |a_i w_i|`` of the exact value, ``gamma_k = k u / (1 - k u)``
    (Higham, *Accuracy and Stability of Numerical Algorithms*, eq. 3.5). Two GEMMs of different
    shapes (different blockings) over the same rows therefore agree to twice this bound.
    ``a (..., k)``, ``w (n, k)`` -> ``(..., n)`` in float64.
    """
    u = torch.finfo(dtype or a.dtype).eps / 2
    k = a.shape[-1]
    gamma = k * u / (1 - k * u)
    return gamma * (a.detach().double().abs() @ w.detach().double().abs().T)


def use_triton_interpreter() -> bool:
    """Turn on Triton's CPU interpreter when no CUDA device is present.

    Must run before any module defining ``@triton.jit`` kernels is imported (the test suite's
    ``conftest.py`` calls it first). Returns True when kernels will be interpreted.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device() -> torch.device:
    """Where Triton kernels run in tests: CUDA if present, else CPU under the interpreter."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def grad_on_another_thread(output: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad(output, inputs)`` run on a thread of its own, as autograd runs a CUDA
    backward; an error there is raised again here."""
    import threading

    box: dict = {}

    def work():
        try:
            box["grads"] = torch.autograd.grad(output, inputs)
        except Exception as e:  # noqa: BLE001  (raised again on the caller's thread)
            box["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["grads"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a local process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, fn, args, out_dir, timeout_s):
    import datetime
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world, *args)
    except BaseException:  # report it to the parent, then leave (the peers time out)
        result, code = {"error": traceback.format_exc()}, 1
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if code == 0:
        dist.barrier()
        dist.destroy_process_group()
    # Leave without interpreter-exit destructors (a joinable gloo thread can abort there).
    os._exit(code)


def run_on_ranks(fn, world: int, *args, timeout_s: float = 120.0) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` CPU processes joined in a gloo process group
    (``torch.multiprocessing.spawn``); returns each rank's return value (saved with
    ``torch.save``: tensors, numbers, containers). ``fn`` must be importable by name. A rank that
    raises makes this raise with its traceback."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_rank_main, args=(world, free_port(), fn, args, d, timeout_s), nprocs=world, join=True)
        finally:
            results = []
            for r in range(world):
                p = os.path.join(d, f"rank{r}.pt")
                results.append(torch.load(p, weights_only=True) if os.path.exists(p) else None)
            errors = [res["error"] for res in results if isinstance(res, dict) and "error" in res]
            if errors:
                raise RuntimeError("a rank failed:\n" + errors[0])
    return results
