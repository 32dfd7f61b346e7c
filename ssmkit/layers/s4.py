"""S4 layer (Gu, Goel & Ré 2022): a diagonal-plus-low-rank (DPLR) LTI SSM per channel.

The state matrix is HiPPO's in its NPLR eigenbasis (:func:`ssmkit.theory.hippo.nplr`),
A = diag(Λ) - P P^H, with Λ, P, B, C learned; the step Δ is learned per channel and the
discretisation is bilinear (S4 eq. (3)). The N = d_state modes are stored as N/2 of them plus
their conjugates (the system is similar to a real one, so kernels and outputs are real).

* ``forward`` (convolution view): K_l = C^T Ā^l B̄ from the Cauchy + Woodbury generating function
  (:func:`ssmkit.ops.conv.ssm_kernel.ssm_kernel_dplr`), then an FFT convolution. A nonzero
  initial state x_{-1} adds C^T Ā^{l+1} x_{-1}, computed by the same kernel routine with
  B := (I + Δ/2 A) x_{-1} / Δ (whose B̄ is Ā x_{-1}); the final state is
  Ā^L x_{-1} + Σ_j Ā^j B̄ u_{L-1-j}, with the "state kernel" Ā^j B̄ from the same routine (C = I).
* ``step`` (recurrent view): x_k = Ā x_{k-1} + B̄ u_k applied in DPLR form (the bilinear step
  with a Woodbury inverse, O(N R) per channel and token), y_k = Re(C^T x_k) + D u_k. The state is
  complex ``(batch, d_model, N)``.

The block around the SSM (channels, activation, dropout, GLU output) is the one of
:class:`ssmkit.layers.s4d.S4D`.
"""

from __future__ import annotations

import torch
from torch import nn

from ssmkit.layers.s4d import _complex, _complex_param, _conv_bidirectional, _LTIBlock, _set_optim
from ssmkit.ops.conv.fftconv import fftconv
from ssmkit.ops.conv.ssm_kernel import dplr_bilinear_woodbury, dplr_dense, ssm_kernel_dplr
from ssmkit.theory.hippo import nplr
from ssmkit.theory.init import conjugate_half

S4_MEASURES = ("legs", "legt", "lagt")


