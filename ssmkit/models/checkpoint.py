"""Saving and loading checkpoints (ssmkit, Hugging Face and mamba_ssm formats), safely.

Reading never executes code from a checkpoint: weights come from safetensors files or from
``torch.load(weights_only=True)`` (a pickle that needs anything beyond tensors is refused), and the
tokenizer from ``tokenizer.json`` through the ``tokenizers`` library. Every tensor is checked
against the model the config describes; a missing, unexpected or wrongly shaped tensor raises
:class:`CheckpointError` naming it.

Writing is atomic per file: each file is written to a temporary name in the target directory and
renamed into place, so an interrupted save never leaves a truncated file under the final name.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssmkit.models.config import ModelConfig
from ssmkit.models.formats import detect_format, get_format

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the tensor or key."""


# ------------------------------------------------------------------------------------------------
# Atomic writes
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path`` (same directory, so atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, w)


# ------------------------------------------------------------------------------------------------
# Reading tensors
def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupted?): {e}") from e


def _load_torch(file: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        hint = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(
            f"{file}: refusing to load: the pickle needs code execution (only tensors are allowed; "
            f"nothing was executed): {hint.strip()}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint (truncated or corrupted?): {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return obj


def read_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the checkpoint in ``directory`` -> ``(state_dict, weights file name)``.

    Prefers ``model.safetensors`` (or its sharded index), then ``pytorch_model.bin`` (or its index).
    """
    d = Path(directory)
    for name in WEIGHT_FILES:
        f = d / name
        if not f.exists():
            continue
        if name.endswith(".index.json"):
            try:
                index = json.loads(f.read_text())
                shards = sorted(set(index["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{f}: not a valid weight index (needs a 'weight_map'): {e}") from e
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sf = d / shard
                if not sf.exists():
                    raise CheckpointError(f"{f}: lists shard {shard!r}, which is missing from {d}")
                sd.update(_load_safetensors(sf) if shard.endswith(".safetensors") else _load_torch(sf))
            return sd, name
        return (_load_safetensors(f) if name.endswith(".safetensors") else _load_torch(f)), name
    raise CheckpointError(f"{d}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    f = Path(directory) / CONFIG
    if not f.exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG} (is this a checkpoint directory?)")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


# ------------------------------------------------------------------------------------------------
def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], key_in: Callable[[str], str],
              source: str = "checkpoint") -> None:
    """Copy ``state_dict`` (checkpoint names, mapped by ``key_in``) into ``model``, strictly.

    Raises :class:`CheckpointError` naming the first missing, unexpected or mis-shaped tensor.
    """
    expected = model.state_dict()
    tied = getattr(model.config, "tie_embeddings", False)
    renamed: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for k, v in state_dict.items():
        nk = key_in(k)
        renamed[nk] = v
        original[nk] = k
    hint = " (does config.json match the weights?)"
    unexpected = sorted(k for k in renamed if k not in expected)
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {original[unexpected[0]]!r}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "") + hint)
    missing = sorted(k for k in expected if k not in renamed and not (tied and k == "lm_head.weight"))
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor {missing[0]!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + hint)
    for k, v in renamed.items():
        want = expected[k]
        if tuple(v.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: tensor {original[k]!r} has shape {tuple(v.shape)}, but the model built from "
                f"config.json expects {tuple(want.shape)}" + hint)
        if v.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{source}: tensor {original[k]!r} has dtype {v.dtype}, expected {want.dtype}")
    if tied and "lm_head.weight" in renamed and "backbone.embedding.weight" in renamed:
        if not torch.equal(renamed["lm_head.weight"], renamed["backbone.embedding.weight"]):
            raise CheckpointError(
                f"{source}: config.json says the embeddings are tied, but tensor "
                f"{original['lm_head.weight']!r} differs from the embedding (set tie_embeddings=false)")
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers()))
        for k, v in renamed.items():
            params[k].copy_(v)


def _resolve_dtype(dtype: Any, state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return next((v.dtype for v in state_dict.values() if v.is_floating_point()), torch.float32)
    if isinstance(dtype, str):
        try:
            dtype = getattr(torch, dtype)
        except AttributeError as e:
            raise ValueError(f"dtype {dtype!r} is not a torch dtype") from e
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or 'auto', got {dtype!r}")
    return dtype


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_path(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory for ``path_or_repo_id`` (downloading a Hub repo id if needed)."""
    p = Path(path_or_repo_id)
    if p.exists():
        if not p.is_dir():
            raise NotADirectoryError(f"{p} is a file; pass the checkpoint directory (with config.json)")
        return p
    s = str(path_or_repo_id)
    if not _REPO_ID.match(s) or s.startswith((".", "/")):
        raise FileNotFoundError(f"no checkpoint directory {s!r} (and it is not a Hugging Face repo id like 'owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"{s!r} is not a local directory and huggingface_hub is not installed to download it: "
            "pip install huggingface_hub, or download the repo yourself and pass its directory") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        local = snapshot_download(
            s, revision=revision, local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"],
        )
    except Exception as e:  # network errors, offline mode, gated/missing repos: one clear message
        why = "offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache" if offline else \
            f"the download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        raise CheckpointError(
            f"cannot load {s!r}: {why}. On a machine with network access run "
            f"`hf download {s} --local-dir DIR` (config.json + model.safetensors or "
            f"pytorch_model.bin, plus tokenizer.json if any), copy DIR here and pass DIR instead") from e
    return Path(local)


def _build_empty(cls, config: ModelConfig, dtype: torch.dtype):
    """The model with uninitialised weights (built on the meta device, then given CPU storage).

    Skips random initialisation (minutes and a second copy of the weights for billion-parameter
    models); every persistent tensor is then overwritten by :func:`load_into`, which checks that
    the checkpoint covers all of them. Falls back to a normal build if a module cannot be built
    on the meta device or holds non-persistent buffers other than attention's RoPE frequencies.
    """
    from ssmkit.layers.attention import Attention

    try:
        with torch.device("meta"):
            model = cls(config, dtype=dtype)
    except Exception:  # a mixer doing data-dependent work in __init__: build it the slow way
        return cls(config, dtype=dtype)
    for mod in model.modules():
        extra = set(getattr(mod, "_non_persistent_buffers_set", ())) - ({"inv_freq"} if isinstance(mod, Attention) else set())
        if extra:
            return cls(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    for mod in model.modules():
        if isinstance(mod, Attention) and mod.rope_dim:
            r = mod.rope_dim
            mod.inv_freq = mod.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float32) / r)
    return model


