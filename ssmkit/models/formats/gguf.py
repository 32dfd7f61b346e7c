"""GGUF export: a pure Mamba or pure Mamba-2 model as one ``.gguf`` file that llama.cpp runs
(its ``mamba`` and ``mamba2`` architectures). Write-only; needs the ``gguf`` package
(``pip install 'ssmkit[gguf]'``).

Tensors (ssmkit name -> GGUF name, GGUF keeps the numpy shapes below; ``i`` is the layer)::

    backbone.embedding.weight (V, d)         -> token_embd.weight        (V = padded vocabulary)
    backbone.norm_f.weight                    -> output_norm.weight
    lm_head.weight                            -> output.weight            (left out when tied)
    backbone.layers.i.norm.weight             -> blk.i.attn_norm.weight
    mixer.in_proj.weight                      -> blk.i.ssm_in.weight
    mixer.conv1d.weight (C, 1, K)             -> blk.i.ssm_conv1d.weight  (C, K)
    mixer.conv1d.bias                         -> blk.i.ssm_conv1d.bias
    mixer.out_proj.weight                     -> blk.i.ssm_out.weight
  Mamba:
    mixer.x_proj.weight                       -> blk.i.ssm_x.weight
    mixer.dt_proj.weight / .bias              -> blk.i.ssm_dt.weight / .bias
    mixer.A_log (d_inner, d_state)            -> blk.i.ssm_a   = -exp(A_log)
    mixer.D (d_inner,)                        -> blk.i.ssm_d
  Mamba-2:
    mixer.dt_bias (H,)                        -> blk.i.ssm_dt.bias
    mixer.A_log (H,)                          -> blk.i.ssm_a   = -exp(A_log), shape (H, 1)
    mixer.D (H,)                              -> blk.i.ssm_d   shape (H, 1)
    mixer.norm.weight (d_inner,)              -> blk.i.ssm_norm.weight  (ngroups, d_inner // ngroups)

Metadata (``{arch}`` is ``mamba`` or ``mamba2``): ``{arch}.context_length`` (2**20: a recurrent model
has no limit), ``embedding_length`` (d_model), ``feed_forward_length`` and
``attention.head_count`` (0), ``block_count``, ``ssm.conv_kernel``, ``ssm.inner_size`` (d_inner),
``ssm.state_size``, ``ssm.time_step_rank`` (Mamba: dt_rank; Mamba-2: the number of heads),
``ssm.group_count`` (Mamba-2), ``ssm.dt_b_c_rms`` (Mamba: false),
``attention.layer_norm_rms_epsilon``, ``general.file_type`` and the tokenizer keys below.

Weight types (``dtype``): ``f32`` (exact), ``f16``, ``bf16`` or ``q8_0`` apply to the 2-D
projection and embedding matrices; norms, biases, ``ssm_a``, ``ssm_d`` and the convolution stay
float32 (as llama.cpp reads them). ``q8_0`` needs rows of a multiple of 32 values; a matrix with
other rows (Mamba's ``ssm_dt`` with dt_rank 48, say) is written as f16.

Tokenizer (``tokenizer.ggml.*``; the token list has the padded vocabulary size, ids without a
token are ``[PAD<id>]`` of type unused):

* :class:`~ssmkit.models.tokenizer.ByteTokenizer`: model ``gpt2`` (byte-level BPE), pre-tokenizer
  ``gpt-2``, tokens 0..255 the GPT-2 byte-to-character map of bytes 0..255 (so every byte is its own
  token and llama.cpp's ids equal ssmkit's), 256 ``<|endoftext|>`` (control; end of text) when the
  model has that id. A bytes-only model (256 ids, as ``ssmkit train --data`` makes) has no
  end-of-text token, but llama.cpp's BPE vocabulary always has an EOS id: the NUL byte (0) takes
  that role, so llama.cpp stops if the model emits byte 0 (text models do not). BPE in
  llama.cpp needs a merge list and GGUF writers refuse empty arrays: the list holds one merge of
  the end-of-text token with itself, which never applies (special tokens are never BPE symbols).
* :class:`~ssmkit.models.tokenizer.HFTokenizer` with a byte-level BPE ``tokenizer.json`` split by
  the GPT-2 expression (GPT-2, GPT-NeoX: the tokenizer of the state-spaces Mamba checkpoints):
  model ``gpt2``, pre-tokenizer ``gpt-2``, its vocabulary, merges and added tokens (special ones
  as control tokens). Other tokenizers raise ``ValueError``.
* None: model ``none`` and ``{arch}.vocab_size``: llama.cpp then runs on token ids only.

No BOS/EOS token is added when llama.cpp tokenizes (``add_bos_token`` / ``add_eos_token`` false),
as ssmkit encodes text.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ssmkit.models.config import ModelConfig

NAME = "gguf"
FILE = "model.gguf"
DTYPES = ("f32", "f16", "bf16", "q8_0")
CONTEXT_LENGTH = 2**20

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_EOT = "<|endoftext|>"
_MAMBA_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max",
               "dt_init_floor", "dt_scale", "dt_init", "use_gate"}
_MAMBA2_KEYS = {"d_state", "d_conv", "expand", "headdim", "ngroups", "bias", "conv_bias", "chunk_size",
                "dt_limit", "dt_min", "dt_max", "dt_init_floor", "rmsnorm", "norm_before_gate", "D_has_hdim",
                "A_init_range"}


def require_gguf():
    """The ``gguf`` package, or ``ImportError`` naming the extra that installs it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the gguf package: pip install 'ssmkit[gguf]'") from e
    return gguf


