"""The Mamba block's mixer (Gu & Dao 2023, Sec. 3.4 / Fig. 3), with ``mamba_ssm``'s parameter names.

Data flow for ``x: (batch, seqlen, d_model)``::

    in_proj(x) -> [x | z]                        widths d_inner, d_inner (no z when use_gate=False)
    x -> causal depthwise conv1d -> SiLU
    x_proj(x) -> [dt | B | C]                     widths dt_rank, N, N (input-dependent: "selective")
    Δ = softplus(dt_proj.weight @ dt + dt_proj.bias),  A = -exp(A_log)
    y = selective_scan(x, Δ, A, B, C, D, z)       = (C·h + D x) * silu(z)
    out_proj(y)

Initialisation (Sec. 3.6 and the reference code): S4D-real A_n = n + 1 (A_log = log A), Δ drawn
log-uniformly in [dt_min, dt_max] and stored as its softplus preimage in ``dt_proj.bias``,
``dt_proj.weight`` uniform in ±dt_rank^-1/2·dt_scale, D = 1.

``inner="s4d"`` or ``"hyena"`` puts another sequence layer in the block in S6's place (the Mamba
paper's Table 1: Mamba block x inner layer): a diagonal LTI SSM
(:class:`~ssmkit.layers.long_conv.DiagSSM`, ``d_state`` states) or Hyena's implicit long filter
(:class:`~ssmkit.layers.long_conv.ImplicitFilter`), on the d_inner channels after the conv, then
the same gate and out_proj. ``inner_cfg`` holds the inner layer's keyword arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit._checks import check_positive_int, check_tensor
from ssmkit.layers import _decode
from ssmkit.layers.linear import Linear
from ssmkit.layers.long_conv import DiagSSM, ImplicitFilter, run_rows
from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.quantized import float_dtype
from ssmkit.layers.state import LayerState, check_mixer_inputs, context_parallel_group
from ssmkit.ops import context_parallel as cp
from ssmkit.ops import cpu_linear, custom_ops
from ssmkit.ops.conv.causal_conv1d import causal_conv1d
from ssmkit.ops.conv.causal_conv1d_triton import causal_conv1d_triton
from ssmkit.ops.dispatch import get
from ssmkit.ops.selective_scan import selective_scan  # noqa: F401  (importing registers the forms)
from ssmkit.ops.selective_scan.triton import selective_scan_triton
from ssmkit.theory.init import inverse_softplus, log_uniform_dt

__all__ = ["Mamba", "MambaState"]

MAMBA_INNER = ("s6", "s4d", "hyena")


@dataclasses.dataclass
class MambaState(LayerState):
    """``conv_state: (batch, d_inner, d_conv - 1)`` (the last conv inputs, model dtype) and
    ``ssm_state: (batch, d_inner, N)`` (float32; float64 for a float64 model)."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor | None = None
    # inner="hyena": the inner layer's inputs so far (batch, n, d_inner) and their count (batch,)
    cache: torch.Tensor | None = None
    pos: torch.Tensor | None = None


