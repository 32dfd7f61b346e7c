"""DeltaNet and Gated DeltaNet mixers (Yang et al. 2024; Yang, Kautz & Hatamizadeh 2024).

Data flow for ``x: (batch, seqlen, d_model)`` with H heads of key size K and value size V::

    q, k, v = q_proj(x), k_proj(x), v_proj(x)
    [q | k | v] -> causal depthwise conv (short convolution) -> SiLU
    q, k -> L2-normalised per head; q scaled by K^-1/2
    β = sigmoid(b_proj(x))                                       write strength in (0, 1)
    gated only: g = -exp(A_log) * softplus(a_proj(x) + dt_bias)  log decay, Mamba-2 style
    o = delta_rule(q, k, v, beta=β, g=g)                         ssmkit.ops.delta_rule
    o = RMSNorm(o) * silu(g_proj(x))   per head                   output norm and gate
    o_proj(o)

The L2 normalisation keeps each erase-write step I - β k kᵀ a contraction, so the state stays
bounded without any decay (DeltaNet); the gate adds Mamba-2's data-dependent forgetting on top.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit._checks import check_positive_int
from ssmkit.layers import _decode
from ssmkit.layers.linear import Linear
from ssmkit.layers.norm import RMSNormGated
from ssmkit.layers.quantized import float_dtype
from ssmkit.layers.state import LayerState, check_mixer_inputs, context_parallel_group
from ssmkit.ops import context_parallel as cp
from ssmkit.ops.conv.causal_conv1d import causal_conv1d
from ssmkit.ops.delta_rule import delta_rule, delta_rule_step_reference
from ssmkit.ops.delta_rule._common import l2norm, per_value_head
from ssmkit.ops.delta_rule.step import delta_step
from ssmkit.ops.dispatch import get
from ssmkit.theory.init import inverse_softplus, log_uniform_dt

__all__ = ["DeltaNet", "DeltaNetState", "GatedDeltaNet"]


def _call(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mod(x)


@dataclasses.dataclass
class DeltaNetState(LayerState):
    """``conv_state: (batch, 2 H K + H V, conv_size - 1)`` (model dtype) and
    ``ssm_state: (batch, H, K, V)`` (float32; the transpose of S in the papers)."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


