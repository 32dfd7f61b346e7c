"""Tokenizers: a checkpoint's ``tokenizer.json`` (through the ``tokenizers`` library) or a built-in
byte-level tokenizer (UTF-8 bytes 0..255, plus end-of-text = 256).

Both offer ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``eos_token_id``, ``vocab_size``
and ``save(directory)``. :class:`StreamDecoder` turns a growing list of ids into printable text
pieces without splitting a multi-byte character.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; ``eos_token_id = 256``; ``vocab_size = 257``."""

    vocab_size = 257
    eos_token_id = 256
    bos_token_id = None
    pad_token_id = None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        """Write ``tokenizer_config.json`` saying the model reads UTF-8 bytes (nothing else to save)."""
        from ssmkit.models.checkpoint import atomic_write_text

        atomic_write_text(Path(directory) / "tokenizer_config.json",
                          json.dumps({"tokenizer_class": "ByteTokenizer", "ssmkit_tokenizer": "bytes",
                                      "eos_token_id": self.eos_token_id}, indent=2) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_token_id=256)"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json`` (no code is run)."""

    def __init__(self, path: str | os.PathLike, eos_token_id: int | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type for bad JSON
            raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from e
        self.path = path
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id if eos_token_id is not None else self._special_id(path.parent, "eos_token")
        self.bos_token_id = self._special_id(path.parent, "bos_token")
        self.pad_token_id = None

    def _special_id(self, directory: Path, key: str) -> int | None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            f = directory / name
            if not f.exists():
                continue
            try:
                tok = json.loads(f.read_text()).get(key)
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                return self.tok.token_to_id(tok)
        return None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> None:
        from ssmkit.models.checkpoint import atomic_write

        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: self.tok.save(tmp))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            src = self.path.parent / name
            dst = Path(directory) / name
            if src.exists() and src.resolve() != dst.resolve():
                from ssmkit.models.checkpoint import atomic_write_text

                atomic_write_text(dst, src.read_text())

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def load_tokenizer(path: str | os.PathLike | None = None, eos_token_id: int | None = None):
    """The tokenizer of ``path``: a tokenizer JSON file (any name), or a directory's ``tokenizer.json``;
    the byte tokenizer for None or a directory without one.

    A ``path`` that does not exist raises ``FileNotFoundError``; a file that is not a tokenizer
    raises ``ValueError``.
    """
    if path is None:
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer {p} does not exist")
    f = p if p.is_file() else p / "tokenizer.json"
    if not f.exists():
        return ByteTokenizer()
    try:
        return HFTokenizer(f, eos_token_id)
    except ImportError as e:
        raise ImportError(f"reading {f} needs the tokenizers package: pip install 'ssmkit[hf]'") from e


class StreamDecoder:
    """Incremental detokenisation: ``push(ids)`` returns the new text since the last call.

    Decodes the whole sequence each time and emits the new suffix, holding back a trailing
    replacement character (an incomplete UTF-8 sequence) until more tokens complete it.
    """

    def __init__(self, tokenizer, prefix_ids: Iterable[int] = ()):
        # Decoding after the prompt's ids keeps word boundaries (e.g. a leading space) right.
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in prefix_ids]
        self.emitted = len(tokenizer.decode(self.ids)) if self.ids else 0

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new = text[self.emitted:]
        self.emitted = len(text)
        return new
