"""Weight-only quantisation of a :class:`~ssmkit.LanguageModel` for CPU decoding.

``quantize(model, "int8")`` replaces the large linear layers of every block (Mamba's ``in_proj``,
``x_proj``, ``out_proj``; Mamba-2's and DeltaNet's projections; attention and MLP weights; both
branches of a parallel ``P`` layer) and the LM head by :class:`~ssmkit.layers.quantized.Int8Linear`:
int8 weights with one bfloat16 scale per output channel, multiplied by PyTorch's int8 weight-only
kernel. A tied embedding reads its rows from the head's int8 table
(:class:`~ssmkit.layers.quantized.Int8Embedding`), so the model holds the table once. What stays in
float (the model's dtype): norms, convolutions, SSM parameters (``A_log``, ``D``, ``dt_bias``),
Mamba's small ``dt_proj`` and projections narrower than ``MIN_OUT_FEATURES`` (DeltaNet's per-head
gates), MoE experts and S4D layers. SSM states stay float32.

Decoding reads about a quarter of the float32 weight bytes per token; see
``docs/models.md`` (CPU decoding) for the measured speed and error.
"""

from __future__ import annotations

from torch import nn

from ssmkit.layers.quantized import Int8Embedding, Int8Linear, int8_supported

__all__ = ["QUANTIZE_MODES", "check_quantize", "quantize"]

QUANTIZE_MODES = ("int8",)
# Linear layers with fewer output features stay in float (per-head gates: tiny, precision-sensitive).
MIN_OUT_FEATURES = 64
# Mixer letters whose linear layers are quantised (S4D keeps its float projections).
_QUANTIZED_LETTERS = frozenset("M2DGAFP")
_SKIP_NAMES = frozenset({"dt_proj"})  # Mamba's rank-dt_rank Δ projection: 1.4% of the weights


def check_quantize(quantize: object) -> str | None:
    """``None`` or a mode of :data:`QUANTIZE_MODES`; anything else raises one ``ValueError``."""
    if quantize is None or (isinstance(quantize, str) and quantize in QUANTIZE_MODES):
        return quantize
    raise ValueError(f"quantize must be None or one of {list(QUANTIZE_MODES)}, got {quantize!r}")


def _quantize_children(module: nn.Module) -> int:
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            if (name not in _SKIP_NAMES and child.out_features >= MIN_OUT_FEATURES
                    and int8_supported(child)):
                setattr(module, name, Int8Linear.from_linear(child))
                n += 1
        elif not isinstance(child, Int8Linear):
            n += _quantize_children(child)
    return n


def quantize(model, mode: str = "int8", head: bool = True):
    """Quantise ``model`` (a CPU :class:`~ssmkit.LanguageModel`) in place and return it.

    ``mode``: ``"int8"`` (weight-only, per-output-channel scales). ``head``: also the LM head (and
    a tied embedding). The model is for inference afterwards (no gradients, no ``save_pretrained``:
    save the float model and quantise after loading).
    """
    if check_quantize(mode) is None:
        raise ValueError(f"mode must be one of {list(QUANTIZE_MODES)}, got None")
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is already quantised ({model.quantization})")
    if model.device.type != "cpu":
        raise ValueError(f"int8 quantisation runs on the CPU (PyTorch's int8 weight-only kernel); the model "
                         f"is on {model.device}: quantise before moving it, or decode on the CPU")
    for blk in model.backbone.layers:
        if blk.letter in _QUANTIZED_LETTERS:
            _quantize_children(blk.mixer)
        if getattr(blk, "mlp_kind", "none") == "swiglu":  # dense MLPs (experts stay in float)
            _quantize_children(blk.mlp)
    if head and isinstance(model.lm_head, nn.Linear) and int8_supported(model.lm_head):
        emb = model.backbone.embedding
        tied = model.lm_head.weight is emb.weight
        qhead = Int8Linear.from_linear(model.lm_head)
        if tied:
            model.backbone.embedding = Int8Embedding(qhead, emb.weight.dtype, emb.padding_idx)
        model.lm_head = qhead
    model.quantization = mode
    return model.eval().requires_grad_(False)
