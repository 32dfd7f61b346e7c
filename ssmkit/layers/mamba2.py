"""The Mamba-2 block's mixer (Dao & Gu 2024, Sec. 7 / Fig. 6), with ``mamba_ssm``'s parameter names.

Data flow for ``x: (batch, seqlen, d_model)``::

    in_proj(x) -> [z | x B C | dt]              widths d_inner, d_inner + 2 G N, H
    x B C -> causal depthwise conv1d -> SiLU     (one conv over the three, as mamba_ssm)
    Δ = clamp(softplus(dt + dt_bias), dt_limit),  A = -exp(A_log)
    y = SSD(x, Δ, A, B, C) + D x                 (ssmkit.ops.ssd, heads of size headdim)
    y = RMSNorm(y * silu(z))                     (gated RMSNorm in groups of d_inner / G: the
                                                  ops.fused.gated_rms_norm op)
    out_proj(y)

Unlike Mamba-1 the parallel projection produces B, C, Δ from the block input directly, and A
is a scalar per head, which is what lets SSD use matmuls (Sec. 7.1).
"""

from __future__ import annotations

import dataclasses
import functools
import math

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
from ssmkit.ops import custom_ops
from ssmkit.ops.conv.causal_conv1d import causal_conv1d
from ssmkit.ops.conv.causal_conv1d_triton import causal_conv1d_triton
from ssmkit.ops.dispatch import get
from ssmkit.ops.fused.gated_norm import gated_rms_norm
from ssmkit.ops.ssd import ssd
from ssmkit.ops.ssd.step import ssd_step_one, ssd_step_reference
from ssmkit.ops.ssd.triton import ssd_triton
from ssmkit.theory.init import inverse_softplus, log_uniform_dt

__all__ = ["Mamba2", "Mamba2State"]


