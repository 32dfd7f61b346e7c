"""Decoding with the whole decode step captured in one CUDA graph (static cache buffers).

A decode step of :class:`ssmkit.LanguageModel` (``model.step(token, cache)``) launches a few
kernels per layer; at batch 1 the launch overhead, not the GPU, sets the speed. The cache is
allocated once and updated in place (fixed addresses), and ``step`` has static shapes and no host
synchronisation, so the step can be recorded once and replayed per token::

    dec = CUDAGraphDecoder(model, cache)      # captures on first use
    logits = dec(token)                        # copy token in, replay, advance cache.seqlen_offset

Works for Mamba, Mamba-2, Mamba-3 (SISO and MIMO), DeltaNet and Gated DeltaNet models and their
hybrids with attention, with the steps' default forms and with Triton forced
(``SSMKIT_BACKEND=triton``: the fused delta-rule and Mamba-3 decode kernels). For attention layers the graph uses a decode attention on SDPA over the
static KV cache (invalid slots masked), installed per layer instance only while the decoder lives
(see :func:`sdpa_decode_attention`).

Generation hook: :func:`generate_cuda_graph` is ``ssmkit.generate`` with ``decode_one_token``
replaced by the graph; ``ssmkit.inference.generate`` can route ``cuda_graph=True`` to it.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CUDAGraphDecoder", "CUDAGraphPrefill", "clear_graphs", "generate_cuda_graph",
           "sdpa_decode_attention"]


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
        self.prefills: dict[int, CUDAGraphPrefill] = {}  # captured prefills, by prompt length
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
        self.prefills = {}


@torch.inference_mode()
def generate_cuda_graph(model, input_ids: torch.Tensor, max_new_tokens: int = 32,
                        temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                        min_p: float = 0.0, seed: int | None = None, cache: Any = None,
                        attention_mask: torch.Tensor | None = None,
                        attention: str = "sdpa", prefill_graph: bool | None = None) -> torch.Tensor:
    """Prefill, then decode ``max_new_tokens - 1`` steps through a captured CUDA graph.

    Same result as ``ssmkit.generate`` for these arguments (greedy by default); returns
    ``(batch, seqlen + max_new_tokens)``. No early stop (a fixed number of steps, as in
    benchmarks); use ``ssmkit.generate`` for EOS/stop handling. Without ``cache``, the cache and
    the graph are kept per (model, batch, prompt + new tokens) and reused by later calls.

    ``prefill_graph``: also capture the prefill (:class:`CUDAGraphPrefill`) on the first call of a
    geometry and replay it on later calls with the same prompt shape (no ``attention_mask``, no
    ``cache`` given). ``None`` (default): for models of Mamba or Mamba-2 layers only when batch x
    prompt length <= ``PREFILL_GRAPH_MAX_TOKENS``. The first call then costs one more host pass over the prefill.
    """
    from ssmkit.inference.cache import allocate_cache
    from ssmkit.inference.sampling import sample
    from ssmkit.inference.stages import prefill

    ids = input_ids.to(model.device).long()
    B, L = ids.shape
    if prefill_graph is None:
        prefill_graph = B * L <= PREFILL_GRAPH_MAX_TOKENS and _prefill_capturable(model)
    # a captured prefill only with the cache this function keeps (and no padding mask)
    graphed = bool(prefill_graph) and attention_mask is None and cache is None
    dec = pre = None
    if cache is None:
        # Reuse the cache buffers and the captured graph across calls of the same geometry.
        key = (id(model), B, L + max_new_tokens, attention)
        dec = _DECODERS.get(key)
        if dec is not None and dec.model is model:
            cache = dec.cache
            pre = dec.prefills.get(L) if graphed else None
            if pre is None:
                cache.reset()  # (a captured prefill resets the cache itself)
        else:
            cache = allocate_cache(model, B, L + max_new_tokens, device=model.device)
            dec = None
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(int(seed))
    vocab = model.config.vocab_size
    logits = pre(ids) if pre is not None else prefill(model, ids, cache, attention_mask)
    if dec is None:
        dec = CUDAGraphDecoder(model, cache, attention=attention)
        if len(_DECODERS) >= 4:
            _DECODERS.pop(next(iter(_DECODERS))).close()
        _DECODERS[(id(model), B, cache.max_seqlen, attention)] = dec
    if graphed and L not in dec.prefills:
        # after the eager prefill above: Triton kernels compiled, cuBLAS initialised
        dec.prefills[L] = CUDAGraphPrefill(model, cache, ids)
    out = []
    for t in range(max_new_tokens):
        tok = sample(logits[:, :vocab], temperature, top_k, top_p, min_p, generator=gen)
        out.append(tok)
        if t + 1 < max_new_tokens:
            logits = dec(tok)
    return torch.cat([ids, torch.stack(out, 1)], dim=1)


class CUDAGraphPrefill:
    """``prefill(model, ids, cache)`` for one prompt shape, captured in a CUDA graph.

    At batch 1 a prefill is bound by the host: about twenty launches per layer, each with its
    Python and launch overhead (H100, Mamba-1.4B, 2,048 tokens: ~50 ms of wall time for ~20 ms of
    kernels). Replaying a captured graph leaves only the kernels. The graph covers the cache
    reset too; ``ids`` are copied into a static buffer (range-checked first). Capturing costs
    about one eager prefill, so :func:`generate_cuda_graph` keeps one per prompt shape it meets.
    """

    def __init__(self, model, cache, ids: torch.Tensor):
        from ssmkit.inference.stages import prefill

        self.model, self.cache = model, cache
        self.ids = ids.detach().clone()
        offset = cache.seqlen_offset  # capture records without running: the states stay as
        self.graph = torch.cuda.CUDAGraph()  # they are, only the host bookkeeping moves
        try:
            with torch.cuda.graph(self.graph), torch.inference_mode():
                cache.reset()
                self.logits = prefill(model, self.ids, cache)
        finally:
            cache.seqlen_offset = offset

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Prefill ``ids`` (the captured shape) into the cache; returns the last position's
        logits (a static buffer)."""
        from ssmkit.models.lm import _check_ids

        _check_ids("input_ids", ids, self.model.config.padded_vocab_size, 2)
        self.ids.copy_(ids)
        self.graph.replay()
        self.cache.seqlen_offset = ids.shape[1]
        return self.logits


