"""Next-token sampling: temperature, top-k, top-p (nucleus), min-p and a repetition penalty.

All filters work on ``logits (batch, vocab)`` with tensor ops only (no host synchronisation), so
they can run inside a captured decode step:

* temperature ``T``: ``p ∝ exp(logits / T)``; ``T == 0`` means greedy (argmax).
* top-k: keep the ``k`` largest logits (Fan et al., 2018).
* top-p: keep the smallest set of tokens whose probability sums to at least ``p`` (Holtzman et al.,
  2020); the most likely token is always kept.
* min-p: keep tokens with ``p >= min_p * max p`` (Nguyen et al., 2024).
* repetition penalty (Keskar et al., 2019, CTRL): logits of already-seen tokens are divided by
  ``penalty`` when positive and multiplied by it when negative.

Sampling draws ``argmax(p / E)`` with ``E ~ Exponential(1)``, which picks token ``i`` with
probability ``p_i`` (the exponential race) without ``torch.multinomial``'s synchronisation.
"""

from __future__ import annotations

import torch


def check_sampling_args(temperature: float, top_k: int | None, top_p: float, min_p: float,
                        repetition_penalty: float) -> None:
    """Raise ``ValueError`` naming the first argument that is out of range."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0 (0 or None = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(min_p, (int, float)) or not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1), got {min_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty!r}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits (batch, vocab)``, ``seen (batch, vocab)`` bool -> penalised logits (new tensor)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """Set the logits of filtered-out tokens to ``-inf`` (top-k, then top-p, then min-p)."""
    neg_inf = float("-inf")
    if top_k:
        k = min(int(top_k), logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg_inf)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, neg_inf)
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
           min_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from ``logits (batch, vocab)`` -> ``(batch,)`` int64."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p, min_p)
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)
