"""Causal depthwise 1-D convolution (the short convolution in front of Mamba's SSM).

Shapes (one layout for all ops, time on axis 1):

* ``x``: ``(batch, seqlen, dim)``; ``weight``: ``(dim, width)``; ``bias``: ``(dim,)``
* ``initial_state`` / final state: ``(batch, dim, width - 1)``, the last ``width - 1`` inputs
  before / at the end of the sequence (oldest first), i.e. exactly the decode ``conv_state``.

Math: with ``W = width`` and the inputs before the sequence taken from ``initial_state``
(zeros by default),

    y[t, d] = act( bias[d] + sum_{k=0}^{W-1} weight[d, k] * x[t - (W-1) + k, d] )

so ``weight[:, -1]`` multiplies the current token (the ``nn.Conv1d`` cross-correlation with
``padding=W-1`` that ``mamba_ssm`` uses). With ``cu_seqlens`` (batch 1, packed sequences) every
sequence starts from its own initial state (row ``i`` of ``initial_state``, shape
``(num_seqs, dim, W-1)``), never seeing its neighbour's tokens.

Forms: ``reference`` (explicit sum over taps) and ``chunked`` (the same sum as fused in-place
multiply-adds in the (batch, seqlen, dim) layout when no gradient is needed), both differentiable
through autograd and registered under the op name ``"causal_conv1d"``. With compiled CPU kernels
on (:mod:`ssmkit.ops.cpu_compile`), ``chunked`` inference in float32 runs blocks of output rows
through one compiled pass each (:mod:`ssmkit.ops.conv.compiled`).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F

from ssmkit._checks import check_cu_seqlens, check_same_device, check_tensor, read_values
from ssmkit.ops.conv import compiled
from ssmkit.ops.cpu_compile import cpu_compile_enabled
from ssmkit.ops.dispatch import get, register

__all__ = ["causal_conv1d", "causal_conv1d_step", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def _segments(cu_seqlens: torch.Tensor | None, seqlen: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, seqlen)]
    c = cu_seqlens.tolist()
    return [(int(a), int(b)) for a, b in zip(c[:-1], c[1:])]


def _conv_segment_reference(x, weight, bias, activation, init):
    """x (B, L, D), init (B, D, W-1) or None -> y (B, L, D), final (B, D, W-1)."""
    bsz, L, D = x.shape
    W = weight.shape[1]
    if init is None:
        init = x.new_zeros(bsz, D, W - 1)
    xp = torch.cat([init.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, W-1+L, D)
    y = torch.zeros_like(x)
    for k in range(W):
        y = y + weight[:, k] * xp[:, k : k + L]
    if bias is not None:
        y = y + bias
    final = xp[:, xp.shape[1] - (W - 1) :].transpose(1, 2)
    return _act(y, activation), final


@register("causal_conv1d", "reference")
def causal_conv1d_reference(x, weight, bias=None, activation=None, initial_state=None,
                            return_final_state=False, cu_seqlens=None):
    """Sum over the ``width`` taps, one sequence at a time. Same signature as the public op."""
    ys, finals = [], []
    for i, (a, b) in enumerate(_segments(cu_seqlens, x.shape[1])):
        init = None
        if initial_state is not None:
            init = initial_state[i : i + 1] if cu_seqlens is not None else initial_state
        y, f = _conv_segment_reference(x[:, a:b], weight, bias, activation, init)
        ys.append(y)
        finals.append(f)
    y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
    if return_final_state:
        return y, torch.cat(finals, dim=0) if len(finals) > 1 else finals[0]
    return y


def _conv_segment_fast(x, weight, bias, activation, init):
    """Sum of ``width`` shifted copies of x, each scaled by one tap, in the (batch, seqlen, dim)
    layout: a few fused multiply-adds over contiguous rows. Measured ~5x faster on CPU than
    ``F.conv1d(groups=dim)``, which needs two transposes and has a slow depthwise path."""
    bsz, L, D = x.shape
    W = weight.shape[1]
    # taps as rows (width, dim): each tap's multiplier is then a contiguous row, which the
    # elementwise loops vectorise (a column of the (dim, width) weight is strided: ~5x slower)
    w = weight.to(x.dtype).t().contiguous()
    if not torch.is_grad_enabled() and L >= W - 1:
        return _conv_segment_inplace(x, w, bias, activation, init)
    if init is None:
        xp = F.pad(x, (0, 0, W - 1, 0))  # (B, W-1+L, D)
    else:
        xp = torch.cat([init.to(x.dtype).transpose(1, 2), x], dim=1)
    if bias is None:
        y = xp[:, 0:L] * w[0]
    else:
        y = torch.addcmul(bias.to(x.dtype), xp[:, 0:L], w[0])
    for k in range(1, W):
        y = y.addcmul_(xp[:, k : k + L], w[k]) if not torch.is_grad_enabled() else y + xp[:, k : k + L] * w[k]
    if activation in ("silu", "swish"):
        y = F.silu(y, inplace=not torch.is_grad_enabled())
    final = xp[:, xp.shape[1] - (W - 1) :].transpose(1, 2)
    return y, final


def _conv_segment_inplace(x, w, bias, activation, init):
    """``w``: the taps as rows, ``(width, dim)``. No-autograd variant of :func:`_conv_segment_fast` that never builds the padded copy:
    tap k (shift s = W-1-k) is added in place to the outputs it reaches, and the first s outputs
    take their earlier inputs from ``init``. Needs seqlen >= W-1."""
    bsz, L, D = x.shape
    W = w.shape[0]
    if W > 1 and x.dtype == torch.float32 and cpu_compile_enabled(x) and L >= W - 1 + compiled.ROWS:
        y = _conv_compiled(x, w, bias, activation, init)
        if y is not None:
            return y, x[:, L - (W - 1) :].transpose(1, 2)
    y = x * w[W - 1] if bias is None else torch.addcmul(bias.to(x.dtype), x, w[W - 1])
    for s in range(1, W):
        k = W - 1 - s  # y_t += w[k] * x_{t-s}
        if L > s:
            y[:, s:].addcmul_(x[:, : L - s], w[k])
        if init is not None:
            m = min(s, L)  # outputs t < s read inputs from before the sequence: init[..., t - s + W-1]
            y[:, :m].addcmul_(init[:, :, W - 1 - s : W - 1 - s + m].transpose(1, 2).to(x.dtype), w[k])
    if activation in ("silu", "swish"):
        y = F.silu(y, inplace=True)
    final = x[:, L - (W - 1) :].transpose(1, 2)
    return y, final


def _conv_compiled(x, w, bias, activation, init):
    """:func:`_conv_segment_inplace`'s output through the compiled row blocks (:mod:`.compiled`),
    one batch row per call; the first W - 1 rows (which read ``init``) eager. Where L - (W - 1)
    is not a multiple of the block, the last block ends at L and overlaps the one before (its
    rows are computed twice, identically). None if compiling failed."""
    bsz, L, D = x.shape
    W, R = w.shape[0], compiled.ROWS
    y = x.new_empty(bsz, L, D)
    y[:, : W - 1] = _conv_segment_inplace(x[:, : W - 1], w, bias, activation, init)[0]
    starts = list(range(W - 1, L - R + 1, R))
    if starts[-1] != L - R:
        starts.append(L - R)
    b = None if bias is None else bias.to(x.dtype)
    silu, kern = activation in ("silu", "swish"), None
    for r in range(bsz):
        for c in starts:
            args = (y[r, c : c + R], x[r, c - (W - 1) : c + R], w, b)
            if kern is None:  # every block has the same shapes and strides
                kern = compiled.conv_rows_kernel(*args, silu)
            if kern is None or kern(*(t for t in args if t is not None)) is None:
                return None
    return y


@register("causal_conv1d", "chunked")
def causal_conv1d_chunked(x, weight, bias=None, activation=None, initial_state=None,
                          return_final_state=False, cu_seqlens=None):
    """Shifted multiply-adds in the (batch, seqlen, dim) layout after prepending the initial state."""
    ys, finals = [], []
    for i, (a, b) in enumerate(_segments(cu_seqlens, x.shape[1])):
        init = None
        if initial_state is not None:
            init = initial_state[i : i + 1] if cu_seqlens is not None else initial_state
        y, f = _conv_segment_fast(x[:, a:b], weight, bias, activation, init)
        ys.append(y)
        finals.append(f)
    y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
    if return_final_state:
        return y, (torch.cat(finals, dim=0) if len(finals) > 1 else finals[0]).contiguous()
    return y


def _check_activation(activation: object) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution over time.

    Args:
        x: ``(batch, seqlen, dim)``.
        weight: ``(dim, width)`` (an ``nn.Conv1d(dim, dim, width, groups=dim)`` weight
            ``(dim, 1, width)`` squeezed).
        bias: ``(dim,)`` or None.
        activation: None or ``"silu"``/``"swish"``.
        initial_state: ``(batch, dim, width-1)`` (``(num_seqs, dim, width-1)`` with
            ``cu_seqlens``), the inputs preceding the sequence; zeros if None.
        return_final_state: also return the last ``width-1`` inputs ``(batch, dim, width-1)``.
        cu_seqlens: ``(num_seqs + 1,)`` int32/int64 cumulative lengths (batch must be 1).
        backend: ``"auto" | "reference" | "chunked" | "triton"``.
        check: also check ``cu_seqlens``' values; None: only for CPU tensors (reading GPU data
            synchronises with the host).

    Every argument after ``bias`` is keyword-only.

    Returns:
        ``y`` ``(batch, seqlen, dim)`` and, if asked, the final state.
    """
    check_tensor("x", x, 3, desc="(batch, seqlen, dim)")
    bsz, L, D = x.shape
    check_tensor("weight", weight, 2, desc=f"(dim={D}, width)")
    if weight.shape[0] != D:
        raise ValueError(f"weight must have shape (dim={D}, width), got {tuple(weight.shape)}")
    W = weight.shape[1]
    if W < 1:
        raise ValueError("weight width must be >= 1")
    check_tensor("bias", bias, shape=(D,), desc=f"(dim={D},)", allow_none=True)
    _check_activation(activation)
    check_cu_seqlens(cu_seqlens, bsz, L, read_values(check, x))
    nstate = bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    check_tensor("initial_state", initial_state, shape=(nstate, D, W - 1),
                 desc=f"({'num_seqs' if cu_seqlens is not None else 'batch'}={nstate}, dim={D}, width-1={W - 1})",
                 allow_none=True)
    check_same_device(x=x, weight=weight, bias=bias, initial_state=initial_state, cu_seqlens=cu_seqlens)
    fn = get("causal_conv1d", backend, x)
    return fn(x, weight, bias, activation, initial_state, return_final_state, cu_seqlens)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend="auto"):
    """Deprecated: :func:`causal_conv1d_step` takes the state first (``mamba_ssm``'s argument order
    stays in :func:`ssmkit.compat.causal_conv1d_update`)."""
    warnings.warn("ssmkit.ops.causal_conv1d_update is deprecated: use causal_conv1d_step(conv_state, x, "
                  "weight, bias, activation=...) or ssmkit.compat.causal_conv1d_update",
                  DeprecationWarning, stacklevel=2)
    return causal_conv1d_step(conv_state, x, weight, bias, activation=activation, backend=backend)