def load_pretrained(model_cls, path_or_repo_id: str | os.PathLike, device: torch.device | str | None = None,
                    dtype: Any = None, format: str | None = None, revision: str | None = None):
    """Build ``model_cls(config)`` from a directory or Hugging Face repo id and load its weights
    (:func:`ssmkit.from_pretrained` with the model class given: ``LanguageModel``).

    Reads ssmkit, Hugging Face (``MambaForCausalLM``, ``Mamba2ForCausalLM``,
    ``BambaForCausalLM``, ``GraniteMoeHybridForCausalLM``, ``NemotronHForCausalLM``,
    ``FalconH1ForCausalLM``, ``JambaForCausalLM``) and mamba_ssm
    checkpoints, detected from ``config.json`` (or forced by ``format``), and run directories of
    ``ssmkit train``: their model files, or (runs without them) the newest ``checkpoint-<step>.pt``. ``dtype``: a torch dtype,
    ``"auto"`` (the checkpoint's) or None (float32). The model is returned in eval mode.
    """
    d = resolve_path(path_or_repo_id, revision)
    if not (d / CONFIG).exists() and _run_checkpoints(d):
        return _from_run_checkpoint(model_cls, d, device, dtype)
    cfg = read_config(d)
    fmt_name = format or detect_format(cfg)
    fmt = get_format(fmt_name)
    try:
        config: ModelConfig = fmt.to_model_config(cfg)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{d / CONFIG}: invalid {fmt_name} config: {e}") from e
    sd, wname = read_state_dict(d)
    key_in = fmt.key_in
    if hasattr(fmt, "state_dict_in"):  # formats whose tensors need more than renaming
        sd, key_in = fmt.state_dict_in(sd, config), _same_name
    model = _build_empty(model_cls, config, _resolve_dtype(dtype, sd))
    load_into(model, sd, key_in, source=str(d / wname))
    if device is not None:
        model = model.to(device)
    model.checkpoint_format = fmt_name
    model.checkpoint_path = str(d)
    return model.eval()


