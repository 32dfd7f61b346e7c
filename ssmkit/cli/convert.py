"""Convert a checkpoint between formats: ssmkit, Hugging Face (MambaForCausalLM /
Mamba2ForCausalLM) and mamba_ssm (MambaLMHeadModel). The source format is detected from its
config.json; tokenizer files are copied along. Tensors keep their dtype.

SRC may be a run directory of ssmkit train (its newest model): converting it is how a trained
model is exported.

Examples:
  ssmkit convert runs/bytes exported --to hf
  ssmkit convert state-spaces/mamba-130m-hf ./m130 --to mamba_ssm
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "convert"
HELP = "convert a checkpoint between ssmkit, Hugging Face and mamba_ssm formats"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint or run directory, or Hugging Face repo id")
    parser.add_argument("dst", metavar="DST", help="output directory")
    parser.add_argument("--to", required=True, choices=["hf", "mamba_ssm", "ssmkit"], help="output format")
    parser.add_argument("--force", action="store_true", help="overwrite a checkpoint already in DST")


def run(args: argparse.Namespace) -> int:
    from ssmkit.cli.args import CLIError, check_output_dir
    from ssmkit.models import from_pretrained, save_pretrained
    from ssmkit.models.tokenizer import HFTokenizer, load_tokenizer

    dst = check_output_dir("DST", args.dst)
    if (dst / "config.json").exists() and not args.force:
        raise CLIError(f"{dst} already holds a checkpoint; pass --force to overwrite it")
    if Path(args.src).exists() and dst.exists() and dst.resolve() == Path(args.src).resolve():
        raise CLIError("SRC and DST are the same directory")
    model = from_pretrained(args.src, dtype="auto")
    tok = load_tokenizer(getattr(model, "checkpoint_path", None))
    src_dir = Path(getattr(model, "checkpoint_path", "") or ".")
    carry = isinstance(tok, HFTokenizer) or '"ssmkit_tokenizer": "bytes"' in _read(src_dir / "tokenizer_config.json")
    save_pretrained(model, dst, format=args.to, tokenizer=tok if carry else None)
    print(f"converted {args.src} ({model.checkpoint_format}, {model.config.describe()}, "
          f"{model.num_parameters():,} parameters) -> {dst} ({args.to})")
    return 0


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
