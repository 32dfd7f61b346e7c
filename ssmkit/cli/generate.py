"""Generate text from a checkpoint (ssmkit, Hugging Face or mamba_ssm format), streaming it.

MODEL is a checkpoint directory, a Hugging Face repo id, or a preset name (``tiny-mamba`` ...:
randomly initialised weights, for trying the pipeline). Prints the prompt and the generated text
as it comes, then tokens/s on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NAME = "generate"
HELP = "generate text from a model checkpoint (streams text, prints tokens/s)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory, Hugging Face repo id, or preset name")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json to use (default: the checkpoint's, else bytes)")


def _load(model_arg: str, device: str, dtype: str):
    import ssmkit
    from ssmkit.models.config import PRESETS

    if not Path(model_arg).exists() and model_arg in PRESETS:
        print(f"[{model_arg}: randomly initialised weights]", file=sys.stderr)
        return ssmkit.LanguageModel(ssmkit.ModelConfig.from_name(model_arg)).to(device).eval(), None
    model = ssmkit.from_pretrained(model_arg, device=device, dtype=None if dtype == "float32" else dtype)
    return model, getattr(model, "checkpoint_path", None)


def run(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.cli.main import CLIError
    from ssmkit.inference import generate
    from ssmkit.models.tokenizer import StreamDecoder, load_tokenizer

    if args.max_new_tokens <= 0:
        raise CLIError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
    model, ckpt_dir = _load(args.model, args.device, args.dtype)
    tok = load_tokenizer(args.tokenizer or ckpt_dir, eos_token_id=model.config.eos_token_id)
    ids = tok.encode(args.prompt)
    if not ids:
        raise CLIError("--prompt is empty after tokenisation")
    if max(ids) >= model.config.padded_vocab_size:
        raise CLIError(f"the tokenizer produced id {max(ids)} >= the model's vocabulary "
                       f"{model.config.padded_vocab_size}; pass --tokenizer")
    eos = None if args.ignore_eos else (model.config.eos_token_id if model.config.eos_token_id is not None
                                        else tok.eos_token_id)
    stream = StreamDecoder(tok, prefix_ids=ids)
    n_new = [0]
    t_first = [None]

    def on_token(t: torch.Tensor) -> None:
        if t_first[0] is None:
            t_first[0] = time.perf_counter()
        n_new[0] += 1
        tid = int(t[0])
        if eos is not None and tid == eos:
            return
        sys.stdout.write(stream.push([tid]))
        sys.stdout.flush()

    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    t0 = time.perf_counter()
    generate(model, torch.tensor([ids], device=args.device), max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p,
             repetition_penalty=args.repetition_penalty, eos_token_id=eos, stop=args.stop, seed=args.seed,
             streamer=on_token, tokenizer=tok)
    t1 = time.perf_counter()
    sys.stdout.write(stream.flush() + "\n")
    prefill_s = (t_first[0] or t1) - t0
    decode_n = max(n_new[0] - 1, 0)
    decode_s = t1 - (t_first[0] or t1)
    rate = decode_n / decode_s if decode_s > 0 else float("nan")
    print(f"[{len(ids)} prompt tokens in {prefill_s:.3f} s; {n_new[0]} new tokens, decode {rate:.1f} tokens/s; "
          f"state {_state_note(model)}]", file=sys.stderr)
    return 0


def _state_note(model) -> str:
    return "fixed size (SSM only)" if model.config.is_ssm_only else "SSM + attention KV cache"
