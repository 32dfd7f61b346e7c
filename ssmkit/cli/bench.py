"""Benchmarks on this machine.

ssmkit bench [ops] times the ops (selective scan, causal conv1d, SDPA attention) for every backend
available here, over seqlens: forward and forward+backward medians (triton.testing.do_bench on
CUDA, torch.utils.benchmark on CPU), peak CUDA memory, peers when installed (mamba_ssm).

ssmkit bench generation times generation (prompt --prompt, --new greedy tokens) of an SSM model
(--ssm: Mamba, Mamba-2 or Gated DeltaNet) and a same-size attention model (--size): tokens/s at
batch 1, or with --max-batch at batch 1, 2, 4, ... up to the largest batch that fits (or N), with
the peak memory of each batch: the Mamba paper's throughput-vs-batch figure. On CUDA, decoding
replays a captured CUDA graph; SSMKIT_BACKEND=triton runs every op's Triton form.

Both print a table; --out FILE.json also writes JSON and a PNG plot beside it.

Examples:
  ssmkit bench --device cpu --ops selective_scan --seqlens 256,1024 --out bench/cpu.json
  ssmkit bench --device cuda --dtype bf16 --backends triton,reference
  ssmkit bench generation --device cuda --max-batch --out bench/generation.json
  ssmkit bench generation --device cpu --size tiny --prompt 64 --new 16 --max-batch 8
  SSMKIT_BACKEND=triton ssmkit bench generation --device cuda --size 130m --ssm gated-deltanet --max-batch 64
"""

from __future__ import annotations

import argparse
import sys

from ssmkit.cli import args as A

NAME = "bench"
HELP = "benchmark the ops on this machine (CPU or GPU), JSON + plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="ops", choices=["ops", "generation"],
                        help="ops (default) or generation (throughput against batch size)")
    parser.add_argument("--device", type=A.device(allow_auto=False), default=None,
                        help="cpu or cuda (default: cuda if present, else cpu)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="input dtype on CUDA (CPU always uses fp32)")
    parser.add_argument("--ops", type=A.comma_list(), default=None,
                        help="comma list: selective_scan,causal_conv1d,sdpa_attention (default: all)")
    parser.add_argument("--backends", type=A.comma_list(), default=None,
                        help="comma list (default: every form available here)")
    parser.add_argument("--seqlens", type=A.int_list, default=None,
                        help="comma list of seqlens, e.g. 256,1024 (default: per op)")
    parser.add_argument("--no-bwd", action="store_true", help="forward only")
    parser.add_argument("--out", default=None, metavar="FILE.json",
                        help="write JSON here (and a PNG beside it); checked before the benchmark starts")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--size", default=None, choices=["1.4b", "130m", "tiny"],
                     help="model pair (default: 1.4b on CUDA, 130m on the CPU)")
    gen.add_argument("--ssm", default="mamba", choices=["mamba", "mamba2", "gated-deltanet"],
                     help="the SSM model of the pair (default mamba; gated-deltanet: sizes 130m and tiny)")
    gen.add_argument("--prompt", type=A.positive_int, default=2048, help="prompt tokens (default 2048)")
    gen.add_argument("--new", type=A.positive_int, default=128, help="generated tokens (default 128)")
    gen.add_argument("--max-batch", type=A.positive_int, nargs="?", const=4096, default=1, metavar="N",
                     help="double the batch from 1 up to N or until memory runs out (alone: as far as it fits)")
    gen.add_argument("--reps", type=A.positive_int, default=3, help="timed runs per batch (median; default 3)")


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device).type
    if args.out:
        A.check_output_file("--out", args.out)
        if not args.out.endswith(".json"):
            raise A.CLIError(f"--out {args.out}: expected a .json file name (the PNG goes beside it)")
    if args.what == "generation":
        return _generation(args, device)
    from ssmkit.bench import ops

    known = ops.registry.REGISTRY
    if args.ops and not set(args.ops) <= set(known):
        raise A.CLIError(f"--ops: unknown op(s) {', '.join(sorted(set(args.ops) - set(known)))}; "
                         f"choose from {', '.join(sorted(known))}")
    here = sorted({b for op in (args.ops or known) for b in known[op].backends(torch.device(device))})
    if args.backends and not set(args.backends) & set(here):
        raise A.CLIError(f"--backends: none of {', '.join(args.backends)} runs here for these ops; "
                         f"available on {device}: {', '.join(here)}")
    if args.backends and set(args.backends) - set(here):
        print(f"[skipping backends not available on {device}: "
              f"{', '.join(sorted(set(args.backends) - set(here)))}]", file=sys.stderr)
    argv = ["--device", device, "--dtype", args.dtype]
    for flag, val in (("--ops", args.ops), ("--backends", args.backends), ("--seqlens", args.seqlens)):
        if val:
            argv += [flag, ",".join(map(str, val))]
    if args.out:
        argv += ["--out", args.out]
    if args.no_bwd:
        argv.append("--no-bwd")
    return ops.main(argv)


