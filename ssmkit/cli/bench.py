"""Time the ops (selective scan, causal conv1d, SDPA attention) for every backend available here,
over seqlens: forward and forward+backward medians (triton.testing.do_bench on CUDA,
torch.utils.benchmark on CPU), peak CUDA memory, peers when installed (mamba_ssm).
Prints a table; --out FILE.json also writes JSON and a PNG plot of time vs seqlen.

Examples:
  ssmkit bench --device cpu --ops selective_scan --seqlens 256,1024 --out bench/cpu.json
  ssmkit bench --device cuda --dtype bf16 --backends triton,reference
"""

from __future__ import annotations

import argparse
import sys

from ssmkit.cli import args as A

NAME = "bench"
HELP = "benchmark the ops on this machine (CPU or GPU), JSON + plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device).type
    if args.out:
        A.check_output_file("--out", args.out)
        if not args.out.endswith(".json"):
            raise A.CLIError(f"--out {args.out}: expected a .json file name (the PNG goes beside it)")
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
