"""Float32 linear layers on the CPU through oneDNN's matmul, reading the ``(out, in)`` weight in place.

PyTorch's float32 ``F.linear`` on the CPU calls MKL: ``sgemm`` for several rows, ``sgemv`` for
one. On an AMD processor MKL takes no AVX-512 path, and its GEMV runs on one thread whatever the
thread count. oneDNN's matmul, which PyTorch ships for its bfloat16 linears and for Inductor's,
does both, and takes the plain ``(out, in)`` weight as it is (no packed copy, the parameter stays
the one ``nn.Linear`` owns). On a 2-core AMD EPYC (AVX-512), against ``F.linear``, medians of 7
interleaved rounds (2026-12-08, ``python benchmarks/cpu_linear.py``): the Mamba-130M layers'
products at 1024 rows 0.98-1.18x as fast, at 16-64 rows 1.17-1.31x (one thread) and 1.52-1.62x
(two), at one row 1.16x / 2.16x; the Mamba and Mamba-2 130M prefill of 1024 tokens 3-6% faster,
their eager batch-1 decoding 8-9% faster on one thread and 48-59% on two.

:func:`linear` is that product where it applies: float32 CPU tensors (plain tensors or
parameters, no tensor subclass), no autograd recording, a 2-D contiguous weight, not under
``torch.compile`` (Inductor lowers ``F.linear`` itself, and its lowering of this op expects the
weights it packs), and oneDNN present and agreeing with ``F.linear`` on a first small product;
anywhere else, and for ``reference``, it is ``F.linear``. Both are IEEE float32 products that
differ only in the order of the sums (measured relative error against float64: 2-9e-7 for
either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear", "reference", "fast_form_available"]

reference = F.linear

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_available: bool | None = None  # None: not probed yet


def _onednn(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")


def fast_form_available() -> bool:
    """Whether this PyTorch build has oneDNN's float32 matmul and it agrees with ``F.linear`` on a
    small product (probed once per process)."""
    global _available
    if _available is None:
        try:
            ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            if ok:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(3, 40, generator=g)
                w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
                with torch.inference_mode():
                    ok = torch.allclose(_onednn(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        except Exception:  # noqa: BLE001  (any failure: the build lacks it, keep F.linear)
            ok = False
        _available = bool(ok)
    return _available


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` ->
    ``(..., out)``; through oneDNN's matmul where it applies (module docstring)."""
    if (x.is_cpu and x.dtype is torch.float32 and weight.dtype is torch.float32 and weight.dim() == 2
            and type(x) is torch.Tensor and type(weight) in _PLAIN
            and (bias is None or (type(bias) in _PLAIN and bias.dtype is torch.float32))
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and not torch.compiler.is_compiling() and fast_form_available()):
        y = _onednn(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
