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
chunks at once. Ratios γ_t/γ_i come from segment sums of g (non-positive, never exp of a large
positive number).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.delta_rule._common import make_form
from ssmkit.ops.dispatch import register
from ssmkit.ops.ssd._common import segsum


class _UnitLowerInverse(torch.autograd.Function):
    """``(I + A)⁻¹`` for strictly lower-triangular ``A: (..., Q, Q)`` (the UT transform's T).

    Forward substitution one row at a time, batched over everything else: row i of T = S - I is
    T[i, :i] = -A[i, :i] + (-A[i, :i]) T[:i, :i]. (A batched LAPACK triangular solve is far
    slower for many small systems on CPU.) Backward: d(S⁻¹) = -S dA S, so dA = -Sᵀ dS Sᵀ.
    """

    @staticmethod
    def forward(ctx, A):
        Q = A.shape[-1]
        T = (-A).reshape(-1, Q, Q)  # contiguous (batch, Q, Q)
        for i in range(1, Q):
            # row i is zero from column i on, so the full-width product only reads the finished
            # rows k < i; full rows keep the operands contiguous (no copies per step)
            row = T[:, i : i + 1]
            T[:, i : i + 1] = row + row @ T
        T = T.view(A.shape)
        S = T + torch.eye(Q, dtype=A.dtype, device=A.device)
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

    def chunks(t):  # (b, l, h, d) -> (b, h, c, Q, d)
        return t.view(b, c, Q, h, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    bc = beta.view(b, c, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()
    if g is not None:
        gc = g.view(b, c, Q, h).permute(0, 3, 1, 2)
        seg = segsum(gc)  # log(γ_t / γ_i), -inf above the diagonal
        Gam = _exp_flushed(seg)  # (b, h, c, Q, Q)
        gam = _exp_flushed(torch.cumsum(gc, dim=-1))  # γ_t
        gam_to_end = _exp_flushed(seg[..., -1, :])  # γ_C / γ_i
        chunk_decay = gam[..., -1]  # γ_C
    kkT = kc @ kc.transpose(-1, -2)
    qkT = qc @ kc.transpose(-1, -2)
    if g is not None:
        kkT = kkT * Gam
        qkT = qkT * Gam
    else:
        qkT = qkT.masked_fill(~causal, 0.0)
    A = (bc[..., None] * kkT).tril(-1)
    bk = bc[..., None] * kc if g is None else (bc * gam)[..., None] * kc
    rhs = torch.cat([bc[..., None] * vc, bk], dim=-1)
    sol = _UnitLowerInverse.apply(A) @ rhs  # (I + A)⁻¹ [diag(β) V | diag(βγ) K]
    Ut, W = sol.split([dv, dk], dim=-1)

    # Fold what depends on h_0 into two small matrices per chunk so the carry is one matmul:
    #   O   = P Ũ + (diag(γ) Q - P W) h_0,    h_C = (γ_C I - K̃ᵀ W) h_0 + K̃ᵀ Ũ
    o_local = qkT @ Ut  # (b, h, c, Q, dv)
    q_eff = (qc if g is None else qc * gam[..., None]) - qkT @ W  # (b, h, c, Q, dk)
    kt = (kc if g is None else kc * gam_to_end[..., None]).transpose(-1, -2)  # (b, h, c, dk, Q)
    carry_add = kt @ Ut  # (b, h, c, dk, dv)
    carry_mul = -(kt @ W)  # (b, h, c, dk, dk)
    eye = torch.eye(dk, dtype=q.dtype, device=q.device)
    carry_mul = carry_mul + (eye if g is None else chunk_decay[..., None, None] * eye)

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