class DeltaNet(nn.Module):
    """DeltaNet mixer (``gated=False``) or Gated DeltaNet (``gated=True``, see :class:`GatedDeltaNet`).

    ``head_dim`` is the key size K (default ``d_model // num_heads``); the value size is
    ``V = expand_v * K``. ``num_v_heads`` (default ``num_heads``, a multiple of it) gives more
    value heads than query/key heads: value head ``j`` reads query/key head ``j // (num_v_heads /
    num_heads)``, and β, the decay and the state are per value head (Qwen3-Next). Same contract
    as every mixer in :mod:`ssmkit.layers`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_output_gate: bool = True,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        gated: bool = False,
        A_init_range: tuple[float, float] = (1, 16),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        layer_idx: int | None = None,
        num_v_heads: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("num_heads", num_heads)
        check_positive_int("conv_size", conv_size)
        check_positive_int("chunk_size", chunk_size)
        head_dim = head_dim if head_dim is not None else d_model // num_heads
        check_positive_int("head_dim", head_dim)
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        check_positive_int("num_v_heads", num_v_heads)
        if num_v_heads % num_heads:
            raise ValueError(f"num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads}")
        head_v_dim = int(head_dim * expand_v)
        if head_v_dim <= 0 or head_v_dim != head_dim * expand_v:
            raise ValueError(f"head_dim * expand_v must be a positive integer, got {head_dim} * {expand_v}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads, self.head_k_dim, self.head_v_dim = d_model, num_heads, head_dim, head_v_dim
        self.num_v_heads = num_v_heads
        self.key_dim, self.value_dim = num_heads * head_dim, num_v_heads * head_v_dim
        self.conv_size, self.chunk_size, self.gated, self.layer_idx = conv_size, chunk_size, gated, layer_idx
        self.use_output_gate = use_output_gate
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.scale = head_dim ** -0.5

        self.q_proj = Linear(d_model, self.key_dim, bias=False, **fk)
        self.k_proj = Linear(d_model, self.key_dim, bias=False, **fk)
        self.v_proj = Linear(d_model, self.value_dim, bias=False, **fk)
        self.b_proj = Linear(d_model, num_v_heads, bias=False, **fk)
        # one short convolution over [q | k | v] (three depthwise convs, computed in one call)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_size, groups=self.conv_dim,
                                padding=conv_size - 1, bias=conv_bias, **fk)
        if gated:
            self.a_proj = Linear(d_model, num_v_heads, bias=False, **fk)
            A = torch.empty(num_v_heads).uniform_(*A_init_range)
            self.A_log = nn.Parameter(torch.log(A).to(device=device, dtype=dtype or torch.float32))
            self.A_log._no_weight_decay = True
            dt = log_uniform_dt(num_v_heads, dt_min, dt_max, floor=dt_init_floor)
            self.dt_bias = nn.Parameter(inverse_softplus(dt).to(device=device, dtype=dtype or torch.float32))
            self.dt_bias._no_weight_decay = True
        if use_output_gate:
            self.g_proj = Linear(d_model, self.value_dim, bias=False, **fk)
        self.o_norm = RMSNormGated(head_v_dim, eps=norm_eps, norm_before_gate=True, **fk)
        self.o_proj = Linear(self.value_dim, d_model, bias=False, **fk)

    def _ssm_dtype(self, dtype=None) -> torch.dtype:
        dtype = dtype or float_dtype(self.q_proj)
        return torch.float64 if dtype == torch.float64 else torch.float32

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> DeltaNetState:
        device = device or self.conv1d.weight.device
        dtype = dtype or float_dtype(self.q_proj)
        return DeltaNetState(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.conv_size - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim, device=device,
                                  dtype=self._ssm_dtype(dtype)),
        )

    def _beta_g(self, x: torch.Tensor, *, cpu_step: bool = False):
        cdt = self._ssm_dtype(x.dtype)
        lin = _decode.linear if cpu_step else _call
        beta = torch.sigmoid(lin(self.b_proj, x).to(cdt))
        g = None
        if self.gated:
            g = -torch.exp(self.A_log.to(cdt)) * F.softplus(lin(self.a_proj, x).to(cdt) + self.dt_bias.to(cdt))
        return beta, g

    def _output(self, o: torch.Tensor, x: torch.Tensor, *, cpu_step: bool = False) -> torch.Tensor:
        """o: (..., H, V) -> (..., d_model): per-head RMSNorm, output gate, o_proj (``cpu_step``:
        the projections through :func:`ssmkit.layers._decode.linear`)."""
        lin = _decode.linear if cpu_step else _call
        gate = lin(self.g_proj, x).unflatten(-1, (self.num_v_heads, self.head_v_dim)) if self.use_output_gate else None
        o = self.o_norm(o, gate)
        return lin(self.o_proj, o.flatten(-2))

    def forward(self, x: torch.Tensor, state: DeltaNetState | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """``x: (batch, seqlen, d_model) -> y`` (same shape), and the new state if ``return_state``."""
        check_mixer_inputs(self, x, state, cu_seqlens, mask, DeltaNetState)
        group = context_parallel_group(self, state, mask)
        conv, rule = causal_conv1d, delta_rule
        conv_kw = {"initial_state": None if state is None else state.conv_state}
        rule_kw = {"initial_state": None if state is None else state.ssm_state}
        if group is not None:  # x is this rank's shard of the sequence
            conv = functools.partial(cp.causal_conv1d, group=group)
            rule = functools.partial(cp.delta_rule, group=group)
            conv_kw, rule_kw = {}, {}
        b, l, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if mask is not None:
            qkv = qkv * mask.to(qkv.dtype)[..., None]
        qkv, conv_state = conv(
            qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
            return_final_state=True, cu_seqlens=cu_seqlens, **conv_kw,
        )
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        beta, g = self._beta_g(x)
        if mask is not None:  # β = 0, g = 0 at padding: the state is left untouched
            m = mask.to(beta.dtype)
            beta = beta * m[..., None]
            g = None if g is None else g * m[..., None]
        Hv = self.num_v_heads
        q, k = q.reshape(b, l, H, K), k.reshape(b, l, H, K)
        if group is not None:  # (the context-parallel form takes one query/key head per value head)
            q, k = per_value_head(q, Hv), per_value_head(k, Hv)
        o, ssm_state = rule(
            q, k, v.reshape(b, l, Hv, V), beta=beta, g=g,
            scale=self.scale, use_qk_l2norm=True, chunk_size=self.chunk_size,
            return_final_state=True, cu_seqlens=cu_seqlens, **rule_kw,
        )
        out = self._output(o.to(x.dtype), x)
        if return_state:
            return out, DeltaNetState(conv_state=conv_state.to(x.dtype).contiguous(), ssm_state=ssm_state)
        return out

    def step(self, x_t: torch.Tensor, state: DeltaNetState) -> torch.Tensor:
        """One token ``x_t: (batch, d_model) -> (batch, d_model)``; updates ``state`` in place."""
        if _decode.use_cpu_step(x_t, self.conv1d.weight):
            return self._step_cpu(x_t, state)
        b = x_t.shape[0]
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        qkv = torch.cat([self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t)], dim=-1)
        # unchecked dispatched conv update (shapes fixed by the layer), as in Mamba / Mamba-2 ``step``
        qkv = get("causal_conv1d_step", "auto", qkv)(qkv.unsqueeze(1), state.conv_state,
                                                       self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                                       "silu").squeeze(1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        beta, g = self._beta_g(x_t)
        Hv = self.num_v_heads
        q, k, v = q.reshape(b, H, K), k.reshape(b, H, K), v.reshape(b, Hv, V)
        # the dispatched decode form (unchecked, shapes fixed by the layer): the reference step, or
        # the fused Triton kernel when asked for (backend "triton" forced); both update the state in
        # place without reading values on the host, so the step can be captured in a CUDA graph
        rule_step = get("delta_rule_step", "auto", q)
        if rule_step is delta_rule_step_reference:
            o = delta_step(state.ssm_state, q, k, v, beta, g, scale=self.scale, use_qk_l2norm=True)
        else:
            o = rule_step(state.ssm_state, q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), beta.unsqueeze(1),
                          None if g is None else g.unsqueeze(1), self.scale, True).squeeze(1)
        return self._output(o.to(x_t.dtype), x_t)

    def _step_cpu(self, x_t: torch.Tensor, state: DeltaNetState) -> torch.Tensor:
        """:meth:`step` on the CPU (see :mod:`ssmkit.layers._decode`): the conv window lives in a
        per-state buffer, q and k are normalised together, and the state's read, rank-1 write and
        readout are batched GEMVs / one update over ``(batch·H, K, V)``."""
        b, dtype = x_t.shape[0], x_t.dtype
        H, K, V, kd = self.num_heads, self.head_k_dim, self.head_v_dim, self.key_dim
        S = state.ssm_state
        sdt = S.dtype
        ws = _decode.workspace(state, (b, dtype, sdt), lambda: _decode.conv_buffers(
            b, self.conv_dim, self.conv_size, dtype, x_t.device))
        lin = _decode.linear
        qkv = torch.cat([lin(self.q_proj, x_t), lin(self.k_proj, x_t), lin(self.v_proj, x_t)], dim=-1)
        qkv = _decode.conv_step(ws, state.conv_state, qkv, _decode.conv_kernel(self.conv1d, dtype))
        qk = l2norm(qkv[:, :2 * kd].to(sdt).reshape(b, 2 * H, K))
        H = self.num_v_heads
        q = per_value_head(qk[:, :self.num_heads], H).reshape(b * H, 1, K)
        if self.scale != 1.0:
            q = q * self.scale
        k = per_value_head(qk[:, self.num_heads:], H).reshape(b * H, 1, K)
        v = qkv[:, 2 * kd:].to(sdt).reshape(b * H, 1, V)
        beta, g = self._beta_g(x_t, cpu_step=True)
        Sh = S.view(b * H, K, V)
        if g is not None:
            Sh.mul_(torch.exp(g.to(sdt)).view(b * H, 1, 1))
        u = (v - torch.bmm(k, Sh)).mul_(beta.to(sdt).view(b * H, 1, 1))  # β (v - hᵀk)
        Sh.baddbmm_(k.transpose(1, 2), u)  # h += k uᵀ
        o = torch.bmm(q, Sh).view(b, H, V)
        return self._output(o.to(dtype), x_t, cpu_step=True)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, head_k_dim={self.head_k_dim}, "
                f"head_v_dim={self.head_v_dim}, gated={self.gated}"
                + (f", num_v_heads={self.num_v_heads}" if self.num_v_heads != self.num_heads else ""))


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: DeltaNet with a Mamba-2-style data-dependent decay α = exp(g) per head.

    Defaults follow the paper's layer (two-times wider values, ``expand_v=2``).
    """

    def __init__(self, d_model: int, num_heads: int = 4, head_dim: int | None = None, expand_v: float = 2.0,
                 **kwargs):
        kwargs.pop("gated", None)
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, expand_v=expand_v, gated=True, **kwargs)
