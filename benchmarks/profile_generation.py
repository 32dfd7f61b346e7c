"""Where generation time goes: kernels of one prefill and of decode steps, from ``torch.profiler``.

Mamba-1.4B shape (random weights, bf16) by default; prints, for the prefill of ``--prompt`` tokens
and for ``--steps`` CUDA-graph decode steps, the wall time, the time the GPU was busy (sum of
kernel times) and the kernels that take most of it. A prefill much longer than its kernels is
bound by the host (Python and launch overhead), not by the GPU. Writes JSON (``--out``).

    python benchmarks/profile_generation.py --batch 1 --prompt 2048 --out prof.json
    python benchmarks/profile_generation.py --device cpu --tiny   # smoke test without a GPU

No peer library needed.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _light_import  # noqa: E402
from _results import result_path, write_json  # noqa: E402

_light_import.light()

import torch  # noqa: E402


def _model(device: str, tiny: bool):
    """The generation benchmark's Mamba-1.4B-shaped model (bf16, on the GPU), or a tiny one."""
    if not tiny and device == "cuda":
        from generation import ssmkit_model

        return ssmkit_model("mamba")
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    cfg = (ModelConfig(d_model=64, n_layer=2, vocab_size=1000, layer_pattern="MM") if tiny
           else ModelConfig.from_name("mamba-1.4b"))
    torch.manual_seed(0)
    with torch.device(device):
        return LanguageModel(cfg).eval()


def _kernels(prof, use_cuda: bool, top: int) -> tuple[float, list[dict]]:
    """(busy microseconds, top kernels) from a finished profiler: device kernels on CUDA, the
    CPU operators otherwise."""
    agg: dict[str, list[float]] = collections.defaultdict(list)
    for ev in prof.events():
        if use_cuda:
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            dur = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        else:
            if ev.cpu_parent is not None:  # top-level operators only
                continue
            dur = ev.cpu_time
        agg[ev.name].append(float(dur))
    rows = sorted(({"kernel": k[:90], "count": len(v), "total_us": sum(v),
                    "mean_us": sum(v) / len(v)} for k, v in agg.items()),
                  key=lambda r: -r["total_us"])
    return sum(r["total_us"] for r in rows), rows[:top]


def _profile(fn, use_cuda: bool, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up: compiles, graph capture
    if use_cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if use_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy, rows = _kernels(prof, use_cuda, top)
    return {"wall_ms": wall * 1e3, "busy_ms": busy / 1e3, "top": rows}


def _host_profile(fn, use_cuda: bool, top: int) -> list[dict]:
    """Python functions by their own host time over one call of ``fn`` (``cProfile``): where a
    host-bound prefill spends its time."""
    import cProfile
    import pstats

    fn()
    if use_cuda:
        torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    fn()
    if use_cuda:
        torch.cuda.synchronize()
    pr.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(pr)
    rows = sorted(({"function": f"{os.path.basename(k[0])}:{k[1]}({k[2]})"[:90], "calls": v[1],
                    "self_ms": v[2] * 1e3, "cum_ms": v[3] * 1e3} for k, v in st.stats.items()),
                  key=lambda r: -r["self_ms"])[:top]
    print(f"\n## host time of one call under cProfile: {wall * 1e3:.1f} ms")
    print("| function | calls | self ms | cumulative ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['function']} | {r['calls']} | {r['self_ms']:.2f} | {r['cum_ms']:.2f} |")
    return rows


def _print(name: str, r: dict) -> None:
    print(f"\n## {name}: wall {r['wall_ms']:.2f} ms, kernels busy {r['busy_ms']:.2f} ms "
          f"({100 * r['busy_ms'] / max(r['wall_ms'], 1e-9):.0f}%)")
    print("| kernel | count | total us | mean us |\n|---|---|---|---|")
    for k in r["top"]:
        print(f"| {k['kernel']} | {k['count']} | {k['total_us']:.0f} | {k['mean_us']:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer d_model 64 model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--host", action="store_true", help="also profile the prefill's host time (cProfile)")
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/profile_generation_<card>_<date>.json")
    a = p.parse_args(argv)
    if a.out_dir and not a.out:
        a.out = result_path(a.out_dir, 'profile_generation', "cpu" if a.device == "cpu" else "cuda")
    use_cuda = a.device == "cuda"
    from ssmkit.inference import allocate_cache
    from ssmkit.inference.stages import prefill

    model = _model(a.device, a.tiny)
    ids = torch.randint(0, model.config.vocab_size - 1, (a.batch, a.prompt), device=a.device)
    info = {"device": torch.cuda.get_device_name(0) if use_cuda else "cpu",
            "torch": torch.__version__, "batch": a.batch, "prompt": a.prompt,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(info)
    cache = allocate_cache(model, a.batch, a.prompt + a.steps + 1, device=a.device)

    def run_prefill():
        cache.reset()
        with torch.inference_mode():
            prefill(model, ids, cache)

    res = {"info": info, "prefill": _profile(run_prefill, use_cuda, a.top)}
    _print(f"prefill of {a.prompt} tokens, batch {a.batch}", res["prefill"])
    if a.host:
        res["prefill_host"] = _host_profile(run_prefill, use_cuda, a.top)
    if use_cuda:
        from ssmkit.inference.cuda_graph import generate_cuda_graph

        def run_decode():
            with torch.inference_mode():
                generate_cuda_graph(model, ids[:, :8], max_new_tokens=a.steps + 1)

        res["decode"] = _profile(run_decode, use_cuda, a.top)
        _print(f"prompt of 8 + {a.steps} CUDA-graph decode steps, batch {a.batch}", res["decode"])
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
