"""Convert a checkpoint between formats: ssmkit, Hugging Face (MambaForCausalLM,
Mamba2ForCausalLM and the hybrids BambaForCausalLM, GraniteMoeHybridForCausalLM,
NemotronHForCausalLM) and mamba_ssm (MambaLMHeadModel), or export it to GGUF for llama.cpp. The
source format is detected from its config.json; tokenizer files are copied along. Tensors keep
their dtype.

SRC may be a run directory of ssmkit train (its newest model): converting it is how a trained
model is exported.

--to gguf writes one file (pure Mamba or pure Mamba-2 models: llama.cpp's mamba / mamba2
architectures): DST ending in .gguf is that file, any other DST is a directory that receives
model.gguf. The tokenizer (tokenizer.json, or ssmkit's byte tokenizer) goes into the file;
--gguf-type picks the weight type (f32 keeps the values exactly).

Examples:
  ssmkit convert runs/bytes exported --to hf
  ssmkit convert state-spaces/mamba-130m-hf ./m130 --to mamba_ssm
  ssmkit convert ./granite-4.0-h-tiny ./g4 --to ssmkit     # a downloaded Hugging Face hybrid
  ssmkit convert runs/mm mm.gguf --to gguf --gguf-type q8_0     # runs/mm: ssmkit train --pattern MM
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "convert"
HELP = "convert a checkpoint between ssmkit, Hugging Face and mamba_ssm formats, or to GGUF"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint or run directory, or Hugging Face repo id")
    parser.add_argument("dst", metavar="DST", help="output directory (--to gguf: a .gguf file or a directory)")
    parser.add_argument("--to", required=True, choices=["hf", "mamba_ssm", "ssmkit", "gguf"], help="output format")
    parser.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                        help="--to gguf: type of the projection and embedding matrices (default f32)")
    parser.add_argument("--force", action="store_true", help="overwrite a checkpoint already in DST")


def run(args: argparse.Namespace) -> int:
    from ssmkit.cli.args import CLIError, check_output_dir
    from ssmkit.models import from_pretrained, save_pretrained

    if args.to == "gguf":
        return _to_gguf(args)
    if args.gguf_type is not None:
        raise CLIError(f"--gguf-type applies to --to gguf only (got --to {args.to})")
    dst = check_output_dir("DST", args.dst)
    if (dst / "config.json").exists() and not args.force:
        raise CLIError(f"{dst} already holds a checkpoint; pass --force to overwrite it")
    if Path(args.src).exists() and dst.exists() and dst.resolve() == Path(args.src).resolve():
        raise CLIError("SRC and DST are the same directory")
    model = from_pretrained(args.src, dtype="auto")
    save_pretrained(model, dst, format=args.to, tokenizer=_source_tokenizer(model))
    print(f"converted {args.src} ({model.checkpoint_format}, {model.config.describe()}, "
          f"{model.num_parameters():,} parameters) -> {dst} ({args.to})")
    return 0


def _source_tokenizer(model):
    """The tokenizer of the model's checkpoint: its tokenizer.json, ssmkit's byte tokenizer when the
    checkpoint says so (ssmkit train writes that), else None."""
    from ssmkit.models.tokenizer import HFTokenizer, load_tokenizer

    tok = load_tokenizer(getattr(model, "checkpoint_path", None))
    src_dir = Path(getattr(model, "checkpoint_path", "") or ".")
    carry = isinstance(tok, HFTokenizer) or '"ssmkit_tokenizer": "bytes"' in _read(src_dir / "tokenizer_config.json")
    return tok if carry else None


def _to_gguf(args: argparse.Namespace) -> int:
    from ssmkit.cli.args import CLIError, check_output_dir, check_output_file
    from ssmkit.models import from_pretrained
    from ssmkit.models.formats.gguf import architecture, output_file, require_gguf, save_gguf

    out = output_file(args.dst)
    if out.parent == Path(args.dst):
        check_output_dir("DST", args.dst)
    else:
        check_output_file("DST", out)
    if out.exists() and not args.force:
        raise CLIError(f"{out} already exists; pass --force to overwrite it")
    require_gguf()  # the gguf package is needed: say so before loading the model
    model = from_pretrained(args.src, dtype="auto")
    architecture(model.config)  # a model GGUF cannot hold: one line, nothing written
    tok = _source_tokenizer(model)
    if tok is None:
        tok = _bytes_if_it_fits(model)
    dtype = args.gguf_type or "f32"
    path = save_gguf(model, args.dst, tokenizer=tok, dtype=dtype)
    vocab = type(tok).__name__ if tok is not None else "token ids only (no tokenizer)"
    print(f"converted {args.src} ({model.checkpoint_format}, {model.config.describe()}, "
          f"{model.num_parameters():,} parameters) -> {path} (gguf {dtype}, {vocab})")
    return 0


def _bytes_if_it_fits(model):
    """A checkpoint without tokenizer files: ssmkit reads its text as bytes (ssmkit generate does),
    so the byte tokenizer goes into the file when the vocabulary is the byte one (with or without
    end-of-text)."""
    from ssmkit.models.tokenizer import ByteTokenizer

    return ByteTokenizer() if model.config.vocab_size in (256, ByteTokenizer.vocab_size) else None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
