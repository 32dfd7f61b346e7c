"""Channelwise sequence operators that H3 and Hyena are built from: ``u (batch, seqlen, H) -> y``.

Each maps H independent channels and has a convolution view (``forward``, through
:func:`ssmkit.ops.conv.fftconv.fftconv`: ``backend="reference"`` is the direct causal sum over
lags, ``"chunked"`` the FFT) and a recurrent view (``step``, one token):

* :class:`ShiftSSM` (H3's first SSM): ``x_k = S x_{k-1} + e_1 u_k``, ``y_k = C x_k + D u_k`` with
  S the N x N shift matrix, so x_k = (u_k, ..., u_{k-N+1}) and the kernel is K_l = C_l for l < N.
  State ``(batch, H, N)``: the last N inputs, newest first. Step O(N H).
* :class:`DiagSSM` (H3's second SSM, S4D-style): ``x_k = Ā x_{k-1} + B̄ u_k``,
  ``y_k = 2 Re(C x_k) + D u_k``, K_l = 2 Re Σ_n C_n B̄_n Ā_n^l. State ``(batch, H, N/2)`` complex.
  Step O(N H).
* :class:`SelectiveSSM` (S6): Δ_t, B_t, C_t depend on u_t (Mamba's selection); the convolution
  view does not exist, the forms are :func:`ssmkit.ops.selective_scan.selective_scan`'s.
  State ``(batch, H, N)``. Step O(N H).
* :class:`ImplicitFilter` (Hyena's long convolution): ``h_t = FFN(PE(t)) ⊙ window(t)``,
  ``y = h * u + D u``; no finite recurrent state: decoding keeps the inputs seen so far (a cache
  of ``l_max`` positions) and each token costs O(t H) (a dot product with the filter over the
  whole prefix).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssmkit._checks import check_positive_int
from ssmkit.layers.linear import Linear
from ssmkit.layers.s4d import _complex, _complex_param, _power_sum
from ssmkit.ops.conv.fftconv import fftconv
from ssmkit.ops.conv.ssm_kernel import ssm_kernel_diag
from ssmkit.ops.selective_scan import selective_scan, selective_scan_step
from ssmkit.theory.init import inverse_softplus, log_uniform_dt, s4d_init

BACKENDS = ("auto", "reference", "chunked")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _cdtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class ShiftSSM(nn.Module):
    """Shift SSM over ``channels`` (H) channels with ``d_state`` (N) taps: ``C (H, N)``, ``D (H,)``."""

    def __init__(self, channels: int, d_state: int = 4, *, backend: str = "auto"):
        super().__init__()
        check_positive_int("d_state", d_state)
        check_backend(backend)
        self.channels, self.d_state, self.backend = channels, d_state, backend
        self.C = nn.Parameter(torch.randn(channels, d_state) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(channels))

    def allocate(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        return {"shift": torch.zeros(batch, self.channels, self.d_state, dtype=_cdtype(self.C), device=device)}

    def forward(self, u: torch.Tensor, st: dict | None, want: bool):
        """``u (b, L, H)``; ``st["shift"] (b, H, N)`` the inputs before u, newest first."""
        L, N = u.shape[1], self.d_state
        K = self.C.to(u.dtype).t()  # (N, H): K_l = C_l
        if st is None:
            y = fftconv(u, K, self.D.to(u.dtype), backend=self.backend)
            full = u
        else:
            full = torch.cat([st["shift"].to(u.dtype).flip(-1).transpose(1, 2), u], dim=1)
            y = fftconv(full, K, backend=self.backend)[:, -L:] + u * self.D.to(u.dtype)
        new = None
        if want:
            tail = full[:, -N:]
            if tail.shape[1] < N:
                tail = torch.cat([tail.new_zeros(tail.shape[0], N - tail.shape[1], tail.shape[2]), tail], dim=1)
            new = {"shift": tail.flip(1).transpose(1, 2).contiguous()}
        return y, new

    def step(self, u_t: torch.Tensor, st: dict) -> torch.Tensor:
        x = st["shift"]
        x_new = torch.cat([u_t[..., None].to(x.dtype), x[..., :-1]], dim=-1)  # x_k = S x_{k-1} + e_1 u_k
        x.copy_(x_new)
        return (self.C.to(u_t.dtype) * x_new.to(u_t.dtype)).sum(-1) + self.D.to(u_t.dtype) * u_t


class DiagSSM(nn.Module):
    """Diagonal SSM (S4D, ZOH) over H channels with N/2 complex modes: ``log_dt (H,)``,
    ``log_A_real, A_imag, B, C (H, N/2)``, ``D (H,)``."""

    def __init__(self, channels: int, d_state: int = 64, *, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 init: str = "diag-lin", backend: str = "auto"):
        super().__init__()
        check_positive_int("d_state", d_state)
        check_backend(backend)
        if d_state % 2:
            raise ValueError(f"d_state must be even (modes come in conjugate pairs), got {d_state}")
        self.channels, self.d_state, self.backend = channels, d_state, backend
        H, n = channels, d_state // 2
        A, B = s4d_init(init, n)
        self.log_dt = nn.Parameter(torch.log(log_uniform_dt(H, dt_min, dt_max)))
        self.log_A_real = nn.Parameter(torch.log(-A.real).float().expand(H, n).clone())
        self.A_imag = nn.Parameter(A.imag.float().expand(H, n).clone())
        self.B = _complex_param(B.expand(H, n))
        self.C = _complex_param(torch.randn(H, n, dtype=torch.complex64))
        self.D = nn.Parameter(torch.randn(H))

    def allocate(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        cdt = torch.complex128 if _cdtype(self.log_dt) == torch.float64 else torch.complex64
        return {"ssm": torch.zeros(batch, self.channels, self.d_state // 2, dtype=cdt, device=device)}

    def discretized(self, rd: torch.dtype):
        """``(log Ā, B̄, C)``, each ``(H, N/2)`` complex (ZOH: Ā = exp(ΔA), B̄ = (Ā - 1)/A · B)."""
        dt = torch.exp(self.log_dt.to(rd))[:, None]
        A = torch.complex(-torch.exp(self.log_A_real.to(rd)), self.A_imag.to(rd))
        dA = dt * A
        return dA, torch.expm1(dA) / A * _complex(self.B).to(A.dtype), _complex(self.C).to(A.dtype)

    def forward(self, u: torch.Tensor, st: dict | None, want: bool):
        L = u.shape[1]
        log_Abar, Bbar, C = self.discretized(u.dtype)
        K = 2 * ssm_kernel_diag(log_Abar, C * Bbar, L).real  # (L, H)
        y = fftconv(u, K, self.D.to(u.dtype), backend=self.backend)
        x0 = None if st is None else st["ssm"].to(log_Abar.dtype)
        if x0 is not None:  # y_l += 2 Re(C Ā^{l+1} x_{-1})
            y = y + 2 * ssm_kernel_diag(log_Abar, C * torch.exp(log_Abar) * x0, L).real
        new = None
        if want:
            x = Bbar * _power_sum(log_Abar, u.flip(1))  # B̄ Σ_j Ā^j u_{L-1-j}
            if x0 is not None:
                x = x + torch.exp(L * log_Abar) * x0
            new = {"ssm": x.to(self.allocate(1)["ssm"].dtype)}
        return y, new

    def step(self, u_t: torch.Tensor, st: dict) -> torch.Tensor:
        log_Abar, Bbar, C = self.discretized(u_t.dtype)
        x = st["ssm"]
        x_old = x.clone() if torch.is_grad_enabled() else x  # the in-place update must not touch a saved tensor
        x_new = torch.exp(log_Abar) * x_old.to(log_Abar.dtype) + Bbar * u_t[..., None]
        x.copy_(x_new.to(x.dtype))
        return 2 * (C * x_new).sum(-1).real + self.D.to(u_t.dtype) * u_t


class SelectiveSSM(nn.Module):
    """S6 over H channels: ``Δ_t = softplus(W_Δ u_t + b_Δ)``, ``B_t = W_B u_t``, ``C_t = W_C u_t``,
    ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t``, ``y_t = C_t · h_t + D u_t``; A = -exp(A_log) (S4D-real)."""

    def __init__(self, channels: int, d_state: int = 16, *, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, backend: str = "auto"):
        super().__init__()
        check_positive_int("d_state", d_state)
        check_backend(backend)
        self.channels, self.d_state, self.backend = channels, d_state, backend
        r = dt_rank or max(1, math.ceil(channels / 16))
        self.x_proj = Linear(channels, r + 2 * d_state, bias=False)
        self.dt_proj = Linear(r, channels, bias=True)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus(log_uniform_dt(channels, dt_min, dt_max)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(channels, 1))
        self.D = nn.Parameter(torch.ones(channels))
        self.dt_rank = r

    def allocate(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        return {"ssm": torch.zeros(batch, self.channels, self.d_state, dtype=_cdtype(self.A_log), device=device)}

    def _params(self, u: torch.Tensor):
        r, N = self.dt_rank, self.d_state
        dbc = self.x_proj(u.to(self.x_proj.weight.dtype)).to(u.dtype)
        dt = (dbc[..., :r] @ self.dt_proj.weight.to(u.dtype).t())
        return dt, dbc[..., r:r + N], dbc[..., r + N:], -torch.exp(self.A_log.to(u.dtype))

    def forward(self, u: torch.Tensor, st: dict | None, want: bool):
        dt, B, C, A = self._params(u)
        out = selective_scan(u, dt, A, B, C, self.D.to(u.dtype), dt_bias=self.dt_proj.bias.to(u.dtype),
                             dt_softplus=True, initial_state=None if st is None else st["ssm"].to(u.dtype),
                             return_final_state=want, backend=self.backend)
        if want:
            return out[0], {"ssm": out[1].to(_cdtype(self.A_log))}
        return out, None

    def step(self, u_t: torch.Tensor, st: dict) -> torch.Tensor:
        dt, B, C, A = self._params(u_t)
        x = st["ssm"]
        h = x.to(u_t.dtype).clone()
        y = selective_scan_step(h, u_t, dt, A, B, C, self.D.to(u_t.dtype),
                                dt_bias=self.dt_proj.bias.to(u_t.dtype), dt_softplus=True)
        x.copy_(h.to(x.dtype))
        return y


class ImplicitFilter(nn.Module):
    """Hyena's implicit long filter over H channels, defined for positions t < ``l_max``.

    ``PE(t) = [t/l_max, cos(2π f t/l_max), sin(2π f t/l_max)]`` for f = 1..``n_bands``; an FFN of
    ``depth`` layers of width ``d_hidden`` with sine activations sin(ω z); the exponential window
    ``exp(-α_h t/l_max) + shift`` with decay rates α_h spread linearly over the channels from
    slow (the window reaches ``target`` at t = 1.5 l_max) to fast (at t = 0.3 l_max):
    ``h_t = FFN(PE(t)) ⊙ window_t``, ``y = h * u + D u``.
    """

    def __init__(self, channels: int, *, l_max: int = 2048, d_hidden: int = 32, n_bands: int = 4,
                 depth: int = 2, omega: float = 1.0, shift: float = 0.0, target: float = 1e-2,
                 backend: str = "auto"):
        super().__init__()
        for name, v in (("l_max", l_max), ("d_hidden", d_hidden), ("n_bands", n_bands), ("depth", depth)):
            check_positive_int(name, v)
        check_backend(backend)
        self.channels, self.l_max, self.n_bands, self.omega = channels, l_max, n_bands, omega
        self.shift, self.backend = shift, backend
        dims = [1 + 2 * n_bands] + [d_hidden] * depth
        self.ffn = nn.ModuleList(Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.ffn_out = Linear(d_hidden, channels, bias=False)
        fast, slow = math.log(target) / 0.3, math.log(target) / 1.5
        self.register_buffer("decay", torch.linspace(abs(slow), abs(fast), channels), persistent=False)
        self.D = nn.Parameter(torch.randn(channels))

    def filter(self, L: int, dtype: torch.dtype) -> torch.Tensor:
        """``h (L, H)`` for t = 0..L-1."""
        if L > self.l_max:
            raise ValueError(f"the implicit filter is defined for l_max={self.l_max} positions, got length {L}")
        t = torch.arange(L, dtype=dtype, device=self.D.device)[:, None] / self.l_max  # (L, 1)
        f = torch.arange(1, self.n_bands + 1, dtype=dtype, device=self.D.device)
        z = torch.cat([t, torch.cos(2 * math.pi * f * t), torch.sin(2 * math.pi * f * t)], dim=-1)
        for lin in self.ffn:
            z = torch.sin(self.omega * (z @ lin.weight.to(dtype).t() + lin.bias.to(dtype)))
        h = z @ self.ffn_out.weight.to(dtype).t()
        return h * (torch.exp(-self.decay.to(dtype) * t) + self.shift)

    def _decode_filter(self, dtype: torch.dtype) -> torch.Tensor:
        """``filter(l_max)`` for decoding. Its rows do not depend on the length asked for (t is
        measured in units of l_max), so without autograd it is built once and cached on the module
        until a parameter changes in place or is replaced, instead of running the FFN every token."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self.filter(self.l_max, dtype)
        params = [*self.ffn.parameters(), self.ffn_out.weight, self.decay]
        key = (tuple((p._version, p.data_ptr()) for p in params), dtype, torch.is_inference_mode_enabled())
        cache = self.__dict__.get("_decode_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, self.filter(self.l_max, dtype))
            self.__dict__["_decode_cache"] = cache
        return cache[1]

    def allocate(self, batch: int, device=None, max_seqlen: int | None = None) -> dict[str, torch.Tensor]:
        n = self.l_max if max_seqlen is None else min(max_seqlen, self.l_max)
        return {"cache": torch.zeros(batch, n, self.channels, dtype=_cdtype(self.D), device=device),
                "pos": torch.zeros(batch, dtype=torch.long, device=device)}

    def conv(self, u: torch.Tensor, hist: torch.Tensor | None = None) -> torch.Tensor:
        """``u (b, L, H)`` after ``hist (b, P, H)`` earlier inputs -> ``y (b, L, H)``."""
        L = u.shape[1]
        full = u if hist is None else torch.cat([hist.to(u.dtype), u], dim=1)
        y = fftconv(full, self.filter(full.shape[1], u.dtype), backend=self.backend)[:, -L:]
        return y + u * self.D.to(u.dtype)

    def forward(self, u: torch.Tensor, st: dict | None, want: bool):
        """Prefix states must have one position for every row (forward runs rows of a masked
        batch one at a time)."""
        P = 0 if st is None else int(st["pos"][0])
        if st is not None and bool((st["pos"] != P).any()):
            raise ValueError("state rows are at different positions: pass one row at a time")
        y = self.conv(u, None if P == 0 else st["cache"][:, :P])
        new = None
        if want:
            new = (self.allocate(u.shape[0], u.device) if st is None
                   else {"cache": st["cache"].clone(), "pos": st["pos"].clone()})
            write_cache(new, u)
        return y, new

    def step(self, u_t: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Writes ``u_t (b, H)`` at ``pos (b,)`` in ``cache (b, n, H)`` and returns
        ``y_t = Σ_{j<=pos} h_{pos-j} u_j + D u_t``: O(pos H) work. ``pos`` is not advanced."""
        b, n, _ = cache.shape
        if bool((pos >= n).any()):
            raise ValueError(f"the decoding cache holds {n} positions and is full")
        rows = torch.arange(b, device=cache.device)
        cache[rows, pos] = u_t.to(cache.dtype)
        m = int(pos.max()) + 1
        h = self._decode_filter(u_t.dtype)[:m]
        lag = pos[:, None] - torch.arange(m, device=cache.device)[None]  # (b, m): pos - j
        hk = h[lag.clamp(min=0)] * (lag >= 0)[..., None].to(u_t.dtype)  # (b, m, H)
        past = cache[:, :m].clone() if torch.is_grad_enabled() else cache[:, :m]
        return (hk * past.to(u_t.dtype)).sum(1) + self.D.to(u_t.dtype) * u_t


def write_cache(st: dict, u: torch.Tensor) -> None:
    """Append ``u (b, L, H)`` to ``st["cache"]`` at ``st["pos"]`` (same for all rows) and advance it."""
    P, L, n = int(st["pos"][0]), u.shape[1], st["cache"].shape[1]
    if P + L > n:
        raise ValueError(f"the decoding cache holds {n} positions; {P} used + {L} new do not fit")
    st["cache"][:, P:P + L] = u.to(st["cache"].dtype)
    st["pos"] += L


def run_rows(seq, x: torch.Tensor, state, want: bool, cu_seqlens, mask, zero_state, cat_states):
    """``seq(x_row (1, l, d), state_row | None, want) -> (y_row, state_row | None)`` run on each
    packed sequence (``cu_seqlens``) or each row's unmasked tokens (``mask``) on its own: padded
    tokens give output 0 and leave the state untouched. ``zero_state(n)`` makes n zero rows and
    ``cat_states(list)`` stacks rows."""
    b, L, _ = x.shape
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = [(0, torch.arange(s, e, device=x.device)) for s, e in zip(bounds[:-1], bounds[1:])]
    else:
        pieces = [(r, mask[r].nonzero().flatten()) for r in range(b)]
    y, states = None, []
    for i, (row, idx) in enumerate(pieces):
        st = None if state is None else state.index_select(torch.tensor([i], device=x.device))
        if idx.numel() == 0:
            states.append(st if st is not None else zero_state(1))
            continue
        yi, si = seq(x[row:row + 1, idx], st, want)
        if y is None:
            y = yi.new_zeros(b, L, yi.shape[-1])
        y[row, idx] = yi[0]
        states.append(si)
    if y is None:
        y = x.new_zeros(b, L, x.shape[-1])
    return y, (cat_states(states) if want else None)
