"""``torch.library`` custom ops for the scan and conv kernels, so ``torch.compile(fullgraph=True)``
sees one opaque node per op (no graph break on the Triton launch or the CPU forms).

Ops (namespace ``ssmkit``), each with a fake (meta) implementation for tracing and an autograd
formula:

* ``ssmkit::selective_scan(x, dt, A, B, C, D?, z?, dt_bias?, initial_state?, cu_seqlens?,
  dt_softplus, backend, save_states) -> (y, final_state, saved_states)`` and its backward
  ``ssmkit::selective_scan_bwd``.
* ``ssmkit::causal_conv1d(x, weight, bias?, initial_state?, cu_seqlens?, silu, backend)
  -> (y, final_state)`` and ``ssmkit::causal_conv1d_bwd``.
* ``ssmkit::ssd(x, dt, A, B, C, D?, z?, dt_bias?, initial_state?, cu_seqlens?, chunk_size,
  dt_softplus, dt_min, dt_max, backend) -> (y, final_state)`` and ``ssmkit::ssd_bwd`` (the Triton
  form's backward kernels, or autograd through the CPU forms).
* ``ssmkit::delta_rule(q, k, v, beta, g?, initial_state?, cu_seqlens?, scale, use_qk_l2norm,
  chunk_size, backend) -> (o, final_state)`` and ``ssmkit::delta_rule_bwd`` (likewise).

With the Triton form, the forward op also returns the states its backward reads and the backward
op runs the Triton backward on them; the CPU forms' backward ops recompute the forward under
autograd and differentiate it (one extra forward; memory stays that of the form). They dispatch through
:mod:`ssmkit.ops.dispatch`, so ``backend="auto"`` means Triton on CUDA and the chunked form on
CPU, as elsewhere.

Python entry points with the public signatures (no data-dependent validation, so they trace):
:func:`selective_scan`, :func:`causal_conv1d`, :func:`ssd` and :func:`delta_rule`. Shapes as in :mod:`ssmkit.ops.selective_scan`
and :mod:`ssmkit.ops.conv.causal_conv1d`; ``B, C`` may be 3-D or 4-D.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from ssmkit.ops import dispatch
from ssmkit.ops.selective_scan._common import compute_dtype
from ssmkit.ops.ssd._common import compute_dtype as ssd_compute_dtype

__all__ = ["selective_scan", "causal_conv1d", "ssd", "delta_rule"]


def _resolve(op: str, backend: str, x: Tensor):
    # Importing the op packages registers their forms (reference, chunked, triton).
    if op == "selective_scan":
        import ssmkit.ops.selective_scan  # noqa: F401
    elif op == "ssd":
        import ssmkit.ops.ssd  # noqa: F401
    elif op == "delta_rule":
        import ssmkit.ops.delta_rule  # noqa: F401
    else:
        import ssmkit.ops.conv.causal_conv1d  # noqa: F401
        if dispatch.triton_installed():
            import ssmkit.ops.conv.causal_conv1d_triton  # noqa: F401
    return dispatch.get(op, backend, x)


@contextlib.contextmanager
def _autograd_inside_op():
    """Record autograd inside a custom op's implementation. The dispatcher runs op bodies below
    the autograd keys (excluded in thread-local state); the backward ops recompute the forward
    and differentiate it, so they switch recording back on for their body."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView)
    prev = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys]
    try:
        for k in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
        with torch.enable_grad():
            yield
    finally:
        for k, p in zip(keys, prev):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, p)


# ----------------------------------------------------------------------------- selective scan


def _triton_scan(fn) -> bool:
    from ssmkit.ops.selective_scan.triton import selective_scan_triton  # (no Triton import)

    return fn is selective_scan_triton


def _bc4(M: Tensor) -> Tensor:
    return M.unsqueeze(2) if M.dim() == 3 else M


@torch.library.custom_op("ssmkit::selective_scan", mutates_args=())
def _scan_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
             z: Tensor | None, dt_bias: Tensor | None, initial_state: Tensor | None,
             cu_seqlens: Tensor | None, dt_softplus: bool, backend: str,
             save_states: bool, state_mem_limit: int) -> tuple[Tensor, Tensor, Tensor]:
    fn = _resolve("selective_scan", backend, x)
    if save_states and _triton_scan(fn):
        from ssmkit.ops.selective_scan import triton as sst

        y, hT, states, _, _ = sst.forward_with_states(
            x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens,
            None if state_mem_limit < 0 else state_mem_limit)
        return y, hT, states
    with torch.no_grad():
        y, hT = fn(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, True, cu_seqlens)
    return y.contiguous(), hT.contiguous(), x.new_empty(0, dtype=compute_dtype(x))