def output_file(path: str | os.PathLike) -> Path:
    """The file a GGUF export of ``path`` writes: ``path`` itself when it ends in ``.gguf`` and is not
    a directory, else ``path/model.gguf``."""
    p = Path(path)
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        return p
    return p / FILE


# ------------------------------------------------------------------------------------------------
# What the architectures can hold
def architecture(config: ModelConfig) -> str:
    """``"mamba"`` or ``"mamba2"``: the llama.cpp architecture of ``config``; ``ValueError`` naming the
    first thing llama.cpp's architectures cannot express."""
    pat = config.layer_pattern
    why = None
    if set(pat) not in ({"M"}, {"2"}):
        from ssmkit.models.config import LAYER_LETTERS

        kinds = ", ".join(sorted({LAYER_LETTERS[c] for c in pat}))
        why = (f"layer_pattern {pat!r} has {kinds} layers; llama.cpp's mamba and mamba2 architectures "
               "hold only Mamba or only Mamba-2 layers")
    elif config.mlp != "none":
        why = f"mlp={config.mlp!r}; llama.cpp's Mamba blocks have no MLP"
    elif config.shared_cfg:
        why = "shared_cfg (shared attention blocks); llama.cpp's Mamba architectures have none"
    elif not config.rms_norm:
        why = "rms_norm=False; llama.cpp's Mamba blocks use RMSNorm"
    else:
        why = _mamba_why(config) if pat[0] == "M" else _mamba2_why(config)
    if why:
        raise ValueError(f"cannot export this model to GGUF: {why}")
    return "mamba" if pat[0] == "M" else "mamba2"


def _mamba_why(config: ModelConfig) -> str | None:
    c = config.ssm_cfg
    extra = sorted(set(c) - _MAMBA_KEYS - {"layer"})
    if extra:
        return f"ssm_cfg {extra} has no llama.cpp equivalent"
    if c.get("expand", 2) != 2:
        return f"ssm_cfg expand={c['expand']}; llama.cpp's mamba supports only expand=2"
    if not c.get("use_gate", True):
        return "ssm_cfg use_gate=False; llama.cpp's mamba always gates"
    if c.get("bias", False):
        return "ssm_cfg bias=True; llama.cpp's mamba has no in_proj/out_proj bias"
    if not c.get("conv_bias", True):
        return "ssm_cfg conv_bias=False; llama.cpp's mamba needs the convolution bias"
    return None


