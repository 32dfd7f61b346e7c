"""Convolution kernels of linear time-invariant SSMs: K_l = C Ā^l B̄, l = 0 .. L-1 (S4 eq. (4)-(5)).

Two families, each with a plain ``reference`` form that powers Ā step by step and a fast
``chunked`` form (the name dispatch's ``"auto"`` picks on CPU; both are pure PyTorch):

``ssm_kernel_diag(log_Abar, W, L)`` — diagonal state matrix (S4D). With Ā_n = exp(log_Abar_n)
(ZOH: log Ā = ΔA) and the folded weights W_n = C_n B̄_n:

    K_l = Σ_n W_n Ā_n^l          (a Vandermonde matrix-vector product, taken in sqrt(L) blocks)

    log_Abar: (H, N) complex, W: (*lead, H, N) complex  ->  K: (*lead, L, H) complex

``ssm_kernel_dplr(Lam, P, Q, B, C, dt, L)`` — diagonal plus low rank A = diag(Λ) - P Q^H (S4),
discretised with the bilinear transform (Ā = (I - Δ/2 A)^{-1}(I + Δ/2 A), B̄ = (I - Δ/2 A)^{-1} ΔB).
The fast form evaluates the truncated generating function at the L-th roots of unity z_k and
inverts it with one FFT (S4 Algorithm 1):

    K̂(z) = Σ_{l<L} K_l z^l = C̃^T (I - Ā z)^{-1} B̄ ,   C̃ = (I - Ā^L)^T C
         = 2 C̃^T (a I - b A)^{-1} B ,   a = (2/Δ)(1 - z), b = 1 + z
    (a - bΛ + b P Q^H)^{-1} = D - b D P (I + b Q^H D P)^{-1} Q^H D ,  D = diag(1/(a - bλ_n))

so every term is a Cauchy sum k_xy(z) = Σ_n x_n y_n / (a - b λ_n) and the low rank costs an
R x R solve (Woodbury). Written with a and b instead of S4's 2/(1+z) factor, the node z = -1
is regular. Ā^L (for C̃) is a dense matrix power by repeated squaring, O(N^3 log L) per channel.

    Lam: (H, N), P, Q: (R, H, N), B: (*lead, H, N), C: (Cc, H, N) complex; dt: (H,) real
    ->  K: (*lead, Cc, L, H) complex,  K[..., c, l, h] = Σ_n C[c,h,n] (Ā_h^l B̄_h)_n

Kernels are complex; a conjugate-symmetric system (what the layers build) gives a real kernel.
"""

from __future__ import annotations

import math

import torch

from ssmkit._checks import check_positive_int, check_same_device, check_tensor
from ssmkit.ops.dispatch import get, register