def causal_conv1d_step(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode: convolve T >= 1 new tokens against ``conv_state`` and shift it in place.

    Args:
        conv_state: ``(batch, dim, width-1)``, the last inputs (oldest first); updated in place.
        x: ``(batch, dim)`` one token, or ``(batch, T, dim)`` several.
        weight: ``(dim, width)``; bias: ``(dim,)`` or None; activation: None or ``"silu"``.
        backend: form of the op ``"causal_conv1d_step"``: ``"auto" | "reference" | "triton"``
            (registered forms get ``x: (batch, T, dim)``).

    Returns:
        ``y`` with the shape of ``x``.
    """
    check_tensor("x", x, (2, 3), desc="(batch, dim) or (batch, T, dim)")
    single = x.dim() == 2
    x3 = x.unsqueeze(1) if single else x
    bsz, T, D = x3.shape
    check_tensor("weight", weight, 2, desc=f"(dim={D}, width)")
    if weight.shape[0] != D:
        raise ValueError(f"weight must have shape (dim={D}, width), got {tuple(weight.shape)}")
    W = weight.shape[1]
    check_tensor("conv_state", conv_state, shape=(bsz, D, W - 1), desc=f"(batch={bsz}, dim={D}, width-1={W - 1})")
    check_tensor("bias", bias, shape=(D,), desc=f"(dim={D},)", allow_none=True)
    _check_activation(activation)
    check_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias)
    y = get("causal_conv1d_step", backend, x)(x3, conv_state, weight, bias, activation)
    return y.squeeze(1) if single else y


@register("causal_conv1d_step", "reference")
def conv_update_unchecked(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """The plain form of :func:`causal_conv1d_step`, without validation, ``x`` first: ``x: (batch, T, dim)``
    (op name ``"causal_conv1d_step"``; layers that already guarantee the shapes may call the
    dispatched form directly, since per-token Python overhead matters when decoding)."""
    T, D = x.shape[1], x.shape[2]
    W = weight.shape[1]
    w = weight.to(x.dtype)
    if T == 1:
        # One token: a (batch, dim, width) window dotted with the kernel; cheaper than conv1d.
        window = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=2)  # (B, D, W)
        y = (window * w).sum(-1)
        if bias is not None:
            y = y + bias.to(x.dtype)
        y = _act(y, activation).unsqueeze(1)
        if W > 1:
            conv_state.copy_(window[:, :, 1:])
        return y
    xp = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=2)  # (B, D, W-1+T)
    y = F.conv1d(xp, w.unsqueeze(1), None if bias is None else bias.to(x.dtype), groups=D)
    y = _act(y, activation).transpose(1, 2)
    if W > 1:
        conv_state.copy_(xp[:, :, xp.shape[2] - (W - 1) :])
    return y


# The Triton form ("causal_conv1d", "triton") registers itself on import; it is optional, so a
# missing or broken Triton leaves the CPU forms. (The step's Triton form: ssmkit.ops.fused.)
if importlib.util.find_spec("triton") is not None:
    try:
        from ssmkit.ops.conv import causal_conv1d_triton  # noqa: E402,F401
    except ImportError:  # pragma: no cover
        pass
