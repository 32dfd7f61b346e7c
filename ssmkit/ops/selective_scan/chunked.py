"""Fast CPU selective scan: chunked over time, vectorised within a chunk, hand-written backward.

Forward: for each chunk of ``T`` steps (:func:`chunk_steps`, from the cache size) the whole
chunk's Ā = exp(ΔA) and B̄x = Δ·x·B are built with a few vectorised (multi-threaded) ops into
``(batch, T, G, N, dim/G)`` buffers (channels last); then a short Python loop runs the recurrence
h_t = Ā_t h_{t-1} + B̄_t x_t with one in-place ``addcmul_`` per step, overwriting the B̄x buffer
with the states h_t; finally y_t = C_t·h_t for the chunk is one batched (1 x N) @ (N x dim/G)
product written straight into y. Memory is O(batch·dim·N·T), never O(L·dim·N). With compiled
CPU kernels on (:mod:`ssmkit.ops.cpu_compile`), inference in float32 runs whole chunks through
:mod:`.compiled` instead. Design and measurements: README.md in this folder.

Backward (reverse-mode of the recurrence; see README.md): the forward keeps only the state at the
start of each chunk. Walking the chunks from last to first, the chunk's states are recomputed from
its start state, the adjoint g_t = ∂L/∂h_t runs backwards with g_t = C_t dy_t + Ā_{t+1} g_{t+1}
(again one ``addcmul_`` per step), and the parameter gradients are chunk-wide reductions:

    ∂Δ_t = Σ_n (g_t ⊙ Ā_t ⊙ h_{t-1} ⊙ A) + x_t Σ_n g_t B_t      ∂x_t = Δ_t Σ_n g_t B_t
    ∂A   = Σ_t g_t ⊙ Ā_t ⊙ h_{t-1} Δ_t                          ∂B_t = Σ_d g_t Δ_t x_t
    ∂C_t = Σ_d dy_t h_t                                          ∂h_0 = Ā_1 g_1
"""

from __future__ import annotations

import torch

from ssmkit.ops.cpu_cache import last_level_cache_bytes
from ssmkit.ops.cpu_compile import cpu_compile_enabled
from ssmkit.ops.dispatch import register
from ssmkit.ops.selective_scan import compiled
from ssmkit.ops.selective_scan._common import as_groups, compute_dtype, finish, prepare_dt, segments

LOG2E = 1.4426950408889634
# exp(ΔA) is taken as exp2(Δ · A log2 e): torch's exp2 measured 4-7x faster than its exp on an
# AVX-512 CPU (0.13 vs 0.6-0.9 ns per float32). Exponents below the smallest normal power of two
# are raised to it: a denormal Ā (about 1e-38 or less, irrelevant next to 1) would make this and
# every later pass over the buffer 5-30x slower on x86.
_EXP2_MIN = {torch.float32: -126.0}  # (float64: denormals start below 2^-1022)

#: Time steps per chunk of the eager loop; None: :func:`chunk_steps` picks it from the cache size.
CHUNK: int | None = None


def chunk_steps(batch: int, dim: int, N: int, itemsize: int = 4) -> int:
    """Steps per chunk: the largest power of two from 8 to 64 whose two chunk buffers
    (Ā and B̄x, ``batch · T · dim · N`` floats each) fit in a quarter of the last-level cache.

    The buffers are written by a few chunk-wide passes and read back by the per-step loop and
    C·h; the other cores and the weights of the layer's matmuls share that cache. Measured on a
    2-core AMD EPYC (32 MiB L3; README.md): at Mamba-130M's dim 1536, N 16 (96 KiB a step)
    T = 16-64 are within noise and 128 (25 MB of buffers) is 1.5-2x slower; below 8 steps the
    per-chunk Python calls dominate.
    """
    per_step = 2 * batch * dim * N * itemsize
    t = 64
    while t > 8 and t * per_step > last_level_cache_bytes() // 4:
        t //= 2
    return t


