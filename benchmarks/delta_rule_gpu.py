"""The delta rule on the GPU: ssmkit's Triton form vs flash-linear-attention (fla) 0.6, same run.

bf16, K = V = 128, q/k L2-normalised in the kernel, scale K^-1/2, seqlen 2048 and 8192, shapes
B8 H16 (value heads = key heads) and B8 H8 Hv16 (grouped value heads, two per key head): forward
and forward+backward medians of ``triton.testing.do_bench`` for the plain rule (fla
``chunk_delta_rule``) and the gated rule (fla ``chunk_gated_delta_rule``), the ratios ours / fla,
and the gated rule also against fla's plain rule (fla's gated backward refuses to run on Hopper
with Triton < 3.7.1; the gate costs little, so that is the nearest comparison there). fla's plain
rule has no grouped value heads: it gets q and k repeated per value head. Also the relative RMS
error of our bf16 output and gradients against float64 (B1, seqlen 2048).

fla autotunes on its first call (minutes): each fla measurement runs in a process of its own with
a time limit (``--peer-timeout``), with Triton's autotuning cache on (``TRITON_CACHE_AUTOTUNING``)
so a second run reuses the choice; a refusal or a timeout is reported in the table.

    python benchmarks/delta_rule_gpu.py --out-dir docs/benchmarks

Peer: fla 0.6 (``source .peers/build-on-device.sh`` installs it); ``--no-peer`` times ssmkit alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _results import cpu_name, result_path, write_json  # noqa: E402

SHAPES = {"B8 H16 K128 V128": (8, 16, 16), "B8 H8 Hv16 K128 V128": (8, 8, 16)}  # name: (batch, H, Hv)
K = V = 128



def make(b, L, H, Hv, gated, dtype=torch.bfloat16, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, L, H, K, device=device, generator=g).to(dtype)
    k = torch.randn(b, L, H, K, device=device, generator=g).to(dtype)
    v = torch.randn(b, L, Hv, V, device=device, generator=g).to(dtype)
    beta = torch.rand(b, L, Hv, device=device, generator=g).to(dtype)
    gate = F.logsigmoid(torch.randn(b, L, Hv, device=device, generator=g) + 2.0) if gated else None
    return q, k, v, beta, gate


def ours(q, k, v, beta, g, backend="triton"):
    from ssmkit.ops.delta_rule import delta_rule

    return delta_rule(q, k, v, beta=beta, g=g, scale=K ** -0.5, use_qk_l2norm=True, backend=backend)


def fla_fn(gated):
    if gated:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        def fn(q, k, v, beta, g):
            return chunk_gated_delta_rule(q, k, v, g, beta, scale=K ** -0.5, use_qk_l2norm_in_kernel=True)[0]
    else:
        from fla.ops.delta_rule import chunk_delta_rule

        def fn(q, k, v, beta, g):
            if v.shape[2] != q.shape[2]:  # no grouped value heads in fla's plain rule
                r = v.shape[2] // q.shape[2]
                q, k = q.repeat_interleave(r, 2), k.repeat_interleave(r, 2)
            return chunk_delta_rule(q, k, v, beta, scale=K ** -0.5, use_qk_l2norm_in_kernel=True)[0]
    return fn


def measure(fn, ts) -> dict:
    from triton.testing import do_bench

    fwd = do_bench(lambda: fn(*ts), warmup=25, rep=200, return_mode="median")
    leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in ts]
    do = torch.randn(ts[2].shape, device="cuda", dtype=ts[2].dtype)

    def step():
        fn(*leaves).backward(do)

    both = do_bench(step, warmup=25, rep=200, grad_to_none=[t for t in leaves if t is not None],
                    return_mode="median")
    return {"fwd_ms": fwd, "fwd_bwd_ms": both}


def errors(H, Hv, gated) -> dict:
    """Relative RMS error of our bf16 output and gradients against float64 (the chunked form)."""
    ts = make(1, 2048, H, Hv, gated)
    do = torch.randn(ts[2].shape, device="cuda")
    outs = []
    for backend, cast in (("triton", lambda t: t), ("chunked", lambda t: t.double())):
        leaves = [None if t is None else cast(t).detach().requires_grad_() for t in ts]
        o = ours(*leaves, backend=backend)
        live = [t for t in leaves if t is not None]
        outs.append([o, *torch.autograd.grad(o, live, do.to(o.dtype))])
    names = ["o", "dq", "dk", "dv", "dbeta", "dg"]
    return {n: float((a.double() - b).norm() / b.norm()) for n, a, b in zip(names, *outs)}


def peer_child(shape: str, L: int, rule: str) -> int:
    """One fla measurement in this process (see ``--peer-one``): prints ``RESULT {json}``."""
    b, H, Hv = SHAPES[shape]
    try:
        res = measure(fla_fn(rule == "gated"), make(b, L, H, Hv, rule == "gated"))
    except Exception as e:  # noqa: BLE001  (fla refuses some setups: report its words)
        res = {"refused": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def peer(shape: str, L: int, rule: str, timeout: float) -> dict:
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--peer-one", f"{shape}|{L}|{rule}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"refused": f"no result within {timeout:.0f} s (autotuning)"}
    res = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if res:
        return json.loads(res[-1][7:])
    tail = " | ".join(out.stderr.strip().splitlines()[-3:])[:300]
    return {"refused": f"exit {out.returncode}: {tail}"}


def _ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.2f}" if key in a and key in b else "-"


def _ms(r: dict, key: str) -> str:
    return f"{r[key]:.3f}" if key in r else "-"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/gpu_delta_rule_<card>_<date>.json")
    p.add_argument("--seqlens", default="2048,8192")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    p.add_argument("--no-peer", action="store_true", help="time ssmkit alone")
    p.add_argument("--peer-timeout", type=float, default=900.0, help="seconds per fla measurement (default 900)")
    p.add_argument("--sweep", action="store_true", help="also time 8 warps per program (default 4)")
    p.add_argument("--peer-one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.peer_one:
        shape, L, rule = a.peer_one.split("|")
        return peer_child(shape, int(L), rule)
    import triton

    import ssmkit.ops.delta_rule  # noqa: F401  (registers the Triton forms)

    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "cpu": cpu_name(), "torch": torch.__version__, "triton": triton.__version__,
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "setup": "bf16, K=V=128, in-kernel q/k L2 norm, scale K^-1/2, do_bench medians"}
    print(info, flush=True)
    rows = []
    for shape in [s.strip() for s in a.shapes.split(",") if s.strip()]:
        b, H, Hv = SHAPES[shape]
        for L in map(int, a.seqlens.split(",")):
            fla = {} if a.no_peer else {rule: peer(shape, L, rule, a.peer_timeout) for rule in ("plain", "gated")}
            for rule in ("plain", "gated"):
                row = {"shape": shape, "L": L, "rule": rule,
                       "ssmkit": measure(ours, make(b, L, H, Hv, rule == "gated"))}
                if a.sweep:
                    import ssmkit.ops.delta_rule.triton as drt

                    base, drt.NUM_WARPS = drt.NUM_WARPS, 8
                    try:
                        row["ssmkit 8 warps"] = measure(ours, make(b, L, H, Hv, rule == "gated"))
                    except Exception as e:  # noqa: BLE001
                        print("8 warps failed:", repr(e)[:300], flush=True)
                    drt.NUM_WARPS = base
                if fla:
                    row["fla"], row["fla_plain"] = fla[rule], fla["plain"]
                if L == 2048:
                    row["rel_rms_vs_fp64"] = errors(H, Hv, rule == "gated")
                print(row, flush=True)
                rows.append(row)
    print("\n| shape | L | rule | ssmkit fwd ms | fla fwd ms | ratio | ssmkit fwd+bwd ms | fla fwd+bwd ms | ratio "
          "| fwd+bwd vs fla plain |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, f, fp = r["ssmkit"], r.get("fla", {}), r.get("fla_plain", {})
        print(f"| {r['shape']} | {r['L']} | {r['rule']} | {_ms(o, 'fwd_ms')} | {_ms(f, 'fwd_ms')} "
              f"| {_ratio(o, f, 'fwd_ms')} | {_ms(o, 'fwd_bwd_ms')} | {_ms(f, 'fwd_bwd_ms')} "
              f"| {_ratio(o, f, 'fwd_bwd_ms')} | {_ratio(o, fp, 'fwd_bwd_ms')} |")
    for r in rows:
        if "refused" in r.get("fla", {}):
            print(f"fla {r['rule']} ({r['shape']}, L={r['L']}): {r['fla']['refused']}")
    if a.out_dir:
        path = result_path(a.out_dir, "gpu_delta_rule", "cuda")
        write_json(path, {"info": info, "rows": rows})
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