# Prompts up to this many tokens (batch x seqlen) get a captured prefill in generate_cuda_graph:
# below it the host sets the prefill's speed; above it the kernels do (and the graph's memory
# pool would hold large activations).
PREFILL_GRAPH_MAX_TOKENS = 8192

_DECODERS: dict[tuple, CUDAGraphDecoder] = {}


def _prefill_capturable(model) -> bool:
    """Whether the automatic prefill capture applies: Mamba and Mamba-2 layers only (no
    attention, MLP, MoE or shared block), whose prefill is known to run without host
    synchronisation. A failed capture would leave CUDA's random-number state mid-capture, so other
    models only capture when asked. (An attention layer's prefill into a cache reads the cache's
    fill level back to the host to size its key window: not capturable.)"""
    from ssmkit.layers.mamba import Mamba
    from ssmkit.layers.mamba2 import Mamba2

    def ok(blk) -> bool:
        mixer = blk.mixer
        if blk.mlp_kind != "none" or getattr(blk, "shared_use", None) is not None:
            return False
        if isinstance(mixer, Mamba):
            return getattr(mixer, "inner_name", "s6") == "s6"
        return isinstance(mixer, Mamba2)

    layers = getattr(getattr(model, "backbone", None), "layers", None)
    return bool(layers) and all(ok(blk) for blk in layers)


def clear_graphs() -> None:
    """Release every cached decoder (graphs, caches) kept by :func:`generate_cuda_graph`."""
    while _DECODERS:
        _DECODERS.popitem()[1].close()