def _chunk_view(buf: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` steps of a ``(b, T, ...)`` buffer, contiguous (a fresh tensor when the
    slice of a batched buffer would not be)."""
    if n == buf.shape[1] or buf.shape[0] == 1:
        return buf[:, :n]
    return buf.new_empty(buf.shape[0], n, *buf.shape[2:])


def _channels_first(h: torch.Tensor) -> torch.Tensor:
    """A fresh ``(b, D, N)`` copy of a ``(b, G, N, Dg)`` state (never a view of it)."""
    b, G, N, Dg = h.shape
    out = h.new_empty(b, G * Dg, N)  # (not a view: the state may leave through autograd)
    out.view(b, G, Dg, N).copy_(h.transpose(2, 3))
    return out


def _scan_chunks(x, delta, A, B, C, h, chunk, keep_starts):
    """Forward over one sequence. x, delta: (b, L, D); A: (D, N); B, C: (b, L, G, N);
    h: (b, D, N) start state (not modified). Returns y (b, L, D), final h (b, D, N) and the
    chunk start states (b, D, N) when ``keep_starts``.

    Inside, the state is kept as (b, G, N, Dg), channels last: every per-step operand and the
    chunk's C·h (a (1 x N) @ (N x Dg) product per step and group) then run along contiguous
    rows of Dg channels, rather than along the N = 16 states of each channel.
    """
    b, L, D = x.shape
    G, N = B.shape[2], B.shape[3]
    Dg = D // G
    At = (A * LOG2E).view(G, Dg, N).transpose(1, 2).contiguous()  # (G, N, Dg), A log2(e)
    lo = _EXP2_MIN.get(x.dtype)
    h = h.view(b, G, Dg, N).transpose(2, 3).contiguous()  # (b, G, N, Dg), a fresh copy
    y = x.new_empty(b, L, D)
    starts = []
    T = min(chunk, L)
    if L == 0:
        return y, _channels_first(h), starts
    dA_buf = x.new_empty(b, T, G, N, Dg)
    H_buf = x.new_empty(b, T, G, N, Dg)
    dtx = (delta * x).view(b, L, G, 1, Dg)
    delta5 = delta.view(b, L, G, 1, Dg)
    Ct = C.unsqueeze(3)  # (b, L, G, 1, N)
    for c0 in range(0, L, T):
        c1 = min(L, c0 + T)
        n = c1 - c0
        if keep_starts:
            starts.append(_channels_first(h))
        dA, H = _chunk_view(dA_buf, n), _chunk_view(H_buf, n)
        torch.mul(delta5[:, c0:c1], At, out=dA)
        if lo is not None:
            dA.clamp_min_(lo)
        dA.exp2_()  # Ā = exp(ΔA) = 2^(Δ A log2 e)
        torch.mul(dtx[:, c0:c1], B[:, c0:c1].unsqueeze(4), out=H)  # B̄x = Δ x B
        Hs = H.unbind(1)
        dAs = dA.unbind(1)
        prev = h
        for t in range(n):
            Hs[t].addcmul_(dAs[t], prev)  # h_t = Ā_t h_{t-1} + B̄_t x_t, written over B̄_t x_t
            prev = Hs[t]
        h.copy_(prev)
        # y_t = C_t·h_t: per (batch, step, group) a (1 x N) @ (N x Dg) product, one bmm.
        Cn = Ct[:, c0:c1].reshape(b * n * G, 1, N)
        if b == 1:  # the chunk's rows of y are contiguous: write them in place
            torch.bmm(Cn, H.view(n * G, N, Dg), out=y[0, c0:c1].view(n * G, 1, Dg))
        else:
            y[:, c0:c1] = torch.bmm(Cn, H.view(b * n * G, N, Dg)).view(b, n, D)
    return y, _channels_first(h), starts


def _scan_chunks_backward(x, delta, A, B, C, starts, dy, dh, chunk, need):
    """Gradients of one sequence's scan; ``dy`` (b, L, D), ``dh`` (b, D, N) of the final state."""
    b, L, D = x.shape
    G, N = B.shape[2], B.shape[3]
    Dg = D // G
    A5 = A.view(1, 1, G, Dg, N)
    dx = torch.zeros_like(x)
    ddelta = torch.zeros_like(delta)
    dA_total = torch.zeros_like(A).view(G, Dg, N)
    dB = torch.zeros_like(B)
    dC = torch.zeros_like(C)
    carry = dh.clone() if dh is not None else x.new_zeros(b, D, N)
    if L == 0:
        return dx, ddelta, dA_total.view(D, N), dB, dC, carry
    T = min(chunk, L)
    dA_buf = x.new_empty(b, T, G, Dg, N)
    H_buf = x.new_empty(b, T, G, Dg, N)
    G_buf = x.new_empty(b, T, G, Dg, N)
    dtx_all = (delta * x).view(b, L, G, Dg)
    delta4 = delta.view(b, L, G, Dg)
    x4 = x.view(b, L, G, Dg)
    dy4 = dy.view(b, L, G, Dg)
    chunk_starts = list(range(0, L, T))
    for ci in range(len(chunk_starts) - 1, -1, -1):
        c0 = chunk_starts[ci]
        c1 = min(L, c0 + T)
        n = c1 - c0
        h0 = starts[ci]
        dA, H, Gd = _chunk_view(dA_buf, n), _chunk_view(H_buf, n), _chunk_view(G_buf, n)
        dtc, xc, dtxc, dyc = delta4[:, c0:c1], x4[:, c0:c1], dtx_all[:, c0:c1], dy4[:, c0:c1]
        Bc, Cc = B[:, c0:c1], C[:, c0:c1]
        # Recompute the chunk's states from its start state.
        torch.mul(dtc.unsqueeze(-1), A5, out=dA).exp_()
        torch.mul(dtxc.unsqueeze(-1), Bc.unsqueeze(3), out=H)
        Hs = H.view(b, n, D, N).unbind(1)
        dAs = dA.view(b, n, D, N).unbind(1)
        prev = h0
        for t in range(n):
            Hs[t].addcmul_(dAs[t], prev)
            prev = Hs[t]
        # Adjoint: g_t = C_t dy_t + Ā_{t+1} g_{t+1}, with g_{last} also receiving the carry.
        torch.mul(dyc.unsqueeze(-1), Cc.unsqueeze(3), out=Gd)
        Gs = Gd.view(b, n, D, N).unbind(1)
        Gs[n - 1].add_(carry)
        for t in range(n - 2, -1, -1):
            Gs[t].addcmul_(dAs[t + 1], Gs[t + 1])
        # ∂C_t = Σ_{d in group} dy_t h_t
        M = b * n * G  # batched matrix-vector products over (batch, t, group), as in the forward
        if need["C"]:
            dC[:, c0:c1] = torch.bmm(dyc.reshape(M, 1, Dg), H.view(M, Dg, N)).view(b, n, G, N)
        # ∂B_t = Σ_{d in group} g_t Δ_t x_t ; Σ_n g_t B_t feeds ∂x and ∂Δ.
        if need["B"]:
            dB[:, c0:c1] = torch.bmm(dtxc.reshape(M, 1, Dg), Gd.view(M, Dg, N)).view(b, n, G, N)
        gB = torch.bmm(Gd.view(M, Dg, N), Bc.reshape(M, N, 1)).view(b, n, G, Dg)
        dx[:, c0:c1] = (gB * dtc).reshape(b, n, D)
        dd = gB * xc
        # q_t = g_t ⊙ Ā_t ⊙ h_{t-1}  (∂L/∂(ΔA)_t); computed in place in the Ā buffer.
        dA.mul_(Gd)  # g_t Ā_t
        carry = dA[:, 0].reshape(b, D, N).clone()  # ∂h_{start} = Ā_first g_first
        if n > 1:
            dA[:, 1:].mul_(H[:, : n - 1])
        dA[:, 0].mul_(h0.view(b, G, Dg, N))
        dd = dd + (dA * A.view(G, Dg, N)).sum(-1)
        ddelta[:, c0:c1] = dd.reshape(b, n, D)
        if need["A"]:
            dA_total += (dA * dtc.unsqueeze(-1)).sum((0, 1))
    return dx, ddelta, dA_total.view(D, N), dB, dC, carry


class _SelectiveScanFn(torch.autograd.Function):
    """Core scan y_t = C_t·h_t of one sequence (no D, no gate); returns (y, final state)."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0, chunk):
        needs_grad = any(ctx.needs_input_grad[:6])
        y, h, starts = _scan_chunks(x, delta, A, B, C, h0, chunk, keep_starts=needs_grad)
        if needs_grad:
            ctx.save_for_backward(x, delta, A, B, C, *starts)
        ctx.chunk = chunk
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh):
        x, delta, A, B, C, *starts = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        need = {"A": ctx.needs_input_grad[2], "B": ctx.needs_input_grad[3], "C": ctx.needs_input_grad[4]}
        dx, ddelta, dA, dB, dC, dh0 = _scan_chunks_backward(
            x, delta, A, B, C, starts, dy.contiguous(), dh, ctx.chunk, need
        )
        return dx, ddelta, dA, dB, dC, dh0, None


@register("selective_scan", "chunked")
def selective_scan_chunked(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           initial_state=None, return_final_state=False, cu_seqlens=None):
    """Same signature and result as :func:`ssmkit.ops.selective_scan` (no validation here)."""
    if (compute_dtype(x) == torch.float32 and cpu_compile_enabled(x)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                                     (x, dt, A, B, C, D, z, dt_bias, initial_state)))):
        out = _scan_compiled(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens)
        if out is not None:
            return out if return_final_state else out[0]
    cdt = compute_dtype(x)
    bsz, L, dim = x.shape
    N = A.shape[1]
    delta = prepare_dt(dt, dt_bias, dt_softplus, cdt).contiguous()
    xc = x.to(cdt).contiguous()
    Ac = A.to(cdt).contiguous()
    Bg = as_groups(B).to(cdt).contiguous()
    Cg = as_groups(C).to(cdt).contiguous()
    ys, finals = [], []
    for i, (a, b) in enumerate(segments(cu_seqlens, L)):
        if initial_state is None:
            h0 = xc.new_zeros(bsz, dim, N)
        elif cu_seqlens is not None:
            h0 = initial_state[i : i + 1].to(cdt)
        else:
            h0 = initial_state.to(cdt)
        if cu_seqlens is None:
            args = (xc, delta, Ac, Bg, Cg)
        else:
            args = (xc[:, a:b], delta[:, a:b], Ac, Bg[:, a:b], Cg[:, a:b])
        y, h = _SelectiveScanFn.apply(*args, h0, CHUNK or chunk_steps(bsz, dim, N, xc.element_size()))
        ys.append(y)
        finals.append(h)
    y = torch.cat(ys, 1) if len(ys) > 1 else ys[0]
    y = finish(y, xc, D, z, x.dtype)
    if return_final_state:
        return y, torch.cat(finals, 0) if len(finals) > 1 else finals[0]
    return y


def _scan_compiled(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens):
    """Inference in float32 through the compiled chunk kernel (:mod:`.compiled`): whole chunks
    of ``compiled.STEPS`` tokens there, one sequence (batch row) per call, a shorter tail through
    the eager chunked scan. Returns ``(y, final state)``, or None when the kernel cannot be
    compiled or run."""
    bsz, L, dim = x.shape
    Bg, Cg = as_groups(B), as_groups(C)
    G, N = Bg.shape[2], Bg.shape[3]
    Dg = dim // G
    A2 = (A.float() * compiled.LOG2E).view(G, Dg, N)
    Dv = None if D is None else D.float().view(G, Dg)
    bias = None if dt_bias is None else dt_bias.float().view(G, Dg)
    # Row-strided views (z, a slice of the layer's input projection) are read in place: the
    # kernel is compiled for their strides.
    xs, dts, zs = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x, dt, z))
    y = torch.empty_like(x)
    finals = []
    T = compiled.STEPS
    for i, (a, b) in enumerate(segments(cu_seqlens, L)):
        if initial_state is None:
            h = x.new_zeros(bsz, G, Dg, N, dtype=torch.float32)
        else:
            h0 = initial_state[i : i + 1] if cu_seqlens is not None else initial_state
            h = h0.float().reshape(bsz, G, Dg, N).contiguous()
        full = a + (b - a) // T * T
        if full > a:
            rows = []
            for r in range(bsz):
                # every chunk's (T, G, Dg) / (T, G, N) view of this row, made in one call per input
                views = [None if t is None else t[r, a:full].unflatten(0, (-1, T)).unflatten(2, (G, -1)).unbind(0)
                         for t in (y, xs, dts, zs)]
                views += [t[r, a:full].unflatten(0, (-1, T)).unbind(0) for t in (Bg, Cg)]
                hr, kern = h[r], None
                for yc, xc, dtc, zc, bc, cc in zip(*(v or [None] * ((full - a) // T) for v in views)):
                    args = [hr, yc, xc, dtc, bc, cc, A2, zc, Dv, bias]
                    if kern is None:  # every chunk has the same shapes and strides
                        kern = compiled.scan_chunk_kernel(args, dt_softplus)
                    out = None if kern is None else kern(*(t for t in args if t is not None))
                    if out is None:
                        return None
                    hr = out[0]
                rows.append(hr)
            h = torch.stack(rows)
        h = h.reshape(bsz, dim, N)
        if full < b:  # the tail: fewer than T tokens
            sl = slice(full, b)
            delta = prepare_dt(dts[:, sl], dt_bias, dt_softplus, torch.float32).contiguous()
            xt = xs[:, sl].float().contiguous()
            yt, h, _ = _scan_chunks(xt, delta, A.float(), Bg[:, sl].float().contiguous(),
                                    Cg[:, sl].float().contiguous(), h, T, False)
            y[:, sl] = finish(yt, xt, D, None if zs is None else zs[:, sl], x.dtype)
        finals.append(h)
    return y, torch.cat(finals, 0) if len(finals) > 1 else finals[0]
