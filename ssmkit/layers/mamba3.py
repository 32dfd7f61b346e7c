"""The Mamba-3 mixer (Lahoti et al. 2026), SISO and MIMO, with ``mamba_ssm``'s parameter names.

Data flow for ``u: (batch, seqlen, d_model)`` (no short convolution, unlike Mamba-1/2)::

    in_proj(u) -> [z | x | B | C | dd_dt | dd_A | trap | angles]
                  widths d_inner, d_inner, R G N, R G N, H, H, H, S
    A = min(-f(dd_A), -A_floor)    f(a) = 1 + a (a >= 0), 1 / (1 - a) (a < 0): heavy-tailed, > 0
    Δ = softplus(dd_dt + dt_bias),  B, C = RMSNorm(B), RMSNorm(C) over N
    y = mamba3(x, Δ, A Δ, B, C, trap, angles; B_bias, C_bias, D, z)   (ssmkit.ops.mamba3)
    out_proj(y)            or, with is_outproj_norm, out_proj(Σ_r mimo_o ⊙ RMSNorm_P(y_r) ⊙ silu(z_r))

S = rope_fraction · N / 2 rotated pairs, one angle per pair shared by the heads (each head turns it
at its own Δ). MIMO (``is_mimo``): B and C have ``mimo_rank`` R columns per group, and x, z and the
output are up/down-projected per head by ``mimo_x``, ``mimo_z``, ``mimo_o`` ``(H, R, P)``.
``fuse_pregate_headwise_norm`` is accepted for mamba_ssm's configs: fused or not, its MIMO computes
the same function (a per-head RMSNorm over P before the gate), which is what this layer computes.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit._checks import check_positive_int
from ssmkit.layers.linear import Linear
from ssmkit.layers.norm import RMSNorm, RMSNormGated
from ssmkit.layers.quantized import float_dtype
from ssmkit.layers.state import LayerState, check_mixer_inputs
from ssmkit.ops.dispatch import get
from ssmkit.ops.fused.norm import rms_norm
from ssmkit.ops.mamba3 import Mamba3Carry, mamba3
from ssmkit.ops.mamba3.step import mamba3_step_one, mamba3_step_reference
from ssmkit.theory.init import inverse_softplus, log_uniform_dt

__all__ = ["Mamba3", "Mamba3State", "heavy_tail"]


def heavy_tail(a: torch.Tensor) -> torch.Tensor:
    """``1 + a`` for ``a >= 0``, ``1 / (1 - a)`` below: positive, continuous, differentiable at 0."""
    return a.clamp_min(0) + torch.reciprocal(1 - a.clamp_max(0))


@dataclasses.dataclass
class Mamba3State(LayerState):
    """``angle: (batch, H, S)``, ``ssm: (batch, H, P, N)``, ``k: (batch, R, H, N)`` (the last
    token's rotated, biased B), ``v: (batch, H, P)`` (its x); float32 (float64 in float64 models)."""

    angle: torch.Tensor
    ssm: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def carry(self) -> Mamba3Carry:
        return Mamba3Carry(self.angle, self.ssm, self.k, self.v)


class Mamba3(nn.Module):
    """Mamba-3 mixer: ``forward(x, state=None, return_state=False, cu_seqlens=None, mask=None)``,
    ``step(x_t, state)``, ``allocate_state(batch_size)`` (the contract of :mod:`ssmkit.layers`).

    ``d_inner = expand * d_model`` in ``H = d_inner / headdim`` heads; ``ngroups`` groups share B
    and C; ``rope_fraction`` (0.5 or 1) of the state is rotated. Parameter names, shapes and
    initialisation follow ``mamba_ssm.modules.mamba3.Mamba3``, so its state dicts load directly.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        rope_fraction: float = 0.5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_floor: float = 1e-4,
        is_outproj_norm: bool = False,
        is_mimo: bool = False,
        mimo_rank: int = 4,
        fuse_pregate_headwise_norm: bool = True,
        chunk_size: int = 64,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("expand", expand), ("headdim", headdim),
                        ("ngroups", ngroups), ("mimo_rank", mimo_rank), ("chunk_size", chunk_size)):
            check_positive_int(name, v)
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"expand * d_model = {d_inner} must be divisible by headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"ngroups={ngroups} must divide the number of heads {nheads}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction must be 0.5 or 1.0, got {rope_fraction!r}")
        split = int(d_state * rope_fraction)
        n_angles = (split - split % 2) // 2
        if n_angles < 1:
            raise ValueError(f"d_state={d_state} with rope_fraction={rope_fraction} leaves no pair to rotate")
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.expand, self.headdim = d_model, d_state, expand, headdim
        self.d_inner, self.nheads, self.ngroups = d_inner, nheads, ngroups
        self.rope_fraction, self.num_rope_angles = float(rope_fraction), n_angles
        self.A_floor, self.is_outproj_norm, self.is_mimo = float(A_floor), bool(is_outproj_norm), bool(is_mimo)
        self.mimo_rank = mimo_rank if is_mimo else 1
        self.fuse_pregate_headwise_norm = bool(fuse_pregate_headwise_norm and is_mimo and is_outproj_norm)
        self.chunk_size, self.layer_idx = chunk_size, layer_idx
        R = self.mimo_rank
        self.bc_width = d_state * ngroups * R
        d_in_proj = 2 * d_inner + 2 * self.bc_width + 3 * nheads + n_angles  # [z, x, B, C, dt, A, trap, angles]
        self.in_proj = Linear(d_model, d_in_proj, bias=False, **fk)
        dt = log_uniform_dt(nheads, dt_min, dt_max, floor=dt_init_floor)
        self.dt_bias = nn.Parameter(inverse_softplus(dt).to(device=device, dtype=torch.float32))
        self.dt_bias._no_weight_decay = True
        self.B_bias = nn.Parameter(torch.ones(nheads, R, d_state, device=device))
        self.C_bias = nn.Parameter(torch.ones(nheads, R, d_state, device=device))
        self.B_norm = RMSNorm(d_state, eps=1e-5, **fk)
        self.C_norm = RMSNorm(d_state, eps=1e-5, **fk)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.full((nheads, R, headdim), 1.0 / R, device=device))
            self.mimo_z = nn.Parameter(torch.ones(nheads, R, headdim, device=device))
            self.mimo_o = nn.Parameter(torch.full((nheads, R, headdim), 1.0 / R, device=device))
        self.D = nn.Parameter(torch.ones(nheads, device=device))
        self.D._no_weight_decay = True
        if is_outproj_norm:
            self.norm = RMSNormGated(d_inner, eps=1e-5, group_size=headdim, norm_before_gate=True, **fk)
        self.out_proj = Linear(d_inner, d_model, bias=False, **fk)

    # -- helpers -----------------------------------------------------------------------------------
    def _ssm_dtype(self, dtype=None) -> torch.dtype:
        dtype = dtype or float_dtype(self.in_proj)
        return torch.float64 if dtype == torch.float64 else torch.float32

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> Mamba3State:
        """Zero state for ``batch_size`` sequences (float32; float64 for a float64 model)."""
        device = device or self.D.device
        sdt = self._ssm_dtype(dtype)
        H, P, N, R = self.nheads, self.headdim, self.d_state, self.mimo_rank

        def z(*s):
            return torch.zeros(batch_size, *s, device=device, dtype=sdt)

        return Mamba3State(angle=z(H, self.num_rope_angles), ssm=z(H, P, N), k=z(R, H, N), v=z(H, P))

    def _split(self, zx: torch.Tensor):
        """``in_proj`` output ``(..., d_in_proj)`` -> ``z, x (..., H, P)``, ``B, C (..., R, G, N)``,
        ``Δ, A·Δ, trap (..., H)`` (float32 or float64) and ``angles (..., H, S)``."""
        H, P, N, G, R = self.nheads, self.headdim, self.d_state, self.ngroups, self.mimo_rank
        z, x, B, C, dd_dt, dd_A, trap, angles = zx.split(
            [self.d_inner, self.d_inner, self.bc_width, self.bc_width, H, H, H, self.num_rope_angles], dim=-1)
        lead = zx.shape[:-1]
        cdt = torch.float64 if zx.dtype == torch.float64 else torch.float32
        A = torch.clamp(-heavy_tail(dd_A.to(cdt)), max=-self.A_floor)
        delta = F.softplus(dd_dt.to(cdt) + self.dt_bias.to(cdt))
        B = self.B_norm(B.reshape(*lead, R, G, N))
        C = self.C_norm(C.reshape(*lead, R, G, N))
        angles = angles.unsqueeze(-2).expand(*lead, H, self.num_rope_angles)
        return (z.reshape(*lead, H, P), x.reshape(*lead, H, P), B, C, delta, A * delta, trap, angles)

    def _op_kwargs(self) -> dict:
        """Biases and MIMO weights in the op's layout; z / mimo_o are left to :meth:`_finish` when
        the output norm sits between the SSM and the down-projection."""
        kw = dict(rotary_pairs="halves" if self.is_mimo else "interleaved")
        if self.is_mimo:
            kw.update(B_bias=self.B_bias, C_bias=self.C_bias, mimo_x=self.mimo_x,
                      mimo_z=None if self.is_outproj_norm else self.mimo_z,
                      mimo_o=None if self.is_outproj_norm else self.mimo_o)
        else:
            kw.update(B_bias=self.B_bias[:, 0], C_bias=self.C_bias[:, 0])
        return kw

    def _finish(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The op's output -> ``(..., d_inner)``: with ``is_outproj_norm``, the per-head RMSNorm over
        P, the gate and (MIMO) the down-projection over the ranks."""
        lead = z.shape[:-2]
        if not self.is_outproj_norm:
            return y.reshape(*lead, self.d_inner)
        if not self.is_mimo:
            return self.norm(y.reshape(*lead, self.d_inner), z.reshape(*lead, self.d_inner))
        # y: (..., R, H, P): per (rank, head) RMSNorm over P with weight (H, P), gate silu(z ⊙ mimo_z)
        w = self.norm.weight.view(self.nheads, self.headdim)
        cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
        yn = rms_norm(y.to(cdt), w, self.norm.eps).to(cdt)
        yn = yn * F.silu(z.to(cdt).unsqueeze(-3) * self.mimo_z.transpose(0, 1).to(cdt))
        out = (yn * self.mimo_o.transpose(0, 1).to(cdt)).sum(-3)
        return out.reshape(*lead, self.d_inner).to(z.dtype)

    # -- forward / step ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: Mamba3State | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """``x: (batch, seqlen, d_model) -> y`` (same shape), and the new state if ``return_state``."""
        check_mixer_inputs(self, x, state, cu_seqlens, mask, Mamba3State)
        z, xs, B, C, delta, dA, trap, angles = self._split(self.in_proj(x))
        if mask is not None:
            # padding keeps h and θ (Δ = 0) and leaves no carried pair behind (x = 0)
            m = mask.to(delta.dtype)[..., None]
            delta, dA, xs = delta * m, dA * m, xs * m.unsqueeze(-1).to(xs.dtype)
        if not self.is_mimo:
            B, C = B.squeeze(-3), C.squeeze(-3)
        zk = None if self.is_outproj_norm else z
        y, carry = mamba3(
            xs, delta, dA, B, C, trap, angles, self.D, zk, **self._op_kwargs(), chunk_size=self.chunk_size,
            initial_state=None if state is None else state.carry(), return_final_state=True,
            cu_seqlens=cu_seqlens,
        )
        out = self.out_proj(self._finish(y.to(x.dtype), z))
        if return_state:
            return out, Mamba3State(*carry)
        return out

    def step(self, x_t: torch.Tensor, state: Mamba3State) -> torch.Tensor:
        """One token ``x_t: (batch, d_model) -> (batch, d_model)``; updates ``state`` in place."""
        z, xs, B, C, delta, dA, trap, angles = self._split(self.in_proj(x_t))
        kw = self._op_kwargs()
        zk = None if self.is_outproj_norm else z
        # the dispatched decode form (unchecked, shapes fixed by the layer): the reference step, or
        # the Triton kernel when asked for (backend "triton" forced); both update the state in place
        # without reading values on the host, so the step can be captured in a CUDA graph
        form = get("mamba3_step", "auto", xs)
        if form is mamba3_step_reference:
            y = mamba3_step_one(state.carry(), xs, delta, dA, B, C, trap, angles, self.D, zk, **kw)
        else:
            t1 = (t.unsqueeze(1) for t in (xs, delta, dA, B, C, trap, angles))
            y = form(state.carry(), *t1, self.D, None if zk is None else zk.unsqueeze(1), **kw).squeeze(1)
        return self.out_proj(self._finish(y.to(x_t.dtype), z))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, rope_fraction={self.rope_fraction}, "
                f"mimo_rank={self.mimo_rank if self.is_mimo else None}, is_outproj_norm={self.is_outproj_norm}")
