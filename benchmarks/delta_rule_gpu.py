"""The delta rule on the GPU: ssmkit's Triton form vs flash-linear-attention (fla) 0.6, same run.

bf16, K = V = 128, q/k L2-normalised in the kernel, scale K^-1/2, seqlen 2048 and 8192, shapes
B8 H16 (value heads = key heads) and B8 H8 Hv16 (grouped value heads, two per key head): forward
and forward+backward medians of ``triton.testing.do_bench`` for the plain rule (fla
``chunk_delta_rule``) and the gated rule (fla ``chunk_gated_delta_rule``), the ratios ours / fla,
and the gated rule also against fla's plain rule (fla's gated backward refuses to run on Hopper
with Triton < 3.7.1; the gate costs little, so that is the nearest comparison there). fla's plain
rule has no grouped value heads: it gets q and k repeated per value head (outside its timing).
Also the relative RMS error of our bf16 output and gradients against float64 (B1, seqlen 2048).

fla autotunes on its first call (minutes): fla runs in a process of its own per rule, all shapes
and seqlens in it, under one time limit for both (``--peer-timeout``, default 300 s, so that the
whole command takes about 8 minutes on an H100 the first time), with Triton's autotuning results
kept on disk (``TRITON_CACHE_AUTOTUNING=1``, ``TRITON_CACHE_DIR=--triton-cache``): a second run
starts at once. A refusal (forward or backward apart) or a timeout is reported under the table.

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
import tempfile
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
            return chunk_delta_rule(q, k, v, beta, scale=K ** -0.5, use_qk_l2norm_in_kernel=True)[0]
    return fn


def fla_inputs(shape: str, L: int, gated: bool):
    b, H, Hv = SHAPES[shape]
    q, k, v, beta, g = make(b, L, H, Hv, gated)
    if not gated and Hv != H:  # no grouped value heads in fla's plain rule: one q, k per value head
        q, k = q.repeat_interleave(Hv // H, 2), k.repeat_interleave(Hv // H, 2)
    return q, k, v, beta, g


def measure(fn, ts) -> dict:
    """Forward and forward+backward medians; an error in the backward keeps the forward's time
    (``bwd_refused``: the error's first line)."""
    from triton.testing import do_bench

    with torch.no_grad():
        res = {"fwd_ms": do_bench(lambda: fn(*ts), warmup=25, rep=200, return_mode="median")}
    leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in ts]
    do = torch.randn(ts[2].shape, device="cuda", dtype=ts[2].dtype)

    def step():
        fn(*leaves).backward(do)

    try:
        res["fwd_bwd_ms"] = do_bench(step, warmup=25, rep=200, grad_to_none=[t for t in leaves if t is not None],
                                     return_mode="median")
    except Exception as e:  # noqa: BLE001  (fla refuses some backward passes: report its words)
        res["bwd_refused"] = _first_line(e)
    return res


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


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


def peer_child(rule: str, cases: list[tuple[str, int]]) -> int:
    """fla's ``rule`` on each (shape, seqlen) in this process (see ``--peer-rule``): prints one
    ``RESULT {json}`` line per case as it is measured (a time limit keeps the ones before it)."""
    try:
        fn = fla_fn(rule == "gated")
    except Exception as e:  # noqa: BLE001  (not installed, or refusing this setup on import)
        fn, why = None, _first_line(e)
    for shape, L in cases:
        if fn is None:
            res = {"refused": why}
        else:
            try:
                res = measure(fn, fla_inputs(shape, L, rule == "gated"))
            except Exception as e:  # noqa: BLE001  (fla refuses some setups: report its words)
                res = {"refused": _first_line(e)}
        print("RESULT " + json.dumps({"shape": shape, "L": L, **res}), flush=True)
        torch.cuda.empty_cache()
    return 0


def peer(rule: str, cases: list[tuple[str, int]], timeout: float, cache_dir: str) -> dict:
    """{(shape, L): result} from fla's process for ``rule``; cases it did not reach within
    ``timeout`` seconds are marked as such."""
    os.makedirs(cache_dir, exist_ok=True)
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING="1", TRITON_CACHE_DIR=cache_dir)
    spec = ",".join(f"{shape}|{L}" for shape, L in cases)
    cmd = [sys.executable, os.path.abspath(__file__), "--peer-rule", rule, "--peer-cases", spec]
    t0 = time.perf_counter()
    stderr, missing = "", f"no result within {timeout:.0f} s (autotuning; --peer-timeout)"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1.0), env=env)
        stdout, stderr = out.stdout, out.stderr
        if out.returncode:
            missing = f"exit {out.returncode}: " + " | ".join(stderr.strip().splitlines()[-3:])[:300]
    except subprocess.TimeoutExpired as e:  # keep what it measured before the limit
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    got = {}
    for ln in stdout.splitlines():
        if ln.startswith("RESULT "):
            r = json.loads(ln[7:])
            got[(r.pop("shape"), r.pop("L"))] = r
    print(f"fla {rule}: {len(got)}/{len(cases)} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    return {c: got.get(c, {"refused": missing}) for c in cases}


def _ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.2f}" if key in a and key in b else "-"


