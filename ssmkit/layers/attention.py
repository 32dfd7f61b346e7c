"""Causal multi-head / grouped-query attention with rotary embeddings and a preallocated KV cache.

Attention (Vaswani et al., 2017): ``softmax(q kᵀ / sqrt(D)) v`` per head, causal, computed with
``torch.nn.functional.scaled_dot_product_attention``. Grouped-query attention (Ainslie et al.,
2023): ``n_kv_heads`` key/value heads each shared by ``n_heads / n_kv_heads`` query heads.

Rotary position embedding (RoPE, Su et al., 2021, eq. 34) on the first ``rope_dim`` channels of q
and k, GPT-NeoX layout (the two halves are rotated as pairs, not interleaved):
``[x1, x2] -> [x1 cos θ - x2 sin θ, x2 cos θ + x1 sin θ]`` with ``θ_i = pos · theta^(-2i/rope_dim)``.

Parameter names follow ``mamba_ssm``'s ``MHA`` (``in_proj`` packing [q, k, v] along its output,
``out_proj``), so hybrid checkpoints from it load without renaming.

Qwen3-Next options: ``qk_norm`` (``"rms"`` or ``"zero_centred_rms"``) RMS-normalises each query and
key head over ``head_dim`` before RoPE (weights ``q_norm`` / ``k_norm``, eps ``qk_norm_eps``);
``output_gate`` multiplies the attention output by ``sigmoid(gate)``, the gate being a second
``n_heads * head_dim`` block of ``in_proj`` (packed ``[q, gate, k, v]``).

KV cache (:class:`KVCacheState`): buffers of ``max_seqlen`` slots allocated once; ``step`` writes
the new key/value at slot ``offset`` with ``index_copy_`` and attends over all slots with a
validity mask, so a decode step has static shapes and no host synchronisation (CUDA-graph
friendly). Left padding: padded positions are written as invalid slots (never attended to) and
do not advance a row's RoPE position, so a left-padded prompt sees exactly what it sees alone.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit._checks import check_cu_seqlens, check_positive_int, check_tensor
from ssmkit.layers.linear import Linear
from ssmkit.layers.state import LayerState, context_parallel_group
from ssmkit.ops import context_parallel as cp

# mamba_ssm's MHA argument names -> ours (so an ``attn_cfg`` from a mamba_ssm config works).
ATTN_CFG_ALIASES = {
    "num_heads": "n_heads",
    "num_heads_kv": "n_kv_heads",
    "rotary_emb_dim": "rope_dim",
    "rotary_emb_base": "rope_theta",
    "qkv_proj_bias": "qkv_bias",
    "out_proj_bias": "out_bias",
}


def normalize_attn_cfg(cfg: dict) -> dict:
    """Rename ``mamba_ssm`` MHA keys to ours; reject the MHA options ssmkit does not implement."""
    out = {}
    for k, v in cfg.items():
        out[ATTN_CFG_ALIASES.get(k, k)] = v
    for k in ("d_conv", "mlp_dim"):
        if out.get(k):
            raise ValueError(f"attn_cfg[{k!r}]={out[k]!r} (mamba_ssm's conv/fused-MLP attention) is not supported")
        out.pop(k, None)
    if out.pop("rotary_emb_interleaved", False):
        raise ValueError("attn_cfg['rotary_emb_interleaved']=True is not supported (GPT-NeoX RoPE only)")
    if out.pop("causal", True) is not True:
        raise ValueError("attn_cfg['causal'] must be True in a language model")
    return out


@dataclasses.dataclass
class KVCacheState(LayerState):
    """KV cache of one attention layer.

    k, v: ``(batch, max_seqlen, n_kv_heads, head_dim)`` (model dtype); valid: ``(batch, max_seqlen)``
    bool, True where a slot holds a real token; pos: ``(batch,)`` int64, the RoPE position of each
    row's next token (its count of real tokens so far); offset: ``(batch,)`` int64, the next free
    slot (equal across rows).
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor
    offset: torch.Tensor

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    def bytes_per_slot(self) -> int:
        """Bytes one more token of capacity costs (k, v and the validity flag)."""
        b = self.k.shape[0]
        return (self.k[:, 0].numel() * self.k.element_size() + self.v[:, 0].numel() * self.v.element_size()
                + b * self.valid.element_size())


def _sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """SDPA on ``(B, H, L, D)`` queries and ``(B, Hkv, S, D)`` keys/values (GQA by repetition)."""
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


