"""Causal convolution of a sequence with a long kernel, by FFT (S4 Sec. 3.3).

    y_t = Σ_{l=0}^{t} K_l u_{t-l} + D u_t

``u: (batch, seqlen, *channels)``, ``K: (kernel_len, *channels)`` (a kernel shorter than seqlen is
zero-padded, a longer one truncated), ``D: channels`` broadcastable or None; returns
``y: (batch, seqlen, *channels)``. The FFT form pads to n >= 2 * seqlen so the circular convolution
equals the linear one (no wrap-around), costing O(L log L) instead of O(L^2).

Forms: ``reference`` (direct sum over lags) and ``chunked`` (the FFT; the fast CPU/GPU form).
Computation is in float32 at least (float64 stays float64); the output has u's dtype.
"""

from __future__ import annotations

import torch

from ssmkit._checks import check_same_device, check_tensor
from ssmkit.ops.dispatch import get, register


def _compute_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _fit_kernel(K: torch.Tensor, L: int) -> torch.Tensor:
    if K.shape[0] >= L:
        return K[:L]
    pad = torch.zeros(L - K.shape[0], *K.shape[1:], dtype=K.dtype, device=K.device)
    return torch.cat([K, pad])


@register("fftconv", "reference")
def fftconv_reference(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Direct causal convolution: a sum over the kernel's lags (O(L^2))."""
    dtype = _compute_dtype(u, K, D)
    uf, Kf = u.to(dtype), K.to(dtype)
    L = u.shape[1]
    Kf = _fit_kernel(Kf, L)
    y = torch.zeros(torch.broadcast_shapes(uf.shape, (1, 1, *Kf.shape[1:])), dtype=dtype, device=u.device)
    for lag in range(L):
        y = y + _shift(uf, lag) * Kf[lag]  # lag l moves u_{t-l} to position t
    if D is not None:
        y = y + uf * D.to(dtype)
    return y.to(u.dtype)


def _shift(x: torch.Tensor, lag: int) -> torch.Tensor:
    """x delayed by ``lag`` steps along dim 1, zeros shifted in."""
    if lag == 0:
        return x
    z = torch.zeros_like(x[:, :lag])
    return torch.cat([z, x[:, : x.shape[1] - lag]], dim=1)


@register("fftconv", "chunked")
def fftconv_fft(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """FFT convolution, zero-padded to length n >= 2L (O(L log L))."""
    dtype = _compute_dtype(u, K, D)
    L = u.shape[1]
    n = 2 * L
    Kf = _fit_kernel(K.to(dtype), L)
    u_f = torch.fft.rfft(u.to(dtype), n=n, dim=1)
    k_f = torch.fft.rfft(Kf, n=n, dim=0)
    y = torch.fft.irfft(u_f * k_f, n=n, dim=1)[:, :L]
    if D is not None:
        y = y + u.to(dtype) * D.to(dtype)
    return y.to(u.dtype)


def fftconv(
    u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Causal convolution ``y = K * u + D u``; see the module docstring for shapes."""
    check_tensor("u", u, desc="(batch, seqlen, *channels)")
    check_tensor("K", K, desc="(kernel_len, *channels)")
    check_tensor("D", D, allow_none=True)
    if u.is_complex() or K.is_complex():
        raise TypeError("fftconv takes real u and K (take the real part of a complex SSM kernel first)")
    if u.dim() < 2:
        raise ValueError(f"u must have at least 2 dimensions (batch, seqlen, *channels), got shape {tuple(u.shape)}")
    if K.dim() != u.dim() - 1:
        raise ValueError(
            f"K must have shape (kernel_len, *channels) with u's {u.dim() - 2} channel dims, got {tuple(K.shape)}"
        )
    if K.shape[0] == 0:
        raise ValueError("K must have kernel_len >= 1")
    try:
        torch.broadcast_shapes(u.shape[2:], K.shape[1:], () if D is None else D.shape)
    except RuntimeError:
        raise ValueError(
            f"channels of u {tuple(u.shape[2:])}, K {tuple(K.shape[1:])} and D "
            f"{None if D is None else tuple(D.shape)} must broadcast"
        ) from None
    check_same_device(u=u, K=K, D=D)
    return get("fftconv", backend, u, K)(u, K, D)