def _generation(args: argparse.Namespace, device: str) -> int:
    import json
    import os

    import torch

    from ssmkit.bench import generation as g
    from ssmkit.bench.registry import machine_info
    from ssmkit.bench.results import write_json

    size = args.size or ("1.4b" if device == "cuda" and args.ssm != "gated-deltanet" else "130m")
    if args.ssm not in g.SIZES[size]:
        raise A.CLIError(f"--ssm {args.ssm}: no such model at --size {size}; sizes with one: "
                         f"{', '.join(k for k in g.SIZES if args.ssm in g.SIZES[k])}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    info = {**machine_info(torch.device(device)), "size": size, "prompt": args.prompt, "new": args.new,
            "dtype": str(dtype).replace("torch.", ""), "reps": args.reps, "ssm": args.ssm,
            "backend": os.environ.get("SSMKIT_BACKEND") or "auto"}
    print(json.dumps(info), flush=True)
    res: dict[str, list[dict]] = {}
    for kind in (args.ssm, "attention"):
        model = g.build(size, kind, torch.device(device), dtype)
        n = sum(p.numel() for p in model.parameters())
        info[f"{kind}_params"] = n
        print(f"{kind}: {n / 1e6:.0f}M parameters", file=sys.stderr, flush=True)
        res[kind] = g.sweep(model, prompt=args.prompt, new=args.new, max_batch=args.max_batch, reps=args.reps,
                            progress=lambda r, k=kind: print(f"  {k} {r}", file=sys.stderr, flush=True))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    summ = g.summary(res)
    name = g.LABELS[args.ssm]
    print(f"\n| batch | {name} tok/s | attention tok/s | {name} / attention |")
    print("|---:|---:|---:|---:|")
    att = {r["batch"]: r for r in res["attention"]}
    for r in res[args.ssm]:
        a = att.get(r["batch"], {})
        cell = lambda x: "out of memory" if x.get("oom") else (f"{x['tokens_per_s']:.0f}" if x else "-")  # noqa: E731
        ratio = summ.get("ratio_per_batch", {}).get(r["batch"])
        print(f"| {r['batch']} | {cell(r)} | {cell(a)} | {'' if ratio is None else f'{ratio:.2f}'} |")
    if "best_ratio" in summ:
        b, a = summ["best"][args.ssm], summ["best"]["attention"]
        print(f"\nbest: {name} {b['tokens_per_s']:.0f} tok/s at batch {b['batch']}, attention "
              f"{a['tokens_per_s']:.0f} tok/s at batch {a['batch']}: {summ['best_ratio']:.2f}x"
              + (" (the paper: ~5x)" if args.ssm == "mamba" else ""))
    if args.out:
        write_json(args.out, {"info": info, "results": res, "summary": summ})
        png = g.plot(res, args.out[: -len(".json")] + ".png",
                     f"{info.get('gpu', info['cpu'])}: {size} pair, prompt {args.prompt} + {args.new}",
                     {k: info[f"{k}_params"] for k in res})
        print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0
