"""Gated RMSNorm of Mamba-2 (Dao & Gu 2024, Sec. 8): op ``"gated_rms_norm"``, forward and backward.

For ``x, z: (..., d)`` and ``weight: (d,)``, normalised in groups of ``group_size`` channels
(``None``: one group of ``d``), with ``silu(z) = z sigmoid(z)``::

    norm_before_gate=False:  y = rms(x ⊙ silu(z)) ⊙ weight           (Mamba-2's default)
    norm_before_gate=True:   y = rms(x) ⊙ weight ⊙ silu(z)
    z=None:                  y = rms(x) ⊙ weight
    rms(u) = u / sqrt(mean_group(u²) + eps)

Everything is computed in float32 (float64 for float64 inputs) from the inputs as given and
rounded once, to ``x``'s dtype: the semantics of ``mamba_ssm``'s ``rmsnorm_fn`` /
``RMSNormGated`` (no bias).

Forms: ``"reference"`` (PyTorch, differentiable by autograd) and ``"triton"``: one program per
(row, group) in the forward, which also stores each group's ``1 / rms`` (float32, 4 bytes per
group and row); the backward recomputes ``x ⊙ silu(z)`` and the normalised row from the inputs
and that statistic, writes dx and dz, and sums the weight gradient over a block of rows per
program in registers (partial sums ``(programs, d)``, added in a fixed order: deterministic, no
atomics). The Triton form runs as ``torch.library`` ops (``ssmkit::gated_rms_norm`` and
``ssmkit::gated_rms_norm_bwd``, with fake implementations), so ``torch.compile(fullgraph=True)``
sees one node. Groups wider than :data:`MAX_TRITON_GROUP` fall back to the reference form.
Kernels compile on first use; this module imports without Triton.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmkit.ops.dispatch import get
from ssmkit.ops.fused.norm import _upcast, rms_norm

__all__ = ["gated_rms_norm", "gated_rms_norm_reference", "gated_rms_norm_triton"]

# A group is held in registers by one program; wider groups use the reference form.
MAX_TRITON_GROUP = 16384
# Backward: about this many programs per group share the rows (each sums its rows' weight
# gradient in registers); ~2 per SM of an H100.
BWD_PROGRAMS = 256


def gated_rms_norm_reference(x: Tensor, weight: Tensor, z: Tensor | None = None, eps: float = 1e-5,
                             group_size: int | None = None, norm_before_gate: bool = False) -> Tensor:
    """PyTorch form of :func:`gated_rms_norm` (no validation)."""
    u = _upcast(x)
    if z is not None and not norm_before_gate:
        u = u * F.silu(_upcast(z))
    y = rms_norm(u, weight, eps, group_size)  # in u's dtype (float32/float64)
    if z is not None and norm_before_gate:
        y = y * F.silu(_upcast(z))
    return y.to(x.dtype)


@functools.cache
def _kernels():
    """The kernels, defined (and Triton imported) on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def fwd_kernel(X, Z, W, Y, RSTD, gs, n_groups, sx, sz, sy, eps,
                   HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        grp = tl.program_id(1)
        cols = grp * gs + tl.arange(0, BLOCK)
        m = tl.arange(0, BLOCK) < gs
        ACC = RSTD.dtype.element_ty
        x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(ACC)
        if HAS_Z:
            z = tl.load(Z + row * sz + cols, mask=m, other=0.0).to(ACC)
            gate = z * tl.sigmoid(z)
            if not NORM_BEFORE_GATE:
                x = x * gate
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / gs + eps)
        tl.store(RSTD + row * n_groups + grp, rstd)
        w = tl.load(W + cols, mask=m, other=0.0).to(ACC)
        y = x * rstd * w
        if HAS_Z:
            if NORM_BEFORE_GATE:
                y = y * gate
        tl.store(Y + row * sy + cols, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def bwd_kernel(X, Z, W, RSTD, DY, DX, DZ, DW_PART, M, gs, n_groups, rows_per_prog,
                   sx, sz, sdy, sdx, sdz,
                   HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        grp = tl.program_id(1)
        cols = grp * gs + tl.arange(0, BLOCK)
        m = tl.arange(0, BLOCK) < gs
        ACC = DW_PART.dtype.element_ty
        w = tl.load(W + cols, mask=m, other=0.0).to(ACC)
        dw = tl.zeros([BLOCK], dtype=ACC)
        row0 = pid * rows_per_prog
        for i in range(0, rows_per_prog):
            row = (row0 + i).to(tl.int64)
            mr = tl.arange(0, BLOCK) < tl.where(row < M, gs, 0)  # (no scalar & block masks)
            x = tl.load(X + row * sx + cols, mask=mr, other=0.0).to(ACC)
            dy = tl.load(DY + row * sdy + cols, mask=mr, other=0.0).to(ACC)
            rstd = tl.load(RSTD + tl.minimum(row, M - 1) * n_groups + grp)
            if HAS_Z:
                z = tl.load(Z + row * sz + cols, mask=mr, other=0.0).to(ACC)
                sig = tl.sigmoid(z)
                gate = z * sig
                dgate = sig * (1.0 + z * (1.0 - sig))  # d silu(z) / dz
                if not NORM_BEFORE_GATE:
                    u = x * gate
                else:
                    u = x
            else:
                u = x
            nrm = u * rstd  # the normalised row
            if HAS_Z:
                if NORM_BEFORE_GATE:
                    tl.store(DZ + row * sdz + cols, (dy * nrm * w * dgate).to(DZ.dtype.element_ty), mask=mr)
                    dy = dy * gate
            dw += dy * nrm
            dn = dy * w
            # u = nrm / rstd with rstd = mean(u²)^(-1/2): du = rstd (dn - nrm mean(dn nrm))
            du = rstd * (dn - nrm * (tl.sum(dn * nrm, axis=0) / gs))
            if HAS_Z:
                if not NORM_BEFORE_GATE:
                    tl.store(DZ + row * sdz + cols, (du * x * dgate).to(DZ.dtype.element_ty), mask=mr)
                    du = du * gate
            tl.store(DX + row * sdx + cols, du.to(DX.dtype.element_ty), mask=mr)
        tl.store(DW_PART + pid * (n_groups * gs) + cols, dw, mask=m)

    return fwd_kernel, bwd_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _warps(block: int) -> int:
    return max(1, min(8, block // 256))


@torch.library.custom_op("ssmkit::gated_rms_norm", mutates_args=())
def _fwd_op(x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int,
            norm_before_gate: bool) -> tuple[Tensor, Tensor]:
    M, d = x.shape
    ng = d // group_size
    y = torch.empty(M, d, device=x.device, dtype=x.dtype)
    rstd = torch.empty(M, ng, device=x.device, dtype=_acc(x))
    if M:
        block = _pow2(group_size)
        _kernels()[0][(M, ng)](
            x, z, weight, y, rstd, group_size, ng, x.stride(0), z.stride(0) if z is not None else 0, d,
            float(eps), HAS_Z=z is not None, NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK=block,
            num_warps=_warps(block))
    return y, rstd


@_fwd_op.register_fake
def _(x, z, weight, eps, group_size, norm_before_gate):
    return torch.empty_like(x), x.new_empty(x.shape[0], x.shape[1] // group_size, dtype=_acc(x))


@torch.library.custom_op("ssmkit::gated_rms_norm_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, z: Tensor | None, weight: Tensor, rstd: Tensor, group_size: int,
            norm_before_gate: bool) -> list[Tensor]:
    M, d = x.shape
    ng = d // group_size
    dx = torch.empty(M, d, device=x.device, dtype=x.dtype)
    dz = torch.empty(M, d, device=x.device, dtype=z.dtype) if z is not None else x.new_empty(0)
    nprog = max(1, min(M, max(1, BWD_PROGRAMS // ng)))
    rows = -(-M // nprog) if M else 0
    nprog = -(-M // rows) if M else 1
    part = torch.zeros(nprog, d, device=x.device, dtype=_acc(x))
    if M:
        block = _pow2(group_size)
        dzz = dz if z is not None else dx
        _kernels()[1][(nprog, ng)](
            x, z, weight, rstd, dy, dx, dzz, part, M, group_size, ng, rows,
            x.stride(0), z.stride(0) if z is not None else 0, dy.stride(0), d, d,
            HAS_Z=z is not None, NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK=block,
            num_warps=_warps(block))
    return [dx, dz, part.sum(0).to(weight.dtype)]


@_bwd_op.register_fake
def _(dy, x, z, weight, rstd, group_size, norm_before_gate):
    dz = torch.empty_like(z) if z is not None else x.new_empty(0)
    return [torch.empty_like(x), dz, torch.empty_like(weight)]


def _setup(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.opts = (group_size, norm_before_gate)


def _backward(ctx, dy, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    dx, dz, dw = _bwd_op(dy.contiguous(), x, z, weight, rstd, *ctx.opts)
    return dx, (dz if z is not None else None), dw, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def _rows(t: Tensor) -> Tensor:
    """``(..., d)`` -> ``(rows, d)`` with unit stride along ``d`` (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def gated_rms_norm_triton(x: Tensor, weight: Tensor, z: Tensor | None = None, eps: float = 1e-5,
                          group_size: int | None = None, norm_before_gate: bool = False) -> Tensor:
    """Triton form of :func:`gated_rms_norm` (no validation; differentiable through the custom
    ops). ``x, z`` are read through their row strides (``z`` may be a slice of a projection)."""
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    if gs > MAX_TRITON_GROUP:
        return gated_rms_norm_reference(x, weight, z, eps, group_size, norm_before_gate)
    y, _ = torch.ops.ssmkit.gated_rms_norm(_rows(x), None if z is None else _rows(z), weight.contiguous(),
                                           float(eps), int(gs), bool(norm_before_gate))
    return y.view(x.shape)


def gated_rms_norm(x: Tensor, weight: Tensor, z: Tensor | None = None, *, eps: float = 1e-5,
                   group_size: int | None = None, norm_before_gate: bool = False,
                   backend: str = "auto") -> Tensor:
    """Mamba-2's gated RMSNorm (see the module docstring): ``x: (..., d)``, ``weight: (d,)``,
    ``z`` like ``x`` or None; returns ``y`` like ``x`` in its dtype. ``group_size`` must divide
    ``d`` (None: ``d``). ``backend``: ``"auto"`` (the reference form until the Triton form has
    run on a GPU), ``"reference"``, ``"triton"``.
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError("x must be a floating tensor of shape (..., d)")
    d = x.shape[-1]
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (d,):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (d={d},), got {got}")
    if z is not None and (not isinstance(z, Tensor) or z.shape != x.shape):
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"z must have the shape of x {tuple(x.shape)}, got {got}")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or d % group_size):
        raise ValueError(f"group_size must be a positive int dividing d={d}, got {group_size!r}")
    return get("gated_rms_norm", backend, x)(x, weight, z, eps, group_size, norm_before_gate)