def _same_name(key: str) -> str:
    return key


_RUN_CKPT = re.compile(r"^checkpoint-(\d+)\.pt$")


def _run_checkpoints(d: Path) -> list[Path]:
    """The training checkpoints ``checkpoint-<step>.pt`` in ``d``, newest first."""
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _RUN_CKPT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _from_run_checkpoint(model_cls, d: Path, device, dtype):
    """The model (a ``model_cls``) of the newest readable training checkpoint in run directory
    ``d``."""
    errors = []
    for f in _run_checkpoints(d):
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable (truncated, not a checkpoint): try the previous one
            errors.append(f"{f.name}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
            continue
        if not isinstance(state, dict) or not state.get("model_config") or not isinstance(state.get("model"), dict):
            errors.append(f"{f.name}: not an ssmkit train checkpoint of a LanguageModel")
            continue
        try:
            config = ModelConfig.from_dict(state["model_config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{f}: invalid model_config: {e}") from e
        sd = state["model"]
        model = _build_empty(model_cls, config, _resolve_dtype(dtype, sd))
        load_into(model, sd, lambda k: k, source=str(f))
        if device is not None:
            model = model.to(device)
        model.checkpoint_format = "ssmkit"
        model.checkpoint_path = str(d)
        return model.eval()
    raise CheckpointError(f"{d}: no loadable model ({'; '.join(errors)})")


def save_pretrained(model, path: str | os.PathLike, format: str = "ssmkit", tokenizer: Any = None,
                    safe_serialization: bool = True) -> None:
    """Write ``model`` to directory ``path`` in ``format`` (config.json + weights, each atomically).

    ssmkit and hf write ``model.safetensors`` (``pytorch_model.bin`` if ``safe_serialization=False``);
    mamba_ssm writes ``pytorch_model.bin``, the file ``mamba_ssm`` reads. Weight files of another
    kind already in ``path`` are removed so a later load cannot pick up stale tensors.
    ``tokenizer`` (anything with ``save(directory)``) writes its files too.

    ``format="gguf"`` writes one file for llama.cpp instead (``path`` ending in ``.gguf``, or
    ``path/model.gguf``; float32 weights): see :func:`ssmkit.models.formats.gguf.save_gguf`.
    """
    if format == "gguf":  # LanguageModel.save_pretrained writes it (ssmkit.models.formats.gguf)
        model.save_pretrained(path, format="gguf", tokenizer=tokenizer)
        return
    fmt = get_format(format)
    cfg = fmt.from_model_config(model.config)  # raises ValueError if the format cannot express it
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    tied = model.config.tie_embeddings
    keep_tied_head = format == "mamba_ssm"  # mamba_ssm's state_dict keeps both tied names
    tensors = {}
    for k, v in sd.items():
        if tied and k == "lm_head.weight" and not keep_tied_head:
            continue
        tensors[k] = v.detach().to("cpu").contiguous()
    if hasattr(fmt, "state_dict_out"):  # formats whose tensors need more than renaming
        tensors = fmt.state_dict_out(tensors, model.config)
    else:
        tensors = {fmt.key_out(k): v for k, v in tensors.items()}
    use_bin = format == "mamba_ssm" or not safe_serialization
    weights = "pytorch_model.bin" if use_bin else "model.safetensors"
    if use_bin:
        if keep_tied_head and tied:  # share storage as torch.save of the tied model would
            tensors["lm_head.weight"] = tensors[fmt.key_out("backbone.embedding.weight")]
        atomic_write(out / weights, lambda tmp: torch.save(tensors, tmp))
    else:
        from safetensors.torch import save_file

        atomic_write(out / weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    for stale in WEIGHT_FILES:
        if stale != weights and (out / stale).exists():
            (out / stale).unlink()
    atomic_write_text(out / CONFIG, json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(str(out))
