"""The compiled CPU kernel of the causal conv1d's inference path (see :mod:`ssmkit.ops.cpu_compile`).

One call computes ``ROWS`` output rows of one sequence from the ``ROWS + width - 1`` input rows
they read: the ``width`` taps, the bias and the SiLU in one pass over the rows (the eager in-place
form makes ``width + 1`` passes over the whole output), written into the caller's output. Blocks
of a fixed number of rows keep one kernel for every prompt length (the last block ends at the last
row, overlapping the one before); the first ``width - 1`` rows, which read the initial state, run
eager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.cpu_compile import compiled_graph

#: Output rows per compiled call (64 rows of Mamba-130M's 1536 channels: 0.4 MB of input).
ROWS = 64


def _make_block(silu: bool, has_bias: bool):
    def block(y_out, x, w, *bias):
        """y_out: (ROWS, dim), written in place; x: (ROWS + W - 1, dim), the input rows from W - 1
        before the block's first output; w: (W, dim), the taps as rows; bias: (dim,), if any."""
        W, R = w.shape[0], y_out.shape[0]
        y = x[W - 1 : W - 1 + R].float() * w[W - 1]
        if has_bias:
            y = y + bias[0]
        for k in range(W - 1):
            y = y + x[k : k + R].float() * w[k]
        if silu:
            y = F.silu(y)
        y_out.copy_(y)
        return ()

    return block


def conv_rows_kernel(y_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                     silu: bool):
    """The compiled block for these arguments (see :func:`_make_block`): a callable taking the
    tensors among them that are not None and returning ``()`` (None if running it failed), or None
    if compiling failed."""
    tensors = [t for t in (y_out, x, w, bias) if t is not None]
    key = (tuple((tuple(t.shape), t.stride(), t.dtype) for t in tensors), silu)
    return compiled_graph("causal_conv1d", _make_block(silu, bias is not None), key, tensors)
