"""Time the ops (selective scan, causal conv1d, SDPA attention) for every backend available here,
over seqlens: forward and forward+backward medians (``triton.testing.do_bench`` on CUDA,
``torch.utils.benchmark`` on CPU), peak CUDA memory, peers when installed (``mamba_ssm``).
Prints a table; ``--out FILE.json`` also writes JSON and a PNG plot of time vs seqlen."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = "benchmark the ops on this machine (CPU or GPU), JSON + plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="input dtype on CUDA (CPU always uses fp32)")
    parser.add_argument("--ops", default=None, help="comma list: selective_scan,causal_conv1d,sdpa_attention")
    parser.add_argument("--backends", default=None, help="comma list (default: every form available)")
    parser.add_argument("--seqlens", default=None, help="comma list of seqlens, e.g. 256,1024")
    parser.add_argument("--no-bwd", action="store_true", help="forward only")
    parser.add_argument("--out", default=None, help="write JSON here (and a PNG beside it)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.cli.main import CLIError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise CLIError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    if args.seqlens:
        try:
            sl = [int(v) for v in args.seqlens.split(",")]
        except ValueError:
            raise CLIError(f"--seqlens must be comma-separated integers, got {args.seqlens!r}") from None
        if any(v <= 0 for v in sl):
            raise CLIError(f"--seqlens must be positive, got {args.seqlens!r}")
    from ssmkit.bench import ops

    known = set(ops.registry.REGISTRY)
    if args.ops and not set(args.ops.split(",")) <= known:
        raise CLIError(f"--ops: unknown op(s) {sorted(set(args.ops.split(',')) - known)}; known: {sorted(known)}")
    argv = ["--device", device, "--dtype", args.dtype]
    for flag, val in (("--ops", args.ops), ("--backends", args.backends), ("--seqlens", args.seqlens),
                      ("--out", args.out)):
        if val:
            argv += [flag, val]
    if args.no_bwd:
        argv.append("--no-bwd")
    return ops.main(argv)
