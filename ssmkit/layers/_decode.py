"""Pieces of the CPU decode steps of the SSM mixers (Mamba, Mamba-2, DeltaNet).

On the CPU a batch-1 decode step is a few GEMVs (bounded by memory bandwidth) plus many small
element-wise ops on vectors of a few thousand elements, each costing one PyTorch dispatch (~1-3 us).
The steps here keep that count low and allocate their fixed-size scratch once, with the layer's
state (:func:`workspace`), instead of per token.

Short causal convolution, one token (``conv_step``): the window ``[conv_state | x | 1]``
``(batch, dim, W + 1)`` lives in a preallocated buffer, and the kernel with its bias appended,
``[w | b]`` ``(dim, W + 1)``, is cached on the layer; the output is one dot product per channel
(``torch.linalg.vecdot``), then SiLU in place, and the state takes the window's last ``W - 1``
columns. Same arithmetic as :func:`ssmkit.ops.causal_conv1d_step` (the bias enters the sum instead
of being added after it).

Linear layers (``linear``): with compiled CPU kernels on (``SSMKIT_CPU_COMPILE=1``) a batch-1 step
runs its ``nn.Linear`` / :class:`~ssmkit.layers.quantized.Int8Linear` layers through the compiled
GEMV of :mod:`ssmkit.ops.cpu_gemv` (float32 / bfloat16 / int8 weights, float32 accumulation);
otherwise, or for other modules, the module itself runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.linear import Linear
from ssmkit.layers.quantized import Int8Linear
from ssmkit.ops.conv.causal_conv1d import conv_update_unchecked
from ssmkit.ops.cpu_gemv import compiled_linear
from ssmkit.ops.dispatch import get
from ssmkit.ops.fused.gemv import norm_linear_reference
from ssmkit.ops.selective_scan.chunked import LOG2E


def use_cpu_step(x: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether a mixer's ``step`` takes its CPU form: a CPU input and nothing to differentiate
    (``param``, one of the layer's weights, stands for all of them). With autograd on, the plain
    step runs instead (the CPU form writes into cached buffers, which a graph cannot record), and
    so does a forced Triton backend (the Triton interpreter in tests)."""
    return (x.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or param.requires_grad))
            and get("causal_conv1d_step", "auto", x) is conv_update_unchecked)


def workspace(state, key: tuple, build) -> dict:
    """The scratch buffers of ``state`` for ``key`` (built by ``build()`` on first use or when
    ``key`` changes). Kept on the state object: each cache decodes with its own buffers, and a
    cloned / re-batched state builds fresh ones."""
    ws = state.__dict__.get("_decode_ws")
    if ws is None or ws["key"] != key:
        ws = build()
        ws["key"] = key
        state.__dict__["_decode_ws"] = ws
    return ws


def decay_rate(mod: nn.Module, A_log: torch.Tensor) -> torch.Tensor:
    """A = -exp(A_log) of a Mamba / Mamba-2 layer ``mod``, in float32 (float64 for a float64 model).

    Without autograd (decoding) it is cached on ``mod`` until ``A_log`` changes (its version
    counter moves on every in-place update, e.g. an optimizer step) or is replaced, together with
    A·log2(e) (:func:`decay_rate_log2e`): an exp less per layer per token."""
    if torch.is_grad_enabled() and A_log.requires_grad:
        return -torch.exp(A_log.float() if A_log.dtype != torch.float64 else A_log)
    key = (A_log._version, A_log.data_ptr(), A_log.device, A_log.dtype, torch.is_inference_mode_enabled())
    cache = mod.__dict__.get("_A_cache")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            A = -torch.exp(A_log.float() if A_log.dtype != torch.float64 else A_log)
        # A·log2(e): the CPU decode step computes exp(ΔA) as exp2(Δ·A·log2 e), several times
        # faster than torch.exp on the CPU (measured 3.8 vs 29 us for 1536 x 16 values)
        cache = (key, A, A * LOG2E)
        mod.__dict__["_A_cache"] = cache
    return cache[1]