def _mamba2_why(config: ModelConfig) -> str | None:
    c = config.mamba2_cfg
    extra = sorted(set(c) - _MAMBA2_KEYS - {"layer"})
    if extra:
        return f"mamba2_cfg {extra} has no llama.cpp equivalent"
    for key, default, ok in (("rmsnorm", True, True), ("norm_before_gate", False, False),
                             ("D_has_hdim", False, False), ("bias", False, False), ("conv_bias", True, True)):
        if bool(c.get(key, default)) != ok:
            return f"mamba2_cfg {key}={c.get(key)}; llama.cpp's mamba2 needs {key}={ok}"
    lo, hi = c.get("dt_limit", (0.0, math.inf))
    if float(lo) != 0.0 or float(hi) != math.inf:
        return f"mamba2_cfg dt_limit={tuple(c['dt_limit'])}; llama.cpp's mamba2 does not clamp dt"
    if abs(config.norm_eps - 1e-5) > 1e-12:
        return (f"norm_eps={config.norm_eps}; llama.cpp's mamba2 uses it in the gated norm too, where "
                "ssmkit uses 1e-5")
    return None


def hyperparameters(config: ModelConfig) -> dict[str, Any]:
    """The ``{arch}.*`` metadata for ``config`` (key suffix -> value), in llama.cpp's key names."""
    arch = architecture(config)
    d = config.d_model
    if arch == "mamba":
        c = config.ssm_cfg
        rank = c.get("dt_rank", "auto")
        ssm = {"ssm.conv_kernel": int(c.get("d_conv", 4)), "ssm.inner_size": 2 * d,
               "ssm.state_size": int(c.get("d_state", 16)),
               "ssm.time_step_rank": math.ceil(d / 16) if rank == "auto" else int(rank), "ssm.dt_b_c_rms": False}
    else:
        c = config.mamba2_cfg
        d_inner = int(c.get("expand", 2)) * d
        ssm = {"ssm.conv_kernel": int(c.get("d_conv", 4)), "ssm.inner_size": d_inner,
               "ssm.state_size": int(c.get("d_state", 128)),
               "ssm.time_step_rank": d_inner // int(c.get("headdim", 64)), "ssm.group_count": int(c.get("ngroups", 1))}
    return {"context_length": CONTEXT_LENGTH, "embedding_length": d, "feed_forward_length": 0,
            "attention.head_count": 0, "block_count": config.n_layer, **ssm,
            "attention.layer_norm_rms_epsilon": float(config.norm_eps)}


# ------------------------------------------------------------------------------------------------
# Tensors
_COMMON = {"norm.weight": "attn_norm.weight", "mixer.in_proj.weight": "ssm_in.weight",
           "mixer.conv1d.weight": "ssm_conv1d.weight", "mixer.conv1d.bias": "ssm_conv1d.bias",
           "mixer.out_proj.weight": "ssm_out.weight", "mixer.A_log": "ssm_a", "mixer.D": "ssm_d"}
_LAYER_NAMES = {
    "mamba": {**_COMMON, "mixer.x_proj.weight": "ssm_x.weight", "mixer.dt_proj.weight": "ssm_dt.weight",
              "mixer.dt_proj.bias": "ssm_dt.bias"},
    "mamba2": {**_COMMON, "mixer.dt_bias": "ssm_dt.bias", "mixer.norm.weight": "ssm_norm.weight"},
}
_TOP_NAMES = {"backbone.embedding.weight": "token_embd.weight", "backbone.norm_f.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(key: str, arch: str) -> str:
    """The GGUF tensor name of ssmkit parameter ``key``."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    parts = key.split(".", 3)  # backbone.layers.<i>.<rest>
    if len(parts) == 4 and parts[:2] == ["backbone", "layers"] and parts[3] in _LAYER_NAMES[arch]:
        return f"blk.{parts[2]}.{_LAYER_NAMES[arch][parts[3]]}"
    raise ValueError(f"tensor {key!r} has no place in GGUF's {arch} architecture")


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """``[(GGUF name, float32 tensor)]`` in llama.cpp's layout (see the module note), in file order."""
    config = model.config
    arch = architecture(config)
    ngroups = int(config.mamba2_cfg.get("ngroups", 1)) if arch == "mamba2" else 1
    out = []
    for key, v in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue  # llama.cpp reuses token_embd when output is absent
        name = gguf_name(key, arch)
        t = v.detach().to("cpu", torch.float32)
        if name.endswith("ssm_a"):
            t = -torch.exp(t)
        if name.endswith("ssm_conv1d.weight"):
            t = t.reshape(t.shape[0], t.shape[-1])
        elif arch == "mamba2" and name.endswith(("ssm_a", "ssm_d")):
            t = t.reshape(-1, 1)
        elif name.endswith("ssm_norm.weight"):
            t = t.reshape(ngroups, -1)
        out.append((name, t.contiguous()))
    return out


def _keeps_f32(name: str, ndim: int) -> bool:
    return ndim < 2 or not name.endswith(".weight") or name.endswith(("_norm.weight", "ssm_conv1d.weight"))


def _encode(gguf, name: str, t: torch.Tensor, dtype: str):
    """``(array, GGML type)`` of one tensor for file type ``dtype``."""
    Q = gguf.GGMLQuantizationType
    a = t.numpy()
    if dtype == "f32" or _keeps_f32(name, a.ndim):
        return a, Q.F32
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    if qtype == Q.Q8_0 and a.shape[-1] % 32:
        qtype = Q.F16
    return gguf.quants.quantize(a, qtype), qtype


# ------------------------------------------------------------------------------------------------
# Tokenizer
def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> one printable character (printable Latin-1 bytes map to
    themselves, the others to U+0100 upward in byte order)."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _pad_tokens(tokens: dict[int, tuple[str, int]], size: int) -> tuple[list[str], list[int]]:
    names, types = [], []
    for i in range(size):
        text, kind = tokens.get(i, (f"[PAD{i}]", UNUSED))
        names.append(text)
        types.append(kind)
    return names, types


def tokenizer_metadata(tokenizer: Any, config: ModelConfig) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` metadata (key suffix -> value) for an ssmkit tokenizer (or None)."""
    from ssmkit.models.tokenizer import ByteTokenizer, HFTokenizer

    size = config.padded_vocab_size
    if tokenizer is None:
        return {"model": "none"}
    if isinstance(tokenizer, ByteTokenizer):
        if config.vocab_size < 256:
            raise ValueError(f"the byte tokenizer needs 256 token ids; the model's vocabulary has {config.vocab_size}")
        tokens = {b: (c, NORMAL) for b, c in enumerate(_byte_chars())}
        eos = tokenizer.eos_token_id
        if eos < config.vocab_size:
            tokens[eos] = (_EOT, CONTROL)
        else:  # bytes only (ssmkit train --data): llama.cpp needs some EOS id, the NUL byte takes it
            eos = 0
        merges = [f"{_EOT} {_EOT}"]
        ids = {"eos": eos, "bos": eos}
        pre = "gpt-2"
    elif isinstance(tokenizer, HFTokenizer):
        tokens, merges, pre = _hf_vocab(json.loads(tokenizer.tok.to_str()))
        ids = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    else:
        raise ValueError(f"tokenizer must be an ssmkit ByteTokenizer or HFTokenizer (or None), got "
                         f"{type(tokenizer).__name__}")
    if max(tokens) >= size:
        raise ValueError(f"the tokenizer has token id {max(tokens)}, beyond the model's vocabulary of {size}")
    names, types = _pad_tokens(tokens, size)
    meta: dict[str, Any] = {"model": "gpt2", "pre": pre, "tokens": names, "token_type": types, "merges": merges}
    ids = {k: v for k, v in ids.items() if v is not None}
    ids.setdefault("eos", config.eos_token_id)
    ids.setdefault("bos", ids["eos"])
    if config.pad_token_id is not None:
        ids["padding"] = config.pad_token_id
    for k, v in ids.items():
        if v is not None:
            meta[f"{k}_token_id"] = int(v)
    meta["add_bos_token"] = False
    meta["add_eos_token"] = False
    return meta


def _hf_vocab(spec: dict) -> tuple[dict[int, tuple[str, int]], list[str], str]:
    """Tokens, merges and pre-tokenizer name of a byte-level BPE ``tokenizer.json`` (parsed)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"cannot export the tokenizer to GGUF: its model is {model.get('type')!r}; only "
                         "byte-level BPE (GPT-2 / GPT-NeoX style) is supported")
    if not _gpt2_byte_level(spec.get("pre_tokenizer")):
        raise ValueError("cannot export the tokenizer to GGUF: its pre-tokenizer is not byte-level with the "
                         "GPT-2 split (GPT-2 / GPT-NeoX style)")
    tokens = {int(i): (t, NORMAL) for t, i in model.get("vocab", {}).items()}
    for a in spec.get("added_tokens") or []:
        tokens[int(a["id"])] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        merges = [f"{_EOT} {_EOT}"]  # a merge that never applies (see the module note)
    return tokens, merges, "gpt-2"


def _gpt2_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        return len(parts) == 1 and _gpt2_byte_level(parts[0])
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


# ------------------------------------------------------------------------------------------------
def save_gguf(model, path: str | os.PathLike, *, tokenizer: Any = None, dtype: str = "f32",
              name: str | None = None) -> Path:
    """Write ``model`` (pure Mamba or pure Mamba-2) to a GGUF file llama.cpp loads; returns its path.

    ``path``: a ``.gguf`` file, or a directory (created if needed) that receives ``model.gguf``.
    ``tokenizer``: the model's ssmkit tokenizer (``ByteTokenizer`` or a byte-level BPE
    ``HFTokenizer``), or None for a token-ids-only file. ``dtype``: ``"f32"`` (default, exact),
    ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the projection and embedding matrices. ``name``: the
    ``general.name`` (default: the file's stem). The file is written atomically. Raises
    ``ValueError`` (before writing anything) for a model or tokenizer GGUF cannot express.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    config: ModelConfig = model.config
    arch = architecture(config)
    hparams = hyperparameters(config)
    tok_meta = tokenizer_metadata(tokenizer, config)
    gguf = require_gguf()
    out = output_file(path)
    if out.parent.exists() and not out.parent.is_dir():
        raise NotADirectoryError(f"{out.parent} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = [(n, *_encode(gguf, n, t, dtype)) for n, t in gguf_tensors(model)]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or out.stem)
        _add_hparams(gguf, w, arch, hparams)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(gguf, w, arch, tok_meta, config.padded_vocab_size)
        for n, a, qtype in tensors:
            w.add_tensor(n, a, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    from ssmkit.models.checkpoint import atomic_write

    atomic_write(out, write)
    return out


def _add_hparams(gguf, w, arch: str, hparams: dict[str, Any]) -> None:
    T = gguf.GGUFValueType
    for key, v in hparams.items():
        vtype = T.BOOL if isinstance(v, bool) else T.FLOAT32 if isinstance(v, float) else T.UINT32
        w.add_key_value(f"{arch}.{key}", v, vtype)


def _add_tokenizer(gguf, w, arch: str, meta: dict[str, Any], vocab: int) -> None:
    T = gguf.GGUFValueType
    w.add_tokenizer_model(meta["model"])
    if meta["model"] == "none":
        w.add_key_value(f"{arch}.vocab_size", vocab, T.UINT32)
        return
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["token_type"])
    w.add_token_merges(meta["merges"])
    for k in ("bos", "eos", "padding"):
        if f"{k}_token_id" in meta:
            w.add_key_value(f"tokenizer.ggml.{k}_token_id", meta[f"{k}_token_id"], T.UINT32)
    w.add_add_bos_token(meta["add_bos_token"])
    w.add_add_eos_token(meta["add_eos_token"])