def _saved_layout(x, B, A, cu_seqlens, backend, save_states, state_mem_limit):
    """``(shape, m, dn)`` of the states the Triton forward saves, or None (nothing saved)."""
    if not (save_states and _triton_scan(_resolve("selective_scan", backend, x))):
        return None
    from ssmkit.ops.selective_scan import triton as sst

    cfg = sst.config_with_limit(None if state_mem_limit < 0 else state_mem_limit)
    return sst.saved_states_layout(cfg, x, _bc4(B), A, cu_seqlens)


@_scan_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, backend, save_states,
      state_mem_limit):
    nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    layout = _saved_layout(x, B, A, cu_seqlens, backend, save_states, state_mem_limit)
    acc = compute_dtype(x)
    states = x.new_empty(layout[0] if layout else (0,), dtype=acc)
    return torch.empty_like(x), x.new_empty(nseq, x.shape[2], A.shape[1], dtype=acc), states


@torch.library.custom_op("ssmkit::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(dy: Tensor, dhT: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                 C: Tensor, D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None,
                 initial_state: Tensor | None, cu_seqlens: Tensor | None, states: Tensor,
                 dt_softplus: bool, backend: str, m: int, dn: bool) -> list[Tensor]:
    ins = [x, dt, A, B, C, D, z, dt_bias, initial_state]
    if states.numel():
        # the Triton backward from the states the forward saved (no second forward)
        from ssmkit.ops.selective_scan import triton as sst

        xp, dtp, Ap, Bp, Cp, Dp, zp, bp, h0, _ = sst._prepare(x, dt, A, B, C, D, z, dt_bias,
                                                             initial_state)
        grads = sst.backward_from_states((xp, dtp, Ap, Bp, Cp, Dp, zp, bp, h0, cu_seqlens, states),
                                         dy, dhT, dt_softplus, m, dn, (True,) * 9)
        grads = [g.view_as(t) if g is not None and t is not None else g for g, t in zip(grads, ins)]
    else:
        fn = _resolve("selective_scan", backend, x)
        if dhT is None:
            dhT = x.new_zeros(x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1,
                              x.shape[2], A.shape[1], dtype=compute_dtype(x))
        with _autograd_inside_op():
            leaves = [t.detach().requires_grad_() if t is not None else None for t in ins]
            y, hT = fn(*leaves[:8], dt_softplus, leaves[8], True, cu_seqlens)
            live = [t for t in leaves if t is not None]
            it = iter(torch.autograd.grad((y, hT), live, (dy, dhT), allow_unused=True))
            grads = [next(it) if t is not None else None for t in leaves]
    # one tensor per input; empty where the input was None, zeros where it got no gradient
    return [x.new_zeros(0) if t is None else torch.zeros_like(t) if g is None else g.contiguous()
            for g, t in zip(grads, ins)]


@_scan_bwd_op.register_fake
def _(dy, dhT, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, states, dt_softplus,
      backend, m, dn):
    return [torch.empty_like(t) if t is not None else x.new_empty(0)
            for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)]


def _scan_setup(ctx, inputs, output):
    (x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, backend, save,
     limit) = inputs
    states = output[2]
    layout = _saved_layout(x, B, A, cu_seqlens, backend, save, limit) if states.numel() else None
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, states)
    ctx.dt_softplus, ctx.backend = dt_softplus, backend
    ctx.m, ctx.dn = (layout[1], layout[2]) if layout else (1, False)


