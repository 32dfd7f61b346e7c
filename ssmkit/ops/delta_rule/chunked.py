"""Chunked delta rule with the WY / UT representation (Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length", Sec. 3; gated: Yang, Kautz &
Hatamizadeh 2024, Sec. 3.3).

With h = Sᵀ (K x V), the gated delta rule is h_t = α_t h_{t-1} + k_t u_tᵀ where
u_t = β_t (v_t - α_t h_{t-1}ᵀ k_t). Inside a chunk starting from state h_0, with γ_t = α_1...α_t,

    u_t = β_t v_t - β_t γ_t h_0ᵀ k_t - Σ_{i<t} β_t (γ_t/γ_i) (k_tᵀ k_i) u_i

i.e. (I + A) U = diag(β) V - diag(βγ) K h_0 with A strictly lower triangular,
A[t, i] = β_t (γ_t/γ_i) k_tᵀ k_i. One unit-triangular inverse per chunk (the UT transform) gives
Ũ = T diag(β) V and W = T diag(βγ) K, T = (I + A)⁻¹, independent of h_0; then

    U   = Ũ - W h_0
    O   = diag(γ) Q h_0 + (M ∘ Γ ∘ Q Kᵀ) U            (M: causal mask incl. diagonal)
    h_C = γ_C h_0 + (diag(γ_C/γ) K)ᵀ U

Everything but the (K x K)(K x V) state carry between chunks is a batched matmul over all
chunks at once. Ratios γ_t/γ_i are exponentials of differences of within-chunk prefix sums of g,
masked with -inf above the diagonal before ``exp`` (non-positive, never exp of a large positive
number).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssmkit.ops.delta_rule._common import make_form
from ssmkit.ops.dispatch import register


def _unit_lower_inverse_rows(A: torch.Tensor) -> torch.Tensor:
    """``(I + A)⁻¹`` for small strictly lower-triangular ``A (..., q, q)`` by forward substitution:
    row i of T = S - I is T[i, :] = -A[i, :] + (-A[i, :]) T (the row is zero from column i on,
    so the full-width product reads only finished rows and its operands stay contiguous)."""
    q = A.shape[-1]
    T = (-A).reshape(-1, q, q).tril_(-1)  # only the strictly lower part of A is read
    for i in range(1, q):
        row = T[:, i : i + 1]
        T[:, i : i + 1] = row + row @ T
    return (T + torch.eye(q, dtype=A.dtype, device=A.device)).view(A.shape)


def _unit_lower_inverse(A: torch.Tensor, block: int = 16) -> torch.Tensor:
    """``(I + A)⁻¹`` for strictly lower-triangular ``A (..., Q, Q)``, blockwise.

    Invert the ``block``-sized diagonal blocks by substitution, then merge neighbours pairwise:
    inv([[I + A11, 0], [A21, I + A22]]) = [[S11, 0], [-S22 A21 S11, S22]], doubling the block
    size each round, so all but the small base case is batched matmuls. Zero padding to
    ``block * 2^k`` leaves the leading block's inverse unchanged (the matrix is lower triangular).
    """
    Q = A.shape[-1]
    if Q <= block:
        return _unit_lower_inverse_rows(A)
    n = 1
    while n * block < Q:
        n *= 2
    Qp = n * block
    Ap = F.pad(A, (0, Qp - Q, 0, Qp - Q))
    batch = Ap.shape[:-2]
    blocks = torch.diagonal(Ap.view(*batch, n, block, n, block), dim1=-4, dim2=-2)  # (..., b, b, n)
    S = _unit_lower_inverse_rows(blocks.movedim(-1, -3).contiguous())  # (..., n, b, b)
    s = block
    while n > 1:
        # blocks (2i+1, 2i) of A at the current block size, below the diagonal
        A21 = torch.diagonal(Ap.view(*batch, n, s, n, s), offset=-1, dim1=-4, dim2=-2)[..., ::2]
        A21 = A21.movedim(-1, -3)  # (..., n/2, s, s)
        S11, S22 = S[..., 0::2, :, :], S[..., 1::2, :, :]
        S21 = -(S22 @ A21 @ S11)
        top = torch.cat([S11, torch.zeros_like(S11)], dim=-1)
        S = torch.cat([top, torch.cat([S21, S22], dim=-1)], dim=-2)  # (..., n/2, 2s, 2s)
        n //= 2
        s *= 2
    return S[..., 0, :Q, :Q]


class _UnitLowerInverse(torch.autograd.Function):
    """``S = (I + A)⁻¹`` for strictly lower-triangular ``A: (..., Q, Q)`` (the UT transform's T).

    Forward: :func:`_unit_lower_inverse` (a batched LAPACK triangular solve is far slower for
    many small systems on CPU). Backward: dS = -S dA S, so dA = -Sᵀ dS Sᵀ (lower part).
    """

    @staticmethod
    def forward(ctx, A):
        S = _unit_lower_inverse(A)
        ctx.save_for_backward(S)
        return S

    @staticmethod
    def backward(ctx, grad_S):
        (S,) = ctx.saved_tensors
        St = S.transpose(-1, -2)
        return -(St @ grad_S @ St).tril(-1)


def _exp_flushed(log_x: torch.Tensor) -> torch.Tensor:
    """exp, with results below the smallest normal number set to 0: denormals would make every
    later matmul an order of magnitude slower on x86 for no accuracy gain."""
    return F.threshold(torch.exp(log_x), torch.finfo(log_x.dtype).tiny, 0.0)


def _chunked_core(q, k, v, beta, g, chunk_size, h0):
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    Q = min(chunk_size, l)
    pad = (-l) % Q
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))
        g = None if g is None else F.pad(g, (0, 0, 0, pad))
    c = (l + pad) // Q

    def chunks(t):  # (b, l, h, d) -> (b, h, c, Q, d), contiguous so the matmuls need no copies
        return t.view(b, c, Q, h, -1).permute(0, 3, 1, 2, 4).contiguous()

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    bc = beta.view(b, c, Q, h).permute(0, 3, 1, 2).unsqueeze(-1)  # (b, h, c, Q, 1)
    kT = kc.transpose(-1, -2)
    kkT, qkT = kc @ kT, qc @ kT
    if g is not None:
        g_cum = torch.cumsum(g.view(b, c, Q, h), dim=2).permute(0, 3, 1, 2)  # log γ_t, (b, h, c, Q)
        # log(γ_t / γ_i) as a difference of within-chunk prefix sums, -inf above the diagonal
        # before exp: only non-positive exponents (g <= 0)
        upper = torch.ones(Q, Q, dtype=torch.bool, device=q.device).triu(1)
        Gam = _exp_flushed((g_cum[..., :, None] - g_cum[..., None, :]).masked_fill(upper, -math.inf))
        gam = _exp_flushed(g_cum).unsqueeze(-1)  # γ_t
        gam_to_end = _exp_flushed(g_cum[..., -1:] - g_cum).unsqueeze(-1)  # γ_C / γ_i
        chunk_decay = gam[..., -1, :]  # γ_C, (b, h, c, 1)
        qkT = qkT * Gam
        A = kkT * (bc * Gam)  # its diagonal and upper part are ignored by the inverse
        bk, qg, kg = (bc * gam) * kc, qc * gam, kc * gam_to_end
    else:
        qkT = qkT.tril()
        A = bc * kkT
        bk, qg, kg = bc * kc, qc, kc
    rhs = torch.cat([bc * vc, bk], dim=-1)
    sol = _UnitLowerInverse.apply(A) @ rhs  # (I + A)⁻¹ [diag(β) V | diag(βγ) K] = [Ũ | W]

    # Fold what depends on h_0 into two small matrices per chunk so the carry is one matmul:
    #   O   = P Ũ + (diag(γ) Q - P W) h_0,    h_C = (γ_C I - K̃ᵀ W) h_0 + K̃ᵀ Ũ
    P_sol = qkT @ sol  # [P Ũ | P W]: (b, h, c, Q, dv + dk)
    o_local = P_sol[..., :dv]
    q_eff = qg - P_sol[..., dv:]  # (b, h, c, Q, dk)
    K_sol = kg.transpose(-1, -2) @ sol  # [K̃ᵀ Ũ | K̃ᵀ W]: (b, h, c, dk, dv + dk)
    carry_add = K_sol[..., :dv]
    eye = torch.eye(dk, dtype=q.dtype, device=q.device)
    carry_mul = (eye if g is None else chunk_decay[..., None] * eye) - K_sol[..., dv:]  # (b, h, c, dk, dk)

    # chunk-major and (b*h)-flattened so each step is one contiguous baddbmm
    carry_mul = carry_mul.permute(2, 0, 1, 3, 4).reshape(c, b * h, dk, dk)
    carry_add = carry_add.permute(2, 0, 1, 3, 4).reshape(c, b * h, dk, dv)
    s = q.new_zeros(b * h, dk, dv) if h0 is None else h0.reshape(b * h, dk, dv)
    prev = []
    for ci in range(c):
        prev.append(s)
        s = torch.baddbmm(carry_add[ci], carry_mul[ci], s)
    s = s.view(b, h, dk, dv)
    o = o_local
    if c > 1 or h0 is not None:
        o = o + q_eff @ torch.stack(prev, dim=1).view(b, h, c, dk, dv)
    o = o.permute(0, 2, 3, 1, 4).reshape(b, c * Q, h, dv)
    if pad:
        o = o[:, :l]
    return o, s


delta_rule_chunked = register("delta_rule", "chunked")(make_form(_chunked_core))
