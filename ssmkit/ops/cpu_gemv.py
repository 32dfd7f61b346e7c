"""Batch-1 linear layers of CPU decoding (GEMV) compiled by Inductor, for float32, bfloat16 and
int8 weights (see :mod:`ssmkit.ops.cpu_compile`: opt-in, eager otherwise).

A decode step at batch 1 reads every weight once, so its linear layers are bound by memory
bandwidth. PyTorch's own GEMVs do not reach it on one core: float32 ``F.linear`` (MKL's sgemv)
reads ~18 GB/s of weights where ``torch.sum`` reads ~40, and the int8 weight-only kernel
(``_weight_int8pack_mm``) ~15. The same product written as one broadcast multiply and row sum::

    y[n] = sum_k float(W[n, k]) * float(x[k])   (* scale[n])   (+ bias[n])

becomes, through Inductor's C++ backend, one loop per output row that loads a vector of weights,
converts it to float32 in registers and adds its products into float32 accumulators (no
temporary, no copy of the weight); the scale, bias and output cast fuse into a second short loop.

The graph is traced once per shape (``make_fx``) and compiled by ``compile_fx`` without Dynamo
(:func:`ssmkit.ops.cpu_compile.compiled_graph`): a GEMV is a few microseconds of work for the
small projections, and Dynamo's per-call guards would add ~15 us to each. Batch > 1 and layouts
other than a contiguous ``(out, in)`` weight run the eager forms.

``reference`` is ``F.linear`` on the dequantised weight; :func:`compiled_linear` returns None
where the compiled form does not apply (the caller then runs its eager form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.cpu_compile import compiled_graph, cpu_compile_enabled

__all__ = ["compiled_linear", "reference"]

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * scale[:, None], bias)``: ``x (..., in)``, ``weight (out, in)`` (int8
    with ``scale (out,)``, or float with no scale) -> ``(..., out)`` in ``x``'s dtype."""
    if scale is not None:
        weight = weight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _gemv(x: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor, has_scale: bool, has_bias: bool,
          out_dtype: torch.dtype) -> tuple[torch.Tensor]:
    """The traced form: ``x (in,)``, ``w (out, in)`` [, ``scale (out,)``] [, ``bias (out,)``] ->
    ``((1, out),)`` in ``out_dtype``, accumulated in float32."""
    y = (w.float() * x.float()).sum(-1)
    i = 0
    if has_scale:
        y = y * rest[i].float()
        i += 1
    if has_bias:
        y = y + rest[i].float()
    return (y.to(out_dtype).unsqueeze(0),)


def compiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`reference` for ``x (1, in)`` through the compiled GEMV, or None where it does not
    apply: compiled kernels off (:func:`~ssmkit.ops.cpu_compile.cpu_compile_enabled`), batch > 1,
    autograd needed, a weight that is not a contiguous ``(out, in)`` CPU tensor of float32 /
    bfloat16 / float16 / int8 (int8 needs ``scale``), or compiling failed."""
    if (x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or x.shape[1] != weight.shape[1]
            or weight.dtype not in _WEIGHT_DTYPES or (weight.dtype == torch.int8) != (scale is not None)
            or not weight.is_contiguous() or not x.dtype.is_floating_point
            or not cpu_compile_enabled(x) or weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return None
    x1 = x.view(-1) if x.is_contiguous() else x.reshape(-1)
    args = [x1, weight]
    for t in (scale, bias):
        if t is not None:
            if t.shape != (weight.shape[0],) or not t.is_contiguous():
                return None
            args.append(t)
    key = (tuple(weight.shape), weight.dtype, x.dtype, None if scale is None else scale.dtype,
           None if bias is None else bias.dtype)

    def fn(*a):
        return _gemv(*a, has_scale=scale is not None, has_bias=bias is not None, out_dtype=x.dtype)

    kern = compiled_graph("cpu_gemv", fn, key, args)
    if kern is None:
        return None
    out = kern(*args)
    return None if out is None else out[0]