class Mamba(nn.Module):
    """Mamba (S6) mixer following the contract of :mod:`ssmkit.layers`.

    Parameters (names and shapes as ``mamba_ssm.modules.mamba_simple.Mamba`` and Hugging Face's
    ``MambaMixer``, so state dicts map one to one):

    * ``in_proj``: Linear(d_model -> 2·d_inner) [x, z] (d_inner only with ``use_gate=False``)
    * ``conv1d``: depthwise Conv1d, weight ``(d_inner, 1, d_conv)``, bias ``(d_inner,)``
    * ``x_proj``: Linear(d_inner -> dt_rank + 2·d_state) [dt, B, C], no bias
    * ``dt_proj``: Linear(dt_rank -> d_inner) with bias (the Δ bias)
    * ``A_log``: ``(d_inner, d_state)``; ``D``: ``(d_inner,)``; ``out_proj``: Linear(d_inner -> d_model)

    ``use_gate=False`` removes the z branch (the "S6 without gating" ablation of the paper).
    ``inner_norms=True`` adds Jamba's RMSNorms (``dt_layernorm``, ``b_layernorm``,
    ``c_layernorm``, eps ``inner_norm_eps``) on dt, B and C after ``x_proj`` (Lieber et al., 2024).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_gate: bool = True,
        inner_norms: bool = False,
        inner_norm_eps: float = 1e-6,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        inner: str = "s6",
        inner_cfg: dict | None = None,
    ):
        super().__init__()
        if inner not in MAMBA_INNER:
            raise ValueError(f"inner must be one of {MAMBA_INNER}, got {inner!r}")
        if inner_cfg is not None and not isinstance(inner_cfg, dict):
            raise TypeError(f"inner_cfg must be a dict, got {type(inner_cfg).__name__}")
        self.inner_name = inner
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            check_positive_int(name, v)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        check_positive_int("dt_rank", dt_rank)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = d_inner = expand * d_model
        self.dt_rank, self.use_gate, self.layer_idx = dt_rank, use_gate, layer_idx

        self.in_proj = Linear(d_model, d_inner * (2 if use_gate else 1), bias=bias, **fk)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1,
                                bias=conv_bias, **fk)
        if inner != "s6":
            self.inner = _inner_layer(inner, d_inner, d_state, inner_cfg or {})
            self.inner.to(device=device, dtype=torch.float64 if dtype == torch.float64 else None)
            self.out_proj = Linear(d_inner, d_model, bias=bias, **fk)
            return
        self.x_proj = Linear(d_inner, dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = Linear(dt_rank, d_inner, bias=True, **fk)
        # dt_proj.weight keeps the variance of Δ's pre-activation independent of dt_rank.
        dt_init_std = dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(dt_init_std)
            else:
                self.dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
            # softplus(bias) = Δ ~ log-uniform[dt_min, dt_max] (Mamba Sec. 3.6), floored.
            dt = log_uniform_dt(d_inner, dt_min, dt_max, floor=dt_init_floor)
            self.dt_proj.bias.copy_(inverse_softplus(dt))
        self.dt_proj.bias._no_reinit = True
        # S4D-real: A_n = -(n + 1) for every channel, stored as log(-A) so A stays negative.
        # A_log and D stay float32 in half-precision models (as mamba_ssm keeps them).
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        A = torch.arange(1, d_state + 1, dtype=pdt).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A).to(device=device))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner, device=device, dtype=pdt))
        self.D._no_weight_decay = True
        self.out_proj = Linear(d_inner, d_model, bias=bias, **fk)
        # Jamba: RMSNorms on dt (before dt_proj), B and C, each over its own width
        self.inner_norms = bool(inner_norms)
        if self.inner_norms:
            self.dt_layernorm = RMSNorm(dt_rank, eps=inner_norm_eps, **fk)
            self.b_layernorm = RMSNorm(d_state, eps=inner_norm_eps, **fk)
            self.c_layernorm = RMSNorm(d_state, eps=inner_norm_eps, **fk)

    # -- helpers -----------------------------------------------------------------------------------
    def _A(self) -> torch.Tensor:
        """A = -exp(A_log), cached while decoding (:func:`ssmkit.layers._decode.decay_rate`)."""
        return _decode.decay_rate(self, self.A_log)

    def _A_log2e(self) -> torch.Tensor:
        """A·log2(e), cached like :meth:`_A` (for ``exp(ΔA) = exp2(Δ·A·log2 e)``)."""
        return _decode.decay_rate_log2e(self, self.A_log)

    def _ssm_dtype(self, dtype=None) -> torch.dtype:
        dtype = dtype or float_dtype(self.in_proj)
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _split_in(self, xz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.use_gate:
            x, z = xz.chunk(2, dim=-1)
            return x, z
        return xz, None

    def _dbc(self, x: torch.Tensor):
        """[dt | B | C] = x_proj(x), each normed when ``inner_norms``."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return dt, B, C

    def _x_proj(self, x: torch.Tensor, with_bias: bool = False):
        """[dt | B | C] = x_proj(x); dt -> dt_proj.weight @ dt (+ dt_proj.bias if ``with_bias``;
        otherwise the bias is added inside the scan)."""
        dt, B, C = self._dbc(x)
        return cpu_linear.linear(dt, self.dt_proj.weight, self.dt_proj.bias if with_bias else None), B, C

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        """Zero state for ``batch_size`` sequences (conv part in ``dtype``, SSM part float32)."""
        check_positive_int("batch_size", batch_size)
        if self.inner_name != "s6":
            return _inner_state(self, batch_size, device, dtype, max_seqlen=None)
        device = device or self.A_log.device
        dtype = dtype or float_dtype(self.in_proj)
        return MambaState(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                  dtype=self._ssm_dtype(dtype)),
        )

    def _check(self, x, state, cu_seqlens, mask) -> None:
        check_mixer_inputs(self, x, state, cu_seqlens, mask, MambaState)

    # -- forward / step ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: MambaState | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """``x: (batch, seqlen, d_model) -> y`` (same shape), and the new state if ``return_state``.

        ``state`` (not modified) continues earlier tokens; with ``cu_seqlens`` it holds one row per
        packed sequence. ``mask`` (batch, seqlen), 0 = padding: padded positions see a zero conv
        input and Δ = 0 (Ā = 1, B̄x = 0), so they leave both states untouched.
        """
        self._check(x, state, cu_seqlens, mask)
        group = context_parallel_group(self, state, mask)
        if self.inner_name != "s6":
            if group is not None:
                raise ValueError(f"Mamba(inner={self.inner_name!r}) has no context-parallel form")
            return _inner_forward(self, x, state, return_state, cu_seqlens, mask)
        xs, z = self._split_in(self.in_proj(x))
        if mask is not None:
            xs = xs * mask.to(xs.dtype)[..., None]
        # (Triton forms as torch.library ops: see the scan below)
        conv, conv_kw = causal_conv1d, {"initial_state": None if state is None else state.conv_state}
        if group is not None:  # x is this rank's shard of the sequence
            conv, conv_kw = functools.partial(cp.causal_conv1d, group=group), {}
        elif get("causal_conv1d", "auto", xs) is causal_conv1d_triton:
            conv = functools.partial(custom_ops.causal_conv1d, backend="triton")
        xs, conv_state = conv(
            xs, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
            return_final_state=True, cu_seqlens=cu_seqlens, **conv_kw,
        )
        # Full precision: dt_proj's bias goes into its matmul (addmm) rather than a separate pass in
        # the scan; half-precision models keep it apart so it is added in float32 (as mamba_ssm does).
        fold = self.dt_proj.weight.dtype in (torch.float32, torch.float64)
        dt, B, C = self._x_proj(xs, with_bias=fold)
        dt_bias, softplus = (None if fold else self.dt_proj.bias), True
        if mask is not None:
            cdt = self._ssm_dtype(x.dtype)
            dt = dt.to(cdt) if dt_bias is None else dt.to(cdt) + dt_bias.to(cdt)
            dt = F.softplus(dt) * mask.to(cdt)[..., None]
            dt_bias, softplus = None, False
        # The layer built every input itself (and checked x, state, cu_seqlens and mask above), so
        # the dispatched form is called directly, without the public op's checks.
        # The Triton form runs as a torch.library op: torch.compile(fullgraph=True) sees one node,
        # and its backward reads the states the forward saved.
        if group is not None:
            y, ssm_state = cp.selective_scan(xs, dt, self._A(), B, C, self.D, z, dt_bias, group=group,
                                             dt_softplus=softplus, return_final_state=True, cu_seqlens=cu_seqlens)
        else:
            scan = get("selective_scan", "auto", xs)
            if scan is selective_scan_triton:
                scan = functools.partial(custom_ops.selective_scan, backend="triton",
                                         state_mem_limit=self.scan_state_mem_limit)
            y, ssm_state = scan(xs, dt, self._A(), B, C, self.D, z, dt_bias, softplus,
                                None if state is None else state.ssm_state, True, cu_seqlens)
        out = self.out_proj(y)
        if return_state:
            return out, MambaState(conv_state=conv_state.to(x.dtype).contiguous(), ssm_state=ssm_state)
        return out

    def step(self, x_t: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token ``x_t: (batch, d_model) -> (batch, d_model)``; updates ``state`` in place."""
        check_tensor("x_t", x_t, 2, desc=f"(batch, d_model={self.d_model})")
        if not isinstance(state, MambaState):
            raise TypeError(f"state must be a MambaState (from allocate_state), got {type(state).__name__}")
        if x_t.shape[1] != self.d_model or state.conv_state.shape[0] != x_t.shape[0]:
            raise ValueError(f"x_t must have shape (batch={state.conv_state.shape[0]}, d_model={self.d_model}), "
                             f"got {tuple(x_t.shape)}")
        if self.inner_name != "s6":
            return _inner_step(self, x_t, state)
        if _decode.use_cpu_step(x_t, self.conv1d.weight):
            return self._step_cpu(x_t, state)
        # Shapes are fixed by the layer, so the ops' unchecked forms are called directly: when
        # decoding, the per-token Python overhead is a noticeable share of the time. Slices of the
        # projections (x | z, dt | B | C) are passed as views: the Triton forms read them in place.
        xs, z = self._split_in(self.in_proj(x_t).unsqueeze(1))  # (batch, 1, d_inner), views
        conv_update = get("causal_conv1d_step", "auto", xs)
        xs = conv_update(xs, state.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        dt, B, C = self._dbc(xs)
        update = get("selective_scan_step", "auto", xs)
        if getattr(update, "fuses_dt_proj", False):
            # Triton: dt_proj (dt_rank -> d_inner) runs inside the state-update kernel.
            y = update(state.ssm_state, xs, dt, self._A(), B.unsqueeze(2), C.unsqueeze(2), self.D, z,
                       self.dt_proj.bias, True, dt_proj_weight=self.dt_proj.weight)
        else:
            dt = cpu_linear.linear(dt, self.dt_proj.weight)
            y = update(state.ssm_state, xs, dt, self._A(), B.unsqueeze(2), C.unsqueeze(2), self.D, z,
                       self.dt_proj.bias, True)
        return self.out_proj(y.squeeze(1))

    def _step_cpu(self, x_t: torch.Tensor, state: MambaState) -> torch.Tensor:
        """:meth:`step` on the CPU in few PyTorch ops (see :mod:`ssmkit.layers._decode`): the state
        is updated in place, the conv window and Ā live in per-state buffers."""
        b, di, N, R = x_t.shape[0], self.d_inner, self.d_state, self.dt_rank
        dtype, sdt = x_t.dtype, state.ssm_state.dtype
        ws = _decode.workspace(state, (b, dtype, sdt), lambda: {
            **_decode.conv_buffers(b, di, self.d_conv, dtype, x_t.device),
            "dA": torch.empty(b, di, N, dtype=sdt, device=x_t.device)})
        xz = _decode.linear(self.in_proj, x_t)
        xs = _decode.conv_step(ws, state.conv_state, xz[:, :di], _decode.conv_kernel(self.conv1d, dtype))
        if self.inner_norms:
            low, Bm, Cm = self._dbc(xs)
        else:
            dbc = _decode.linear(self.x_proj, xs)
            low, Bm, Cm = dbc[:, :R], dbc[:, R:R + N], dbc[:, R + N:]
        fold = self.dt_proj.weight.dtype == sdt  # full precision: the Δ bias inside the GEMV
        dt = _decode.linear_fn(low, self.dt_proj.weight, self.dt_proj.bias if fold else None)
        if not fold:
            dt = dt.to(sdt) + self.dt_proj.bias.to(sdt)  # half precision: the bias added in float32
        delta = F.softplus(dt)
        xf = xs if xs.dtype == sdt else xs.to(sdt)
        # h = exp(Δ A) h + Δ x B,  y = C·h + D x   (the state's dtype: float32)
        if torch.is_grad_enabled():  # (out= does not record a graph)
            dA = torch.exp2(delta.unsqueeze(-1) * self._A_log2e())
        else:
            dA = torch.mul(delta.unsqueeze(-1), self._A_log2e(), out=ws["dA"]).exp2_()
        h = state.ssm_state.mul_(dA)
        h.addcmul_((delta * xf).unsqueeze(-1), Bm.to(sdt).unsqueeze(1))
        y = torch.bmm(h, Cm.to(sdt).unsqueeze(-1)).squeeze(-1)
        y.addcmul_(xf, self.D.to(sdt))
        if self.use_gate:
            y.mul_(F.silu(xz[:, di:].to(sdt)))
        return _decode.linear(self.out_proj, y.to(dtype))

    # Bytes of scan states one training forward of this layer may keep for its backward on the
    # Triton path (None: ScanConfig.state_mem_limit); LanguageModel.set_scan_state_budget
    # shares a model's budget among its Mamba layers.
    scan_state_mem_limit: int | None = None

    # Batch rows up to which a decode step on the Triton path takes the fused small-batch form
    # (step_norm); larger batches are matrix products, where cuBLAS is the better choice.
    FUSED_STEP_MAX_BATCH = 1

    def can_step_norm(self, x_t: torch.Tensor) -> bool:
        """Whether :meth:`step_norm` applies to ``x_t (batch, d_model)``: Triton forms (CUDA),
        small batch, Mamba's usual layout (gate, no projection biases), no autograd."""
        return (self.use_gate and self.inner_name == "s6" and not self.inner_norms
                and _decode.fused_step_applies(x_t, self.FUSED_STEP_MAX_BATCH, self.in_proj, self.x_proj,
                                               self.out_proj))

    def step_norm(self, out: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, residual_dtype: torch.dtype | None, state: MambaState
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's residual add + RMSNorm and this layer's decode step, in four launches:
        ``(out, residual) (batch, d_model)`` -> ``(new residual, layer output)``; updates ``state``.

        1. residual add + RMSNorm + in_proj (one GEMV with the norm in its prologue);
        2. conv update + SiLU + x_proj, split over channel blocks;
        3. dt_proj + softplus + state update + D + gate, summing x_proj's parts;
        4. out_proj.
        Same arithmetic (and roundings) as add_rms_norm followed by :meth:`step`. Check
        :meth:`can_step_norm` first.
        """
        xz, residual = get("norm_linear", "auto", out)(out, self.in_proj.weight, norm_weight,
                                                      residual, eps, residual_dtype)
        xs, z = xz[:, :self.d_inner], xz[:, self.d_inner:]
        xs, parts = get("causal_conv1d_step_proj", "auto", xs)(
            xs, state.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu",
            self.x_proj.weight)
        y = get("selective_scan_step_parts", "auto", xs)(
            state.ssm_state, xs, parts, self._A(), self.D, z, self.dt_proj.bias, self.dt_proj.weight)
        y, _ = get("norm_linear", "auto", y)(y, self.out_proj.weight)
        return residual, y

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"d_conv={self.d_conv}, dt_rank={self.dt_rank}, use_gate={self.use_gate}"
                + ("" if self.inner_name == "s6" else f", inner={self.inner_name!r}"))


# -- the Mamba block around another inner layer (inner="s4d" | "hyena") -----------------------------


def _inner_layer(inner: str, d_inner: int, d_state: int, cfg: dict) -> nn.Module:
    if inner == "s4d":
        return DiagSSM(d_inner, d_state, **cfg)
    return ImplicitFilter(d_inner, **cfg)


def _inner_state(m: Mamba, batch: int, device, dtype, max_seqlen: int | None) -> MambaState:
    device = device or m.in_proj.weight.device
    dtype = dtype or float_dtype(m.in_proj)
    conv = torch.zeros(batch, m.d_inner, m.d_conv - 1, device=device, dtype=dtype)
    if isinstance(m.inner, DiagSSM):
        return MambaState(conv_state=conv, ssm_state=m.inner.allocate(batch, device)["ssm"])
    st = m.inner.allocate(batch, device, max_seqlen)
    return MambaState(conv_state=conv, cache=st["cache"], pos=st["pos"])


def _inner_seq(m: Mamba, x: torch.Tensor, state: MambaState | None, want: bool):
    xs, z = m._split_in(m.in_proj(x))
    xs, conv_state = causal_conv1d(xs, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation="silu",
                                   initial_state=None if state is None else state.conv_state,
                                   return_final_state=True)
    rd = torch.float64 if xs.dtype == torch.float64 else torch.float32
    st = None if state is None else {"ssm": state.ssm_state, "cache": state.cache, "pos": state.pos}
    y, new = m.inner(xs.to(rd), st, want)
    if z is not None:
        y = y * F.silu(z.to(rd))
    out = m.out_proj(y.to(x.dtype))
    if not want:
        return out, None
    return out, MambaState(conv_state=conv_state.to(x.dtype).contiguous(), ssm_state=new.get("ssm"),
                           cache=new.get("cache"), pos=new.get("pos"))


def _inner_forward(m: Mamba, x, state, return_state, cu_seqlens, mask):
    if mask is not None and bool(mask.all()):
        mask = None
    if cu_seqlens is None and mask is None:
        out, new = _inner_seq(m, x, state, return_state)
    else:
        def cat(states):
            return dataclasses.replace(states[0], **{k: torch.cat([getattr(s, k) for s in states])
                                                     for k in states[0].tensors()})
        seq = functools.partial(_inner_seq, m)
        out, new = run_rows(seq, x, state, return_state, cu_seqlens, mask,
                            lambda n: m.allocate_state(n, x.device, x.dtype), cat)
    return (out, new) if return_state else out


def _inner_step(m: Mamba, x_t: torch.Tensor, state: MambaState) -> torch.Tensor:
    xs, z = m._split_in(m.in_proj(x_t))
    window = torch.cat([state.conv_state, xs[..., None].to(state.conv_state.dtype)], dim=-1)  # (b, d_inner, d_conv)
    state.conv_state.copy_(window[..., 1:])
    xs = F.silu((window * m.conv1d.weight.squeeze(1)).sum(-1) + (0 if m.conv1d.bias is None else m.conv1d.bias))
    rd = torch.float64 if xs.dtype == torch.float64 else torch.float32
    if isinstance(m.inner, DiagSSM):
        y = m.inner.step(xs.to(rd), {"ssm": state.ssm_state})
    else:
        y = m.inner.step(xs.to(rd), state.cache, state.pos)
        state.pos += 1
    if z is not None:
        y = y * F.silu(z.to(rd))
    return m.out_proj(y.to(x_t.dtype))
