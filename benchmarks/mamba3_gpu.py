"""Mamba-3 layers on the GPU: ssmkit's Triton sequence form vs its chunked PyTorch form vs
``mamba_ssm``'s ``Mamba3`` (Triton SISO, TileLang MIMO kernels), same run, same weights.

B8, d_model 2048 (d_state 128, headdim 64, expand 2: 64 heads), bf16, SISO and MIMO (R = 4), L in
{2048, 8192}: layer forward and forward+backward medians of ``triton.testing.do_bench``, the
relative RMS difference of each output from ssmkit's Triton form, and the ratios against
mamba_ssm. mamba_ssm is optional (``--no-peer``, or it is skipped when it does not import or a
case fails); a case whose first call takes longer than ``--max-call-s`` is not timed (the chunked
form at 8192 tokens may not be worth the minutes). Writes JSON (``--out-dir``).

    python benchmarks/mamba3_gpu.py --out-dir docs/benchmarks

Peer: ``pip install mamba-ssm --no-build-isolation`` (MIMO also needs ``tilelang``).
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

from ssmkit.layers import Mamba3  # noqa: E402
from ssmkit.ops import dispatch  # noqa: E402

B, D_MODEL, D_STATE, HEADDIM = 8, 2048, 128, 64


def _ours(form, layer):
    def run(u):
        with dispatch.force_backend(form):
            return layer(u)
    return run


def _peer_layer(ours: torch.nn.Module, is_mimo: bool):
    """mamba_ssm's Mamba3 with ssmkit's weights (the parameter names are the same), or None."""
    try:
        from mamba_ssm.modules.mamba3 import Mamba3 as Peer
    except Exception as e:  # noqa: BLE001
        print("mamba_ssm's Mamba3 does not import:", repr(e)[:300], flush=True)
        return None
    try:
        peer = Peer(D_MODEL, d_state=D_STATE, headdim=HEADDIM, is_mimo=is_mimo, mimo_rank=4,
                    chunk_size=16 if is_mimo else 64, device="cuda", dtype=torch.bfloat16)
        missing, unexpected = peer.load_state_dict(ours.state_dict(), strict=False)
        if missing or unexpected:
            print("state dict mismatch: missing", missing, "unexpected", unexpected, flush=True)
        return peer
    except Exception as e:  # noqa: BLE001
        print("mamba_ssm's Mamba3 failed to build:", repr(e)[:300], flush=True)
        return None


def _time(fn, u, max_call_s, rep_ms):
    """Forward and forward+backward medians (ms), or the reason they were not taken."""
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = fn(u)
        y.backward(torch.ones_like(y))
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        if first > max_call_s:
            return {"skipped": f"first forward+backward took {first:.1f} s (> {max_call_s} s)"}
        with torch.no_grad():
            fwd = do_bench(lambda: fn(u), warmup=10, rep=rep_ms, return_mode="median")
        leaf = u.detach().requires_grad_()
        gy = torch.randn_like(u)

        def step():
            fn(leaf).backward(gy)

        both = do_bench(step, warmup=10, rep=rep_ms, grad_to_none=[leaf], return_mode="median")
        return {"fwd_ms": fwd, "fwd_bwd_ms": both}
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"skipped": "out of memory: " + str(e)[:200]}
    except Exception as e:  # noqa: BLE001
        return {"skipped": repr(e)[:300]}


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/gpu_mamba3_<card>_<date>.json")
    p.add_argument("--seqlens", default="2048,8192")
    p.add_argument("--variants", default="siso,mimo")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-chunked", action="store_true", help="skip the chunked PyTorch form")
    p.add_argument("--max-call-s", type=float, default=20.0)
    p.add_argument("--rep-ms", type=int, default=300)
    a = p.parse_args(argv)
    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "shape": f"B{B} d_model {D_MODEL} d_state {D_STATE} headdim {HEADDIM} expand 2, bf16 weights",
            "command": "python benchmarks/mamba3_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(info, flush=True)
    rows = []
    for variant in a.variants.split(","):
        is_mimo = variant == "mimo"
        torch.manual_seed(0)
        layer = Mamba3(D_MODEL, d_state=D_STATE, headdim=HEADDIM, is_mimo=is_mimo, mimo_rank=4,
                       device="cuda", dtype=torch.bfloat16)
        peer = None if a.no_peer else _peer_layer(layer, is_mimo)
        sides = {"ssmkit triton": _ours("triton", layer)}
        if not a.no_chunked:
            sides["ssmkit chunked"] = _ours("chunked", layer)
        if peer is not None:
            sides["mamba_ssm"] = peer
        for L in map(int, a.seqlens.split(",")):
            u = torch.randn(B, L, D_MODEL, device="cuda", dtype=torch.bfloat16)
            row = {"variant": variant, "L": L}
            with torch.no_grad():
                ref = sides["ssmkit triton"](u)
                for name, fn in sides.items():
                    if name != "ssmkit triton":
                        try:
                            row[f"{name} rel_rms_vs_triton"] = _rel(fn(u), ref)
                        except Exception as e:  # noqa: BLE001
                            row[f"{name} rel_rms_vs_triton"] = repr(e)[:200]
            del ref
            for name, fn in sides.items():
                row[name] = _time(fn, u.requires_grad_(), a.max_call_s, a.rep_ms)
                layer.zero_grad(set_to_none=True)
                if peer is not None:
                    peer.zero_grad(set_to_none=True)
                print(variant, L, name, row[name], flush=True)
            rows.append(row)
    print("\n| layer | L | triton fwd ms | mamba_ssm fwd ms | ratio | triton fwd+bwd ms | mamba_ssm fwd+bwd ms | ratio |"
          " chunked fwd / fwd+bwd ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for r in rows:
        o, m, c = r["ssmkit triton"], r.get("mamba_ssm", {}), r.get("ssmkit chunked", {})
        of, ob = o.get("fwd_ms", nan), o.get("fwd_bwd_ms", nan)
        mf, mb = m.get("fwd_ms", nan), m.get("fwd_bwd_ms", nan)
        print(f"| {r['variant']} | {r['L']} | {of:.2f} | {mf:.2f} | {of / mf:.2f} | {ob:.2f} | {mb:.2f} | {ob / mb:.2f} "
              f"| {c.get('fwd_ms', nan):.2f} / {c.get('fwd_bwd_ms', nan):.2f} |")
    if a.out_dir:
        write_json(result_path(a.out_dir, "gpu_mamba3", "cuda"), {"info": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