@dataclasses.dataclass
class Mamba2State(LayerState):
    """``conv_state: (batch, conv_dim, d_conv - 1)`` (last conv inputs, model dtype) and
    ``ssm_state: (batch, H, P, N)`` (float32)."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


class Mamba2(nn.Module):
    """Mamba-2 mixer: ``forward(x, state=None, return_state=False, cu_seqlens=None, mask=None)``,
    ``step(x_t, state)``, ``allocate_state(batch_size)`` (the contract of :mod:`ssmkit.layers`).

    ``d_inner = expand * d_model`` split into ``H = d_inner / headdim`` heads; ``ngroups`` groups
    share B and C (``d_inner`` may be given instead, for heads that do not fill ``expand * d_model``;
    ``norm_eps`` is the gated RMSNorm's epsilon). Parameter names and shapes match ``mamba_ssm.modules.mamba2.Mamba2`` (and Hugging
    Face's ``Mamba2Mixer``), so their state dicts load directly.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, math.inf),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        d_inner: int | None = None,
        norm_eps: float = 1e-5,
        in_multiplier: float = 1.0,
        in_proj_multipliers: tuple[float, float, float, float, float] | None = None,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                        ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            check_positive_int(name, v)
        if d_inner is None:
            d_inner = expand * d_model
        check_positive_int("d_inner", d_inner)
        if d_inner % headdim:
            raise ValueError(f"d_inner (expand * d_model unless given) = {d_inner} must be divisible by "
                             f"headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"ngroups={ngroups} must divide the number of heads {nheads}")
        if not (0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.headdim, self.ngroups, self.nheads, self.d_inner = headdim, ngroups, nheads, d_inner
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.chunk_size, self.layer_idx = chunk_size, layer_idx
        self.conv_dim = d_inner + 2 * ngroups * d_state

        d_in_proj = 2 * d_inner + 2 * ngroups * d_state + nheads  # [z, x, B, C, dt]
        self.in_proj = Linear(d_model, d_in_proj, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        # Δ initialised log-uniformly in [dt_min, dt_max] through its softplus inverse (Mamba, Sec. 3.6).
        dt = log_uniform_dt(nheads, dt_min, dt_max, floor=dt_init_floor)
        self.dt_bias = nn.Parameter(inverse_softplus(dt).to(device=device, dtype=dtype or torch.float32))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(nheads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(device=device, dtype=dtype or torch.float32))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner if D_has_hdim else nheads, device=device,
                                         dtype=dtype or torch.float32))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(d_inner, eps=norm_eps, group_size=d_inner // ngroups,
                                     norm_before_gate=norm_before_gate, **fk)
        self.out_proj = Linear(d_inner, d_model, bias=bias, **fk)
        # Falcon-H1's scalings: the input times ``in_multiplier``, the in_proj output's sections
        # [z, x, B, C, dt] times ``in_proj_multipliers`` (1.0 / None: none)
        self.in_multiplier = float(in_multiplier)
        if in_proj_multipliers is not None:
            in_proj_multipliers = tuple(float(m) for m in in_proj_multipliers)
            if len(in_proj_multipliers) != 5:
                raise ValueError(f"in_proj_multipliers must be 5 numbers (z, x, B, C, dt), got {in_proj_multipliers!r}")
        self.in_proj_multipliers = in_proj_multipliers
        self._mup: dict = {}

    # -- helpers -----------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, cpu_step: bool = False) -> torch.Tensor:
        """``in_proj(x)`` ([z, x, B, C, dt]) with the input and section multipliers (``cpu_step``:
        in a CPU decode step, through :func:`ssmkit.layers._decode.linear`)."""
        if self.in_multiplier != 1.0:
            x = x * self.in_multiplier
        out = _decode.linear(self.in_proj, x) if cpu_step else self.in_proj(x)
        if self.in_proj_multipliers is None:
            return out
        key = (out.device, out.dtype)
        if key not in self._mup:
            gn = self.ngroups * self.d_state
            sizes = torch.tensor([self.d_inner, self.d_inner, gn, gn, self.nheads])
            vec = torch.tensor(self.in_proj_multipliers, dtype=torch.float32).repeat_interleave(sizes)
            self._mup[key] = vec.to(device=out.device, dtype=out.dtype)
        return out * self._mup[key]

    def _D(self) -> torch.Tensor:
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _A(self) -> torch.Tensor:
        """A = -exp(A_log), cached while decoding (:func:`ssmkit.layers._decode.decay_rate`)."""
        return _decode.decay_rate(self, self.A_log)

    def _delta(self, dt: torch.Tensor) -> torch.Tensor:
        cdt = torch.float64 if dt.dtype == torch.float64 else torch.float32
        delta = F.softplus(dt.to(cdt) + self.dt_bias.to(cdt))
        lo, hi = self.dt_limit
        if lo > 0.0 or hi != math.inf:
            delta = delta.clamp(min=lo, max=hi)
        return delta

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``self.norm(y, z)`` through the ``gated_rms_norm`` op (the form dispatch picks)."""
        n = self.norm
        return gated_rms_norm(y, n.weight, z, eps=n.eps, group_size=n.group_size,
                              norm_before_gate=n.norm_before_gate)

    def _ssm_dtype(self, dtype=None) -> torch.dtype:
        dtype = dtype or float_dtype(self.in_proj)
        return torch.float64 if dtype == torch.float64 else torch.float32

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> Mamba2State:
        """Zero state for ``batch_size`` sequences (conv part in ``dtype``, SSM part float32)."""
        device = device or self.A_log.device
        dtype = dtype or float_dtype(self.in_proj)
        return Mamba2State(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                  dtype=self._ssm_dtype(dtype)),
        )

    # -- forward / step ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: Mamba2State | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """``x: (batch, seqlen, d_model) -> y`` (same shape), and the new state if ``return_state``."""
        check_mixer_inputs(self, x, state, cu_seqlens, mask, Mamba2State)
        group = context_parallel_group(self, state, mask)
        b, l, _ = x.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self._project(x).split([self.d_inner, self.conv_dim, h], dim=-1)
        if mask is not None:
            # padding must not reach the conv window of later tokens, nor the SSM state (Δ = 0)
            xBC = xBC * mask.to(xBC.dtype)[..., None]
        # The Triton forms run as torch.library ops (torch.compile(fullgraph=True) sees one node
        # each); the SSD kernels then also apply softplus(dt + dt_bias) and the Δ clamp.
        conv, scan = causal_conv1d, ssd
        conv_kw = {"initial_state": None if state is None else state.conv_state}
        scan_kw = {"initial_state": None if state is None else state.ssm_state}
        fused = group is None and get("ssd", "auto", xBC) is ssd_triton
        if group is not None:  # x is this rank's shard of the sequence
            conv = functools.partial(cp.causal_conv1d, group=group)
            scan = functools.partial(cp.ssd, group=group)
            conv_kw, scan_kw = {}, {}
        elif get("causal_conv1d", "auto", xBC) is causal_conv1d_triton:
            conv = functools.partial(custom_ops.causal_conv1d, backend="triton")
        if fused:
            scan = functools.partial(custom_ops.ssd, backend="triton")
        xBC, conv_state = conv(
            xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
            return_final_state=True, cu_seqlens=cu_seqlens, **conv_kw,
        )
        xs, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        if fused and mask is None:
            delta, dt_opts = dt, dict(dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        else:
            delta, dt_opts = self._delta(dt), {}
        if mask is not None:
            delta = delta * mask.to(delta.dtype)[..., None]
        y, ssm_state = scan(
            xs.reshape(b, l, h, p), delta, self._A(), B.reshape(b, l, g, n), C.reshape(b, l, g, n),
            chunk_size=self.chunk_size, D=self._D(), z=None if self.rmsnorm else z.reshape(b, l, h, p),
            return_final_state=True, cu_seqlens=cu_seqlens, **scan_kw, **dt_opts,
        )
        y = y.reshape(b, l, self.d_inner)
        if self.rmsnorm:
            y = self._gated_norm(y, z)
        out = self.out_proj(y)
        if return_state:
            return out, Mamba2State(conv_state=conv_state.to(x.dtype).contiguous(), ssm_state=ssm_state)
        return out

    def step(self, x_t: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """One token ``x_t: (batch, d_model) -> (batch, d_model)``; updates ``state`` in place."""
        if _decode.use_cpu_step(x_t, self.conv1d.weight):
            return self._step_cpu(x_t, state)
        return self.out_proj(self._step_mix(self._project(x_t), state))

    def _step_mix(self, zxbcdt: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """The device step between the projections: ``zxbcdt (batch, d_in_proj)`` (in_proj's
        output) -> ``y (batch, d_inner)``, the out_proj input; updates ``state`` in place.

        Three launches on the Triton path: the conv update (+ SiLU) on the ``xBC`` slice, the
        ``ssd_step`` (softplus(dt + dt_bias), the Δ clamp, state update, ``D x``) reading x, B, C
        from the conv output and dt from the projection as views, then the gated RMSNorm reading
        z in place. Shapes are fixed by the layer, so the ops' unchecked dispatched forms are
        called (per-token Python overhead is a noticeable share of decoding time); no host
        synchronisation and no allocation but the outputs (CUDA-graph safe).
        """
        h, p, g, n, di, cd = self.nheads, self.headdim, self.ngroups, self.d_state, self.d_inner, self.conv_dim
        b = zxbcdt.shape[0]
        z, xBC, dt = zxbcdt[:, :di], zxbcdt[:, di:di + cd], zxbcdt[:, di + cd:]
        conv_update = get("causal_conv1d_step", "auto", xBC)
        xBC = conv_update(xBC.unsqueeze(1), state.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                          "silu")  # (b, 1, conv_dim)
        xs = xBC[..., :di].unflatten(-1, (h, p))
        B = xBC[..., di:di + g * n].unflatten(-1, (g, n))
        C = xBC[..., di + g * n:].unflatten(-1, (g, n))
        zs = None if self.rmsnorm else z.unflatten(-1, (h, p))
        update = get("ssd_step", "auto", xs)
        if update is ssd_step_reference:  # one token: its per-token form (no stack over T)
            y = ssd_step_one(state.ssm_state, xs[:, 0], dt, self._A(), B[:, 0], C[:, 0], D=self._D(), z=zs,
                             dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        else:
            y = update(state.ssm_state, xs, dt.unsqueeze(1), self._A(), B, C, self._D(),
                       None if zs is None else zs.unsqueeze(1), self.dt_bias, True, self.dt_limit)
        y = y.reshape(b, di)
        if self.rmsnorm:
            nm = self.norm
            y = get("gated_rms_norm", "auto", y)(y, nm.weight, z, nm.eps, nm.group_size, nm.norm_before_gate)
        return y

    # Batch rows up to which a decode step on the Triton path takes the fused small-batch form
    # (step_norm: GEMVs); larger batches are matrix products, where cuBLAS is the better choice.
    FUSED_STEP_MAX_BATCH = 1

    def can_step_norm(self, x_t: torch.Tensor) -> bool:
        """Whether :meth:`step_norm` applies to ``x_t (batch, d_model)``: Triton forms (CUDA) of
        the GEMV and of ``ssd_step`` (the fused step goes with the Triton state update: while that
        form is opt-in, so is this path), small batch, no projection biases or input scalings, no
        autograd."""
        return (self.in_multiplier == 1.0 and self.in_proj_multipliers is None
                and _decode.fused_step_applies(x_t, self.FUSED_STEP_MAX_BATCH, self.in_proj, self.out_proj)
                and get("ssd_step", "auto", x_t) is not ssd_step_reference)

    def step_norm(self, out: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, residual_dtype: torch.dtype | None, state: Mamba2State
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's residual add + RMSNorm and this layer's decode step in five launches:
        ``(out, residual) (batch, d_model)`` -> ``(new residual, layer output)``; updates ``state``.

        1. residual add + RMSNorm + in_proj (one GEMV with the norm in its prologue);
        2.-4. conv update, ``ssd_step``, gated RMSNorm (:meth:`_step_mix`);
        5. out_proj (GEMV).
        Same arithmetic (and roundings) as add_rms_norm followed by :meth:`step`. Check
        :meth:`can_step_norm` first.
        """
        zxbcdt, residual = get("norm_linear", "auto", out)(out, self.in_proj.weight, norm_weight,
                                                          residual, eps, residual_dtype)
        y = self._step_mix(zxbcdt, state)
        y, _ = get("norm_linear", "auto", y)(y, self.out_proj.weight)
        return residual, y

    def _step_cpu(self, x_t: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """:meth:`step` on the CPU (see :mod:`ssmkit.layers._decode`): the conv window lives in a
        per-state buffer; the state update and readout are one rank-1 update and one batched
        GEMV over the ``(batch·G, H/G·P, N)`` view of the state (a broadcast matmul there is
        ~10x slower on the CPU)."""
        h, p, g, n, di = self.nheads, self.headdim, self.ngroups, self.d_state, self.d_inner
        b, dtype = x_t.shape[0], x_t.dtype
        S = state.ssm_state
        sdt = S.dtype
        ws = _decode.workspace(state, (b, dtype, sdt), lambda: _decode.conv_buffers(
            b, self.conv_dim, self.d_conv, dtype, x_t.device))
        zxbcdt = self._project(x_t, cpu_step=True)
        xBC = _decode.conv_step(ws, state.conv_state, zxbcdt[:, di:di + self.conv_dim],
                                _decode.conv_kernel(self.conv1d, dtype))
        delta = self._delta(zxbcdt[:, di + self.conv_dim:]).to(sdt)  # (b, h)
        xf = xBC[:, :di].to(sdt).reshape(b, h, p)
        Bf = xBC[:, di:di + g * n].to(sdt).reshape(b * g, 1, n)
        Cf = xBC[:, di + g * n:].to(sdt).reshape(b * g, n, 1)
        # h <- exp(Δ A) h + Δ x Bᵀ,   y = h C + D x
        S.mul_(torch.exp(delta * self._A().to(sdt)).view(b, h, 1, 1))
        Sg = S.view(b * g, (h // g) * p, n)
        Sg.addcmul_((xf * delta.unsqueeze(-1)).view(b * g, (h // g) * p, 1), Bf)
        y = torch.bmm(Sg, Cf).view(b, h, p)
        D = self._D().to(sdt)
        y.addcmul_(xf, D.unsqueeze(-1) if D.dim() == 1 else D)
        z = zxbcdt[:, :di]
        if self.rmsnorm:
            y = self.norm(y.view(b, di).to(dtype), z)
        else:
            y = y.view(b, di).mul_(F.silu(z.to(sdt))).to(dtype)
        return _decode.linear(self.out_proj, y)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, chunk_size={self.chunk_size}")
