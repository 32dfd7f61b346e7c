"""Generate text from a checkpoint (ssmkit, Hugging Face or mamba_ssm format), streaming it.

MODEL is a checkpoint directory, a run directory of ssmkit train (its newest model), a Hugging
Face repo id, or a preset name (tiny-mamba ...: randomly initialised weights, for trying the
pipeline). Prints the prompt and the generated text as it comes, then tokens/s on stderr.

Examples:
  ssmkit generate runs/bytes --prompt "The state" --max-new-tokens 200 --temperature 0.8
  ssmkit generate state-spaces/mamba-130m-hf --prompt "Hello" --top-p 0.9 --temperature 0.7
  ssmkit generate runs/bytes --prompt "The state" --quantize int8     # int8 weights (CPU)
  ssmkit generate gated-deltanet-130m --prompt "The state" --device cuda --dtype bfloat16 --cuda-graph
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ssmkit.cli import args as A

NAME = "generate"
HELP = "generate text from a model checkpoint (streams text, prints tokens/s)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="checkpoint or run directory, Hugging Face repo id, or preset name")
    parser.add_argument("--prompt", type=A.utf8_text, required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=A.positive_int, default=64, help="tokens to generate at most")
    parser.add_argument("--temperature", type=A.float_range(0), default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=A.nonneg_int, default=0, help="sample from the k likeliest; 0 = off")
    parser.add_argument("--top-p", type=A.float_range(0, 1, lo_open=True), default=1.0,
                        help="nucleus sampling mass; 1 = off")
    parser.add_argument("--min-p", type=A.float_range(0, 1, hi_open=True), default=0.0,
                        help="drop tokens below min-p x the top probability; 0 = off")
    parser.add_argument("--repetition-penalty", type=A.float_range(0, lo_open=True), default=1.0,
                        help="> 1 discourages repeats; 1 = off")
    parser.add_argument("--seed", type=A.nonneg_int, default=None, help="seed for sampling (default: random)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    parser.add_argument("--device", type=A.device(allow_auto=False), default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                        help="weights dtype (auto: the checkpoint's)")
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="int8: weight-only int8 linear layers and LM head (CPU decoding, ~4x fewer bytes "
                             "per token than float32)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="decode through a captured CUDA graph (needs --device cuda; any model, "
                             "Mamba, Mamba-2, DeltaNet, attention and hybrids)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer JSON file or a directory with tokenizer.json "
                        "(default: the checkpoint's, else UTF-8 bytes)")


def available_memory(device: str) -> int | None:
    """Bytes free for new tensors on ``device`` (None when unknown)."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Each generated token is kept as its own small tensor until the end (measured: ~740 bytes).
_BYTES_PER_NEW_TOKEN = 768


def memory_needed(model, batch: int, prompt_len: int, max_new_tokens: int) -> int:
    """Bytes that generate() allocates for a run: the cache (KV caches grow with the length) and the
    ids of every generated token."""
    states = model.allocate_states(batch, prompt_len + max_new_tokens, device="meta")
    cache = sum(st.nbytes() for st in states if st is not None)
    return cache + batch * max_new_tokens * _BYTES_PER_NEW_TOKEN + batch * (prompt_len + max_new_tokens) * 8


def check_memory(model, batch: int, prompt_len: int, max_new_tokens: int, device: str) -> None:
    need = memory_needed(model, batch, prompt_len, max_new_tokens)
    have = available_memory(device)
    if have is not None and need > 0.9 * have:
        raise A.CLIError(f"--max-new-tokens {max_new_tokens} needs about {need:,} bytes ({need / 2**30:.1f} GiB) "
                         f"for the cache and the generated ids, more than the {have / 2**30:.1f} GiB free on "
                         f"{device}; ask for fewer tokens")


def _load(model_arg: str, device: str, dtype: str, quantize: str | None = None):
    import ssmkit
    from ssmkit.cli.args import CLIError
    from ssmkit.models.config import PRESETS

    if quantize is not None and not device.startswith("cpu"):
        raise CLIError(f"--quantize {quantize} runs on the CPU (PyTorch's int8 weight-only kernel); "
                       f"drop --device {device} or --quantize")
    if not Path(model_arg).exists() and model_arg in PRESETS:
        import torch

        model = ssmkit.LanguageModel(ssmkit.ModelConfig.from_name(model_arg)).eval()
        if dtype not in ("float32", "auto"):
            model = model.to(getattr(torch, dtype))
        if quantize is not None:
            ssmkit.models.quantize(model, quantize)
        model = model.to(device)
        model.note = f"[{model_arg}: randomly initialised weights]"
        return model, None
    model = ssmkit.from_pretrained(model_arg, device=device, dtype=None if dtype == "float32" else dtype,
                                   quantize=quantize)
    return model, getattr(model, "checkpoint_path", None)


def run(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.cli.args import CLIError
    from ssmkit.inference import generate
    from ssmkit.models.tokenizer import StreamDecoder, load_tokenizer

    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise CLIError(f"--tokenizer {args.tokenizer} does not exist")
    if args.tokenizer is not None and Path(args.tokenizer).is_dir() and \
            not (Path(args.tokenizer) / "tokenizer.json").exists():
        raise CLIError(f"--tokenizer {args.tokenizer}: the directory has no tokenizer.json")
    if getattr(args, "cuda_graph", False) and not args.device.startswith("cuda"):
        raise CLIError(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    model, ckpt_dir = _load(args.model, args.device, args.dtype, getattr(args, "quantize", None))
    tok = load_tokenizer(args.tokenizer or ckpt_dir, eos_token_id=model.config.eos_token_id)
    ids = tok.encode(args.prompt)
    if not ids:
        raise CLIError("--prompt is empty after tokenisation")
    if max(ids) >= model.config.padded_vocab_size:
        raise CLIError(f"the tokenizer produced id {max(ids)} >= the model's vocabulary "
                       f"{model.config.padded_vocab_size}; pass --tokenizer")
    check_memory(model, 1, len(ids), args.max_new_tokens, args.device)
    if getattr(model, "note", None):
        print(model.note, file=sys.stderr)
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
             streamer=on_token, tokenizer=tok, cuda_graph=getattr(args, "cuda_graph", False))
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
    note = "fixed size (SSM only)" if model.config.is_ssm_only else "SSM + attention KV cache"
    return note + (f"; {model.quantization} weights" if getattr(model, "quantization", None) else "")
