"""Decoding with the whole decode step captured in one CUDA graph (static cache buffers).

A decode step of :class:`ssmkit.LanguageModel` (``model.step(token, cache)``) launches a few
kernels per layer; at batch 1 the launch overhead, not the GPU, sets the speed. The cache is
allocated once and updated in place (fixed addresses), and ``step`` has static shapes and no host
synchronisation, so the step can be recorded once and replayed per token::

    dec = CUDAGraphDecoder(model, cache)      # captures on first use
    logits = dec(token)                        # copy token in, replay, advance cache.seqlen_offset

Works for Mamba models and hybrids with attention. For attention layers the graph uses a decode
attention on SDPA over the static KV cache (invalid slots masked), installed per layer instance
only while the decoder lives (see :func:`sdpa_decode_attention`).

Generation hook: :func:`generate_cuda_graph` is ``ssmkit.generate`` with ``decode_one_token``
replaced by the graph; ``ssmkit.inference.generate`` can route ``cuda_graph=True`` to it.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CUDAGraphDecoder", "clear_graphs", "generate_cuda_graph", "sdpa_decode_attention"]


def sdpa_decode_attention(self, q: torch.Tensor, state) -> torch.Tensor:
    """One query per row over the static KV cache with SDPA: ``q (B, H, D) -> (B, H, D)``.

    Keys/values stay in the model dtype (no float32 copy of the cache per step); invalid slots
    are masked; grouped-query heads attend through a ``(B, Hkv, G, D)`` view (no repeated K/V).
    """
    B, H, D = q.shape
    hk = self.n_kv_heads
    qg = q.view(B, hk, H // hk, D).to(state.k.dtype)  # (B, Hkv, G, D): G queries per KV head
    k = state.k.transpose(1, 2)  # (B, Hkv, S, D)
    v = state.v.transpose(1, 2)
    mask = state.valid[:, None, None, :]  # (B, 1, 1, S)
    scale = self.softmax_scale if self.softmax_scale is not None else D ** -0.5
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return o.reshape(B, H, D)


class CUDAGraphDecoder:
    """Capture ``model.step(token, cache)`` once; replay it for each new token.

    ``cache``: an :class:`~ssmkit.inference.InferenceCache` (after ``prefill``); its buffers must
    not be reallocated while the decoder is used. ``attention``: "sdpa" swaps each attention
    layer's decode attention for :func:`sdpa_decode_attention` (the default), "model" keeps it.
    """

    def __init__(self, model, cache, attention: str = "sdpa", warmup: int = 2):
        if not torch.cuda.is_available() or model.device.type != "cuda":
            raise ValueError("CUDAGraphDecoder needs the model on a CUDA device")
        if attention not in ("sdpa", "model"):
            raise ValueError(f"attention must be 'sdpa' or 'model', got {attention!r}")
        self.model, self.cache = model, cache
        self.batch = cache.batch_size
        self._patched = []
        if attention == "sdpa":
            for m in model.modules():
                if hasattr(m, "_decode_attention") and hasattr(m, "n_kv_heads"):
                    m._decode_attention = types.MethodType(sdpa_decode_attention, m)
                    self._patched.append(m)
        self.token = torch.zeros(self.batch, dtype=torch.long, device=model.device)
        self.graph = None
        self.logits = None
        self._warmup = warmup

    def _capture(self) -> None:
        saved = self.cache.clone()  # warm-up steps advance the states: restore them afterwards
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(self._warmup):  # compile Triton kernels, pick cuBLAS algorithms
                self.model.step(self.token, self.cache)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self.model.step(self.token, self.cache)
        # Capture records without running; the warm-up ran for real: put the states back.
        for a, b in zip(self.cache.states, saved.states):
            a.copy_(b)
        del saved

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """``token (batch,)`` -> logits ``(batch, padded_vocab)`` (a static buffer: copy to keep)."""
        if self.graph is None:
            self._capture()
        self.token.copy_(token)
        self.graph.replay()
        self.cache.advance(1)
        return self.logits

    def close(self) -> None:
        """Drop the graph and restore the attention layers' own decode attention."""
        for m in self._patched:
            if "_decode_attention" in vars(m):
                del m._decode_attention
        self._patched = []
        self.graph = None


@torch.inference_mode()
def generate_cuda_graph(model, input_ids: torch.Tensor, max_new_tokens: int = 32,
                        temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                        min_p: float = 0.0, seed: int | None = None, cache: Any = None,
                        attention_mask: torch.Tensor | None = None,
                        attention: str = "sdpa") -> torch.Tensor:
    """Prefill, then decode ``max_new_tokens - 1`` steps through a captured CUDA graph.

    Same result as ``ssmkit.generate`` for these arguments (greedy by default); returns
    ``(batch, seqlen + max_new_tokens)``. No early stop (a fixed number of steps, as in
    benchmarks); use ``ssmkit.generate`` for EOS/stop handling. Without ``cache``, the cache and
    the graph are kept per (model, batch, prompt + new tokens) and reused by later calls.
    """
    from ssmkit.inference.cache import allocate_cache
    from ssmkit.inference.generate import prefill
    from ssmkit.inference.sampling import sample

    ids = input_ids.to(model.device).long()
    B, L = ids.shape
    dec = None
    if cache is None:
        # Reuse the cache buffers and the captured graph across calls of the same geometry.
        key = (id(model), B, L + max_new_tokens, attention)
        dec = _DECODERS.get(key)
        if dec is not None and dec.model is model:
            cache = dec.cache.reset()
        else:
            cache = allocate_cache(model, B, L + max_new_tokens, device=model.device)
            dec = None
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(int(seed))
    vocab = model.config.vocab_size
    logits = prefill(model, ids, cache, attention_mask)
    if dec is None:
        dec = CUDAGraphDecoder(model, cache, attention=attention)
        if len(_DECODERS) >= 4:
            _DECODERS.pop(next(iter(_DECODERS))).close()
        _DECODERS[(id(model), B, cache.max_seqlen, attention)] = dec
    out = []
    for t in range(max_new_tokens):
        tok = sample(logits[:, :vocab], temperature, top_k, top_p, min_p, generator=gen)
        out.append(tok)
        if t + 1 < max_new_tokens:
            logits = dec(tok)
    return torch.cat([ids, torch.stack(out, 1)], dim=1)


_DECODERS: dict[tuple, CUDAGraphDecoder] = {}


def clear_graphs() -> None:
    """Release every cached decoder (graphs, caches) kept by :func:`generate_cuda_graph`."""
    while _DECODERS:
        _DECODERS.popitem()[1].close()
