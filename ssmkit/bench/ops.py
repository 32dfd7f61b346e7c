"""Op benchmarks: selective scan, causal conv1d and (as the quadratic peer) SDPA attention, every
backend available on the device, over seqlens; JSON + PNG plot. Peers measured in the same run:
``mamba_ssm`` (``selective_scan_fn``) when installed (``pip install mamba-ssm causal-conv1d
--no-build-isolation``: builds CUDA extensions against the installed torch); torch SDPA.

    ssmkit bench --device cuda --dtype bf16 --out-dir results/   # results/ops_<card>_<date>.json
    ssmkit bench                                                 # CPU: chunked / reference forms
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

from ssmkit.bench import registry
from ssmkit.bench.registry import Case, register
from ssmkit.bench.results import result_path, write_json


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _rand(shape, device, dtype, grad, scale=1.0, shift=0.0):
    t = (torch.randn(*shape, device=device) * scale + shift).to(dtype)
    return t.requires_grad_() if grad else t


# ----------------------------------------------------------------------------- selective scan


def _scan_make(s, device, dtype, grad):
    b, L, d, n = s["batch"], s["L"], s["dim"], s["N"]
    x, dt, z = _rand((b, L, d), device, dtype, grad), _rand((b, L, d), device, dtype, grad, 0.5, -2), \
        _rand((b, L, d), device, dtype, grad)
    A = (-torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(d, 1)).requires_grad_(grad)
    B, C = _rand((b, L, n), device, dtype, grad), _rand((b, L, n), device, dtype, grad)
    D = torch.ones(d, device=device).requires_grad_(grad)
    bias = (torch.rand(d, device=device) * 0.1).requires_grad_(grad)
    return x, dt, A, B, C, D, z, bias


def _scan_call(backend, x, dt, A, B, C, D, z, bias):
    if backend == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        # transposes included: the peer's layout is (batch, dim, seqlen)
        t = lambda v: v.transpose(1, 2)  # noqa: E731
        return selective_scan_fn(t(x), t(dt), A, t(B), t(C), D, t(z), bias, True)
    from ssmkit.ops.selective_scan import selective_scan

    return selective_scan(x, dt, A, B, C, D, z, bias, dt_softplus=True, backend=backend)


def _scan_backends(device):
    if device.type == "cuda":
        return ["triton"] + (["mamba_ssm"] if _has("selective_scan_cuda") else [])
    return ["chunked", "reference"]


def _scan_shapes(device):
    if device.type == "cuda":
        return [dict(batch=8, dim=2048, N=16, L=L) for L in (512, 1024, 2048, 4096, 8192)]
    return [dict(batch=1, dim=256, N=16, L=L) for L in (128, 256, 512)]


register(Case("selective_scan", _scan_make, _scan_call, _scan_backends, _scan_shapes))


# ----------------------------------------------------------------------------- causal conv1d


def _conv_make(s, device, dtype, grad):
    x = _rand((s["batch"], s["L"], s["dim"]), device, dtype, grad)
    w = _rand((s["dim"], 4), device, dtype, grad)
    b = _rand((s["dim"],), device, dtype, grad)
    return x, w, b


def _conv_call(backend, x, w, b):
    from ssmkit.ops.conv.causal_conv1d import causal_conv1d

    return causal_conv1d(x, w, b, activation="silu", backend=backend)


def _conv_backends(device):
    return ["triton", "chunked"] if device.type == "cuda" else ["chunked", "reference"]


def _conv_shapes(device):
    if device.type == "cuda":
        return [dict(batch=8, dim=4096, L=L) for L in (512, 2048, 8192)]
    return [dict(batch=1, dim=512, L=L) for L in (256, 1024)]


register(Case("causal_conv1d", _conv_make, _conv_call, _conv_backends, _conv_shapes))


# ----------------------------------------------------------------------------- SDPA (peer)


def _sdpa_make(s, device, dtype, grad):
    shape = (s["batch"], s["heads"], s["L"], 64)
    return tuple(_rand(shape, device, dtype, grad) for _ in range(3))


def _sdpa_call(backend, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sdpa_shapes(device):
    if device.type == "cuda":
        return [dict(batch=8, heads=16, L=L) for L in (512, 1024, 2048, 4096, 8192)]
    return [dict(batch=1, heads=4, L=L) for L in (128, 256, 512)]


register(Case("sdpa_attention", _sdpa_make, _sdpa_call, lambda d: ["torch"], _sdpa_shapes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--ops", default=None, help="comma list (default: all)")
    p.add_argument("--backends", default=None, help="comma list (default: all available)")
    p.add_argument("--seqlens", default=None, help="comma list overriding the default shapes")
    p.add_argument("--no-bwd", action="store_true")
    p.add_argument("--out", default=None, help="JSON path; a PNG plot goes beside it")
    p.add_argument("--out-dir", default=None,
                   help="write OUT_DIR/ops_<card>_<date>.json (and the PNG beside it)")
    a = p.parse_args(argv)
    if a.out_dir and not a.out:
        a.out = result_path(a.out_dir, "ops", a.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    device = torch.device(a.device)
    if device.type == "cpu":
        dtype = torch.float32
    info = registry.machine_info(device)
    print(json.dumps(info))
    rows = registry.run(a.ops.split(",") if a.ops else None, device, dtype,
                        a.backends.split(",") if a.backends else None, not a.no_bwd,
                        [int(v) for v in a.seqlens.split(",")] if a.seqlens else None)
    print("\n| op | backend | shape | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        shape = " ".join(f"{k}={r[k]}" for k in ("batch", "dim", "heads", "N", "L") if k in r)
        print(f"| {r['op']} | {r['backend']} | {shape} | {r.get('fwd_ms', float('nan')):.3f} | "
              f"{r.get('fwd_bwd_ms', float('nan')):.3f} |" + (f" {r['error'][:60]}" if "error" in r else ""))
    if a.out:
        write_json(a.out, {"info": info, "rows": rows})
        png = registry.plot(rows, os.path.splitext(a.out)[0] + ".png",
                            f"{info.get('gpu', info['cpu'])} {a.dtype if device.type == 'cuda' else 'fp32'}")
        if png:
            print("plot:", png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
