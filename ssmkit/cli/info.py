"""Print the installed versions, the devices found and the backends each op offers."""

from __future__ import annotations

import argparse
import platform

NAME = "info"
HELP = "show versions, devices and available backends"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    import torch

    import ssmkit
    from ssmkit.ops import dispatch

    print(f"ssmkit {ssmkit.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"cpu: {platform.processor() or platform.machine()}  threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name(0)}")
    else:
        print("cuda: not available")
    print(f"triton: {'installed' if dispatch.triton_installed() else 'not installed'}")
    for op in sorted(dispatch._registry):
        print(f"  {op}: {', '.join(dispatch.available(op))}")
    return 0
