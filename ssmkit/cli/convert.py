"""Convert a checkpoint between formats: ssmkit, Hugging Face (``MambaForCausalLM`` /
``Mamba2ForCausalLM``) and mamba_ssm (``MambaLMHeadModel``). The source format is detected from
its config.json; tokenizer files are copied along. Tensors keep their dtype.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "convert"
HELP = "convert a checkpoint between ssmkit, Hugging Face and mamba_ssm formats"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint directory or Hugging Face repo id")
    parser.add_argument("dst", metavar="DST", help="output directory")
    parser.add_argument("--to", required=True, choices=["hf", "mamba_ssm", "ssmkit"], help="output format")
    parser.add_argument("--force", action="store_true", help="overwrite a checkpoint already in DST")


def run(args: argparse.Namespace) -> int:
    from ssmkit.cli.main import CLIError
    from ssmkit.models import from_pretrained, save_pretrained
    from ssmkit.models.tokenizer import HFTokenizer, load_tokenizer

    dst = Path(args.dst)
    if (dst / "config.json").exists() and not args.force:
        raise CLIError(f"{dst} already holds a checkpoint; pass --force to overwrite it")
    if Path(args.src).exists() and dst.exists() and dst.resolve() == Path(args.src).resolve():
        raise CLIError("SRC and DST are the same directory")
    model = from_pretrained(args.src, dtype="auto")
    tok = load_tokenizer(getattr(model, "checkpoint_path", None))
    save_pretrained(model, dst, format=args.to, tokenizer=tok if isinstance(tok, HFTokenizer) else None)
    print(f"converted {args.src} ({model.checkpoint_format}, {model.config.describe()}, "
          f"{model.num_parameters():,} parameters) -> {dst} ({args.to})")
    return 0
