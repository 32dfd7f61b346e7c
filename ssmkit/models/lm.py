"""``LanguageModel``: embedding, a stack of :class:`~ssmkit.models.block.Block`, final norm, LM head.

Module names mirror ``mamba_ssm``'s ``MambaLMHeadModel`` (``backbone.embedding``,
``backbone.layers.{i}.norm / mixer / norm2 / mlp``, ``backbone.norm_f``, ``lm_head``), so its
checkpoints load with no renaming (see :mod:`ssmkit.models.formats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ssmkit._checks import check_cu_seqlens
from ssmkit.layers import _decode
from ssmkit.layers._decode_delta import delta_block_step
from ssmkit.layers._decode_mamba import mamba_block_step
from ssmkit.layers.linear import Linear
from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.state import LayerState
from ssmkit.models import context_parallel as _cp
from ssmkit.models.block import Block, add_norm, build_norm
from ssmkit.models.checkpoint import load_pretrained, save_pretrained
from ssmkit.models.config import ModelConfig
from ssmkit.models.quantize import check_quantize
from ssmkit.models.quantize import quantize as _quantize
from ssmkit.ops import cpu_memory
from ssmkit.ops.cpu_compile import cpu_compile_enabled
from ssmkit.ops.cross_entropy import linear_cross_entropy
from ssmkit.ops.dispatch import checkpoint_contexts, get
from ssmkit.ops.fused.gemv import norm_linear_reference
from ssmkit.ops.fused.norm import add_rms_norm_reference

# Decode batches up to this size run the final norm inside the LM head's GEMV (Triton path).
_FUSED_HEAD_MAX_BATCH = 1
# CPU decoding of bfloat16 / float16 weights: let matrix products go to oneDNN (True) or to
# PyTorch's own GEMV (False; reduced-precision dot products accumulated in float32). Measured on a
# 2-core AVX-512 EPYC, batch 1: see docs/models.md (CPU decoding).
CPU_DECODE_ONEDNN = False


@dataclass
class LMOutput:
    """What :meth:`LanguageModel.forward` returns.

    logits: ``(batch, seqlen, padded_vocab_size)`` float32 (``seqlen`` = ``logits_to_keep`` when
    that is set; None with ``return_logits=False``). loss: mean next-token cross entropy
    over labels != -100 (labels aligned with input_ids, shifted inside), or None; under context
    parallelism this rank's share of that mean (the shares add up to it). aux_loss: sum of
    the MoE layers' load-balancing losses (not added to ``loss``; scale it yourself), or None.
    cache: the cache passed in, updated in place, or None.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: Any = None


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, i, device, dtype) for i in range(config.n_layer))
        self.norm_f = build_norm(config, device, dtype)
        if config.shared_cfg:  # blocks whose parameters several layers use (ssmkit.models.shared)
            from ssmkit.models.shared import SharedBlock

            n = int(config.shared_cfg.get("n_blocks", 1))
            self.shared_blocks = nn.ModuleList(SharedBlock(config, device, dtype) for _ in range(n))

    def shared_for(self, blk: Block, emb: torch.Tensor | None = None):
        """``(shared block, emb)`` for a block with a shared use (None otherwise); the block alone
        when ``emb`` is None."""
        if blk.shared_use is None:
            return None
        block = self.shared_blocks[blk.shared_use.block]
        return block if emb is None else (block, emb)


def _check_ids(name: str, ids: object, vocab: int, ndim: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.dim() != ndim:
        want = "(batch, seqlen)" if ndim == 2 else "(batch,)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(ids.shape)}")
    # The range check reads the ids back (a host sync), which a CUDA graph capture may not do:
    # a captured prefill (ssmkit.inference.cuda_graph) checks its input ids before each replay.
    # Under torch.compile the check is left out too (it would break the graph).
    if (vocab and ids.numel() and not torch.compiler.is_compiling()
            and not (ids.is_cuda and torch.cuda.is_current_stream_capturing())):
        lo, hi = (int(v) for v in torch.aminmax(ids))  # one reduction over the ids
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} must hold token ids in [0, {vocab}), got values in [{lo}, {hi}]")
    return ids.long()


