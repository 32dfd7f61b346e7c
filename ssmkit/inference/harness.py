"""A model for EleutherAI's lm-evaluation-harness (``pip install 'ssmkit[lm_eval]'``).

:func:`harness_model` wraps a :class:`~ssmkit.LanguageModel` and its tokenizer as an
``lm_eval.api.model.LM``, so any harness task runs on it::

    import lm_eval
    from ssmkit.inference.harness import harness_model

    lm = harness_model(ssmkit.from_pretrained("runs/bytes"), batch_size=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

The three request types, each batched (requests of similar length together, left padded with an
``attention_mask``, as :func:`ssmkit.generate` pads prompts):

- ``loglikelihood(context, continuation)``: the sum of log p(continuation token | everything
  before it), and whether greedy decoding gives the continuation.
- ``loglikelihood_rolling(text)``: the log-likelihood of the whole text after the end-of-text
  (or BOS) token. The text runs through the inference cache in chunks, so every token is scored
  with the whole text before it (no sliding windows): the state carries the context, and the
  logits of only one chunk are held at a time.
- ``generate_until(context, {until, max_gen_toks, ...})``: :func:`ssmkit.generate` (greedy unless
  the task asks for sampling), cut at the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ssmkit._checks import check_positive_int
from ssmkit.inference.cache import allocate_cache
from ssmkit.inference.generate import generate

# Logits held per chunk: batch x chunk x vocabulary float32 numbers (about 256 MiB).
_LOGITS_BUDGET = 2**26


def _lm_base() -> type:
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError("the lm-evaluation-harness model needs the lm_eval package: "
                          "pip install 'ssmkit[lm_eval]'") from e
    return LM


_CLASSES: dict[type, type] = {}


def harness_model(model, tokenizer: Any = None, batch_size: int = 8, max_gen_toks: int = 256,
                  chunk_size: int | None = None):
    """``model`` (a :class:`~ssmkit.LanguageModel`) as an lm-evaluation-harness ``LM``.

    tokenizer: an object with ``encode``/``decode``/``eos_token_id`` (default: the checkpoint's
    ``tokenizer.json`` when the model was loaded from a directory, else UTF-8 bytes).
    batch_size: requests per forward pass. max_gen_toks: tokens ``generate_until`` makes when a
    task does not say. chunk_size: positions per forward pass when scoring (default: as many as
    keep the batch's logits near 256 MiB).
    """
    base = _lm_base()
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type("SSMKitLM", (HarnessLM, base), {})
    return cls(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks, chunk_size=chunk_size)


class HarnessLM:
    """The request handlers; :func:`harness_model` mixes them into ``lm_eval``'s ``LM`` class."""

    def __init__(self, model, tokenizer: Any = None, *, batch_size: int = 8, max_gen_toks: int = 256,
                 chunk_size: int | None = None):
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_gen_toks", max_gen_toks)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        if not hasattr(model, "config") or not hasattr(model, "allocate_states"):
            raise TypeError(f"model must be an ssmkit LanguageModel, got {type(model).__name__}")
        if tokenizer is None:
            from ssmkit.models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(getattr(model, "checkpoint_path", None),
                                       eos_token_id=model.config.eos_token_id)
        for attr in ("encode", "decode"):
            if not callable(getattr(tokenizer, attr, None)):
                raise TypeError(f"tokenizer must have encode() and decode(), got {type(tokenizer).__name__}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.chunk_size = chunk_size
        eos = model.config.eos_token_id
        self.eos_token_id = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
        bos = getattr(tokenizer, "bos_token_id", None)
        prefix = self.eos_token_id if self.eos_token_id is not None else bos
        if prefix is None:
            raise ValueError("the tokenizer has no end-of-text or BOS token to start a text with; "
                             "pass a tokenizer that has one")
        self.prefix_token_id = prefix

    # ---------------------------------------------------------------------------------------
    # lm_eval's LM interface
    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args[:2]) for r in requests]
        return self._cached("loglikelihood", requests, self.score(pairs))

    def loglikelihood_rolling(self, requests) -> list[float]:
        pairs = [([self.prefix_token_id], self.tokenizer.encode(r.args[0])) for r in requests]
        return self._cached("loglikelihood_rolling", requests, [lp for lp, _ in self.score(pairs)])

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(_gen_kwargs(r.args[1]).items())), []).append(i)
        for idx in groups.values():
            kw = _gen_kwargs(requests[idx[0]].args[1])
            prompts = [self.tokenizer.encode(requests[i].args[0]) or [self.prefix_token_id] for i in idx]
            texts = self._generate(prompts, kw)
            for i, text in zip(idx, texts):
                out[i] = text
        return self._cached("generate_until", requests, out)

    def _cached(self, kind: str, requests, results: list) -> list:
        """Hand each result to the harness's request cache (``--use_cache``), then return them."""
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            for r, res in zip(requests, results):
                hook.add_partial(kind, r.args, res)
        return results

    # ---------------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of the context and of the continuation, tokenised together (as the harness's
        Hugging Face model does: trailing spaces of the context move to the continuation)."""
        if context == "":
            return [self.prefix_token_id], self.tokenizer.encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx):]

    @torch.inference_mode()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` for each ``(context ids, continuation ids)``."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx:
                raise ValueError(f"request {i}: the context has no tokens (start it with the end-of-text token)")
            if not cont:
                results[i] = (0.0, True)
        todo = sorted((i for i, r in enumerate(results) if r is None),
                      key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            for i, res in zip(batch, self._score_batch([pairs[i] for i in batch])):
                results[i] = res
        return results  # type: ignore[return-value]

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        model = self.model
        device, vocab = model.device, model.config.vocab_size
        rows = [(ctx + cont)[:-1] for ctx, cont in pairs]
        targets = [(ctx + cont)[1:] for ctx, cont in pairs]
        B, T = len(rows), max(len(r) for r in rows)
        ids = torch.zeros(B, T, dtype=torch.long)
        tgt = torch.zeros(B, T, dtype=torch.long)
        scored = torch.zeros(B, T, dtype=torch.bool)  # positions whose next token is the continuation
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, ((_, cont), row, t) in enumerate(zip(pairs, rows, targets)):
            ids[b, T - len(row):] = torch.tensor(row)
            tgt[b, T - len(row):] = torch.tensor(t)
            mask[b, T - len(row):] = 1
            scored[b, T - len(cont):] = True
        ids, tgt, scored = ids.to(device), tgt.to(device), scored.to(device)
        chunk = self.chunk_size or max(16, _LOGITS_BUDGET // (B * model.config.padded_vocab_size))
        # The first chunk holds all the padding (so later chunks need no mask) and one token of each row.
        first = min(T, max(chunk, T - min(len(r) for r in rows) + 1))
        cache = allocate_cache(model, B, T, device=device)
        logprob = torch.zeros(B, dtype=torch.float64, device=device)
        greedy = torch.ones(B, dtype=torch.bool, device=device)
        first_scored = T - max(len(cont) for _, cont in pairs)
        s = 0
        while s < T:
            e = first if s == 0 else min(T, s + chunk)
            keep = e - max(s, min(first_scored, e - 1))  # no logits before the first scored position
            m = mask[:, s:e].to(device) if s == 0 else None
            logits = model(ids[:, s:e], cache=cache, attention_mask=m, logits_to_keep=keep).logits
            logits = logits[..., :vocab].float()
            lo = e - logits.shape[1]
            t, sc = tgt[:, lo:e], scored[:, lo:e]
            lp = torch.log_softmax(logits, -1).gather(-1, t[..., None])[..., 0]
            logprob += torch.where(sc, lp, torch.zeros_like(lp)).sum(1).double()
            greedy &= ((logits.argmax(-1) == t) | ~sc).all(1)
            s = e
        return [(float(lp), bool(g)) for lp, g in zip(logprob.tolist(), greedy.tolist())]

    def _generate(self, prompts: list[list[int]], kw: dict[str, Any]) -> list[str]:
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
        top_p = float(kw.pop("top_p", 1.0) or 1.0) if do_sample else 1.0
        top_k = kw.pop("top_k", None) if do_sample else None
        if not until and self.eos_token_id is not None:
            until = [self.tokenizer.decode([self.eos_token_id])]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[str | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            L = max(len(prompts[i]) for i in batch)
            ids = torch.zeros(len(batch), L, dtype=torch.long)
            mask = torch.zeros(len(batch), L, dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, L - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[b, L - len(prompts[i]):] = 1
            stop = [s for s in until if s]
            gen = generate(self.model, ids, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                           top_k=top_k, eos_token_id=self.eos_token_id, stop=stop or None,
                           tokenizer=self.tokenizer if stop else None, attention_mask=mask)
            for b, i in enumerate(batch):
                out[i] = _cut(self._decode_new(gen[b, L:].tolist()), stop)
        return [t for t in out if t is not None]

    def _decode_new(self, new: list[int]) -> str:
        if self.eos_token_id is not None and self.eos_token_id in new:
            new = new[:new.index(self.eos_token_id)]
        return self.tokenizer.decode(new)


def _gen_kwargs(kw: Any) -> dict[str, Any]:
    if kw is None:
        return {}
    if not isinstance(kw, dict):
        raise ValueError(f"generate_until: expected a dict of generation settings, got {type(kw).__name__}")
    return dict(kw)


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to the first stop string."""
    for s in stops:
        if s in text:
            text = text.split(s, 1)[0]
    return text


__all__ = ["harness_model", "HarnessLM"]
