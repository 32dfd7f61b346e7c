"""Generation: ``prefill`` the prompt into a preallocated cache, then ``decode_one_token`` per step.

Decoding an SSM layer costs O(1) time and memory per token (the recurrent view of the SSM), so an
SSM-only model generates with a fixed-size state; attention layers read and extend their KV
cache. Batched prompts of different lengths are left padded with an ``attention_mask``: padding
never enters a state, so every row generates what its prompt generates alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ssmkit._checks import check_positive_int
from ssmkit.inference.cache import InferenceCache, allocate_cache
from ssmkit.inference.sampling import apply_repetition_penalty, check_sampling_args, sample
from ssmkit.inference.stages import decode_one_token, prefill  # noqa: F401  (part of this module's API)


def _stop_ids(stop: Any, tokenizer: Any) -> tuple[list[list[int]], list[str]]:
    if stop is None:
        return [], []
    if isinstance(stop, (str, bytes)) or (isinstance(stop, Sequence) and stop and isinstance(stop[0], int)):
        stop = [stop]
    seqs, strings = [], []
    for s in stop:
        if isinstance(s, str):
            if tokenizer is None:
                raise ValueError(f"stop string {s!r} needs a tokenizer: pass tokenizer=... (or token-id lists)")
            strings.append(s)
        elif isinstance(s, Sequence) and s and all(isinstance(t, int) for t in s):
            seqs.append(list(s))
        else:
            raise ValueError(f"stop must be strings or non-empty lists of token ids, got {s!r}")
    return seqs, strings


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             stop: Any = None, seed: int | None = None, streamer: Any = None,
             attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
             pad_token_id: int | None = None, cache: InferenceCache | None = None,
             cuda_graph: bool = False) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids (batch, seqlen)``.

    Returns ``(batch, seqlen + n_new)`` int64: the prompt followed by the generated tokens; rows
    that finished early (``eos_token_id`` or a ``stop`` sequence) are filled with ``pad_token_id``
    (default: the EOS id, else 0). ``temperature == 0`` (the default) is greedy decoding.
    ``stop``: strings (need ``tokenizer``) or lists of token ids; generation of a row ends right after
    one appears. ``streamer``: an object with ``put(ids)``/``end()`` (Hugging Face's ``TextStreamer``
    protocol: the prompt first, then each new ``(batch,)`` token tensor) or a callable receiving each
    new ``(batch,)`` token tensor. ``seed`` makes sampling reproducible. ``cache``: continue from a
    cache that already holds a previous context (``input_ids`` are then the new tokens).
    ``cuda_graph``: on CUDA, capture the decode step once and replay it for every new token
    (:class:`ssmkit.inference.cuda_graph.CUDAGraphDecoder`); same tokens as eager decoding.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seqlen) tensor of token ids, got {got}")
    check_positive_int("max_new_tokens", max_new_tokens)
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape[1] > 0 and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask must use left padding (the last position of every row must be a token)")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    stop_seqs, stop_strings = _stop_ids(stop, tokenizer)

    device = model.device
    ids = input_ids.to(device).long()
    B, L = ids.shape
    vocab = model.config.vocab_size
    if cache is None:
        cache = allocate_cache(model, B, L + max_new_tokens, device=device)
    elif cache.batch_size != B:
        raise ValueError(f"cache has batch {cache.batch_size} but input_ids has batch {B}")
    elif not model.config.is_ssm_only and cache.seqlen_offset + L + max_new_tokens - 1 > cache.max_seqlen:
        raise ValueError(
            f"cache holds {cache.seqlen_offset} tokens of max_seqlen={cache.max_seqlen}: no room for "
            f"{L} more + max_new_tokens={max_new_tokens}; allocate it larger")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))

    seen = None
    if repetition_penalty != 1.0:
        real = torch.ones_like(ids, dtype=torch.int32) if attention_mask is None else \
            (attention_mask.to(device) != 0).to(torch.int32)
        counts = torch.zeros(B, model.config.padded_vocab_size, dtype=torch.int32, device=device)
        seen = counts.scatter_add_(1, ids, real) > 0  # padding tokens do not count as seen
    eos_t = torch.tensor(eos, device=device, dtype=torch.long) if eos else None

    put = getattr(streamer, "put", None)
    if put is not None:
        put(ids.cpu())
    logits = prefill(model, ids, cache, attention_mask)
    decoder = None
    if cuda_graph:
        from ssmkit.inference.cuda_graph import CUDAGraphDecoder

        decoder = CUDAGraphDecoder(model, cache)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        logits = logits[:, :vocab]  # never sample the embedding's padding rows
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen[:, :vocab], repetition_penalty)
        tok = sample(logits, temperature, top_k, top_p, min_p, generator=gen)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        new_tokens.append(tok)
        if put is not None:
            put(tok.cpu())
        elif callable(streamer):
            streamer(tok)
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if eos_t is not None:
            finished |= torch.isin(tok, eos_t)
        if stop_seqs or stop_strings:
            finished |= _hit_stop(torch.stack(new_tokens, 1), finished, stop_seqs, stop_strings, tokenizer)
        if (eos_t is not None or stop_seqs or stop_strings) and bool(finished.all()):
            break
        if t + 1 < max_new_tokens:
            # The graph's output buffer is overwritten by the next replay: clone it.
            logits = decoder(tok).clone() if decoder is not None else decode_one_token(model, tok, cache)
    if decoder is not None:
        decoder.close()
    end = getattr(streamer, "end", None)
    if end is not None:
        end()
    return torch.cat([ids, torch.stack(new_tokens, 1)], dim=1)


def _hit_stop(gen: torch.Tensor, finished: torch.Tensor, seqs: list[list[int]], strings: list[str],
              tokenizer: Any) -> torch.Tensor:
    """Rows whose generated tokens now end with a stop sequence / contain a stop string."""
    hit = torch.zeros_like(finished)
    rows = gen.tolist()
    for b, row in enumerate(rows):
        if bool(finished[b]):
            continue
        if any(len(row) >= len(s) and row[-len(s):] == s for s in seqs):
            hit[b] = True
        elif strings:
            text = tokenizer.decode(row)
            if any(s in text for s in strings):
                hit[b] = True
    return hit
