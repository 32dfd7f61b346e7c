"""The batch-1 CPU decode step of a Mamba or Mamba-2 block as one compiled graph (with compiled
CPU kernels on, :mod:`ssmkit.ops.cpu_compile`): :func:`mamba_block_step`, called by
``LanguageModel._step_cpu`` for each plain Mamba / Mamba-2 block.

The block's step (RMSNorm, in_proj, conv, x_proj, dt_proj, the state update, readout, gate,
out_proj, residual add: ~30 PyTorch ops of a few microseconds each) is written as four regions,
each starting at a GEMV's input::

    RMSNorm | in_proj, conv + SiLU | x_proj, dt_proj, softplus, state update, readout, D, gate |
    out_proj, residual add

(Mamba-2: RMSNorm | in_proj, conv + SiLU | Δ, state update, readout, D, gated RMSNorm |
out_proj, residual add), traced once together and compiled by Inductor as one graph
(:func:`compile_plan`), which also serves the DeltaNet blocks (:mod:`ssmkit.layers._decode_delta`).

The GEMVs are written as in :mod:`ssmkit.ops.cpu_gemv` (float32 accumulation; int8 weights times
their per-channel scales). Every region's outputs are outputs of the graph: left inside it,
Inductor inlines a pointwise producer (the RMSNorm, the conv) into the loop of the GEMV that reads
it and recomputes it for every output row, which made int8 decoding slower than the GEMVs alone.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers._decode import conv_kernel, use_cpu_step
from ssmkit.layers.linear import Linear
from ssmkit.layers.mamba import Mamba
from ssmkit.layers.mamba2 import Mamba2
from ssmkit.layers.norm import RMSNorm, RMSNormGated
from ssmkit.layers.quantized import Int8Linear, float_dtype
from ssmkit.ops.cpu_compile import compiled_graph, cpu_compile_enabled

__all__ = ["mamba_block_step"]


def _mv(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """``w (out, in) @ x (in,)`` summed in float32 (times the int8 scale ``s``), as the compiled GEMV."""
    y = (w.float() * x.float()).sum(-1)
    return y if s is None else y * s.float()


def _norm_g(h, w, *, eps: float, dtype: torch.dtype):
    """RMSNorm of the residual ``h (1, d)`` (cast to the norm's dtype first, statistics in float32)."""
    xf = h[0].to(w.dtype).float()
    return ((xf * torch.rsqrt(xf.pow(2).mean() + eps) * w.float()).to(dtype),)


def _in_conv_g(x, in_w, conv_state, conv_k, *in_s, dtype: torch.dtype):
    """in_proj, then one token of the causal conv + SiLU: ``x (d,)`` -> ``(xs (di,), z (di,))``;
    ``conv_state (1, di, W - 1)`` shifted in place."""
    W = conv_k.shape[1] - 1
    xz = _mv(in_w, x, in_s[0] if in_s else None).to(dtype)
    di = xz.shape[0] // 2
    win = torch.cat([conv_state[0], xz[:di].unsqueeze(-1)], dim=-1)  # (di, W)
    xs = F.silu(((win.float() * conv_k[:, :W].float()).sum(-1) + conv_k[:, W].float()).to(dtype)).to(dtype)
    conv_state.copy_(win[:, 1:].unsqueeze(0))
    return xs, xz[di:]


def _ssm_g(xs, z, xp_w, dt_w, dt_b, A2, D, ssm, *xp_s, dtype: torch.dtype, R: int, N: int):
    """x_proj, dt_proj + softplus, the state update (``ssm (1, di, N)`` float32, in place), the
    readout, D and the gate: ``xs, z (di,)`` -> ``y (di,)``."""
    dbc = _mv(xp_w, xs, xp_s[0] if xp_s else None).to(dtype)
    low, Bm, Cm = dbc[:R], dbc[R:R + N].float(), dbc[R + N:].float()
    dt = _mv(dt_w, low, None)
    dt = dt + dt_b.float() if dt_w.dtype == torch.float32 else dt.to(dtype).float() + dt_b.float()
    delta = F.softplus(dt)
    xs32 = xs.float()
    hs = ssm[0] * torch.exp2(delta.unsqueeze(-1) * A2) + (delta * xs32).unsqueeze(-1) * Bm
    ssm.copy_(hs.unsqueeze(0))
    y = ((hs * Cm).sum(-1) + xs32 * D.float()) * F.silu(z.float())
    return (y.to(dtype),)


def _out_g(y, out_w, h, *out_s, dtype: torch.dtype, mult: float):
    """out_proj and the residual add: ``h (1, d)`` += out_proj(y) (times ``mult``), in place."""
    out = _mv(out_w, y, out_s[0] if out_s else None).to(dtype)
    if mult != 1.0:
        out = out * mult
    h.add_(out.unsqueeze(0))
    return (out,)


def _weight_scale(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, int8 scale or None)`` of a bias-free ``nn.Linear`` / ``Int8Linear``, else None.
    (Read from the modules' parameter and buffer dicts: this runs for every block of every decoded
    token, and ``nn.Module.__getattr__`` costs about 0.5 µs a lookup.)"""
    kind = type(lin)
    if kind is Linear or kind is nn.Linear:
        p = lin._parameters
        return (p["weight"], None) if p["bias"] is None else None
    if kind is Int8Linear:
        b = lin._buffers
        return (b["qweight"], b["scale"]) if b["bias"] is None else None
    return None


def mamba_block_step(blk: nn.Module, h: torch.Tensor, state) -> bool:
    """``h (1, d_model)`` += Mamba or Mamba-2 block ``blk``'s decode step as one compiled graph
    (with compiled CPU kernels on): RMSNorm | in_proj, conv | (Mamba: x_proj, dt_proj) the state
    update, readout, gate (Mamba-2: gated RMSNorm) | out_proj and the residual add. Returns False
    (nothing done) where it does not apply: not a plain block (no MLP, no shared block, RMSNorm,
    the mixer's usual layout), batch > 1, autograd, or
    compiling failed. The compiled step and its tensors are kept with the state (``_decode_plan``)
    while the thread count, the block's tensors and the state's tensors stay the same."""
    if h.shape[0] != 1 or not cpu_compile_enabled(h):
        return False
    m = blk.mixer
    mamba2 = type(m) is Mamba2
    tensors = _block_tensors2(blk) if mamba2 else _block_tensors(blk)
    plan = state.__dict__.get("_decode_plan")
    # the plan holds the state's tensors too: a state given new tensors gets a new plan
    key = None if tensors is None else (*tensors, state.conv_state, state.ssm_state)
    if (plan is None or plan[0] != (torch.get_num_threads(), h.shape, h.dtype) or key is None
            or len(plan[1]) != len(key) or any(a is not b for a, b in zip(plan[1], key))):
        if tensors is None or not use_cpu_step(h, m.conv1d.weight):
            return False
        plan = (_mamba2_plan if mamba2 else _mamba_plan)(blk, h, state, tensors)
        if plan is None:
            return False
        state.__dict__["_decode_plan"] = plan
    return run_plan(plan, h)


def _chained(h, *rest, fns, kws, counts, n_prev, h_pos):
    """The regions ``fns`` in order: region i takes the previous region's outputs (``n_prev[i]`` of
    them) as its first arguments, its ``counts[i]`` own tensors from ``rest`` and ``h`` at position
    ``h_pos[i]``. Returns every region's outputs: graph outputs stay in buffers, so Inductor does
    not recompute a pointwise producer (the RMSNorm, the conv) inside the next GEMV's loop for every
    output row, which it does with the intermediates left inside the graph."""
    prev, outs, pos = (), [], 0
    for fn, kw, n, k, hp in zip(fns, kws, counts, n_prev, h_pos):
        assert len(prev) == k
        call = [*prev, *rest[pos:pos + n]]
        pos += n
        if hp is not None:
            call.insert(hp, h)
        prev = fn(*call, **kw)
        outs += prev
    return tuple(outs)


def compile_plan(name: str, h: torch.Tensor, key: tuple, plan: list, n_prev: tuple, h_pos: tuple):
    """The decode plan kept with a block's state: ``((threads, h's shape and dtype), key, kernel,
    tensors)``, the kernel being the regions of ``plan`` (``(fn, arguments, options)`` each, the
    arguments as at compile time, the previous region's outputs and ``h`` as placeholders; see
    :func:`_chained`) traced and compiled as one graph; or None if compiling failed."""
    rest, counts = [], []
    for (_, args, _), k, hp in zip(plan, n_prev, h_pos):
        own = [t for i, t in enumerate(args) if i >= k and i != hp]
        rest += own
        counts.append(len(own))
    fn = functools.partial(_chained, fns=tuple(p[0] for p in plan), kws=tuple(p[2] for p in plan),
                           counts=tuple(counts), n_prev=n_prev, h_pos=h_pos)
    ckey = (tuple(p[0].__name__ for p in plan), tuple((tuple(a.shape), a.dtype) for a in (h, *rest)),
            tuple(tuple(p[2].items()) for p in plan), n_prev, h_pos)
    kern = compiled_graph(name, fn, ckey, [h, *rest])
    return None if kern is None else ((torch.get_num_threads(), h.shape, h.dtype), key, kern, rest)


def run_plan(plan, h: torch.Tensor) -> bool:
    """Run the compiled block step of ``plan`` on ``h``. False if running it failed (reported once):
    the graph checks its arguments' sizes and strides before any kernel runs, so nothing was
    updated and the caller takes the eager step."""
    return plan[2](h, *plan[3]) is not None


def _block_tensors(blk: nn.Module) -> tuple | None:
    """The tensors a compiled Mamba block step reads (weights, int8 scales, conv kernel, A·log2 e),
    or None if ``blk`` is not a plain Mamba block of float32 / bfloat16 / int8 weights."""
    m, norm = blk._modules.get("mixer"), blk._modules.get("norm")
    if (type(m) is not Mamba or blk.mlp_kind != "none" or blk.shared_use is not None
            or type(norm) is not RMSNorm or m.inner_name != "s6" or m.inner_norms or not m.use_gate):
        return None
    mods = m._modules  # (dict lookups, as in _weight_scale)
    in_proj, dt = mods["in_proj"], mods["dt_proj"]._parameters
    if dt["bias"] is None:
        return None
    lins = [_weight_scale(in_proj), _weight_scale(mods["x_proj"]), _weight_scale(mods["out_proj"])]
    dtype = float_dtype(in_proj)
    if any(ws is None for ws in lins) or dtype not in (torch.float32, torch.bfloat16):
        return None
    (in_w, in_s), (xp_w, xp_s), (out_w, out_s) = lins
    return (_tensor(norm, "weight"), in_w, in_s, conv_kernel(mods["conv1d"], dtype), xp_w, xp_s,
            dt["weight"], dt["bias"], m._A_log2e(), _tensor(m, "D"), out_w, out_s)


def _mamba_plan(blk: nn.Module, h: torch.Tensor, state, tensors: tuple):
    """The decode plan of a Mamba block (:func:`compile_plan`), or None."""
    m = blk.mixer
    norm_w, in_w, in_s, conv_k, xp_w, xp_s, dt_w, dt_b, A2, D, out_w, out_s = tensors
    dtype = float_dtype(m.in_proj)
    if (state.ssm_state.dtype != torch.float32 or state.conv_state.dtype != dtype
            or not all(t.is_contiguous() for t in (h, state.ssm_state, state.conv_state, *tensors)
                       if t is not None)):
        return None
    opt = lambda t: [] if t is None else [t]  # noqa: E731
    # four regions, each starting at a GEMV's input, compiled as one graph (the intermediates and
    # h are placeholders here, the arguments' order as the regions take them)
    di, d = m.d_inner, h.shape[1]
    xp = torch.empty(d, dtype=dtype)
    xs, z = torch.empty(di, dtype=dtype), torch.empty(di, dtype=dtype)
    plan = [(_norm_g, [h, norm_w], {"eps": float(blk.norm.eps), "dtype": dtype}),
            (_in_conv_g, [xp, in_w, state.conv_state, conv_k, *opt(in_s)], {"dtype": dtype}),
            (_ssm_g, [xs, z, xp_w, dt_w, dt_b, A2, D, state.ssm_state, *opt(xp_s)],
             {"dtype": dtype, "R": m.dt_rank, "N": m.d_state}),
            (_out_g, [xs, out_w, h, *opt(out_s)], {"dtype": dtype, "mult": float(blk.residual_multiplier)})]
    return compile_plan("cpu_mamba_block", h, (*tensors, state.conv_state, state.ssm_state), plan, (0, 1, 2, 1),
                        (0, None, None, 2))


# -- Mamba-2 -----------------------------------------------------------------------------------

def _in_conv2_g(x, in_w, conv_state, conv_k, *in_s, dtype: torch.dtype, di: int):
    """in_proj ([z, xBC, dt]), then the conv + SiLU of xBC: ``x (d,)`` -> ``(z, xBC, dt)``;
    ``conv_state (1, conv_dim, W - 1)`` shifted in place."""
    W = conv_k.shape[1] - 1
    zxbcdt = _mv(in_w, x, in_s[0] if in_s else None).to(dtype)
    cd = conv_k.shape[0]
    win = torch.cat([conv_state[0], zxbcdt[di:di + cd].unsqueeze(-1)], dim=-1)  # (conv_dim, W)
    xBC = F.silu(((win.float() * conv_k[:, :W].float()).sum(-1) + conv_k[:, W].float()).to(dtype)).to(dtype)
    conv_state.copy_(win[:, 1:].unsqueeze(0))
    return zxbcdt[:di], xBC, zxbcdt[di + cd:]


def _ssd_g(z, xBC, dt, dt_bias, A_log, D, S, norm_w, *, dtype: torch.dtype, g: int, n: int, eps: float,
           lo: float, hi: float):
    """Δ, the state update of ``S (1, H, P, N)`` (float32, in place), the readout, D and the gated
    RMSNorm (per group, norm after the gate): ``z (di,), xBC, dt (H,)`` -> ``y (di,)``."""
    H, P = S.shape[1], S.shape[2]
    di = H * P
    delta = F.softplus(dt.float() + dt_bias.float())
    if lo > 0.0 or hi != float("inf"):
        delta = delta.clamp(min=lo, max=hi)
    xf = xBC[:di].float().view(g, H // g, P)
    Bf = xBC[di:di + g * n].float().view(g, 1, 1, n)
    Cf = xBC[di + g * n:].float().view(g, 1, 1, n)
    dg = delta.view(g, H // g)
    A = -torch.exp(A_log.float()).view(g, H // g)
    Sn = (S[0].view(g, H // g, P, n) * torch.exp(dg * A).view(g, H // g, 1, 1)
          + (xf * dg.unsqueeze(-1)).unsqueeze(-1) * Bf)
    S.copy_(Sn.view(1, H, P, n))
    Dv = D.float().view(g, H // g, -1)
    y = ((Sn * Cf).sum(-1) + xf * Dv).reshape(di).to(dtype)
    gated = (y.float() * F.silu(z.float())).view(g, di // g)
    yn = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    return ((yn.reshape(di) * norm_w.float()).to(dtype),)


def _block_tensors2(blk: nn.Module) -> tuple | None:
    """:func:`_block_tensors` for a Mamba-2 block (its usual layout: gated RMSNorm after the gate,
    no input or section multipliers, bias-free projections)."""
    m, norm = blk._modules.get("mixer"), blk._modules.get("norm")
    mods = m._modules
    gnorm = mods.get("norm")
    if (blk.mlp_kind != "none" or blk.shared_use is not None or type(norm) is not RMSNorm
            or not m.rmsnorm or m.norm_before_gate or type(gnorm) is not RMSNormGated
            or m.in_multiplier != 1.0 or m.in_proj_multipliers is not None):
        return None
    in_proj = mods["in_proj"]
    lins = [_weight_scale(in_proj), _weight_scale(mods["out_proj"])]
    dtype = float_dtype(in_proj)
    if any(ws is None for ws in lins) or dtype not in (torch.float32, torch.bfloat16):
        return None
    (in_w, in_s), (out_w, out_s) = lins
    return (_tensor(norm, "weight"), in_w, in_s, conv_kernel(mods["conv1d"], dtype), _tensor(m, "dt_bias"),
            _tensor(m, "A_log"), _tensor(m, "D"), _tensor(gnorm, "weight"), out_w, out_s)


def _tensor(mod: nn.Module, name: str) -> torch.Tensor:
    """``mod.<name>``, a parameter read from the parameter dict (see :func:`_weight_scale`)."""
    p = mod._parameters
    return p[name] if name in p else getattr(mod, name)


def _mamba2_plan(blk: nn.Module, h: torch.Tensor, state, tensors: tuple):
    """The decode plan of a Mamba-2 block (as :func:`_mamba_plan`), or None."""
    m = blk.mixer
    norm_w, in_w, in_s, conv_k, dt_bias, A_log, D, gnorm_w, out_w, out_s = tensors
    dtype = float_dtype(m.in_proj)
    H, P, G, N, di = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_inner
    if (state.ssm_state.dtype != torch.float32 or state.conv_state.dtype != dtype
            or tuple(state.ssm_state.shape) != (1, H, P, N) or m.norm.group_size not in (None, di // G)
            or not all(t.is_contiguous() for t in (h, state.ssm_state, state.conv_state, *tensors)
                       if t is not None)):
        return None
    groups = 1 if m.norm.group_size is None else G
    opt = lambda t: [] if t is None else [t]  # noqa: E731
    xp = torch.empty(h.shape[1], dtype=dtype)
    z, xBC, dt = (torch.empty(k, dtype=dtype) for k in (di, m.conv_dim, H))
    lo, hi = m.dt_limit
    plan = [(_norm_g, [h, norm_w], {"eps": float(blk.norm.eps), "dtype": dtype}),
            (_in_conv2_g, [xp, in_w, state.conv_state, conv_k, *opt(in_s)], {"dtype": dtype, "di": di}),
            (_ssd_g, [z, xBC, dt, dt_bias, A_log, D, state.ssm_state, gnorm_w],
             {"dtype": dtype, "g": G, "n": N, "eps": float(m.norm.eps), "lo": lo, "hi": hi}),
            (_out_g, [z, out_w, h, *opt(out_s)], {"dtype": dtype, "mult": float(blk.residual_multiplier)})]
    if groups != G:
        return None  # (a norm over all of d_inner with several groups: the eager step)
    return compile_plan("cpu_mamba_block", h, (*tensors, state.conv_state, state.ssm_state), plan, (0, 1, 3, 1),
                        (0, None, None, 2))
