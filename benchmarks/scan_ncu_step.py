"""One inference forward and one training step of the selective scan at the reference
training shape (B8 D2048 N16 L2048 bf16), for Nsight Compute on the GPU machine, e.g.

    ncu --kernel-name regex:"bwd_quad|fwd_quad" --launch-count 3 --section WarpStateStats \\
        --section MemoryWorkloadAnalysis python benchmarks/scan_ncu_step.py

``SSMKIT_SCAN_CONFIG`` or ``--set field=value,...`` pick the kernels' configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _light_import  # noqa: E402

_light_import.light()

import torch  # noqa: E402
from selective_scan_gpu import make  # noqa: E402

from ssmkit.ops.selective_scan import triton as sst  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--set", default="", help="ScanConfig overrides, e.g. bwd_quad_warps=2")
    a = p.parse_args()
    over = {k: int(v) for k, v in (kv.split("=") for kv in a.set.split(",") if kv)}
    sst.set_config(dataclasses.replace(sst.get_config(), **over))
    ts = make(8, a.seqlen, 2048, 16)
    with torch.no_grad():
        sst.selective_scan_triton(*ts, True)
    leaves = [t.detach().requires_grad_() for t in ts]
    y = sst.selective_scan_triton(*leaves, True)
    y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    print("done", over)


if __name__ == "__main__":
    main()