class LanguageModel(nn.Module):
    """A causal language model built from a :class:`ModelConfig`.

    ``forward(input_ids (batch, seqlen), cache=None, labels=None, attention_mask=None)`` ->
    :class:`LMOutput`. ``attention_mask (batch, seqlen)``: 1 = token, 0 = padding (left padding);
    padding never enters any layer's state. ``step(token (batch,), cache)`` -> logits
    ``(batch, padded_vocab_size)`` for decoding, updating the cache in place.
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.backbone = Backbone(config, device, dtype)
        self.lm_head = Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.set_scan_state_budget(self.DEFAULT_SCAN_STATE_BUDGET)

    # Bytes of Mamba scan states (float32) one training forward keeps for its backward, for the
    # whole model (GPU path). Each Mamba layer may keep its share; beyond it the scan saves one
    # state per ScanConfig.coarse_blocks blocks and the backward recomputes the rest. At the
    # 130M shape, batch 8 x 2048, one state per block would be 9.7 GB (0.4 GB per layer).
    DEFAULT_SCAN_STATE_BUDGET = 2**31

    # A ProcessGroup / 1-D DeviceMesh over which input_ids' seqlen is sharded (None: off), and
    # whether training forwards recompute each block in the backward instead of keeping its
    # activations (see the setters).
    context_parallel = None
    activation_checkpointing = False

    def set_context_parallel(self, group) -> None:
        """Shard the sequence over ``group`` (None: off): each rank then passes its contiguous
        shard of ``input_ids`` (and ``labels``, ``cu_seqlens`` of the whole sequence), in rank
        order, and gets its shard of the logits; ``loss`` is the rank's share of the whole
        sequence's mean (the shares add up to it). See :mod:`ssmkit.models.context_parallel`."""
        _cp.set_context_parallel(self, group)

    def set_activation_checkpointing(self, on: bool = True) -> None:
        """Recompute each block's forward in the backward (training memory: one residual stream per
        block is kept instead of every activation inside it)."""
        if not isinstance(on, bool):
            raise TypeError(f"on must be a bool, got {type(on).__name__}")
        self.activation_checkpointing = on

    def set_scan_state_budget(self, nbytes: int | None) -> None:
        """Share ``nbytes`` of saved scan states among the model's Mamba layers (None: each layer
        follows ``ScanConfig.state_mem_limit``, a per-call bound)."""
        if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
            raise ValueError(f"nbytes must be an int >= 0 or None, got {nbytes!r}")
        mixers = [blk.mixer for blk in self.backbone.layers if hasattr(blk.mixer, "scan_state_mem_limit")]
        for mixer in mixers:
            mixer.scan_state_mem_limit = None if nbytes is None else nbytes // len(mixers)

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Embedding N(0, 0.02); residual-branch output projections scaled by 1/sqrt(2 n_layer) (GPT-2
        # / mamba_ssm's rescale_prenorm_residual), so the residual stream's variance stays O(1).
        std = self.config.initializer_range
        nn.init.normal_(self.backbone.embedding.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        scale = 1.0 / math.sqrt(2 * self.config.n_layer)
        for block in self.backbone.layers:
            for name, p in block.named_parameters():
                if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
                    p.mul_(scale)

    # ----------------------------------------------------------------------------------------------
    # None, or the mode of ssmkit.models.quantize (e.g. "int8") once the model is quantised
    quantization: str | None = None

    @property
    def device(self) -> torch.device:
        return self.backbone.norm_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's float dtype (of its activations and unquantised weights)."""
        return self.backbone.norm_f.weight.dtype

    def allocate_states(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> list[LayerState]:
        """One zeroed state per layer (KV caches sized ``max_seqlen``; SSM states float32)."""
        device = device if device is not None else self.device
        dtype = dtype if dtype is not None else self.dtype
        return [blk.allocate_state(batch_size, max_seqlen, device=device, dtype=dtype,
                                   shared=self.backbone.shared_for(blk))
                for blk in self.backbone.layers]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, times ``embedding_multiplier``."""
        h = self.backbone.embedding(ids)
        m = self.config.embedding_multiplier
        return h if m == 1.0 else h * m

    def _head(self, residual: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """Final add + norm + LM head on the carried ``(residual, out)`` -> float32 logits."""
        logits = self._head_unscaled(residual, out)
        s = self.config.logits_scaling
        return logits if s == 1.0 else logits / s

    def _head_unscaled(self, residual: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        norm, head = self.backbone.norm_f, self.lm_head
        gemv = get("norm_linear", "auto", out)
        if not isinstance(head, nn.Linear):  # quantised head
            _, x = add_norm(norm, out, residual, self.config.residual_in_fp32)
            return head(x).float()
        if (out.dim() == 2 and out.shape[0] <= _FUSED_HEAD_MAX_BATCH and isinstance(norm, RMSNorm)
                and head.bias is None and not (torch.is_grad_enabled() and head.weight.requires_grad)
                and norm.weight.dtype == head.weight.dtype and gemv is not norm_linear_reference):
            # small-batch decode on the GPU: the final add + norm in the head GEMV's prologue
            logits, _ = gemv(
                out, head.weight, norm.weight, residual, norm.eps,
                torch.float32 if self.config.residual_in_fp32 else None)
            return logits.float()
        _, x = add_norm(norm, out, residual, self.config.residual_in_fp32)
        return head(x.to(head.weight.dtype)).float()

    def forward(self, input_ids: torch.Tensor, cache: Any = None, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                logits_to_keep: int = 0, return_logits: bool = True) -> LMOutput:
        """See the class docstring. ``logits_to_keep``: 0 = logits for every position, ``k > 0`` =
        only for the last ``k`` (prefill keeps 1 and skips the ``(batch, seqlen, vocab)`` head).
        ``return_logits=False`` (with ``labels``): the loss only, by a chunked cross entropy that
        never holds every position's float32 logits at once (training memory)."""
        ids = _check_ids("input_ids", input_ids, self.config.padded_vocab_size, 2)
        B, L = ids.shape
        if L == 0:
            raise ValueError("input_ids must hold at least one token per row, got seqlen 0")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = all positions), got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep must be 0 with labels (the loss needs every position's logits)")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False needs labels (it computes the loss only)")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(f"attention_mask must have shape (batch={B}, seqlen={L}) like input_ids, got {got}")
            attention_mask = attention_mask.to(ids.device)
            if bool(attention_mask.all()):
                attention_mask = None  # nothing padded: take the faster unmasked paths
        group = _cp.active_group(self.context_parallel)
        if group is not None and (attention_mask is not None or cache is not None or logits_to_keep):
            raise ValueError("context parallelism takes whole shards: no attention_mask (pack sequences with "
                             "cu_seqlens), cache or logits_to_keep")
        if cu_seqlens is not None and group is None:  # (sharded: the ops check the whole sequence's)
            check_cu_seqlens(cu_seqlens, B, L)
        if ids.device.type == "cpu" and not torch.compiler.is_compiling():
            cpu_memory.keep_freed_memory()  # no page faults for the forward's temporaries
        states = None
        if cache is not None:
            states = getattr(cache, "states", cache)
            if not isinstance(states, (list, tuple)) or len(states) != self.config.n_layer:
                raise TypeError("cache must be an InferenceCache (ssmkit.inference.allocate_cache) "
                                f"holding {self.config.n_layer} layer states")
        # Carried (residual, out): each block's residual add is fused into the next norm.
        residual, out = None, self._embed(ids)
        emb = out
        aux_total = None
        for i, blk in enumerate(self.backbone.layers):
            st = states[i] if states is not None else None
            kw = {} if blk.shared_use is None else {"shared": self.backbone.shared_for(blk, emb)}
            if self.activation_checkpointing and self.training and torch.is_grad_enabled() and st is None:
                residual, out, new_st, aux = torch.utils.checkpoint.checkpoint(
                    blk.forward_residual, residual, out, None, False, attention_mask, cu_seqlens,
                    use_reentrant=False, context_fn=checkpoint_contexts, **kw)
            else:
                residual, out, new_st, aux = blk.forward_residual(
                    residual, out, state=st, return_state=st is not None, mask=attention_mask,
                    cu_seqlens=cu_seqlens, **kw)
            if st is not None:
                st.copy_(new_st)  # keep the cache's buffers (addresses) for CUDA graphs
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None and hasattr(cache, "advance"):
            cache.advance(L)
        if 0 < logits_to_keep < L:
            # the head (final norm + lm_head) on the kept positions only
            out = out[:, L - logits_to_keep:]
            residual = residual[:, L - logits_to_keep:] if residual is not None else None
        lab = None
        if labels is not None:
            lab = _check_ids("labels", labels, 0, 2)
            if tuple(lab.shape) != (B, L):
                raise ValueError(f"labels must have the shape of input_ids {(B, L)}, got {tuple(lab.shape)}")
        if not return_logits:
            if not isinstance(self.lm_head, nn.Linear):
                raise ValueError("return_logits=False (the training loss) needs a float LM head; "
                                 f"this model is quantised ({self.quantization})")
            # HF convention: labels are aligned with input_ids; position t predicts labels[t + 1].
            _, x = add_norm(self.backbone.norm_f, out, residual, self.config.residual_in_fp32)
            head = self.lm_head
            if group is not None:
                targets = _cp.shifted_labels(lab, group).reshape(-1).to(x.device)
                x = x.to(head.weight.dtype).reshape(-1, x.shape[-1])
            else:
                targets = lab[:, 1:].reshape(-1).to(x.device)
                x = x[:, :-1].to(head.weight.dtype).reshape(-1, x.shape[-1])
            if self.config.logits_scaling != 1.0:
                x = x / self.config.logits_scaling
            if group is not None:
                loss = _cp.loss_share(lambda: linear_cross_entropy(x, head.weight, targets), x, targets, group)
            else:
                loss = linear_cross_entropy(x, head.weight, targets)
            return LMOutput(logits=None, loss=loss, aux_loss=aux_total, cache=cache)
        logits = self._head(residual, out)
        loss = None
        if labels is not None and group is not None:
            targets = _cp.shifted_labels(lab, group).reshape(-1).to(logits.device)
            flat = logits.reshape(-1, logits.shape[-1])
            loss = _cp.loss_share(lambda: F.cross_entropy(flat, targets, ignore_index=-100), logits, targets, group)
        elif labels is not None:
            # HF convention: labels are aligned with input_ids; position t predicts labels[t + 1].
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   lab[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, aux_loss=aux_total, cache=cache)

    def step(self, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Decode one token per row: ``input_ids (batch,)`` -> logits ``(batch, padded_vocab)``.

        Updates ``cache`` in place; no host synchronisation and static shapes (CUDA-graph safe).
        """
        states = getattr(cache, "states", cache)
        if input_ids.device.type == "cpu" and get("add_rms_norm", "auto", input_ids) is add_rms_norm_reference:
            return self._step_cpu(input_ids, states)
        residual, out = None, self._embed(input_ids)
        emb = out
        for blk, st in zip(self.backbone.layers, states):
            if blk.shared_use is None:
                residual, out = blk.step_residual(residual, out, st)
            else:
                residual, out = blk.step_residual(residual, out, st, shared=self.backbone.shared_for(blk, emb))
        return self._head(residual, out)

    def _step_cpu(self, input_ids: torch.Tensor, states) -> torch.Tensor:
        """:meth:`step` on the CPU: the residual stream is one tensor added to in place, each norm
        one op, and the mixers take their CPU steps (few ops, no per-token scratch allocations);
        with compiled CPU kernels on, each plain Mamba / Mamba-2 / (Gated) DeltaNet block of a batch-1
        step runs as one compiled graph (:func:`ssmkit.layers._decode_mamba.mamba_block_step`,
        :func:`ssmkit.layers._decode_delta.delta_block_step`) and the LM head is
        the compiled GEMV. Same arithmetic as the carried form of the blocks."""
        h = self._embed(input_ids)  # a fresh tensor: the residual stream, updated in place
        emb = h.clone() if self.config.shared_cfg else None
        if self.config.residual_in_fp32 and h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()
        lowp = self.dtype in (torch.float16, torch.bfloat16)
        fused = h.shape[0] == 1 and cpu_compile_enabled(h)  # Mamba / Mamba-2 / DeltaNet blocks: one compiled graph each
        onednn = torch._C._get_mkldnn_enabled()
        if lowp and onednn != CPU_DECODE_ONEDNN:
            torch._C._set_mkldnn_enabled(CPU_DECODE_ONEDNN)
        try:
            for blk, st in zip(self.backbone.layers, states):
                if blk.shared_use is not None:  # the shared block's output enters the mixer's input only
                    t = self.backbone.shared_for(blk).step(h, emb, blk.shared_use, st.shared)
                    h.add_(blk._scale(blk.mixer.step(_norm(blk.norm, h + t), st.layer)))
                elif not (fused and (mamba_block_step(blk, h, st) or delta_block_step(blk, h, st))):
                    h.add_(blk._scale(blk.mixer.step(_norm(blk.norm, h), st)))
                if blk.mlp_kind != "none":
                    h.add_(blk._mlp(_norm(blk.norm2, h), None, dense=True)[0])
            logits = _decode.linear(self.lm_head, _norm(self.backbone.norm_f, h))
            if self.config.logits_scaling != 1.0:
                logits = logits / self.config.logits_scaling
        finally:
            if lowp and onednn != CPU_DECODE_ONEDNN:
                torch._C._set_mkldnn_enabled(onednn)
        return logits.float()

    # ----------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str, format: str = "ssmkit", tokenizer: Any = None,
                        safe_serialization: bool = True) -> None:
        """Write a checkpoint directory in ``format`` "ssmkit" | "hf" | "mamba_ssm" (atomically),
        or a llama.cpp file with ``format="gguf"`` (:func:`ssmkit.models.formats.gguf.save_gguf`)."""
        if format == "gguf":
            from ssmkit.models.formats.gguf import save_gguf

            save_gguf(self, path, tokenizer=tokenizer)
            return
        save_pretrained(self, path, format=format, tokenizer=tokenizer, safe_serialization=safe_serialization)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, **kwargs: Any) -> LanguageModel:
        """:func:`from_pretrained` (ssmkit, Hugging Face and mamba_ssm checkpoints)."""
        mode = check_quantize(kwargs.pop("quantize", None))
        model = load_pretrained(cls, path_or_repo_id, **kwargs)
        return _quantize(model, mode) if mode is not None else model


def _norm(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A block's pre-norm of the residual stream ``h`` (cast to the norm's dtype first, as
    :func:`~ssmkit.models.block.add_norm` does): one op for RMSNorm (statistics in float32)."""
    w = norm.weight
    x = h if h.dtype == w.dtype else h.to(w.dtype)
    if isinstance(norm, RMSNorm):
        return F.rms_norm(x, (w.shape[0],), w, norm.eps)
    return norm(x)


def from_pretrained(path_or_repo_id: str, device: torch.device | str | None = None, dtype: Any = None,
                    format: str | None = None, revision: str | None = None,
                    quantize: str | None = None) -> LanguageModel:
    """Load a :class:`LanguageModel` from a directory or Hugging Face repo id.

    Reads ssmkit, Hugging Face (``MambaForCausalLM``, ``Mamba2ForCausalLM``,
    ``BambaForCausalLM``, ``GraniteMoeHybridForCausalLM``, ``NemotronHForCausalLM``,
    ``FalconH1ForCausalLM``, ``JambaForCausalLM``, ``Zamba2ForCausalLM``, ``Qwen3NextForCausalLM``) and mamba_ssm
    checkpoints, detected from ``config.json`` (or forced by ``format``). ``dtype``: a torch dtype,
    ``"auto"`` (the checkpoint's) or None (float32). ``quantize``: None, or ``"int8"`` for int8
    weight-only linear layers and LM head (:func:`ssmkit.models.quantize`; CPU decoding). The
    model is returned in eval mode.
    """
    check_quantize(quantize)
    model = load_pretrained(LanguageModel, path_or_repo_id, device=device, dtype=dtype, format=format,
                            revision=revision)
    if quantize is not None:
        _quantize(model, quantize)
    return model
