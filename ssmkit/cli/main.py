"""``ssmkit`` command line: one module per command under ``ssmkit/cli/``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
User errors (bad flags, missing files, invalid values) print one line and exit 2, no traceback;
flags are checked by the converters in :mod:`ssmkit.cli.args` before any work starts.
"""

from __future__ import annotations

import importlib
import os
import sys

from ssmkit.cli.args import CLIError, Parser, one_line, print_error

__all__ = ["CLIError", "build_parser", "entry", "main"]

# Set by a command that ran in a torch.distributed process group (``ssmkit train`` under torchrun):
# the process then leaves without interpreter-exit destructors, after its files are written and
# flushed. A worker's C++ threads (gloo, FSDP) still joinable at that point have aborted the
# process ("terminate called without an active exception", SIGABRT) after all of its work was done.
hard_exit = False

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


class Interrupted(Exception):
    """A command stopped by a signal after saving its work: ``message`` is printed, ``code`` returned."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def build_parser() -> Parser:
    parser = Parser(
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a flag error (one line already printed) returns 2; --help/--version exit 0
        if e.code == 2:
            return 2
        raise
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"ssmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`ssmkit info | head`): stop quietly, and point stdout
        # at /dev/null so that the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Interrupted as e:
        if str(e):  # (other ranks than rank 0 of a torchrun job say nothing)
            print(f"ssmkit {args.command}: {e}", file=sys.stderr)
        return e.code
    except (CLIError, ValueError, TypeError, OSError, ImportError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: rank 0 says it
            print_error(args.command, one_line(e))
        return 2


def entry() -> None:
    """``ssmkit`` and ``python -m ssmkit``: run :func:`main` and exit with its status."""
    rc = main()
    if hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    entry()
