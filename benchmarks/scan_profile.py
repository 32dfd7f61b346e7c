"""Where the time of one selective-scan training step goes, per kernel, for several ScanConfigs.

Runs forward + backward (``--fwd``: the inference forward) at B8 D2048 N16 bf16 (the
reference shape) under ``torch.profiler`` and prints, per configuration, the median step time (``do_bench``) and the GPU time of every kernel
per step. Writes JSON (``--out``). GPU only.

    python benchmarks/scan_profile.py --seqlens 2048,8192 --configs "bwd_quad=4;bwd_quad=4,seq_split=1"

``--peer`` needs ``pip install mamba-ssm --no-build-isolation`` (CUDA extension built against
the installed torch; needs nvcc).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _light_import  # noqa: E402
from _results import result_path, write_json  # noqa: E402

_light_import.light()

import torch  # noqa: E402
from selective_scan_gpu import bench_mamba, make  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from ssmkit.ops.selective_scan import triton as sst  # noqa: E402


def parse_configs(text: str) -> list[dict]:
    """``"a=1,b=2;c=3"`` -> ``[{}, {"a": 1, "b": 2}, {"c": 3}]`` (the default always first)."""
    out: list[dict] = [{}]
    for part in filter(None, (p.strip() for p in text.split(";"))):
        out.append({k.strip(): int(v) for k, v in (kv.split("=") for kv in part.split(","))})
    return out


def profile_step(step, iters: int = 5, ops: bool = False) -> dict[str, float]:
    """GPU milliseconds per step of every kernel launched by ``step`` (``ops``: also print the
    PyTorch operators that launched them)."""
    acts = [torch.profiler.ProfilerActivity.CUDA]
    if ops:
        acts.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            step(clear=True)
        torch.cuda.synchronize()
    if ops:
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="device_time_total", row_limit=14, max_name_column_width=40,
            max_shapes_column_width=60))
    per = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:60]] += ev.device_time_total / 1e3 / iters
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="2048")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--configs", default="", help="';'-separated ScanConfig overrides")
    p.add_argument("--peer", action="store_true", help="also time mamba_ssm (same run)")
    p.add_argument("--ops", action="store_true", help="operator table of the first config")
    p.add_argument("--fwd", action="store_true",
                   help="time the inference forward (no gradient) instead of a training step")
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/gpu_scan_profile_<card>_<date>.json")
    a = p.parse_args()
    if a.out_dir and not a.out:
        a.out = result_path(a.out_dir, 'gpu_scan_profile', "cuda")
    print({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "ssmkit": os.path.dirname(sst.__file__)}, flush=True)
    base = sst.get_config()
    rows = []
    for L in map(int, a.seqlens.split(",")):
        ts = make(a.batch, L, a.dim, 16)
        if a.peer:
            try:
                r = bench_mamba(ts, bwd=True)
                rows.append({"seqlen": L, "peer": "mamba_ssm", **r})
                print(f"L={L} mamba_ssm: fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                print("mamba_ssm failed:", e, flush=True)
        leaves = [t.detach().requires_grad_() for t in ts]
        gy = torch.randn_like(ts[0])

        def step(leaves=leaves, gy=gy, clear=False):
            if a.fwd:
                with torch.no_grad():
                    return sst.selective_scan_triton(*leaves, True)
            if clear:  # (as do_bench's grad_to_none: no accumulation into earlier gradients)
                for t in leaves:
                    t.grad = None
            y = sst.selective_scan_triton(*leaves, True)
            y.backward(gy)

        for over in parse_configs(a.configs):
            sst.set_config(dataclasses.replace(base, **over))
            try:
                step()
                ms = do_bench(step, warmup=10, rep=100, grad_to_none=leaves,
                              return_mode="median")
                kernels = profile_step(step, ops=a.ops and not rows)
            except Exception as e:  # noqa: BLE001
                print(L, over, "failed:", e, flush=True)
                continue
            finally:
                for t in leaves:
                    t.grad = None
            rows.append({"seqlen": L, "config": over, ("fwd_ms" if a.fwd else "fwd_bwd_ms"): ms,
                         "kernels_ms": kernels})
            print(f"\nL={L} {over or 'default'}: {ms:.3f} ms per {'forward' if a.fwd else 'step'}",
                  flush=True)
            for name, t in list(kernels.items())[:8]:
                print(f"  {t:7.3f}  {name}")
        del ts, leaves, gy, step
        torch.cuda.empty_cache()
    sst.set_config(base)
    if a.out:
        write_json(a.out, {"device": torch.cuda.get_device_name(), "rows": rows})


if __name__ == "__main__":
    main()