def _spec_cases(spec: str) -> list[tuple[str, int]]:
    return [(c.split("|")[0], int(c.split("|")[1])) for c in spec.split(",") if c]


def _ms(r: dict, key: str) -> str:
    return f"{r[key]:.3f}" if key in r else "-"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/gpu_delta_rule_<card>_<date>.json")
    p.add_argument("--seqlens", default="2048,8192")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    p.add_argument("--no-peer", action="store_true", help="time ssmkit alone")
    p.add_argument("--peer-timeout", type=float, default=300.0,
                   help="seconds for all fla measurements, both rules, autotuning included (default 300)")
    p.add_argument("--triton-cache", default=os.path.join(tempfile.gettempdir(), "ssmkit-fla-triton-cache"),
                   help="Triton cache of fla's processes (its autotuning choices; kept between runs)")
    p.add_argument("--sweep", action="store_true", help="also time 8 warps per program (default 4)")
    p.add_argument("--peer-rule", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-cases", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.peer_rule:
        return peer_child(a.peer_rule, _spec_cases(a.peer_cases))
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    seqlens = [int(x) for x in a.seqlens.split(",") if x.strip()]
    import triton

    import ssmkit.ops.delta_rule  # noqa: F401  (registers the Triton forms)

    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "cpu": cpu_name(), "torch": torch.__version__, "triton": triton.__version__,
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "setup": "bf16, K=V=128, in-kernel q/k L2 norm, scale K^-1/2, do_bench medians"}
    print(info, flush=True)
    cases = [(shape, L) for shape in shapes for L in seqlens]
    fla = {}
    if not a.no_peer:  # first, while the card is otherwise idle; plain first, the gated rule in what is left
        deadline = time.perf_counter() + a.peer_timeout
        for rule in ("plain", "gated"):
            left = deadline - time.perf_counter()
            fla[rule] = (peer(rule, cases, left, a.triton_cache) if left >= 20 else
                         {c: {"refused": "not run: --peer-timeout spent on the plain rule"} for c in cases})
    rows = []
    for shape in shapes:
        b, H, Hv = SHAPES[shape]
        for L in seqlens:
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
                    row["fla"], row["fla_plain"] = fla[rule][(shape, L)], fla["plain"][(shape, L)]
                if L == 2048:
                    row["rel_rms_vs_fp64"] = errors(H, Hv, rule == "gated")
                print(row, flush=True)
                rows.append(row)
    print("\nratio: ssmkit / fla (below 1: ssmkit faster); vs fla plain: against fla's plain rule")
    print("\n| shape | L | rule | ssmkit fwd ms | fla fwd ms | ratio | vs fla plain | ssmkit fwd+bwd ms "
          "| fla fwd+bwd ms | ratio | vs fla plain |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, f, fp = r["ssmkit"], r.get("fla", {}), r.get("fla_plain", {})
        print(f"| {r['shape']} | {r['L']} | {r['rule']} | {_ms(o, 'fwd_ms')} | {_ms(f, 'fwd_ms')} "
              f"| {_ratio(o, f, 'fwd_ms')} | {_ratio(o, fp, 'fwd_ms')} | {_ms(o, 'fwd_bwd_ms')} "
              f"| {_ms(f, 'fwd_bwd_ms')} | {_ratio(o, f, 'fwd_bwd_ms')} | {_ratio(o, fp, 'fwd_bwd_ms')} |")
    for r in rows:
        f = r.get("fla", {})
        for key, what in (("refused", ""), ("bwd_refused", " backward")):
            if key in f:
                print(f"fla {r['rule']}{what} ({r['shape']}, L={r['L']}): {f[key]}")
    if a.out_dir:
        path = result_path(a.out_dir, "gpu_delta_rule", "cuda")
        write_json(path, {"info": info, "rows": rows})
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