def _as_complex(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        return t
    return t.to(torch.complex128 if t.dtype == torch.float64 else torch.complex64)


# ---------------------------------------------------------------- diagonal (Vandermonde)


@register("ssm_kernel_diag", "reference")
def ssm_kernel_diag_reference(log_Abar: torch.Tensor, W: torch.Tensor, L: int) -> torch.Tensor:
    """Powers Ā one step at a time: K_l = Σ_n W_n Ā_n^l."""
    Abar = torch.exp(log_Abar)
    power = torch.ones_like(Abar)
    out = []
    for _ in range(L):
        out.append((W * power).sum(-1))
        power = power * Abar
    return torch.stack(out, dim=-2)


@register("ssm_kernel_diag", "chunked")
def ssm_kernel_diag_vandermonde(log_Abar: torch.Tensor, W: torch.Tensor, L: int) -> torch.Tensor:
    """Vandermonde product in blocks of c ~ sqrt(L): with l = j c + i,

        K_{jc+i} = Σ_n (W_n Ā_n^{jc}) Ā_n^i,

    one batched matmul ``(…, H, J, N) @ (H, N, c)``. Every power is exp(l log Ā), so the error
    does not grow with l, and only O(sqrt(L) N) complex exponentials are taken instead of O(L N)."""
    c = max(1, math.isqrt(L))
    J = -(-L // c)
    rdt = log_Abar.real.dtype
    inner = torch.exp(log_Abar[..., None] * torch.arange(c, device=log_Abar.device, dtype=rdt))  # (H, N, c)
    block = torch.exp(log_Abar[:, None, :] * (c * torch.arange(J, device=log_Abar.device, dtype=rdt))[:, None])
    K = (W[..., None, :] * block) @ inner  # (*lead, H, J, c)
    K = K.reshape(*K.shape[:-2], J * c)[..., :L]
    return K.transpose(-1, -2)


def ssm_kernel_diag(log_Abar: torch.Tensor, W: torch.Tensor, L: int, *, backend: str = "auto") -> torch.Tensor:
    """Kernel of a diagonal SSM; see the module docstring. Returns ``(*lead, L, H)`` complex."""
    check_tensor("log_Abar", log_Abar, 2, desc="(H, N)")
    check_tensor("W", W, desc="(*lead, H, N)")
    check_positive_int("L", L)
    if W.dim() < 2 or tuple(W.shape[-2:]) != tuple(log_Abar.shape):
        raise ValueError(f"W must have shape (*lead, H, N) = (*, {log_Abar.shape[0]}, {log_Abar.shape[1]}), got {tuple(W.shape)}")
    check_same_device(log_Abar=log_Abar, W=W)
    log_Abar, W = _as_complex("log_Abar", log_Abar), _as_complex("W", W)
    dtype = torch.promote_types(log_Abar.dtype, W.dtype)
    return get("ssm_kernel_diag", backend, W)(log_Abar.to(dtype), W.to(dtype), L)


# ---------------------------------------------------------------- DPLR (Cauchy + Woodbury)


def dplr_dense(Lam: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Dense ``A = diag(Λ) - Σ_r P_r Q_r^H``: ``(H, N)``, ``(R, H, N)`` -> ``(H, N, N)``."""
    return torch.diag_embed(Lam) - torch.einsum("rhn,rhm->hnm", P, Q.conj())


def dplr_bilinear(
    Lam: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, B: torch.Tensor, dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bilinear discretisation: ``Ā (H, N, N)`` and ``B̄ (*lead, H, N)``."""
    A = dplr_dense(Lam, P, Q)
    N = A.shape[-1]
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    half = (dt.to(A.dtype) / 2)[:, None, None]
    left = eye - half * A
    Abar = torch.linalg.solve(left, eye + half * A)
    rhs = (dt.to(A.dtype)[:, None] * B)[..., None]
    Bbar = torch.linalg.solve(left.expand(*rhs.shape[:-2], N, N), rhs)[..., 0]
    return Abar, Bbar


def dplr_bilinear_woodbury(
    Lam: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ā (H, N, N), M^{-1} (H, N, N))`` with M = I - Δ/2 A, without a general solve.

    M = diag(1/d) + Δ/2 P Q^H with d = 1/(1 - Δ/2 Λ), so by Woodbury
    M^{-1} = diag(d) - Δ/2 diag(d) P (I_R + Δ/2 Q^H diag(d) P)^{-1} Q^H diag(d), and since
    I + Δ/2 A = 2I - M, Ā = M^{-1}(2I - M) = 2 M^{-1} - I: O(N^2 R) per channel."""
    half = (dt.to(Lam.dtype) / 2)[:, None]  # (H, 1)
    d = 1 / (1 - half * Lam)  # (H, N)
    R = P.shape[0]
    small = torch.einsum("rhn,hn,shn->hrs", Q.conj(), d, P)
    W = torch.linalg.inv(torch.eye(R, dtype=Lam.dtype, device=Lam.device) + half[..., None] * small)
    dP = d[None] * P  # (R, H, N)
    Qd = Q.conj() * d[None]  # (R, H, N)
    Minv = torch.diag_embed(d) - half[..., None] * torch.einsum("rhn,hrs,shm->hnm", dP, W, Qd)
    eye = torch.eye(Lam.shape[-1], dtype=Lam.dtype, device=Lam.device)
    return 2 * Minv - eye, Minv


@register("ssm_kernel_dplr", "reference")
def ssm_kernel_dplr_reference(Lam, P, Q, B, C, dt, L: int) -> torch.Tensor:
    """Builds dense Ā, B̄ and powers Ā: v_l = Ā^l B̄, K_l = C^T v_l."""
    Abar, v = dplr_bilinear(Lam, P, Q, B, dt)
    out = []
    for _ in range(L):
        out.append(torch.einsum("chn,...hn->...ch", C, v))
        v = torch.einsum("hnm,...hm->...hn", Abar, v)
    return torch.stack(out, dim=-2)


@register("ssm_kernel_dplr", "chunked")
def ssm_kernel_dplr_cauchy(Lam, P, Q, B, C, dt, L: int) -> torch.Tensor:
    """Generating function at the roots of unity (Cauchy sums + Woodbury), then an inverse FFT."""
    cdtype = Lam.dtype
    rdtype = Lam.real.dtype
    Abar, _ = dplr_bilinear_woodbury(Lam, P, Q, dt)
    C_t = C - torch.einsum("chm,hmn->chn", C, torch.linalg.matrix_power(Abar, L))  # C̃ = (I - Ā^L)^T C
    k = torch.arange(L, device=Lam.device, dtype=rdtype)
    z = torch.exp(torch.complex(torch.zeros_like(k), -2 * math.pi * k / L))  # (L,)
    a = (2 / dt.to(rdtype))[:, None] * (1 - z)  # (H, L)
    b = 1 + z  # (L,)
    r = 1 / (a[..., None] - b[None, :, None] * Lam[:, None, :])  # (H, L, N)
    Qc = Q.conj()
    k_CB = torch.einsum("chn,...hn,hln->...chl", C_t, B, r)
    k_CP = torch.einsum("chn,shn,hln->cshl", C_t, P, r)
    k_QB = torch.einsum("rhn,...hn,hln->...rhl", Qc, B, r)
    k_QP = torch.einsum("rhn,shn,hln->hlrs", Qc, P, r)
    R = P.shape[0]
    M = torch.eye(R, dtype=cdtype, device=Lam.device) + b[:, None, None] * k_QP  # (H, L, R, R)
    rhs = k_QB.movedim(-3, -1)[..., None]  # (*lead, H, L, R, 1)
    X = torch.linalg.solve(M.expand(*rhs.shape[:-2], R, R), rhs)[..., 0]  # (*lead, H, L, R)
    corr = torch.einsum("cshl,...hls->...chl", k_CP, X) * b
    K_hat = 2 * (k_CB - corr)  # (*lead, Cc, H, L)
    K = torch.fft.ifft(K_hat, n=L, dim=-1)
    return K.transpose(-1, -2)


def ssm_kernel_dplr(
    Lam: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    L: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Kernel of a bilinear-discretised DPLR SSM; see the module docstring.
    Returns ``(*lead, Cc, L, H)`` complex."""
    check_tensor("Lam", Lam, 2, desc="(H, N)")
    H, N = Lam.shape
    check_tensor("P", P, 3, desc="(R, H, N)")
    check_tensor("Q", Q, 3, desc="(R, H, N)")
    check_tensor("B", B, desc="(*lead, H, N)")
    check_tensor("C", C, 3, desc="(Cc, H, N)")
    check_tensor("dt", dt, 1, shape=(H,), desc=f"(H,) = ({H},)")
    check_positive_int("L", L)
    if tuple(P.shape[1:]) != (H, N) or P.shape != Q.shape:
        raise ValueError(f"P and Q must both have shape (R, {H}, {N}), got {tuple(P.shape)} and {tuple(Q.shape)}")
    if B.dim() < 2 or tuple(B.shape[-2:]) != (H, N):
        raise ValueError(f"B must have shape (*lead, {H}, {N}), got {tuple(B.shape)}")
    if tuple(C.shape[1:]) != (H, N):
        raise ValueError(f"C must have shape (Cc, {H}, {N}), got {tuple(C.shape)}")
    if dt.is_complex():
        raise TypeError("dt must be real")
    check_same_device(Lam=Lam, P=P, Q=Q, B=B, C=C, dt=dt)
    ts = [_as_complex(n, t) for n, t in (("Lam", Lam), ("P", P), ("Q", Q), ("B", B), ("C", C))]
    cdtype = ts[0].dtype
    for t in ts[1:]:
        cdtype = torch.promote_types(cdtype, t.dtype)
    Lam, P, Q, B, C = (t.to(cdtype) for t in ts)
    dt = dt.to(Lam.real.dtype)
    return get("ssm_kernel_dplr", backend, Lam)(Lam, P, Q, B, C, dt, L)
