"""Chunked SSD: the block decomposition of the semiseparable matrix (Dao & Gu 2024, Sec. 6).

The sequence is cut into chunks of Q tokens (the last one zero-padded: Δ = 0 leaves the state
unchanged). With log decays a_t = Δ_t A and their within-chunk prefix sums, four stages, each a
batched matmul except the short scan of stage 3:

1. intra-chunk outputs (diagonal blocks): y_diag = (L ∘ C Bᵀ) (Δx) per chunk, the quadratic
   form restricted to Q x Q blocks;
2. chunk states: s_c = Σ_j exp(a_{j+1} + ... + a_Q) B_j (Δx_j)ᵀ, the state each chunk would
   leave starting from zero;
3. state passing: h_c = exp(a_1 + ... + a_Q) h_{c-1} + s_c, a recurrence over chunks only;
4. state to output: y_off_i = exp(a_1 + ... + a_i) C_i h_{c-1} (low-rank off-diagonal blocks).

Cost O(L Q (N + P)) for the blocks plus O(L/Q · H P N) for the scan, against O(L H P N) steps
of the recurrence done one token at a time. Exponents are segment sums of the log decays
(non-positive for A <= 0, Δ >= 0): differences of within-chunk prefix sums, replaced by 0 above
the diagonal before ``exp`` and masked there, so long sequences with strong decay stay finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.dispatch import register
from ssmkit.ops.ssd._common import make_form

CPU_BLOCK = 64
LOG2E = 1.4426950408889634


def _decay_matrix_times(a_cum: torch.Tensor, CB: torch.Tensor, nonpositive: bool) -> torch.Tensor:
    """``L ∘ CB`` with ``L[i, j] = 2^(a_cum[i] - a_cum[j])`` for i >= j, 0 above the diagonal.

    ``a_cum: (b, c, g, hg, Q)`` within-chunk prefix sums of the log decays (base 2); ``CB: (b, c, g, 1, Q, Q)``.
    Below the diagonal the difference is a segment sum of the log decays; above it, it is
    replaced by 0 *before* ``exp`` (so no exp of a large positive number there) and the entry is
    zeroed by the causal mask, applied to CB, which is hg times smaller than L. When every log
    decay is <= 0 (``nonpositive``, the usual A < 0, Δ >= 0) the replacement is a clamp at 0,
    one fast pass; otherwise (a growing state) an explicit fill of the upper triangle. Without
    autograd the passes over the (Q, Q) blocks run in place: on a CPU these memory-bound passes
    cost as much as the matmuls.
    """
    CB = CB.tril()
    diff = a_cum[..., :, None] - a_cum[..., None, :]
    Q = diff.shape[-1]
    upper = None if nonpositive else torch.ones(Q, Q, dtype=torch.bool, device=diff.device).triu(1)
    # Decays below the smallest normal float are set to 0: denormal operands slow the following
    # matmul by an order of magnitude on x86, for no accuracy gain.
    tiny = torch.finfo(diff.dtype).tiny
    if torch.is_grad_enabled() and (a_cum.requires_grad or CB.requires_grad):
        diff = diff.clamp_max(0.0) if nonpositive else diff.masked_fill(upper, 0.0)
        return F.threshold(torch.exp2(diff), tiny, 0.0) * CB
    diff = diff.clamp_max_(0.0) if nonpositive else diff.masked_fill_(upper, 0.0)
    return F.threshold_(diff.exp2_(), tiny, 0.0).mul_(CB)


def _chunked_core(x, dt, A, B, C, chunk_size, h0):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    # chunk_size only sets the block length, not the result. On a CPU the (Q, Q) blocks are
    # memory-bound passes, and blocks of 64 measured fastest for Mamba-2 shapes (2-3x faster
    # than 256, the GPU kernels' choice), so longer chunks are cut into blocks of CPU_BLOCK.
    Q = min(chunk_size, l, CPU_BLOCK if x.device.type == "cpu" else chunk_size)
    pad = (-l) % Q
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // Q

    # log decays a_t = Δ_t A and their prefix sums within each chunk: (b, c, g, hg, Q), in base 2:
    # every decay below is exp2 of them (torch's exp2 measured 4-7x faster than its exp on an
    # AVX-512 CPU; see ssmkit/ops/selective_scan/README.md)
    a = dt * (A * LOG2E)
    # The clamp shortcut needs to know every log decay is <= 0; reading that back is a host sync,
    # cheap on a CPU but a pipeline stall on a GPU, where the explicit mask (same result) is used.
    nonpositive = a.device.type == "cpu" and not bool((a > 0).any())
    a_cum = torch.cumsum(a.view(b, c, Q, h), dim=2).permute(0, 1, 3, 2).reshape(b, c, g, hg, Q)
    a_last = a_cum[..., -1:]  # a_1 + ... + a_Q per chunk

    Bc = B.view(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    Cc = C.view(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    xdt = (x * dt[..., None]).view(b, c, Q, g, hg, p)  # Δx in the input's layout

    # 1. diagonal blocks: (L ∘ C Bᵀ) Δx, per head with time next to p: (b, c, g, hg, Q, p)
    CB = (Cc @ Bc.transpose(-1, -2)).unsqueeze(3)  # (b, c, g, 1, Q, Q)
    y = _decay_matrix_times(a_cum, CB, nonpositive) @ xdt.permute(0, 1, 3, 4, 2, 5)

    # States are kept transposed, (n, hg*p) per group, inside this function: then both state
    # matmuls below read Δx and write y_off in the input's own layout (no transposing copies).
    # 2. chunk states from zero: Σ_j exp(a_{j+1} + ... + a_Q) B_j (Δx_j)ᵀ -> (b, c, g, n, hg*p)
    decay_to_end = torch.exp2(a_last - a_cum).permute(0, 1, 4, 2, 3).unsqueeze(-1)  # (b, c, Q, g, hg, 1)
    xw = (xdt * decay_to_end).transpose(2, 3).reshape(b, c, g, Q, hg * p)
    states = Bc.transpose(-1, -2) @ xw  # (b, c, g, n, hg*p)

    # 3. pass states between chunks (the only sequential part, one step per chunk)
    chunk_decay = torch.exp2(a_last).view(b, c, g, 1, hg, 1)
    states = states.view(b, c, g, n, hg, p)
    if h0 is None:
        s = x.new_zeros(b, g, n, hg, p)
    else:
        s = h0.view(b, g, hg, p, n).permute(0, 1, 4, 2, 3)
    need_prev = c > 1 or h0 is not None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, s))
    if grad:
        prev = []
        for ci in range(c):
            prev.append(s)
            s = torch.addcmul(states[:, ci], chunk_decay[:, ci], s)
        prev_states = torch.stack(prev, dim=1) if need_prev else None
    else:  # inference: each chunk's state is written straight into one buffer
        hs = x.new_empty(b, c + 1, g, n, hg, p)
        hs[:, 0] = s
        for ci in range(c):
            torch.addcmul(states[:, ci], chunk_decay[:, ci], hs[:, ci], out=hs[:, ci + 1])
        prev_states, s = hs[:, :c], hs[:, c]
    s = s.permute(0, 1, 3, 4, 2).reshape(b, h, p, n).contiguous()  # the public (b, H, P, N) layout
    y = y.transpose(3, 4)  # (b, c, g, Q, hg, p) view
    if need_prev:
        # prev_states: (b, c, g, n, hg, p), the state entering each chunk
        # 4. state -> output: exp(a_1 + ... + a_i) C_i h_{c-1}, summed in y_off's (b, c, g, Q, hg, p)
        # layout, which is already the output's when G = 1 (no final permute copy then)
        y_off = (Cc @ prev_states.reshape(b, c, g, n, hg * p)).view(b, c, g, Q, hg, p)
        decay_out = torch.exp2(a_cum).transpose(-1, -2).unsqueeze(-1)  # (b, c, g, Q, hg, 1)
        y = y_off * decay_out + y if grad else torch.addcmul(y, y_off, decay_out, out=y_off)

    y = y.transpose(2, 3).reshape(b, c * Q, h, p)
    if pad:
        y = y[:, :l]
    return y, s


ssd_chunked = register("ssd", "chunked")(make_form(_chunked_core))