class Attention(nn.Module):
    """Causal MHA/GQA mixer with RoPE: ``(batch, seqlen, d_model) -> (batch, seqlen, d_model)``.

    ``n_heads`` defaults to ``max(1, d_model // 64)``, ``n_kv_heads`` to ``n_heads``, ``head_dim``
    to ``d_model // n_heads``, ``rope_dim`` to ``head_dim`` (0 turns RoPE off). ``max_seqlen`` is the
    default KV-cache capacity of ``allocate_state``.
    """

    def __init__(self, d_model: int, n_heads: int | None = None, n_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_theta: float = 10000.0, rope_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, softmax_scale: float | None = None,
                 max_seqlen: int = 2048, key_multiplier: float = 1.0, layer_idx: int | None = None,
                 qk_norm: str | None = None, qk_norm_eps: float = 1e-6, output_gate: bool = False,
                 device=None, dtype=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        n_heads = n_heads if n_heads is not None else max(1, d_model // 64)
        check_positive_int("n_heads", n_heads)
        n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        check_positive_int("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads={n_heads} must divide d_model={d_model} (or give head_dim)")
            head_dim = d_model // n_heads
        check_positive_int("head_dim", head_dim)
        rope_dim = head_dim if rope_dim is None else rope_dim
        if not (isinstance(rope_dim, int) and 0 <= rope_dim <= head_dim and rope_dim % 2 == 0):
            raise ValueError(f"rope_dim must be an even int in [0, head_dim={head_dim}], got {rope_dim!r}")
        check_positive_int("max_seqlen", max_seqlen)
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.rope_dim, self.rope_theta = rope_dim, float(rope_theta)
        self.softmax_scale = softmax_scale
        self.key_multiplier = float(key_multiplier)  # keys times this before RoPE (Falcon-H1)
        self.max_seqlen = max_seqlen
        self.layer_idx = layer_idx
        if qk_norm not in (None, "rms", "zero_centred_rms"):
            raise ValueError(f"qk_norm must be None, 'rms' or 'zero_centred_rms', got {qk_norm!r}")
        self.output_gate = bool(output_gate)
        n_q = 2 * n_heads if self.output_gate else n_heads
        self.in_proj = Linear(d_model, head_dim * (n_q + 2 * n_kv_heads), bias=qkv_bias,
                                 device=device, dtype=dtype)
        self.qk_norm = qk_norm
        if qk_norm:
            from ssmkit.layers.norm import RMSNorm, ZeroCentredRMSNorm

            cls = ZeroCentredRMSNorm if qk_norm == "zero_centred_rms" else RMSNorm
            self.q_norm = cls(head_dim, eps=qk_norm_eps, device=device, dtype=dtype)
            self.k_norm = cls(head_dim, eps=qk_norm_eps, device=device, dtype=dtype)
        self.out_proj = Linear(n_heads * head_dim, d_model, bias=out_bias, device=device, dtype=dtype)
        if rope_dim:
            inv_freq = rope_theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        else:
            self.inv_freq = None

    # ----------------------------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor):
        qkv = self.in_proj(x)
        hq, hk, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        if self.key_multiplier != 1.0:
            k = k * self.key_multiplier
        return (q.unflatten(-1, (hq, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d)))

    def _qkv_gate(self, x: torch.Tensor):
        """``(q, k, v, gate)`` per head, q/k normalised when ``qk_norm``; gate ``(..., n_heads * head_dim)`` or None."""
        if not self.output_gate and not self.qk_norm:
            return (*self._qkv(x), None)
        hq, hk, d = self.n_heads, self.n_kv_heads, self.head_dim
        gate = None
        if self.output_gate:
            q, gate, k, v = self.in_proj(x).split([hq * d, hq * d, hk * d, hk * d], dim=-1)
        else:
            q, k, v = self.in_proj(x).split([hq * d, hk * d, hk * d], dim=-1)
        if self.key_multiplier != 1.0:
            k = k * self.key_multiplier
        q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v, gate

    def _gated(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return o if gate is None else o * torch.sigmoid(gate.to(o.dtype))

    def _rope(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate ``t: (..., H, head_dim)`` at positions ``pos`` (shape ``t.shape[:-2]``)."""
        if not self.rope_dim:
            return t
        r = self.rope_dim
        # float32 angles (float64 for float64 inputs, so tests can compare at 1e-12)
        wd = torch.float64 if t.dtype == torch.float64 else torch.float32
        inv_freq = self.inv_freq if wd == torch.float32 else self.rope_theta ** (
            -torch.arange(0, r, 2, dtype=wd, device=t.device) / r)
        ang = pos.to(wd)[..., None] * inv_freq.to(t.device)  # (..., r/2)
        cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]
        tf = t.to(wd)
        x1, x2, rest = tf[..., : r // 2], tf[..., r // 2 : r], tf[..., r:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
        return out.to(t.dtype)

    def allocate_state(self, batch_size: int, device=None, dtype=None, max_seqlen: int | None = None) -> KVCacheState:
        """Zeroed KV cache with ``max_seqlen`` slots (default ``self.max_seqlen``)."""
        check_positive_int("batch_size", batch_size)
        max_seqlen = self.max_seqlen if max_seqlen is None else max_seqlen
        check_positive_int("max_seqlen", max_seqlen)
        device = device if device is not None else self.in_proj.weight.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        shape = (batch_size, max_seqlen, self.n_kv_heads, self.head_dim)
        return KVCacheState(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            valid=torch.zeros(batch_size, max_seqlen, device=device, dtype=torch.bool),
            pos=torch.zeros(batch_size, device=device, dtype=torch.long),
            offset=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    # ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: KVCacheState | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """``x: (batch, seqlen, d_model)`` -> ``y`` or ``(y, new_state)``; ``state`` is not modified."""
        check_tensor("x", x, 3, desc=f"(batch, seqlen, d_model={self.d_model})")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, seqlen, d_model={self.d_model}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        if mask is not None:
            check_tensor("mask", mask, floating=False, shape=(B, L), desc=f"(batch={B}, seqlen={L})")
            mask = mask.to(device=x.device, dtype=torch.bool)
        if state is not None and not isinstance(state, KVCacheState):
            raise TypeError(f"state must be a KVCacheState, got {type(state).__name__}")
        if state is not None and state.k.shape[0] != B:
            raise ValueError(f"state has batch {state.k.shape[0]} but x has batch {B}")
        group = context_parallel_group(self, state, mask)
        if group is not None:
            if return_state:
                raise ValueError("Attention: return_state cannot be combined with context parallelism")
            return self._forward_context_parallel(x, group, cu_seqlens)
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, B, L)
            if state is not None or mask is not None:
                raise ValueError("cu_seqlens cannot be combined with state or mask")
        q, k, v, gate = self._qkv_gate(x)
        dev = x.device
        base = state.pos if state is not None else torch.zeros(B, device=dev, dtype=torch.long)
        ar = torch.arange(L, device=dev)
        if mask is not None:
            # Real tokens are numbered 0, 1, ... per row; padding takes no position.
            pos = base[:, None] + (mask.long().cumsum(1) - 1).clamp_min(0)
        elif cu_seqlens is not None:
            cu = cu_seqlens.to(dev).long()
            seg = torch.searchsorted(cu[1:], ar, right=True)
            pos = (ar - cu[seg])[None]
        else:
            pos = base[:, None] + ar
        q, k = self._rope(q, pos), self._rope(k, pos)

        new_state = None
        if state is None:
            keys, vals = k, v
            attn_mask, is_causal = None, mask is None and cu_seqlens is None
            if not is_causal:
                allowed = ar[None, :] <= ar[:, None]  # (L, S) causal
                if cu_seqlens is not None:
                    allowed = allowed & (seg[None, :] == seg[:, None])
                allowed = allowed[None, None]
                if mask is not None:
                    # Padded keys are never seen; a padded query sees itself (avoids an all -inf row).
                    allowed = (allowed & mask[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=dev)
                attn_mask = allowed
            if return_state:
                new_state = self.allocate_state(B, device=dev, dtype=x.dtype, max_seqlen=max(L, self.max_seqlen))
                self._write(new_state, 0, k, v, mask, pos)
        else:
            off = int(state.offset[0])
            if off + L > state.max_seqlen:
                raise ValueError(
                    f"KV cache of attention layer {self.layer_idx} is full: {off} + {L} tokens > "
                    f"max_seqlen={state.max_seqlen}; allocate the cache with a larger max_seqlen"
                )
            new_state = state.clone()
            self._write(new_state, off, k, v, mask, pos)
            keys, vals = new_state.k[:, : off + L], new_state.v[:, : off + L]
            S = off + L
            qslot = off + ar
            allowed = (torch.arange(S, device=dev)[None, :] <= qslot[:, None])[None, None] \
                & new_state.valid[:, None, None, :S]
            allowed = allowed | (torch.arange(S, device=dev)[None, :] == qslot[:, None])[None, None]
            attn_mask, is_causal = allowed, False
        o = _sdpa(q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype), vals.transpose(1, 2).to(q.dtype),
                  attn_mask=attn_mask, is_causal=is_causal, scale=self.softmax_scale)
        y = self.out_proj(self._gated(o.transpose(1, 2).flatten(2), gate))
        return (y, new_state) if return_state else y

    def _forward_context_parallel(self, x: torch.Tensor, group, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """``x``: this rank's shard ``[start, end)`` of the sequence. Causal attention over the
        keys and values of positions ``< end``, all-gathered from the group (the gradient of each
        rank's keys and values is summed over the ranks that attended to them)."""
        B, L, _ = x.shape
        dev = x.device
        q, k, v, gate = self._qkv_gate(x)
        bounds = cp.shard_bounds(L, group, dev)
        r = cp.group_rank(group)
        start, end = bounds[r], bounds[r + 1]
        ar = torch.arange(end, device=dev)  # global positions up to this shard's end
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, B, bounds[-1])
            cu = cu_seqlens.to(dev).long()
            seg = torch.searchsorted(cu[1:], ar, right=True)
            pos = (ar - cu[seg])[None, start:]
        else:
            pos = ar[None, start:]
        q, k = self._rope(q, pos), self._rope(k, pos)
        kv = cp.all_gather_seq(torch.cat([k, v], -1), group=group, bounds=bounds, causal=True)  # (B, end, ...)
        keys, vals = kv.split([self.head_dim, self.head_dim], -1)
        allowed = ar[None, :] <= ar[start:, None]  # (L, end) causal, bottom-right aligned
        if cu_seqlens is not None:
            allowed = allowed & (seg[None, :] == seg[start:, None])
        o = _sdpa(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=allowed[None, None],
                  scale=self.softmax_scale)
        return self.out_proj(self._gated(o.transpose(1, 2).flatten(2), gate))

    @staticmethod
    def _write(st: KVCacheState, off: int, k, v, mask, pos) -> None:
        L = k.shape[1]
        st.k[:, off : off + L] = k.to(st.k.dtype)
        st.v[:, off : off + L] = v.to(st.v.dtype)
        st.valid[:, off : off + L] = True if mask is None else mask
        n_real = L if mask is None else mask.long().sum(1)
        st.pos += n_real
        st.offset += L

    def step(self, x_t: torch.Tensor, state: KVCacheState) -> torch.Tensor:
        """One token ``x_t: (batch, d_model)`` -> ``(batch, d_model)``; updates ``state`` in place.

        No host synchronisation: the slot index stays a device tensor.
        """
        check_tensor("x_t", x_t, 2, desc=f"(batch, d_model={self.d_model})")
        if not isinstance(state, KVCacheState):
            raise TypeError(f"state must be a KVCacheState, got {type(state).__name__}")
        q, k, v, gate = self._qkv_gate(x_t)  # (B, H, D)
        q, k = self._rope(q, state.pos), self._rope(k, state.pos)
        slot = state.offset[:1]
        state.k.index_copy_(1, slot, k[:, None].to(state.k.dtype))
        state.v.index_copy_(1, slot, v[:, None].to(state.v.dtype))
        state.valid.index_fill_(1, slot, True)
        o = self._decode_attention(q, state)
        state.pos += 1
        state.offset += 1
        return self.out_proj(self._gated(o.flatten(1).to(x_t.dtype), gate))

    def _decode_attention(self, q: torch.Tensor, state: KVCacheState) -> torch.Tensor:
        """One query per row over every cache slot, invalid slots masked: ``(B, H, D)``.

        Two einsums instead of SDPA: for a single query the CPU SDPA kernel's fixed overhead
        dominates (~10x slower here), and grouping heads avoids materialising repeated K/V for GQA.
        """
        B, H, D = q.shape
        hk = self.n_kv_heads
        wd = torch.float64 if q.dtype == torch.float64 else torch.float32
        qg = q.view(B, hk, H // hk, D).to(wd)
        scale = self.softmax_scale if self.softmax_scale is not None else D ** -0.5
        scores = torch.einsum("bkgd,bskd->bkgs", qg, state.k.to(wd)) * scale
        scores = scores.masked_fill(~state.valid[:, None, None, :], float("-inf"))
        o = torch.einsum("bkgs,bskd->bkgd", scores.softmax(-1), state.v.to(wd))
        return o.reshape(B, H, D)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, rope_dim={self.rope_dim}, rope_theta={self.rope_theta}")
