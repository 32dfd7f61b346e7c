"""The compiled CPU kernel of the selective scan's inference path (see :mod:`ssmkit.ops.cpu_compile`).

One call advances one sequence's state by a chunk of ``steps`` tokens, the whole output included:

    Δ_t = softplus(dt_t + dt_bias);  h_t = 2^(Δ_t A log2 e) ⊙ h_{t-1} + Δ_t x_t B_t  (2^· by exp2_poly)
    y_t = (C_t · h_t + D x_t) · silu(z_t)

written as an unrolled loop over the steps. Inductor fuses it into one C++ loop nest over the
channels (split among the threads) whose body carries each channel's N states in registers
through the chunk's steps, with C·h as an in-register reduction: the state is read and written
once per chunk, not once per step, and no (steps, dim, N) buffer exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.cpu_compile import compiled_graph

LOG2E = 1.4426950408889634
# 2^f on [0, 1), degree 6, fitted for relative error (1.2e-7 in float32 with the rounding of the
# evaluation: the accuracy of torch's exp2). Horner's rule, 6 multiply-adds.
_EXP2_POLY = (1.0000000035399899, 0.6931469329451198, 0.24023025237085854, 0.05548194395618536,
              0.009681043919480048, 0.0012423592626343016, 0.00021745804690520565)
# log1p(u) / u on [0, 1], degree 8, fitted for relative error (3e-8 before float32 rounding).
_LOG1P_POLY = (0.9999999698854527, -0.4999949317046375, 0.3331909723918668, -0.24842984947880764,
               0.1910601581521582, -0.13663262619568015, 0.07822612835225902, -0.02950533624090059,
               0.005232716273005001)
#: Steps per compiled call: the unrolled code (and its compile time) grows with it; the per-call
#: overhead (a few microseconds, one OpenMP region) shrinks. 16: see README.md in this folder.
STEPS = 16


def _horner(x: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    p = torch.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        p = p * x + c
    return p


def exp2_poly(x: torch.Tensor, *, nonpositive: bool = False) -> torch.Tensor:
    """2^x for finite float32 ``x``: 2^floor(x) built in the exponent bits, times a polynomial for
    the fraction (relative error 1.2e-7, as torch's ``exp2``). Results below 2^-126 are 0 (never a
    denormal, which would slow every later pass 5-30x on x86); exponents are clamped at 127.
    ``nonpositive``: the caller guarantees ``x <= 0``; the clamp is then one integer ``max`` on the
    exponent bits instead of a float clamp (whose NaN handling costs three instructions), so
    Inductor compiles it to about 12 vector instructions."""
    if not nonpositive:
        x = x.clamp(-127.0, 127.0)
    xi = torch.floor(x)
    p = _horner(x - xi, _EXP2_POLY)
    return p * ((xi.to(torch.int32) + 127).clamp_min(0) << 23).view(torch.float32)


def softplus_poly(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) = max(x, 0) + log1p(u), u = e^-|x| in (0, 1], with log1p(u) = u·q(u) for a
    polynomial q: no ``log1p``, whose Sleef form cost 12% of the chunk kernel (README.md here).
    Relative error against float64: 2e-7 for x >= -1; below, where softplus(x) ~ e^x, the rounding
    of x log2 e adds up to ~1e-7·|x| (as for any exp taken through exp2 in float32); 0 where
    softplus(x) is below the normal floats (x < -87)."""
    u = exp2_poly(x.abs() * -LOG2E, nonpositive=True)
    return x.clamp_min(0.0) + u * _horner(u, _LOG1P_POLY)


def _make_chunk(steps: int, softplus: bool, has_z: bool, has_D: bool, has_bias: bool):
    def chunk(h, y_out, x, dt, B, C, A2, *opt):
        """One sequence: h: (G, Dg, N) float32; y_out: (steps, G, Dg), written in place (x's
        dtype); x, dt, z: (steps, G, Dg); B, C: (steps, G, N); A2 = A log2 e: (G, Dg, N); D,
        dt_bias: (G, Dg). ``opt`` holds z, D, dt_bias, those present. Returns (new h,): updating
        h in place as well tripped an Inductor code generation error (torch 2.13)."""
        opt = list(opt)
        z = opt.pop(0) if has_z else None
        D = opt.pop(0) if has_D else None
        dt_bias = opt.pop(0) if has_bias else None
        xf = x.float()
        delta = dt.float()
        if dt_bias is not None:
            delta = delta + dt_bias
        if softplus:
            delta = softplus_poly(delta)
        dx = delta * xf
        Bf, Cf = B.float(), C.float()
        ys = []
        for t in range(steps):
            dA = exp2_poly(delta[t, :, :, None] * A2, nonpositive=softplus)  # Δ >= 0, A <= 0
            h = dA * h + dx[t, :, :, None] * Bf[t, :, None, :]
            ys.append((h * Cf[t, :, None, :]).sum(-1))
        y = torch.stack(ys, 0)
        if D is not None:
            y = y + xf * D
        if z is not None:
            y = y * F.silu(z.float())
        y_out.copy_(y)
        return (h,)

    return chunk


def scan_chunk_kernel(args: list[torch.Tensor | None], softplus: bool):
    """The compiled chunk for ``args`` = ``[h, y_out, x, dt, B, C, A2, z, D, dt_bias]`` (z, D and
    dt_bias may be None; ``x.shape[0]`` steps): a callable taking the tensors among ``args`` that are
    not None and returning ``(new h,)`` (or None if running it failed), or None if compiling failed.
    Compiled once per shape, dtype and stride pattern: a chunk's inputs are slices of one sequence,
    so every chunk of every prompt length shares one kernel."""
    tensors = [t for t in args if t is not None]
    key = (tuple((tuple(t.shape), t.stride(), t.dtype) for t in tensors),
           tuple(t is None for t in args[7:]), softplus)
    fn = _make_chunk(args[2].shape[0], softplus, *(t is not None for t in args[7:]))
    return compiled_graph("selective_scan", fn, key, tensors)
