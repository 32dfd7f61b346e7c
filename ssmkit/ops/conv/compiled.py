"""The compiled CPU kernel of the causal depthwise conv1d's inference path (see
:mod:`ssmkit.ops.cpu_compile`).

    y[t, d] = act(bias[d] + Σ_k w[k, d] · xp[t + k, d]),   xp = [initial inputs | x]   (time axis)

written as ``width`` shifted multiply-adds and the SiLU. Inductor fuses them into one pass over
``(batch, seqlen, dim)`` that reads each input row ``width`` times from cache and writes ``y``
once; the eager form makes ``width`` passes plus one for the activation, each over memory, and
allocates its output afresh. The time axis is dynamic: one compiled kernel serves every sequence
length (and every segment of a packed batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.cpu_compile import compiled_kernel


def _make_conv(width: int, has_bias: bool, silu: bool):
    def conv(x, init, w, bias):
        """x: (b, L, D); init: (b, D, width-1) the inputs before x; w: (width, D) the taps as
        rows; bias: (D,) or None. Returns y (b, L, D)."""
        L = x.shape[1]
        xp = torch.cat([init.transpose(1, 2).to(x.dtype), x], 1)  # fused into the loads
        acc = xp[:, 0:L] * w[0]
        if has_bias:
            acc = acc + bias
        for k in range(1, width):
            acc = acc + xp[:, k : k + L] * w[k]
        return F.silu(acc) if silu else acc

    return conv


def conv_kernel(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu: bool):
    """The compiled conv for ``x``'s dtype and ``w``'s width (any sequence length), or None once
    compiling it has failed."""
    width = w.shape[0]
    key = (width, x.dtype, bias is None, silu, x.dim())
    return compiled_kernel("causal_conv1d", _make_conv(width, bias is not None, silu), key, dynamic=True)
