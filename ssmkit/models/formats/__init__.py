"""Checkpoint formats ssmkit reads and writes.

* ``ssmkit`` (:mod:`.native`): ``config.json`` (``ModelConfig.to_dict()`` + ``"model_type": "ssmkit"``)
  and ``model.safetensors`` with ssmkit's parameter names. Any model ssmkit can build.
* ``hf`` (:mod:`.hf`): Hugging Face ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (``model_type``
  ``"mamba"`` / ``"mamba2"``, ``backbone.embeddings``: pure Mamba or pure Mamba-2 models) and the
  hybrids ``BambaForCausalLM`` (:mod:`.hf_bamba`), ``GraniteMoeHybridForCausalLM``
  (:mod:`.hf_granite`) and ``NemotronHForCausalLM`` (:mod:`.hf_nemotron_h`).
* ``mamba_ssm`` (:mod:`.mamba_ssm`): ``MambaLMHeadModel``'s ``config.json`` (``d_model``,
  ``ssm_cfg``, ``attn_layer_idx``, ...) and ``pytorch_model.bin``. Mamba or Mamba-2 layers, optional
  attention layers and a gated MLP on every layer (no MoE, DeltaNet or S4D).
* ``gguf`` (:mod:`.gguf`, write-only): one ``.gguf`` file for llama.cpp's ``mamba`` / ``mamba2``
  architectures (pure Mamba or pure Mamba-2 models), written by ``save_gguf``; not in
  :data:`FORMATS`, which lists the checkpoint directories ssmkit reads.

Each format module provides ``NAME``, ``matches(cfg)``, ``to_model_config(cfg)``,
``from_model_config(config)`` (raising ``ValueError`` when the format cannot express the model),
``key_in(key)`` / ``key_out(key)`` (checkpoint name <-> ssmkit name) and ``WEIGHTS`` (the file it
writes); a format whose tensors need more than renaming (joined projections) also provides
``state_dict_in(sd, config)`` / ``state_dict_out(sd, config)``, used instead of the key maps.
"""

from __future__ import annotations

from types import ModuleType

from ssmkit.models.formats import hf, mamba_ssm, native

FORMATS: dict[str, ModuleType] = {"ssmkit": native, "hf": hf, "mamba_ssm": mamba_ssm}


def get_format(name: str) -> ModuleType:
    if name not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


def detect_format(cfg: dict) -> str:
    """Name of the format whose ``config.json`` looks like ``cfg``."""
    for name in ("ssmkit", "hf", "mamba_ssm"):
        if FORMATS[name].matches(cfg):
            return name
    raise ValueError(
        "config.json is not a recognised checkpoint: expected model_type 'ssmkit', "
        + ", ".join(repr(t) for t in FORMATS["hf"].MODEL_TYPES)
        + " (Hugging Face), or mamba_ssm keys d_model/n_layer/ssm_cfg; "
        f"got model_type {cfg.get('model_type')!r} and keys {sorted(cfg)[:12]}"
    )