def decay_rate_log2e(mod: nn.Module, A_log: torch.Tensor) -> torch.Tensor:
    """A·log2(e) (for ``exp(ΔA) = exp2(Δ·A·log2 e)``), cached like :func:`decay_rate`."""
    A = decay_rate(mod, A_log)
    cache = mod.__dict__.get("_A_cache")
    return cache[2] if cache is not None and cache[1] is A else A * LOG2E


def conv_kernel(conv: nn.Conv1d, dtype: torch.dtype) -> torch.Tensor:
    """``[weight | bias]`` ``(dim, W + 1)`` of a depthwise ``conv`` in ``dtype`` (zero bias when it
    has none), cached on the module until its parameters change in place or are replaced."""
    w, b = conv.weight, conv.bias
    key = (w._version, w.data_ptr(), None if b is None else (b._version, b.data_ptr()), dtype,
           torch.is_inference_mode_enabled())
    cache = conv.__dict__.get("_decode_kernel")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            w2 = w.detach().squeeze(1)
            bias = torch.zeros_like(w2[:, 0]) if b is None else b.detach()
            kern = torch.cat([w2, bias.unsqueeze(1)], dim=1).to(dtype).contiguous()
        cache = (key, kern)
        conv.__dict__["_decode_kernel"] = cache
    return cache[1]


def conv_buffers(batch: int, dim: int, width: int, dtype: torch.dtype, device) -> dict:
    """The window buffer ``(batch, dim, W + 1)`` (last column 1, for the bias) and its views."""
    win = torch.zeros(batch, dim, width + 1, dtype=dtype, device=device)
    win[..., width] = 1
    return {"win": win, "win_state": win[..., : width - 1], "win_x": win[..., width - 1],
            "win_next": win[..., 1:width]}


def conv_step(ws: dict, conv_state: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """One token of the depthwise causal conv + SiLU: ``x (batch, dim)`` -> ``(batch, dim)``;
    shifts ``conv_state (batch, dim, W - 1)`` in place."""
    ws["win_state"].copy_(conv_state)
    ws["win_x"].copy_(x)
    y = torch.linalg.vecdot(ws["win"], kernel)
    conv_state.copy_(ws["win_next"])
    return F.silu(y, inplace=True)


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` for ``x (batch, in)`` in a CPU decode step: the compiled GEMV at batch 1 when
    compiled CPU kernels are on and ``mod`` is an ``nn.Linear`` or ``Int8Linear``, else ``mod(x)``."""
    if x.shape[0] == 1:
        kind = type(mod)
        if kind is Linear or kind is nn.Linear:
            y = compiled_linear(x, mod.weight, mod.bias)
        elif kind is Int8Linear:
            y = compiled_linear(x, mod.qweight, mod.bias, scale=mod.scale)
        else:
            y = None
        if y is not None:
            return y
    return mod(x)


def linear_fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in a CPU decode step, through the compiled GEMV where it applies."""
    y = compiled_linear(x, weight, bias) if x.shape[0] == 1 else None
    return F.linear(x, weight, bias) if y is None else y


def fused_step_applies(x_t: torch.Tensor, max_batch: int, *linears: nn.Module) -> bool:
    """What the mixers' fused device steps (``step_norm``: GEMVs with the block's add + RMSNorm
    in their prologue) need of ``x_t (batch, d_model)`` and of their projections ``linears`` (the
    input projection first): at most ``max_batch`` rows, plain ``nn.Linear`` layers without bias,
    the Triton GEMV (CUDA), and no autograd."""
    return (x_t.dim() == 2 and 0 < x_t.shape[0] <= max_batch
            and all(isinstance(m, nn.Linear) and m.bias is None for m in linears)
            and get("norm_linear", "auto", x_t) is not norm_linear_reference
            and not (torch.is_grad_enabled() and linears[0].weight.requires_grad))
