"""``torch.library`` custom ops for the scan and conv kernels, so ``torch.compile(fullgraph=True)``
sees one opaque node per op (no graph break on the Triton launch or the CPU forms).

Ops (namespace ``ssmkit``), each with a fake (meta) implementation for tracing and an autograd
formula:

* ``ssmkit::selective_scan(x, dt, A, B, C, D?, z?, dt_bias?, initial_state?, cu_seqlens?,
  dt_softplus, backend) -> (y, final_state)`` and its backward ``ssmkit::selective_scan_bwd``.
* ``ssmkit::causal_conv1d(x, weight, bias?, initial_state?, cu_seqlens?, silu, backend)
  -> (y, final_state)`` and ``ssmkit::causal_conv1d_bwd``.

The backward ops recompute the forward of the chosen form under autograd and differentiate it
(one extra forward; memory stays that of the form). They dispatch through
:mod:`ssmkit.ops.dispatch`, so ``backend="auto"`` means Triton on CUDA and the chunked form on
CPU, as elsewhere.

Python entry points with the public signatures (no data-dependent validation, so they trace):
:func:`selective_scan` and :func:`causal_conv1d`. Shapes as in :mod:`ssmkit.ops.selective_scan`
and :mod:`ssmkit.ops.conv.causal_conv1d`; ``B, C`` may be 3-D or 4-D.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ssmkit.ops import dispatch
from ssmkit.ops.selective_scan._common import compute_dtype

__all__ = ["selective_scan", "causal_conv1d"]


def _resolve(op: str, backend: str, x: Tensor):
    # Importing the op packages registers their forms (reference, chunked, triton).
    if op == "selective_scan":
        import ssmkit.ops.selective_scan  # noqa: F401
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


@torch.library.custom_op("ssmkit::selective_scan", mutates_args=())
def _scan_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
             z: Tensor | None, dt_bias: Tensor | None, initial_state: Tensor | None,
             cu_seqlens: Tensor | None, dt_softplus: bool, backend: str) -> tuple[Tensor, Tensor]:
    fn = _resolve("selective_scan", backend, x)
    with torch.no_grad():
        y, hT = fn(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, True, cu_seqlens)
    return y.contiguous(), hT.contiguous()


@_scan_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, backend):
    nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(x), x.new_empty(nseq, x.shape[2], A.shape[1], dtype=compute_dtype(x))


@torch.library.custom_op("ssmkit::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(dy: Tensor, dhT: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None,
                 initial_state: Tensor | None, cu_seqlens: Tensor | None, dt_softplus: bool,
                 backend: str) -> list[Tensor]:
    fn = _resolve("selective_scan", backend, x)
    ins = [x, dt, A, B, C, D, z, dt_bias, initial_state]
    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in ins]
        y, hT = fn(*leaves[:8], dt_softplus, leaves[8], True, cu_seqlens)
        live = [t for t in leaves if t is not None]
        grads = torch.autograd.grad((y, hT), live, (dy, dhT), allow_unused=True)
    it = iter(grads)
    out = []
    for t in leaves:  # one tensor per input; zeros (never used) where the input was None
        if t is None:
            out.append(x.new_zeros(0))
        else:
            g = next(it)
            out.append(torch.zeros_like(t) if g is None else g.contiguous())
    return out


@_scan_bwd_op.register_fake
def _(dy, dhT, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, backend):
    return [torch.empty_like(t) if t is not None else x.new_empty(0)
            for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)]


def _scan_setup(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, backend = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    ctx.dt_softplus, ctx.backend = dt_softplus, backend


def _scan_backward(ctx, dy, dhT):
    x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens = ctx.saved_tensors
    if dhT is None:
        dhT = x.new_zeros(1).expand(0)  # never reached in practice: autograd passes zeros
    grads = _scan_bwd_op(dy.contiguous(), dhT.contiguous(), x, dt, A, B, C, D, z, dt_bias,
                         initial_state, cu_seqlens, ctx.dt_softplus, ctx.backend)
    ins = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    res = [g if t is not None else None for g, t in zip(grads, ins)]
    return (*res, None, None, None)


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup)


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                   initial_state: Tensor | None = None, return_final_state: bool = False,
                   cu_seqlens: Tensor | None = None, backend: str = "auto"):
    """:func:`ssmkit.ops.selective_scan` as one custom op (traceable; validates shapes only)."""
    if B.dim() != C.dim() or B.dim() not in (3, 4):
        raise ValueError(f"B and C must both be (batch, seqlen, N) or (batch, seqlen, G, N), got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    y, hT = torch.ops.ssmkit.selective_scan(x, dt, A, B, C, D, z, dt_bias, initial_state,
                                            cu_seqlens, bool(dt_softplus), backend)
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
