"""ssmkit's own checkpoint format: ``config.json`` + ``model.safetensors``, names as in the model."""

from __future__ import annotations

from typing import Any

from ssmkit.models.config import ModelConfig

NAME = "ssmkit"
WEIGHTS = "model.safetensors"


def matches(cfg: dict) -> bool:
    return cfg.get("model_type") == "ssmkit"


def to_model_config(cfg: dict) -> ModelConfig:
    return ModelConfig.from_dict(cfg)


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    from ssmkit._version import __version__

    return {"model_type": "ssmkit", "ssmkit_version": __version__, **config.to_dict()}


def key_in(key: str) -> str:
    return key


def key_out(key: str) -> str:
    return key
