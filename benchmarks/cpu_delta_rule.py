"""CPU benchmark: the chunked (WY / UT-transform) delta rule vs its recurrence, same inputs, same run.

Batch 1, ``--seqlen`` tokens (4096), H heads of K = V = ``--dim`` (4 x 64 by default), L2-normalised
q and k, float32; plain DeltaNet (g = None) and gated DeltaNet. Times the forward (inference) and
forward + backward, checks the two forms agree, and writes
``docs/benchmarks/cpu_delta_rule.{json,md}``.

Run:  flock /tmp/bench.lock python benchmarks/cpu_delta_rule.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ssmkit.bench.results import cpu_name


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="docs/benchmarks/cpu_delta_rule")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ssmkit.ops.delta_rule import delta_rule
    from ssmkit.testing import rel_err

    torch.manual_seed(0)
    b, l, h, d = 1, args.seqlen, args.heads, args.dim
    q, k, v = (torch.randn(b, l, h, d) for _ in range(3))
    beta = torch.rand(b, l, h)
    g = -torch.rand(b, l, h) * 0.5
    info = {"machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "load_avg_at_start": os.getloadavg()},
            "shape": {"batch": b, "seqlen": l, "heads": h, "K": d, "V": d, "chunk_size": args.chunk_size},
            "results": []}
    rows = []
    for name, gate in (("DeltaNet", None), ("Gated DeltaNet", g)):
        kw = dict(g=gate, use_qk_l2norm=True, chunk_size=args.chunk_size)
        with torch.inference_mode():
            o_ref = delta_rule(q, k, v, beta=beta, **kw, backend="reference")
            o_chk = delta_rule(q, k, v, beta=beta, **kw, backend="chunked")
            err = rel_err(o_ref, o_chk)
            t_ref = best_of(lambda: delta_rule(q, k, v, beta=beta, **kw, backend="reference"), args.repeats)  # noqa: B023
            t_chk = best_of(lambda: delta_rule(q, k, v, beta=beta, **kw, backend="chunked"), args.repeats)  # noqa: B023

        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, beta)]

        def fwd_bwd(form, leaves=leaves, kw=kw):
            for t in leaves:
                t.grad = None
            q_, k_, v_, beta_ = leaves
            delta_rule(q_, k_, v_, beta=beta_, **kw, backend=form).square().mean().backward()

        tb_ref = best_of(lambda: fwd_bwd("reference"), 1)
        tb_chk = best_of(lambda: fwd_bwd("chunked"), args.repeats)
        res = {"variant": name, "reference_forward_s": t_ref, "chunked_forward_s": t_chk,
               "speedup_forward": t_ref / t_chk, "reference_fwd_bwd_s": tb_ref, "chunked_fwd_bwd_s": tb_chk,
               "speedup_fwd_bwd": tb_ref / tb_chk, "output_rel_diff": err}
        info["results"].append(res)
        rows.append(res)
        print(f"{name}: forward reference {t_ref:.3f} s, chunked {t_chk:.3f} s ({t_ref / t_chk:.1f}x); "
              f"fwd+bwd reference {tb_ref:.3f} s, chunked {tb_chk:.3f} s ({tb_ref / tb_chk:.1f}x); "
              f"rel. diff {err:.1e}")
    info["machine"]["load_avg_at_end"] = os.getloadavg()
    with open(args.out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(f"# Chunked delta rule vs recurrence, batch 1 x {l} tokens, {h} heads x {d}, CPU\n\n")
        f.write(f"Machine: {info['machine']['cpu']} ({info['machine']['logical_cpus']} logical CPUs, shared), "
                f"{info['machine']['torch_threads']} torch threads, torch {torch.__version__}; load average "
                f"{info['machine']['load_avg_at_start'][0]:.1f} at start, {info['machine']['load_avg_at_end'][0]:.1f}"
                f" at end. Command: `flock /tmp/bench.lock python benchmarks/cpu_delta_rule.py`. float32, "
                f"L2-normalised q/k, chunk {args.chunk_size}; best of {args.repeats} (recurrence fwd+bwd: one run)."
                "\n\n")
        f.write("| variant | recurrence fwd | chunked fwd | speed-up | recurrence fwd+bwd | chunked fwd+bwd | "
                "speed-up |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['variant']} | {r['reference_forward_s']:.3f} s | {r['chunked_forward_s']:.3f} s | "
                    f"{r['speedup_forward']:.1f}x | {r['reference_fwd_bwd_s']:.3f} s | {r['chunked_fwd_bwd_s']:.3f} s"
                    f" | {r['speedup_fwd_bwd']:.1f}x |\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