def _scan_backward(ctx, dy, dhT, dstates):
    x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, states = ctx.saved_tensors
    grads = _scan_bwd_op(dy.contiguous(), None if dhT is None else dhT.contiguous(), x, dt, A, B,
                         C, D, z, dt_bias, initial_state, cu_seqlens, states, ctx.dt_softplus,
                         ctx.backend, ctx.m, ctx.dn)
    ins = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    res = [g if t is not None else None for g, t in zip(grads, ins)]
    return (*res, None, None, None, None, None)


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup)


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                   initial_state: Tensor | None = None, return_final_state: bool = False,
                   cu_seqlens: Tensor | None = None, backend: str = "auto", *,
                   state_mem_limit: int | None = None):
    """:func:`ssmkit.ops.selective_scan` as one custom op (traceable; validates shapes only).
    With the Triton form and a gradient to come, the forward saves the states its backward
    reads (the backward op runs the Triton backward on them, no second forward);
    ``state_mem_limit`` (bytes) overrides ``ScanConfig.state_mem_limit`` for this call."""
    if B.dim() != C.dim() or B.dim() not in (3, 4):
        raise ValueError(f"B and C must both be (batch, seqlen, N) or (batch, seqlen, G, N), got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, hT, _ = torch.ops.ssmkit.selective_scan(x, dt, A, B, C, D, z, dt_bias, initial_state,
                                               cu_seqlens, bool(dt_softplus), backend, save,
                                               -1 if state_mem_limit is None else int(state_mem_limit))
    return (y, hT) if return_final_state else y


# ----------------------------------------------------------------------------- causal conv1d


@torch.library.custom_op("ssmkit::causal_conv1d", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None,
             cu_seqlens: Tensor | None, silu: bool, backend: str) -> tuple[Tensor, Tensor]:
    fn = _resolve("causal_conv1d", backend, x)
    with torch.no_grad():
        y, f = fn(x, weight, bias, "silu" if silu else None, initial_state, True, cu_seqlens)
    return y.contiguous(), f.contiguous()


@_conv_op.register_fake
def _(x, weight, bias, initial_state, cu_seqlens, silu, backend):
    nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(x), x.new_empty(nseq, x.shape[2], weight.shape[1] - 1)


@torch.library.custom_op("ssmkit::causal_conv1d_bwd", mutates_args=())
def _conv_bwd_op(dy: Tensor, df: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                 initial_state: Tensor | None, cu_seqlens: Tensor | None, silu: bool,
                 backend: str) -> list[Tensor]:
    fn = _resolve("causal_conv1d", backend, x)
    ins = [x, weight, bias, initial_state]
    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in ins]
        y, f = fn(leaves[0], leaves[1], leaves[2], "silu" if silu else None, leaves[3], True,
                  cu_seqlens)
        live = [t for t in leaves if t is not None]
        grads = torch.autograd.grad((y, f), live, (dy, df), allow_unused=True)
    it = iter(grads)
    out = []
    for t in leaves:
        if t is None:
            out.append(x.new_zeros(0))
        else:
            g = next(it)
            out.append(torch.zeros_like(t) if g is None else g.contiguous())
    return out


@_conv_bwd_op.register_fake
def _(dy, df, x, weight, bias, initial_state, cu_seqlens, silu, backend):
    return [torch.empty_like(t) if t is not None else x.new_empty(0)
            for t in (x, weight, bias, initial_state)]


def _conv_setup(ctx, inputs, output):
    x, weight, bias, initial_state, cu_seqlens, silu, backend = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens)
    ctx.silu, ctx.backend = silu, backend


