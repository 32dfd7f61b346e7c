"""SSD (Mamba-2's scan) on the GPU: ssmkit's Triton form vs ``mamba_ssm``'s
``mamba_chunk_scan_combined``, same run.

B8 H32 P64 N128 G1 bf16 with D, z, dt_bias and softplus, L in {2048, 8192}: forward and
forward+backward medians of ``triton.testing.do_bench``, each side at its preferred chunk
(ours: its own block; mamba_ssm: 256), the relative RMS error of ours against the float32 chunked
form, and the ratios. Writes JSON (``--out-dir``).

    python benchmarks/ssd_gpu.py --out-dir docs/benchmarks

Peer: ``pip install mamba-ssm --no-build-isolation``; without it ``--no-peer`` times ssmkit alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import triton  # noqa: E402
from _results import result_path, write_json  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import ssmkit.ops.ssd.triton  # noqa: E402,F401  (registers the Triton form)
from ssmkit.ops.ssd import ssd  # noqa: E402


def make(b, L, H, P, G, N, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, L, H, P, device="cuda", dtype=dtype, generator=g)
    dt = (torch.randn(b, L, H, device="cuda", generator=g) * 0.5 - 2.0).to(dtype)
    A = -torch.rand(H, device="cuda", generator=g) * 4 - 1
    B = torch.randn(b, L, G, N, device="cuda", dtype=dtype, generator=g)
    C = torch.randn(b, L, G, N, device="cuda", dtype=dtype, generator=g)
    D = torch.ones(H, device="cuda")
    z = torch.randn(b, L, H, P, device="cuda", dtype=dtype, generator=g)
    bias = torch.rand(H, device="cuda", generator=g) * 0.1
    return x, dt, A, B, C, D, z, bias


def _time(fn, ts, bwd):
    fwd = do_bench(lambda: fn(*ts), warmup=25, rep=200, return_mode="median")
    res = {"fwd_ms": fwd}
    if bwd:
        leaves = [t.detach().requires_grad_() for t in ts]
        gy = torch.randn_like(ts[0])

        def step():
            fn(*leaves).backward(gy)

        res["fwd_bwd_ms"] = do_bench(step, warmup=25, rep=200, grad_to_none=leaves, return_mode="median")
    return res


def ours(backend):
    def fn(x, dt, A, B, C, D, z, bias):
        return ssd(x, dt, A, B, C, D, z, bias, dt_softplus=True, backend=backend)
    return fn


def peer(x, dt, A, B, C, D, z, bias):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D, z=z, dt_bias=bias, dt_softplus=True)


def grad_errors(ts, fn=None):
    """Relative RMS error of the output and gradients of ``fn`` (default: the Triton form) on bf16
    inputs against the chunked form on the same inputs in float32."""
    gy = torch.randn_like(ts[0])
    res = {}
    outs = []
    for f, cast in ((fn or ours("triton"), lambda t: t), (ours("chunked"), lambda t: t.float())):
        leaves = [cast(t).detach().requires_grad_() for t in ts]
        y = f(*leaves)
        g = torch.autograd.grad(y, leaves, gy.to(y.dtype))
        outs.append([y, *g])
    for name, a, b in zip(["y", "dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias"], *outs):
        res[name] = float((a.float() - b).norm() / b.norm())
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/gpu_ssd_<card>_<date>.json")
    p.add_argument("--seqlens", default="2048,8192")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--chunked", action="store_true", help="also time the chunked PyTorch form")
    p.add_argument("--sweep", action="store_true", help="also time other warps and state rows per program")
    a = p.parse_args(argv)
    b, H, P, G, N = 8, 32, 64, 1, 128
    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "shape": f"B{b} H{H} P{P} G{G} N{N} bf16, D, z, dt_bias, softplus"}
    print(info, flush=True)
    rows = []
    for L in map(int, a.seqlens.split(",")):
        ts = make(b, L, H, P, G, N)
        row = {"L": L}
        if not a.no_peer:
            try:
                row["mamba_ssm"] = _time(peer, ts, True)
            except Exception as e:  # noqa: BLE001
                print("mamba_ssm failed:", repr(e), flush=True)
        row["ssmkit"] = _time(ours("triton"), ts, True)
        if a.sweep:  # the forward's form, warps and state rows per program
            sdt = sys.modules["ssmkit.ops.ssd.triton"]  # (ssmkit.ops.ssd names the function too)
            variants = ({"STATES_HALF": False}, {"FWD_SPLIT": True}, {"FWD_SPLIT": True, "STATE_ROWS": 16},
                        {"WALK_WARPS": 8}, {"DBC_HEADS": 4}, {"DBC_HEADS": 32}, {"BWD_WARPS": 4})
            for var in variants:
                base = {n: getattr(sdt, n) for n in var}
                for n, v in var.items():
                    setattr(sdt, n, v)
                try:
                    r = _time(ours("triton"), ts, True)
                    row["ssmkit " + " ".join(f"{n.lower()}={v}" for n, v in var.items())] = r
                    print(f"L={L} {var}: {r}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(var, "failed:", repr(e)[:300], flush=True)
                for n, v in base.items():
                    setattr(sdt, n, v)
        if a.chunked:
            row["ssmkit chunked"] = _time(ours("chunked"), ts, True)
        if L <= 2048:
            row["rel_rms_vs_fp32"] = grad_errors(ts)
            if "mamba_ssm" in row:
                row["mamba_ssm rel_rms_vs_fp32"] = grad_errors(ts, peer)
        print(L, row, flush=True)
        rows.append(row)
    print("\n| L | ssmkit fwd ms | mamba_ssm fwd ms | ratio | ssmkit fwd+bwd ms | mamba_ssm fwd+bwd ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, m = r["ssmkit"], r.get("mamba_ssm", {})
        nan = float("nan")
        print(f"| {r['L']} | {o['fwd_ms']:.3f} | {m.get('fwd_ms', nan):.3f} | {o['fwd_ms'] / m.get('fwd_ms', nan):.2f} "
              f"| {o['fwd_bwd_ms']:.3f} | {m.get('fwd_bwd_ms', nan):.3f} | "
              f"{o['fwd_bwd_ms'] / m.get('fwd_bwd_ms', nan):.2f} |")
    if a.out_dir:
        write_json(result_path(a.out_dir, "gpu_ssd", "cuda"), {"info": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
