"""The two stages of generation: ``prefill`` the prompt into a preallocated cache, then
``decode_one_token`` per step (used by :func:`ssmkit.inference.generate.generate` and by the
CUDA-graph decoder, :mod:`ssmkit.inference.cuda_graph`)."""

from __future__ import annotations

import torch

from ssmkit.inference.cache import InferenceCache


def prefill(model, input_ids: torch.Tensor, cache: InferenceCache,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt ``input_ids (batch, seqlen)`` through ``model``, filling ``cache`` in place.

    Also continues from a non-empty cache with a multi-token chunk. Returns the last position's
    logits ``(batch, padded_vocab)`` (left padding keeps the last position a real token).
    """
    # Only the last position's logits are needed: skip the (batch, seqlen, vocab) head.
    out = model(input_ids, cache=cache, attention_mask=attention_mask, logits_to_keep=1)
    return out.logits[:, -1]


def decode_one_token(model, token: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """One decoding step: ``token (batch,)`` int64 -> logits ``(batch, padded_vocab)``.

    Updates ``cache`` in place with static shapes and no host synchronisation (CUDA-graph safe).
    """
    logits = model.step(token, cache)
    cache.advance(1)
    return logits
