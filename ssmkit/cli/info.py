"""Print the installed versions, the devices found, and for each op which backends can run here
(and why the others cannot)."""

from __future__ import annotations

import argparse
import platform

NAME = "info"
HELP = "show versions, devices, and which backends can run here"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def backend_status(backend: str, cuda: bool, triton: bool, interpreted: bool) -> str | None:
    """None when ``backend`` can run on this machine, else the reason it cannot."""
    if backend != "triton":
        return None
    if not triton:
        return "triton is not installed (pip install 'ssmkit[gpu]')"
    if not cuda and not interpreted:
        return "no CUDA device (TRITON_INTERPRET=1 runs it on the CPU, for tests only)"
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    import ssmkit
    from ssmkit.bench.results import cpu_name
    from ssmkit.ops import dispatch

    cuda = torch.cuda.is_available()
    triton = dispatch.triton_installed()
    interpreted = dispatch.triton_interpreted()
    print(f"ssmkit {ssmkit.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"cpu: {cpu_name()}  threads: {torch.get_num_threads()}")
    print(f"cuda: {torch.cuda.get_device_name(0) if cuda else 'not available'}")
    note = "installed" if triton else "not installed"
    if triton and interpreted:
        note += ", interpreted on the CPU (TRITON_INTERPRET=1)"
    print(f"triton: {note}")
    print("backends per op (runs here; cannot run here):")
    why: dict[str, str] = {}
    for op in sorted(dispatch._registry):
        forms = dispatch.available(op)
        ok = [b for b in forms if backend_status(b, cuda, triton, interpreted) is None]
        no = [b for b in forms if b not in ok]
        why.update({b: backend_status(b, cuda, triton, interpreted) for b in no})
        print(f"  {op}: {', '.join(ok) or '-'}" + (f"; not here: {', '.join(no)}" if no else ""))
    for b, reason in sorted(why.items()):
        print(f"{b} cannot run here: {reason}")
    return 0
