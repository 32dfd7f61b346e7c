"""Small-batch decode on the GPU: the GEMVs of a Mamba decode step, and whole steps.

1. ``norm_linear`` (Triton GEMV, optionally with the residual add + RMSNorm in its prologue)
   against cuBLAS (``F.linear``, after ``add_rms_norm`` for the norm case) at the Mamba-1.4B
   decode shapes, for several launch shapes. Each timing is a CUDA graph over enough distinct
   weight copies that the weights come from DRAM, not L2; it prints microseconds per product and
   the weight bytes per second.
2. One CUDA-graph decode step of the Mamba-1.4B model (random weights, bf16) with the fused
   small-batch step (four launches per layer) and with the unfused step, same run.

    python benchmarks/decode_gpu.py --out decode.json

No peer library: cuBLAS (``F.linear``) is the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _light_import  # noqa: E402
from _results import result_path, write_json  # noqa: E402

_light_import.light()

import torch  # noqa: E402

# (name, N, K, with norm)
SHAPES = [("in_proj", 8192, 2048, True), ("out_proj", 2048, 4096, False),
          ("lm_head", 50280, 2048, True)]
CONFIGS = [(8, 512, 4), (16, 256, 4), (4, 1024, 4), (8, 1024, 4), (2, 2048, 4), (4, 2048, 8)]
# whole-step variants: (name, fused, programmatic dependent launch, GEMV shape, conv+x_proj block)
STEP_VARIANTS = [("unfused", False, False, None, None),
                 ("fused, no PDL", True, False, None, None),
                 ("fused, PDL (default)", True, True, None, None),
                 ("fused, PDL, gemv 8x512 everywhere", True, True, (8, 512, 4), None),
                 ("fused, PDL, conv+x_proj 128 channels", True, True, None, 128)]


def _graph_time(fn, copies: int, reps: int = 10) -> float:
    """Microseconds per call of ``fn(i)`` for i over ``copies``, replayed from one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (reps * copies) * 1e6


def gemv_sweep(batch: int) -> list[dict]:
    from ssmkit.ops import dispatch
    from ssmkit.ops.fused import gemv as gemv_triton
    from ssmkit.ops.fused.norm import add_rms_norm_triton

    rows = []
    default = dict(gemv_triton.GEMV)
    for name, N, K, norm in SHAPES:
        nbytes = N * K * 2
        copies = max(4, min(32, -(-400_000_000 // nbytes)))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(batch, K, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(batch, K, device="cuda", dtype=torch.float32)
        nw = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
        ref = None
        if norm:
            def cublas(i, x=x, res=res, nw=nw, ws=ws):
                y, _ = add_rms_norm_triton(x, res, nw, 1e-5, torch.float32)
                return torch.nn.functional.linear(y, ws[i])
            ref, _ = gemv_triton.norm_linear_reference(x, ws[0], nw, res, 1e-5, torch.float32)
        else:
            def cublas(i, x=x, ws=ws):
                return torch.nn.functional.linear(x, ws[i])
            ref = torch.nn.functional.linear(x, ws[0])
        t = _graph_time(cublas, copies)
        rows.append({"shape": name, "N": N, "K": K, "norm": norm, "batch": batch, "form": "cublas",
                     "us": t, "TBps": nbytes / t / 1e6})
        print(f"{name:8s} N{N} K{K} norm={norm} b{batch} cublas{'+norm' if norm else ''}: {t:.2f} us "
              f"{nbytes / t / 1e6:.2f} TB/s", flush=True)
        for (bn, bk, nwarps), pdl in [(c, p) for c in CONFIGS for p in (False, True)]:
            gemv_triton.GEMV.update(block_n=bn, block_k=bk, num_warps=nwarps)
            dispatch.PDL = pdl

            def tri(i, x=x, ws=ws, nw=nw if norm else None, res=res if norm else None):
                return gemv_triton.norm_linear_triton(x, ws[i], nw, res, 1e-5, torch.float32)[0]
            try:
                err = ((tri(0).float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                t = _graph_time(tri, copies)
            except Exception as e:  # a launch shape that does not compile: report and go on
                print(f"  {bn}x{bk} w{nwarps} pdl={pdl}: failed {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append({"shape": name, "N": N, "K": K, "norm": norm, "batch": batch,
                         "form": f"triton {bn}x{bk} w{nwarps}{' pdl' if pdl else ''}", "us": t,
                         "TBps": nbytes / t / 1e6, "rel_err": err})
            print(f"  triton {bn}x{bk} w{nwarps}{' pdl' if pdl else ''}: {t:.2f} us {nbytes / t / 1e6:.2f} TB/s "
                  f"(rel err {err:.1e})", flush=True)
        ws.clear()
        torch.cuda.empty_cache()
    gemv_triton.GEMV.clear()
    gemv_triton.GEMV.update(default)
    dispatch.PDL = True
    return rows


def step_times(batches: list[int], steps: int) -> list[dict]:
    from generation import ssmkit_model

    from ssmkit.inference import allocate_cache
    from ssmkit.inference.cuda_graph import CUDAGraphDecoder
    from ssmkit.inference.stages import prefill
    from ssmkit.layers.mamba import Mamba
    from ssmkit.models import lm
    from ssmkit.ops import dispatch
    from ssmkit.ops.fused import decode as decode_triton
    from ssmkit.ops.fused import gemv as gemv_triton

    model = ssmkit_model("mamba")
    saved = (Mamba.FUSED_STEP_MAX_BATCH, lm._FUSED_HEAD_MAX_BATCH, dict(gemv_triton.GEMV),
             dict(decode_triton.CONV_PROJ), dispatch.PDL)
    out = []
    for batch in batches:
        ids = torch.randint(0, 50000, (batch, 8), device="cuda")
        for name, fused, pdl, gemv, cp in STEP_VARIANTS if batch == 1 else STEP_VARIANTS[:1]:
            Mamba.FUSED_STEP_MAX_BATCH = lm._FUSED_HEAD_MAX_BATCH = batch if fused else 0
            dispatch.PDL = pdl
            gemv_triton.GEMV.clear()
            if gemv:
                gemv_triton.GEMV.update(block_n=gemv[0], block_k=gemv[1], num_warps=gemv[2])
            decode_triton.CONV_PROJ.update(saved[3])
            if cp:
                decode_triton.CONV_PROJ["block_d"] = cp
            with torch.inference_mode():
                cache = allocate_cache(model, batch, 8 + steps + 8, device="cuda")
                logits = prefill(model, ids, cache)
                dec = CUDAGraphDecoder(model, cache)
                tok = logits.argmax(-1)
                for _ in range(3):
                    dec(tok)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(steps):
                    logits = dec(tok)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / steps * 1e3
                dec.close()
            out.append({"batch": batch, "variant": name, "ms_per_step": ms})
            print(f"decode step batch {batch} {name}: {ms:.3f} ms", flush=True)
    (Mamba.FUSED_STEP_MAX_BATCH, lm._FUSED_HEAD_MAX_BATCH, gemv, cp, dispatch.PDL) = saved
    gemv_triton.GEMV.clear()
    gemv_triton.GEMV.update(gemv)
    decode_triton.CONV_PROJ.update(cp)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/gpu_decode_<card>_<date>.json")
    a = p.parse_args(argv)
    if a.out_dir and not a.out:
        a.out = result_path(a.out_dir, 'gpu_decode', "cuda")
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(info, flush=True)
    res = {"info": info}
    if not a.no_sweep:
        res["gemv"] = gemv_sweep(a.batch)
    res["steps"] = step_times([1, 4], a.steps)
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