class S4(_LTIBlock):
    """S4 mixer: ``S4(d_model, d_state=64, measure="legs", rank=1, ...)``.

    Parameters (complex ones stored as real ``(..., 2)`` views, N/2 kept modes): ``log_dt (H,)``,
    ``log_A_real (H, N/2)`` (Re Λ = -exp(.)), ``A_imag (H, N/2)``, ``P (rank, H, N/2)``,
    ``B (H, N/2)``, ``C (channels[*2], H, N/2)``, ``D (channels[*2], H)``. ``lr`` puts
    ``_optim = {"lr": lr, "weight_decay": 0.0}`` on log_dt, A, P and B.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        channels: int = 1,
        bidirectional: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = None,
        dropout: float = 0.0,
        activation: str | None = "gelu",
        postact: str | None = "glu",
        measure: str = "legs",
        rank: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(d_model, d_state, channels, bidirectional, dt_min, dt_max, lr, dropout,
                         activation, postact, device, dtype)
        if measure not in S4_MEASURES:
            raise ValueError(f"measure must be one of {S4_MEASURES}, got {measure!r}")
        if rank is None:
            rank = 2 if measure == "legt" else 1
        self.measure, self.rank = measure, rank
        H, N = d_model, d_state
        Lam, P, B, _V = nplr(measure, N, rank)
        keep = conjugate_half(Lam)
        other = torch.tensor([i for i in range(N) if i not in set(keep.tolist())])
        # the dropped half must be the conjugates of the kept one for the real-system identity
        if not torch.allclose(torch.sort(Lam[other].imag).values, torch.sort(-Lam[keep].imag).values, atol=1e-8):
            raise ValueError(f"measure {measure!r} with N={N} has no conjugate-pair spectrum")
        Lam, P, B = Lam[keep], P[:, keep], B[keep]
        if bool((Lam.real >= 0).any()):  # e.g. LegT/LagT: Re Λ = 0; nudge into the stable half plane
            Lam = torch.complex(torch.full_like(Lam.real, -0.5) if measure == "legt" else Lam.real.clamp(max=-1e-4), Lam.imag)
        n = N // 2
        self.log_A_real = nn.Parameter(torch.log(-Lam.real).float().expand(H, n).clone())
        self.A_imag = nn.Parameter(Lam.imag.float().expand(H, n).clone())
        self.P = _complex_param(P[:, None, :].expand(rank, H, n))
        self.B = _complex_param(B.expand(H, n))
        n_out = channels * (2 if self.bidirectional else 1)
        self.C = _complex_param(torch.randn(n_out, H, n, dtype=torch.complex64))
        _set_optim([self.log_dt, self.log_A_real, self.A_imag, self.P, self.B], lr)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _state_shape(self) -> tuple[int, int]:
        return (self.d_model, self.d_state)

    def full_system(self):
        """``(Λ (H, N), P (R, H, N), B (H, N), C (n_out, H, N), dt (H,))`` with both conjugate halves."""
        rd = self._compute_dtype()
        Lam = torch.complex(-torch.exp(self.log_A_real.to(rd)), self.A_imag.to(rd))
        cd = Lam.dtype
        P, B, C = (_complex(t).to(cd) for t in (self.P, self.B, self.C))
        both = lambda t: torch.cat([t, t.conj()], dim=-1)  # noqa: E731
        return both(Lam), both(P), both(B), both(C), torch.exp(self.log_dt.to(rd))

    def kernel(self, L: int) -> torch.Tensor:
        """Real convolution kernel ``(L, channels[*2], H)``."""
        Lam, P, B, C, dt = self.full_system()
        return ssm_kernel_dplr(Lam, P, P, B, C, dt, L).real.transpose(0, 1)

    def _ssm(self, u, x0, want):
        rd = self._compute_dtype()
        u = u.to(rd)
        b, L, H = u.shape
        Lam, P, B, C, dt = self.full_system()
        K = ssm_kernel_dplr(Lam, P, P, B, C, dt, L).real.transpose(0, 1)  # (L, n_out, H)
        D = self.D.to(rd)
        if self.bidirectional:
            y = _conv_bidirectional(u, K, D, self.channels)
        else:
            y = fftconv(u[:, :, None, :], K, D)
        if x0 is not None:
            x0c = x0.to(Lam.dtype)
            Ax0 = Lam * x0c - torch.einsum("rhn,rhm,bhm->bhn", P, P.conj(), x0c)
            B0 = (x0c + dt[:, None] / 2 * Ax0) / dt[:, None]  # its B̄ is Ā x0
            y = y + ssm_kernel_dplr(Lam, P, P, B0, C, dt, L).real.transpose(1, 2)
        new = None
        if want:
            N = Lam.shape[-1]
            eye = torch.eye(N, dtype=Lam.dtype, device=u.device)[:, None, :].expand(N, H, N)
            S = ssm_kernel_dplr(Lam, P, P, B, eye, dt, L)  # (N, L, H): (Ā^j B̄)_n
            new = torch.einsum("njh,bjh->bhn", S, u.flip(1).to(S.dtype))
            if x0 is not None:
                Abar, _ = dplr_bilinear_woodbury(Lam, P, P, dt)
                new = new + torch.einsum("hnm,bhm->bhn", torch.linalg.matrix_power(Abar, L), x0.to(S.dtype))
            new = new.to(self._state_cdtype())
        return y, new

    def _step_terms(self):
        """What a bilinear DPLR step needs, O(H N R) to build: ``(Λ, P, B, C, dt, d, W)`` with
        d = 1/(1 - Δ/2 Λ) and W = (I_R + Δ/2 P^H diag(d) P)^{-1} (H, R, R). Without autograd
        (generation) they are cached until a parameter changes (in-place updates bump
        ``_version``)."""
        params = (self.log_dt, self.log_A_real, self.A_imag, self.P, self.B, self.C)
        return self._cached_step_terms(params, self._build_step_terms)

    def _build_step_terms(self):
        Lam, P, B, C, dt = self.full_system()
        half = (dt / 2)[:, None]  # (H, 1)
        d = 1 / (1 - half * Lam)  # (H, N)
        small = torch.einsum("rhn,hn,shn->hrs", P.conj(), d, P)  # P^H diag(d) P per channel
        eye = torch.eye(P.shape[0], dtype=small.dtype, device=small.device)
        W = torch.linalg.inv(eye + half[..., None] * small)
        return (Lam, P, B, C, dt, d, W)

    def _step_ssm(self, u_t, h):
        """x_k = (I - Δ/2 A)^{-1} [(I + Δ/2 A) x_{k-1} + Δ B u_k] in O(N R) per channel, with
        A = Λ - P P^H and the inverse by Woodbury (S4 Sec. 3.3 / Appendix C.2):
        (diag(1/d) + Δ/2 P P^H)^{-1} v = d v - d P Δ/2 W P^H (d v)."""
        rd = self._compute_dtype()
        Lam, P, B, C, dt, d, W = self._step_terms()
        half = (dt / 2)[:, None]
        # with autograd on, read a copy: the in-place update below must not touch a saved tensor
        x = (h.clone() if torch.is_grad_enabled() else h).to(Lam.dtype)
        u = u_t.to(rd)
        Ax = Lam * x - (P[:, None] * (P.conj()[:, None] * x).sum(-1)[..., None]).sum(0)  # (b, H, N)
        v = x + half * Ax + dt[:, None] * B * u[..., None]
        dv = d * v
        coef = torch.einsum("hrs,sbh->rbh", W, (P.conj()[:, None] * dv).sum(-1))  # W P^H d v: (R, b, H)
        x_new = dv - half * d * (P[:, None] * coef[..., None]).sum(0)
        h.copy_(x_new.to(h.dtype))
        y = (C[None] * x_new[:, None]).sum(-1).real  # (b, n_out, H)
        return y + self.D.to(rd) * u[:, None, :]

    def dense_A(self) -> torch.Tensor:
        """Continuous ``A (H, N, N)`` in the eigenbasis (complex)."""
        Lam, P, _B, _C, _dt = self.full_system()
        return dplr_dense(Lam, P, P)
