"""``ssmkit`` command line: one module per command under ``ssmkit/cli/``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
User errors (bad flags, missing files, invalid values) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command modules, in the order ``ssmkit --help`` lists them.
COMMAND_MODULES = [
    "ssmkit.cli.info",
    "ssmkit.cli.generate",
    "ssmkit.cli.convert",
    "ssmkit.cli.train",
    "ssmkit.cli.eval",
    "ssmkit.cli.reproduce",
    "ssmkit.cli.bench",
]


class CLIError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssmkit",
        description="State space sequence models (S4, Mamba, Mamba-2, DeltaNet, hybrids) on CPU and GPU.",
    )
    from ssmkit import __version__

    parser.add_argument("--version", action="version", version=f"ssmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in COMMAND_MODULES:
        mod = importlib.import_module(modname)
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.__doc__)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("ssmkit: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
            NotADirectoryError, IsADirectoryError) as e:
        print(f"ssmkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
