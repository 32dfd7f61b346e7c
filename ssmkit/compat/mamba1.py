"""``mamba_ssm``-style entry points for the Mamba-1 selective scan, running through ssmkit.

Layouts follow ``mamba_ssm`` (channels before time), so code written against
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` and
``mamba_ssm.ops.triton.selective_state_update.selective_state_update`` (and the ``causal_conv1d``
package's ``causal_conv1d_update``) runs unchanged on any device, including CPUs. Internally everything is transposed to ssmkit's ``(batch, seqlen, ...)``.
"""

from __future__ import annotations

import torch

from ssmkit._checks import check_tensor
from ssmkit.ops.conv.causal_conv1d import causal_conv1d_step
from ssmkit.ops.selective_scan import selective_scan, selective_scan_step
from ssmkit.ops.ssd import ssd_step

__all__ = ["selective_scan_fn", "selective_state_update", "causal_conv1d_update"]


def _bc_to_ssmkit(name: str, M: torch.Tensor, bsz: int, dim: int, L: int) -> torch.Tensor:
    """mamba_ssm B/C -> ssmkit (batch, L, G, N).

    Accepts ``(batch, N, L)`` (shared by all channels), ``(batch, G, N, L)`` (groups) and the
    non-selective ``(dim, N)`` (one fixed row per channel: G = dim groups, broadcast over time).
    """
    check_tensor(name, M, (2, 3, 4), desc="(batch, N, seqlen), (batch, G, N, seqlen) or (dim, N)")
    if M.is_complex():
        raise TypeError(f"{name}: complex B/C are not supported by ssmkit's selective scan")
    if M.dim() == 2:
        if M.shape[0] != dim:
            raise ValueError(f"{name} of shape (dim, N) must have dim={dim}, got {tuple(M.shape)}")
        return M.view(1, 1, dim, M.shape[1]).expand(bsz, L, dim, M.shape[1])
    if M.dim() == 3:
        return M.permute(0, 2, 1).unsqueeze(2)
    return M.permute(0, 3, 1, 2)


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
):
    """``mamba_ssm``'s ``selective_scan_fn``: u, delta, z ``(batch, dim, seqlen)``; A ``(dim, N)``;
    B, C ``(batch, N, seqlen)`` or ``(batch, G, N, seqlen)`` (or ``(dim, N)``, not selective);
    D, delta_bias ``(dim,)``. Returns ``out (batch, dim, seqlen)`` and, with
    ``return_last_state``, the last state ``(batch, dim, N)`` (float32)."""
    check_tensor("u", u, 3, desc="(batch, dim, seqlen)")
    bsz, dim, L = u.shape
    check_tensor("delta", delta, shape=(bsz, dim, L), desc=f"(batch={bsz}, dim={dim}, seqlen={L})")
    check_tensor("z", z, shape=(bsz, dim, L), desc=f"(batch={bsz}, dim={dim}, seqlen={L})", allow_none=True)
    if A.is_complex():
        raise TypeError("A: complex A is not supported by ssmkit's selective scan (use a real, negative A)")
    Bt = _bc_to_ssmkit("B", B, bsz, dim, L)
    Ct = _bc_to_ssmkit("C", C, bsz, dim, L)
    if Bt.shape[2] != Ct.shape[2]:  # e.g. selective B with a fixed (dim, N) C: one group per channel
        Bt = Bt.expand(bsz, L, -1, -1).repeat_interleave(dim // Bt.shape[2], dim=2)
        Ct = Ct.expand(bsz, L, -1, -1).repeat_interleave(dim // Ct.shape[2], dim=2)
    out = selective_scan(
        u.transpose(1, 2), delta.transpose(1, 2), A, Bt, Ct, D=D,
        z=None if z is None else z.transpose(1, 2), dt_bias=delta_bias, dt_softplus=bool(delta_softplus),
        return_final_state=return_last_state, backend=backend,
    )
    if return_last_state:
        y, last = out
        return y.transpose(1, 2), last
    return out.transpose(1, 2)


def _tied_heads(state, A, dt, dt_bias) -> bool:
    """Mamba-2's call (``mamba_ssm``'s ``Mamba2.step``): A, dt and dt_bias repeated over headdim
    (and A over N) as stride-0 views, so the step is SSD's with one A and one Δ per head."""
    return (state.dim() == 4 and state.dtype in (torch.float32, torch.float64) and state.is_contiguous()
            and A.dim() == 3 and A.stride(1) == 0 and A.stride(2) == 0 and dt.dim() == 3 and dt.stride(2) == 0
            and (dt_bias is None or (dt_bias.dim() == 2 and dt_bias.stride(1) == 0)))


def _step_pool(state, sbi, step, x, dt, B, C, z):
    """Run ``step(state_rows, x, dt, B, C, z)`` on the pool rows ``sbi`` names (negative: padding,
    output zero) and write them back."""
    check_tensor("state_batch_indices", sbi, shape=(x.shape[0],), desc=f"(batch={x.shape[0]},)", floating=False)
    keep = sbi.long() >= 0
    rows = sbi.long()[keep]
    sub = state[rows]
    y = step(sub, x[keep], dt[keep], B[keep], C[keep], None if z is None else z[keep])
    state[rows] = sub
    out = x.new_zeros(x.shape)
    out[keep] = y
    return out


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``mamba_ssm``'s ``selective_state_update`` (one decode token, ``state`` updated in place).

    Mamba-1 layout: state ``(batch, dim, N)``, x/dt/z ``(batch, dim)``, A ``(dim, N)``, B/C
    ``(batch, N)``, D/dt_bias ``(dim,)``. Multi-head layout: state ``(batch, H, P, N)``,
    x/dt/z ``(batch, H, P)``, A ``(H, P, N)``, B/C ``(batch, G, N)``, D/dt_bias ``(H, P)``.
    Mamba-2's call (A, dt, dt_bias repeated over P and N as stride-0 views, a float32 state)
    runs :func:`ssmkit.ops.ssd_step` (its Triton kernel on CUDA).

    ``state_batch_indices (batch,)``: ``state`` is a pool ``(pool, ...)`` and row ``b`` reads and
    writes pool row ``state_batch_indices[b]``; a negative index is a padding row (output zero,
    no state touched), as in ``mamba_ssm``.
    """
    check_tensor("state", state, (3, 4), desc="(batch, dim, N) or (batch, nheads, headdim, N)")
    check_tensor("x", x, state.dim() - 1, desc="(batch, dim) or (batch, nheads, headdim)")
    if _tied_heads(state, A, dt, dt_bias):
        check_tensor("A", A, shape=tuple(state.shape[1:]), desc=f"(nheads, headdim, N) = {tuple(state.shape[1:])}")
        check_tensor("dt", dt, shape=tuple(x.shape), desc=f"like x {tuple(x.shape)}")
        Dh = D if D is None or D.dim() != 2 or D.stride(1) != 0 else D[:, 0]
        return ssd_step(state, x, dt[..., 0], A[:, 0, 0], B, C, Dh, z,
                        None if dt_bias is None else dt_bias[:, 0], dt_softplus=bool(dt_softplus),
                        state_batch_indices=state_batch_indices, backend=backend)
    if state_batch_indices is not None:
        def step(s, x_, dt_, B_, C_, z_):
            return selective_state_update(s, x_, dt_, A, B_, C_, D, z_, dt_bias, dt_softplus, backend=backend)

        return _step_pool(state, state_batch_indices, step, x, dt, B, C, z)
    heads = state.dim() == 4
    bsz, N = state.shape[0], state.shape[-1]
    dim = state.shape[1] * state.shape[2] if heads else state.shape[1]
    xshape = tuple(state.shape[:-1])

    def flat(name, t, shape, allow_none=True):
        check_tensor(name, t, shape=shape, desc=str(shape), allow_none=allow_none)
        if t is None:
            return None
        return t.reshape(bsz, dim)

    xf = flat("x", x, xshape, allow_none=False)
    dtf = flat("dt", dt, xshape, allow_none=False)
    zf = flat("z", z, xshape)
    check_tensor("A", A, shape=(*xshape[1:], N), desc=str((*xshape[1:], N)))
    Af = A.reshape(dim, N)
    pshape = tuple(xshape[1:])
    check_tensor("D", D, shape=pshape, desc=str(pshape), allow_none=True)
    check_tensor("dt_bias", dt_bias, shape=pshape, desc=str(pshape), allow_none=True)
    Df = None if D is None else D.reshape(dim)
    bf = None if dt_bias is None else dt_bias.reshape(dim)
    work = state.view(bsz, dim, N) if state.is_contiguous() else state.reshape(bsz, dim, N).clone()
    in_place = work.data_ptr() == state.data_ptr() and state.is_contiguous()
    if work.dtype not in (torch.float32, torch.float64):
        work, in_place = work.float(), False
    y = selective_scan_step(work, xf, dtf, Af, B, C, D=Df, z=zf, dt_bias=bf, dt_softplus=bool(dt_softplus),
                      backend=backend)
    if not in_place:
        state.copy_(work.view(state.shape).to(state.dtype))
    return y.reshape(xshape)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | bool | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The ``causal_conv1d`` package's ``causal_conv1d_update``: ``x`` first, channels before time.

    ``x: (batch, dim)`` or ``(batch, dim, seqlen)``; ``conv_state: (batch, dim, width-1)``, updated
    in place; ``weight: (dim, width)``; ``activation``: None, ``"silu"``/``"swish"`` or a bool.
    Returns ``y`` shaped like ``x``. ``cache_seqlens`` / ``conv_state_indices`` (a circular or
    indexed state buffer) are not supported. ssmkit's own form: :func:`ssmkit.ops.causal_conv1d_step`
    (state first, ``(batch, T, dim)``).
    """
    if cache_seqlens is not None or conv_state_indices is not None:
        raise ValueError("cache_seqlens and conv_state_indices are not supported: pass a (batch, dim, width-1) "
                         "conv_state in order")
    if isinstance(activation, bool):
        activation = "silu" if activation else None
    check_tensor("x", x, (2, 3), desc="(batch, dim) or (batch, dim, seqlen)")
    xs = x if x.dim() == 2 else x.transpose(1, 2)
    y = causal_conv1d_step(conv_state, xs, weight, bias, activation=activation, backend=backend)
    return y if x.dim() == 2 else y.transpose(1, 2)