def _conv_backward(ctx, dy, df):
    x, weight, bias, initial_state, cu_seqlens = ctx.saved_tensors
    grads = _conv_bwd_op(dy.contiguous(), df.contiguous(), x, weight, bias, initial_state,
                         cu_seqlens, ctx.silu, ctx.backend)
    res = [g if t is not None else None for g, t in zip(grads, (x, weight, bias, initial_state))]
    return (*res, None, None, None)


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  activation: str | None = None, initial_state: Tensor | None = None,
                  return_final_state: bool = False, cu_seqlens: Tensor | None = None,
                  backend: str = "auto"):
    """:func:`ssmkit.ops.causal_conv1d` as one custom op (traceable)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    y, f = torch.ops.ssmkit.causal_conv1d(x, weight, bias, initial_state, cu_seqlens,
                                          activation is not None, backend)
    return (y, f) if return_final_state else y


# ----------------------------------------------------------------------------- SSD


def _triton_ssd(fn) -> bool:
    from ssmkit.ops.ssd.triton import ssd_triton  # (no Triton import)

    return fn is ssd_triton


@torch.library.custom_op("ssmkit::ssd", mutates_args=())
def _ssd_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
            z: Tensor | None, dt_bias: Tensor | None, initial_state: Tensor | None,
            cu_seqlens: Tensor | None, chunk_size: int, dt_softplus: bool, dt_min: float,
            dt_max: float, backend: str) -> tuple[Tensor, Tensor]:
    fn = _resolve("ssd", backend, x)
    with torch.no_grad():
        y, hT = fn(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, (dt_min, dt_max),
                   initial_state, True, cu_seqlens)
    return y.contiguous(), hT.contiguous()


@_ssd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, chunk_size, dt_softplus, dt_min,
      dt_max, backend):
    nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc = ssd_compute_dtype(x, dt, B, C, initial_state)
    return torch.empty_like(x), x.new_empty(nseq, x.shape[2], x.shape[3], B.shape[3], dtype=acc)


@torch.library.custom_op("ssmkit::ssd_bwd", mutates_args=())
def _ssd_bwd_op(dy: Tensor, dhT: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                C: Tensor, D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None,
                initial_state: Tensor | None, cu_seqlens: Tensor | None, chunk_size: int,
                dt_softplus: bool, dt_min: float, dt_max: float, backend: str) -> list[Tensor]:
    ins = [x, dt, A, B, C, D, z, dt_bias, initial_state]
    fn = _resolve("ssd", backend, x)
    if _triton_ssd(fn):
        from ssmkit.ops.ssd import triton as sdt

        grads = sdt.backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus,
                             (dt_min, dt_max), dy, dhT)
    else:
        with _autograd_inside_op():
            leaves = [t.detach().requires_grad_() if t is not None else None for t in ins]
            y, hT = fn(*leaves[:5], chunk_size, *leaves[5:8], dt_softplus, (dt_min, dt_max),
                       leaves[8], True, cu_seqlens)
            live = [t for t in leaves if t is not None]
            outs, gouts = (y, hT) if dhT is not None else (y,), (dy, dhT) if dhT is not None else (dy,)
            it = iter(torch.autograd.grad(outs, live, gouts, allow_unused=True))
            grads = [next(it) if t is not None else None for t in leaves]
    return [x.new_zeros(0) if t is None else torch.zeros_like(t) if g is None else g.contiguous()
            for g, t in zip(grads, ins)]


@_ssd_bwd_op.register_fake
def _(dy, dhT, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, chunk_size, dt_softplus,
      dt_min, dt_max, backend):
    return [torch.empty_like(t) if t is not None else x.new_empty(0)
            for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)]


def _ssd_setup(ctx, inputs, output):
    (x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, chunk_size, dt_softplus, dt_min,
     dt_max, backend) = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    ctx.opts = (chunk_size, dt_softplus, dt_min, dt_max, backend)


def _ssd_backward(ctx, dy, dhT):
    x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens = ctx.saved_tensors
    grads = _ssd_bwd_op(dy.contiguous(), None if dhT is None else dhT.contiguous(), x, dt, A, B, C,
                        D, z, dt_bias, initial_state, cu_seqlens, *ctx.opts)
    ins = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    res = [g if t is not None else None for g, t in zip(grads, ins)]
    return (*res, None, None, None, None, None, None)


_ssd_op.register_autograd(_ssd_backward, setup_context=_ssd_setup)


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
        z: Tensor | None = None, dt_bias: Tensor | None = None, *, chunk_size: int = 64,
        dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, math.inf),
        initial_state: Tensor | None = None, return_final_state: bool = False,
        cu_seqlens: Tensor | None = None, backend: str = "auto"):
    """:func:`ssmkit.ops.ssd` as one custom op (traceable; no validation: the caller built the
    inputs). The Triton form's backward runs its backward kernels; the CPU forms' backward
    differentiates a second forward."""
    y, hT = torch.ops.ssmkit.ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens,
                                 int(chunk_size), bool(dt_softplus), float(dt_limit[0]),
                                 float(dt_limit[1]), backend)
    return (y, hT) if return_final_state else y


# ----------------------------------------------------------------------------- delta rule


def _triton_delta(fn) -> bool:
    from ssmkit.ops.delta_rule.triton import delta_rule_triton  # (no Triton import)

    return fn is delta_rule_triton


@torch.library.custom_op("ssmkit::delta_rule", mutates_args=())
def _delta_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, initial_state: Tensor | None,
              cu_seqlens: Tensor | None, scale: float, use_qk_l2norm: bool, chunk_size: int,
              backend: str) -> tuple[Tensor, Tensor]:
    fn = _resolve("delta_rule", backend, q)
    with torch.no_grad():
        o, hT = fn(q, k, v, beta, g, scale, use_qk_l2norm, chunk_size, initial_state, True, cu_seqlens)
    return o.to(q.dtype).contiguous(), hT.contiguous()


@_delta_op.register_fake
def _(q, k, v, beta, g, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size, backend):
    nseq = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc = torch.float64 if any(t is not None and t.dtype == torch.float64
                               for t in (q, k, v, beta, g, initial_state)) else torch.float32
    return v.new_empty(v.shape, dtype=q.dtype), q.new_empty(nseq, v.shape[2], q.shape[3], v.shape[3], dtype=acc)


@torch.library.custom_op("ssmkit::delta_rule_bwd", mutates_args=())
def _delta_bwd_op(do: Tensor, dhT: Tensor | None, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
                  initial_state: Tensor | None, cu_seqlens: Tensor | None, scale: float, use_qk_l2norm: bool,
                  chunk_size: int, backend: str) -> list[Tensor]:
    ins = [q, k, v, beta, g, initial_state]
    fn = _resolve("delta_rule", backend, q)
    if _triton_delta(fn):
        from ssmkit.ops.delta_rule import triton as drt

        grads = drt.recompute_backward(q, k, v, beta, g, initial_state, cu_seqlens, scale, use_qk_l2norm, do, dhT)
    else:
        with _autograd_inside_op():
            leaves = [t.detach().requires_grad_() if t is not None else None for t in ins]
            o, hT = fn(*leaves[:5], scale, use_qk_l2norm, chunk_size, leaves[5], True, cu_seqlens)
            live = [t for t in leaves if t is not None]
            outs, gouts = (o, hT) if dhT is not None else (o,), (do, dhT) if dhT is not None else (do,)
            it = iter(torch.autograd.grad(outs, live, gouts, allow_unused=True))
            grads = [next(it) if t is not None else None for t in leaves]
    return [q.new_zeros(0) if t is None else torch.zeros_like(t) if gr is None else gr.to(t.dtype).contiguous()
            for gr, t in zip(grads, ins)]


@_delta_bwd_op.register_fake
def _(do, dhT, q, k, v, beta, g, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size, backend):
    return [torch.empty_like(t) if t is not None else q.new_empty(0) for t in (q, k, v, beta, g, initial_state)]


def _delta_setup(ctx, inputs, output):
    q, k, v, beta, g, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size, backend = inputs
    ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens)
    ctx.opts = (scale, use_qk_l2norm, chunk_size, backend)


def _delta_backward(ctx, do, dhT):
    q, k, v, beta, g, initial_state, cu_seqlens = ctx.saved_tensors
    grads = _delta_bwd_op(do.contiguous(), None if dhT is None else dhT.contiguous(), q, k, v, beta, g,
                          initial_state, cu_seqlens, *ctx.opts)
    ins = (q, k, v, beta, g, initial_state)
    return (*[gr if t is not None else None for gr, t in zip(grads, ins)], None, None, None, None, None)


_delta_op.register_autograd(_delta_backward, setup_context=_delta_setup)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, *, beta: Tensor, g: Tensor | None = None, scale: float | None = None,
               use_qk_l2norm: bool = False, chunk_size: int = 64, initial_state: Tensor | None = None,
               return_final_state: bool = False, cu_seqlens: Tensor | None = None, backend: str = "auto"):
    """:func:`ssmkit.ops.delta_rule` as one custom op (traceable; no validation: the caller built
    the inputs). The Triton form's backward recomputes the chunk states with its forward kernel,
    then runs its backward kernels; the CPU forms' backward differentiates a second forward."""
    o, hT = torch.ops.ssmkit.delta_rule(q, k, v, beta, g, initial_state, cu_seqlens,
                                        1.0 if scale is None else float(scale), bool(use_qk_l2norm),
                                        int(chunk_size), backend)
    return (o, hT) if return_final_state else o
