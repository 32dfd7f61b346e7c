"""The batch-1 CPU decode step of a (Gated) DeltaNet block as one compiled graph (with compiled
CPU kernels on, :mod:`ssmkit.ops.cpu_compile`): :func:`delta_block_step`, called by
``LanguageModel._step_cpu`` for each plain DeltaNet / Gated DeltaNet block.

As for Mamba (:mod:`ssmkit.layers._decode_mamba`), the block's step is four regions, each starting
at a GEMV's input, traced once together and compiled by Inductor as one graph::

    RMSNorm | q, k, v, β, a and gate projections, conv + SiLU |
    L2 norms, β, decay, the delta-rule update, readout, gated RMSNorm | o_proj, residual add

The state ``(1, H, K, V)`` is updated in place; the GEMVs sum in float32 (int8 weights times their
per-channel scales) as :mod:`ssmkit.ops.cpu_gemv` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers._decode import conv_kernel, use_cpu_step
from ssmkit.layers._decode_mamba import _mv, _norm_g, _out_g, _tensor, _weight_scale, compile_plan, run_plan
from ssmkit.layers.delta_net import DeltaNet
from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.quantized import float_dtype
from ssmkit.ops.cpu_compile import cpu_compile_enabled

__all__ = ["delta_block_step"]


def _in_conv_g(x, conv_state, conv_k, *ws, dtype: torch.dtype, scaled: tuple[bool, ...], n3: int):
    """The input projections ``[q, k, v], b, (a), gate`` of ``x (d,)``, then the conv + SiLU of
    ``[q | k | v]``: -> ``(qkv (conv_dim,), b (Hv,), (a (Hv,)), gate (value_dim,))``;
    ``conv_state (1, conv_dim, W - 1)`` shifted in place. ``ws``: the weights, then the int8 scales
    of those marked in ``scaled``."""
    n = len(scaled)
    scales = iter(ws[n:])
    outs = [_mv(w, x, next(scales) if s else None).to(dtype) for w, s in zip(ws[:n], scaled)]
    W = conv_k.shape[1] - 1
    qkv = torch.cat(outs[:n3])
    win = torch.cat([conv_state[0], qkv.unsqueeze(-1)], dim=-1)  # (conv_dim, W)
    y = F.silu(((win.float() * conv_k[:, :W].float()).sum(-1) + conv_k[:, W].float()).to(dtype)).to(dtype)
    conv_state.copy_(win[:, 1:].unsqueeze(0))
    return (y, *outs[n3:])


def _rule_g(qkv, b, *rest, dtype: torch.dtype, gated: bool, H: int, K: int, scale: float, eps: float):
    """q, k L2-normalised (q times ``scale``), β = sigmoid(b), the decay exp(g) (gated), the
    delta-rule update of ``S (1, Hv, K, V)`` (float32, in place), the readout and the per-head
    gated RMSNorm: -> ``o (Hv·V,)``."""
    if gated:
        a, gate, A_log, dt_bias, S, norm_w = rest
    else:
        gate, S, norm_w = rest
    Hv, V = S.shape[1], S.shape[3]
    qk = qkv[:2 * H * K].float().view(2 * H, K)
    qk = qk * torch.rsqrt(qk.pow(2).sum(-1, keepdim=True) + 1e-6)
    r = Hv // H
    q = qk[:H].unsqueeze(1).expand(H, r, K).reshape(Hv, K) * scale
    k = qk[H:].unsqueeze(1).expand(H, r, K).reshape(Hv, K)
    v = qkv[2 * H * K:].float().view(Hv, V)
    beta = torch.sigmoid(b.float())
    S0 = S[0]
    if gated:
        g = -torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias.float())
        S0 = S0 * torch.exp(g).view(Hv, 1, 1)
    u = (v - (k.unsqueeze(-1) * S0).sum(1)) * beta.unsqueeze(-1)  # β (v - Sᵀk)  (Hv, V)
    Sn = S0 + k.unsqueeze(-1) * u.unsqueeze(1)
    S.copy_(Sn.unsqueeze(0))
    o = (q.unsqueeze(-1) * Sn).sum(1).to(dtype).float()  # (Hv, V)
    on = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * norm_w.float()).to(dtype).float()
    return ((on * F.silu(gate.float().view(Hv, V))).to(dtype).reshape(Hv * V),)


def _block_tensors(blk: nn.Module) -> tuple | None:
    """The tensors a compiled DeltaNet block step reads, or None if ``blk`` is not a plain
    (Gated) DeltaNet block (output gate on, bias-free projections) of float32 / bfloat16 / int8
    weights."""
    m, norm = blk._modules.get("mixer"), blk._modules.get("norm")
    if not isinstance(m, DeltaNet):
        return None
    mods = m._modules  # (dict lookups: this runs for every block of every decoded token)
    o_norm = mods.get("o_norm")
    if (blk.mlp_kind != "none" or blk.shared_use is not None or type(norm) is not RMSNorm
            or not m.use_output_gate or o_norm is None or o_norm.group_size is not None):
        return None
    names = ["q_proj", "k_proj", "v_proj", "b_proj"] + (["a_proj"] if m.gated else []) + ["g_proj", "o_proj"]
    lins = [_weight_scale(mods[n]) for n in names]
    dtype = float_dtype(mods["q_proj"])
    if any(ws is None for ws in lins) or dtype not in (torch.float32, torch.bfloat16):
        return None
    extra = (_tensor(m, "A_log"), _tensor(m, "dt_bias")) if m.gated else ()
    return (_tensor(norm, "weight"), conv_kernel(mods["conv1d"], dtype), _tensor(o_norm, "weight"), *extra,
            *(t for ws in lins for t in ws))


def _plan(blk: nn.Module, h: torch.Tensor, state, tensors: tuple):
    """The decode plan of a DeltaNet block (``_decode_mamba.compile_plan``), or None."""
    m = blk.mixer
    dtype = float_dtype(m.q_proj)
    ng = 2 if m.gated else 0
    norm_w, conv_k, onorm_w = tensors[:3]
    extra = tensors[3:3 + ng]
    lins = list(zip(tensors[3 + ng::2], tensors[4 + ng::2]))
    Hv, K, V = m.num_v_heads, m.head_k_dim, m.head_v_dim
    if (state.ssm_state.dtype != torch.float32 or state.conv_state.dtype != dtype
            or tuple(state.ssm_state.shape) != (1, Hv, K, V)
            or not all(t.is_contiguous() for t in (h, state.ssm_state, state.conv_state, *tensors)
                       if t is not None)):
        return None
    ins, (o_w, o_s) = lins[:-1], lins[-1]
    scaled = tuple(s is not None for _, s in ins)
    ws = [w for w, _ in ins] + [s for _, s in ins if s is not None]
    xp = torch.empty(h.shape[1], dtype=dtype)
    outs = [torch.empty(k, dtype=dtype) for k in (m.conv_dim, Hv, *((Hv,) if m.gated else ()), m.value_dim)]
    rule_args = [*outs, *extra, state.ssm_state, onorm_w] if m.gated else [*outs, state.ssm_state, onorm_w]
    plan = [(_norm_g, [h, norm_w], {"eps": float(blk.norm.eps), "dtype": dtype}),
            (_in_conv_g, [xp, state.conv_state, conv_k, *ws], {"dtype": dtype, "scaled": scaled, "n3": 3}),
            (_rule_g, rule_args, {"dtype": dtype, "gated": m.gated, "H": m.num_heads, "K": K,
                                  "scale": float(m.scale), "eps": float(m.o_norm.eps)}),
            (_out_g, [outs[-1], o_w, h, *([] if o_s is None else [o_s])],
             {"dtype": dtype, "mult": float(blk.residual_multiplier)})]
    return compile_plan("cpu_deltanet_block", h, (*tensors, state.conv_state, state.ssm_state), plan,
                        (0, 1, len(outs), 1), (0, None, None, 2))


def delta_block_step(blk: nn.Module, h: torch.Tensor, state) -> bool:
    """``h (1, d_model)`` += DeltaNet / Gated DeltaNet block ``blk``'s decode step as one compiled
    graph (with compiled CPU kernels on). Returns False (nothing done) where it does not apply: not
    a plain block (no MLP, no shared block, RMSNorm, output gate on), batch > 1, autograd, or
    compiling failed. The compiled step is kept with the state (``_decode_plan``) while the thread
    count, the block's tensors and the state's tensors stay the same."""
    if h.shape[0] != 1 or not cpu_compile_enabled(h) or not isinstance(blk.mixer, DeltaNet):
        return False
    tensors = _block_tensors(blk)
    plan = state.__dict__.get("_decode_plan")
    key = None if tensors is None else (*tensors, state.conv_state, state.ssm_state)
    if (plan is None or plan[0] != (torch.get_num_threads(), h.shape, h.dtype) or key is None
            or len(plan[1]) != len(key) or any(a is not b for a, b in zip(plan[1], key))):
        if tensors is None or not use_cpu_step(h, blk.mixer.conv1d.weight):
            return False
        plan = _plan(blk, h, state, tensors)
        if plan is None:
            return False
        state.__dict__["_decode_plan"] = plan
    return run_plan(plan, h)
