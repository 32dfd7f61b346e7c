"""Weight-only int8 layers for CPU decoding: per-output-channel symmetric scales.

A float weight ``W (out, in)`` is stored as ``q = round(W / s)`` in int8 with one scale per output
channel, ``s = max_i |W[o, i]| / 127`` (rounded to bfloat16 first, so the stored scale is exact)::

    y = (x @ q.T) * s (+ bias)

The matrix product is ``torch.ops.aten._weight_int8pack_mm`` (PyTorch's int8 weight-only GEMM,
AVX-512 / AVX2 kernels on x86): it reads the int8 weight once, converts it in registers and
accumulates in float32. Its fast form takes bfloat16 activations (the float32 form is scalar, about
10x slower), so the input is cast to bfloat16 and the output back to the input's dtype. The
kernel loads rows with aligned 16-element vectors: ``in_features`` must be a multiple of 16 and the
input rows 32-byte aligned (the layer copies a misaligned input); :func:`int8_supported` says
whether a linear layer qualifies (:func:`ssmkit.models.quantize` leaves the others in float).

:class:`Int8Embedding` looks rows up in the same int8 table (the tied embedding of a language
model shares it with the LM head), dequantising only the rows it returns.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Int8Embedding", "Int8Linear", "float_dtype", "int8_supported", "quantize_int8"]

# the dtype of the kernel's activations, output and scales
_ACT_DTYPE = torch.bfloat16
_int8pack_mm = getattr(torch.ops.aten, "_weight_int8pack_mm", None)


def float_dtype(linear: nn.Module) -> torch.dtype:
    """The float dtype of a linear layer: its weight's, or for an :class:`Int8Linear` the dtype of
    the layer it was made from (what the surrounding model computes in)."""
    return linear.float_dtype if isinstance(linear, Int8Linear) else linear.weight.dtype


def int8_supported(linear: nn.Module) -> bool:
    """Whether ``linear`` (an ``nn.Linear``) can become an :class:`Int8Linear`: float weights,
    ``in_features`` a multiple of 16 (the kernel's vector width) and a kernel in this PyTorch."""
    return (_int8pack_mm is not None and isinstance(linear, nn.Linear)
            and linear.weight.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
            and linear.in_features % 16 == 0 and linear.weight.device.type == "cpu")


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight (out, in)`` -> ``(q int8 (out, in), scale bfloat16 (out,))`` with ``weight ≈ q * scale[:, None]``.

    Symmetric, per output channel; the scale is rounded to bfloat16 before the weights are divided
    by it, so ``q * scale`` uses exactly the scale the kernel multiplies by. All-zero rows get
    scale 1.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(_ACT_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous bfloat16 tensor whose rows the kernel may load with aligned vectors."""
    if x.dtype != _ACT_DTYPE or not x.is_contiguous():
        x = x.to(_ACT_DTYPE, memory_format=torch.contiguous_format)
    return x.clone() if x.data_ptr() % 64 else x


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight and per-output-channel scales (inference only).

    Buffers: ``qweight (out, in)`` int8, ``scale (out,)`` bfloat16, ``bias (out,)`` or None.
    ``forward(x (..., in)) -> (..., out)`` in ``x``'s dtype (bfloat16 inside the kernel).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 bias_dtype: torch.dtype = torch.float32, float_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.float_dtype = float_dtype
        if in_features % 16:
            raise ValueError(f"Int8Linear needs in_features divisible by 16, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=_ACT_DTYPE, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if not int8_supported(linear):
            raise ValueError(f"cannot quantise {linear} to int8 (needs a float CPU weight with "
                             "in_features divisible by 16)")
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device,
                  bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
                  float_dtype=linear.weight.dtype)
        mod.qweight, mod.scale = quantize_int8(linear.weight)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer multiplies by, ``(out, in)``."""
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            y = _int8pack_mm(_aligned(x), self.qweight, self.scale)
        else:
            y = _int8pack_mm(_aligned(x.reshape(-1, self.in_features)), self.qweight, self.scale)
            y = y.view(*x.shape[:-1], self.out_features)
        if x.dtype != _ACT_DTYPE:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """Embedding lookup in an int8 table with per-row scales (the rows of a quantised LM head):
    ``forward(ids) -> table[ids] * scale[ids]`` in ``dtype``. Shares the head's buffers."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        self.head = [head]  # not a submodule: the buffers belong to the LM head
        self.out_dtype = dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> torch.Tensor:
        """The int8 table (its dtype and device are what a model's ``dtype``/``device`` ask)."""
        return self.head[0].qweight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        rows = head.qweight[ids].to(self.out_dtype)
        return rows.mul_(head.scale[ids].to(self.out_dtype).unsqueeze(-1))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 (shared with the LM head)"
