"""Argument checking shared by every command: argparse ``type=`` converters that say what range a
flag accepts, a parser whose errors are one line (exit status 2), and a help formatter that keeps
the layout of the examples and shows each flag's default.

Each converter raises :class:`argparse.ArgumentTypeError`; argparse then names the flag, so the
user sees e.g. ``ssmkit train: error: argument --steps: expected an integer >= 1, got '0'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path


class CLIError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs keep their line breaks; every flag shows its default (if any)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False or default == []
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse's signature
        first = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {first} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------
# Converters for ``type=``
def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (either end open when None)."""
    what = _describe("an integer", lo, hi, True, True)

    def conv(text: str) -> int:
        v = _number(text, int, what)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    conv.__name__ = "int"
    return conv


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval given (``lo_open``/``hi_open``: the end is excluded)."""
    what = _describe("a number", lo, hi, not lo_open, not hi_open)

    def conv(text: str) -> float:
        v = _number(text, float, what)
        bad = v != v or v in (float("inf"), float("-inf"))
        if lo is not None:
            bad = bad or (v <= lo if lo_open else v < lo)
        if hi is not None:
            bad = bad or (v >= hi if hi_open else v > hi)
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    conv.__name__ = "float"
    return conv


def _describe(kind: str, lo, hi, lo_closed: bool, hi_closed: bool) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"
    if lo is not None:
        return f"{kind} {'>=' if lo_closed else '>'} {lo}"
    if hi is not None:
        return f"{kind} {'<=' if hi_closed else '<'} {hi}"
    return kind


positive_int = int_range(1)
nonneg_int = int_range(0)


def device(*, allow_auto: bool = True) -> Callable[[str], str]:
    """``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` when allowed), checked against this machine."""
    names = "cpu, cuda or cuda:N" + (" (or auto)" if allow_auto else "")

    def conv(text: str) -> str:
        import torch

        if allow_auto and text == "auto":
            return text
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {names}, got {text!r}") from None
        if dev.type not in ("cpu", "cuda"):
            raise argparse.ArgumentTypeError(f"expected {names}, got {text!r}")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine; use cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(
                    f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return text

    conv.__name__ = "device"
    return conv


def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE``; VALUE is read as JSON when it parses (numbers, true/false), else kept as text."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        val: object = json.loads(v)
    except json.JSONDecodeError:
        val = v
    return k.strip(), val


key_value.__name__ = "KEY=VALUE"


def utf8_text(text: str) -> str:
    """Text that is valid UTF-8 (argv bytes that are not arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8 text (byte 0x{bad.hex()} at character {e.start})") from None
    return text


utf8_text.__name__ = "text"


def comma_list(choices: Callable[[], list[str]] | list[str] | None = None, *, name: str = "value"
               ) -> Callable[[str], list[str]]:
    """A comma-separated list, each item one of ``choices`` (a list, or a function giving it)."""

    def conv(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if choices is not None:
            known = choices() if callable(choices) else choices
            bad = [s for s in items if s not in known]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {name}(s) {', '.join(map(repr, bad))}; choose from {', '.join(known)}")
        return items

    conv.__name__ = "list"
    return conv


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers."""
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return vals


int_list.__name__ = "list"


# ------------------------------------------------------------------------------------------------
# Checks after parsing (need several flags, or the file system)
def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """A file the command will write at the end: refuse now if it could not be written then."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{flag} {p}: is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{flag} {p}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{flag} {p}: the directory {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise CLIError(f"{flag} {p}: the file is not writable")
    return p


def check_output_dir(flag: str, path: str | os.PathLike) -> Path:
    """A directory the command will write into: it must be a directory (or creatable) and writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {p}: exists and is not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent if str(probe.parent) else Path(".")
        if probe == probe.parent and not probe.exists():
            break
    if probe.exists() and not probe.is_dir():
        raise CLIError(f"{flag} {p}: {probe} is a file, so the directory cannot be created")
    if not os.access(probe, os.W_OK):
        raise CLIError(f"{flag} {p}: {probe} is not writable")
    return p


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def print_error(command: str | None, message: str) -> None:
    prefix = f"ssmkit {command}" if command else "ssmkit"
    print(f"{prefix}: error: {message}", file=sys.stderr)
