"""CPU decoding against the weight-bandwidth floor: batch-1 tokens/s of ``LanguageModel.step`` for
130M-shaped Mamba, Mamba-2 and gated DeltaNet LMs with float32, bfloat16 and int8 weight-only
(``ssmkit.models.quantize``) weights, at 1 and 2 threads.

A decode step at batch 1 reads every weight once (the tied embedding as the LM head), so

    floor tokens/s = read bandwidth / weight bytes per token

with the bandwidth measured right after every timed block (``torch.sum`` over a 256 MiB float32
tensor, far larger than the caches, at the same thread count, best of 2): on a shared machine the
bandwidth moves (on a 2-core cloud VM, 46 to 84 GB/s at 2 threads within one run), so each block's
share of the floor is its tokens/s against the bandwidth measured next to it. Each row prints the
best block's tokens/s and the best share (the medians are kept too): other processes only ever
slow a block down. With ``--compile`` each row is
timed twice, eager and with the compiled CPU kernels (``ssmkit.ops.cpu_compile``: the compiled
GEMVs of ``ssmkit.ops.cpu_gemv``), their blocks interleaved (eager, compiled, eager, ...) on one
cache; the first compiled step, which compiles the model's GEMV shapes, is reported apart.

``decode_section(args) -> list[dict]`` is the function other benchmark programs call (``args``:
any object with the attributes below; missing ones take the defaults). Run alone:

    python benchmarks/_cpu_decode.py [--models mamba mamba2 gated-deltanet] [--threads 1 2]
                                     [--dtypes float32 bfloat16 int8] [--compile] [--out DIR]

writes ``DIR/cpu_decode_cpu_<date>.json`` (default DIR: ./bench_out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ssmkit  # noqa: E402
from ssmkit.inference import allocate_cache, prefill  # noqa: E402

try:
    from _results import result_path, write_json  # noqa: E402
except ImportError:  # imported as benchmarks._cpu_decode
    from benchmarks._results import result_path, write_json  # noqa: E402

MODELS = ("mamba", "mamba2", "gated-deltanet")
DTYPES = ("float32", "bfloat16", "int8")
DEFAULTS = {"models": list(MODELS), "threads": [1, 2], "dtypes": list(DTYPES), "tokens": 32, "repeats": 5,
            "prompt": 8, "bandwidth_mib": 256, "verbose": True, "compile": False}


def model_config(name: str) -> ssmkit.ModelConfig:
    """The 130M shapes: the mamba-130m / mamba2-130m presets, and the gated DeltaNet LM that
    ``benchmarks/cpu_floor.py`` times for prefill (d_model 768, 24 layers, 6 heads with keys of
    128 and values of 192: about 131M parameters)."""
    if name == "mamba":
        return ssmkit.ModelConfig.from_name("mamba-130m")
    if name == "mamba2":
        return ssmkit.ModelConfig.from_name("mamba2-130m")
    if name == "gated-deltanet":
        return ssmkit.ModelConfig(d_model=768, n_layer=24, vocab_size=50277, layer_pattern="G" * 24,
                                  deltanet_cfg={"num_heads": 6, "head_dim": 128, "expand_v": 1.5})
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def build(config: ssmkit.ModelConfig, dtype: str) -> ssmkit.LanguageModel:
    torch.manual_seed(0)
    model = ssmkit.LanguageModel(config).eval()
    if dtype == "int8":
        return ssmkit.models.quantize(model, "int8")
    return model.to(getattr(torch, dtype))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every parameter and buffer once (shared tensors once), less an
    untied embedding table (a lookup reads one row)."""
    seen, total = set(), 0
    skip = set()
    emb = model.backbone.embedding
    if not model.config.tie_embeddings and isinstance(emb, torch.nn.Embedding):
        skip.add(emb.weight.data_ptr())
    for t in [*model.parameters(), *model.buffers()]:
        p = t.data_ptr()
        if p in seen or p in skip:
            continue
        seen.add(p)
        total += t.numel() * t.element_size()
    return total


def read_bandwidth(threads: int, mib: int = 256, repeats: int = 7, x: torch.Tensor | None = None) -> float:
    """Bytes/s of ``torch.sum`` over a ``mib`` MiB float32 tensor (or ``x``) at ``threads`` threads
    (best of ``repeats``)."""
    torch.set_num_threads(threads)
    if x is None:
        x = torch.ones(mib * 2**20 // 4)
        x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def time_decode(model, threads: int, tokens: int, repeats: int, prompt: int,
                modes: tuple[str, ...] = ("eager",), probe=None
                ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, list[float]]]:
    """Seconds per token of each block of ``tokens`` batch-1 steps, per mode ("eager" /
    "compiled"), the modes' blocks interleaved on one cache; the seconds of each mode's first
    step (for "compiled": compiling the model's GEMV shapes at this thread count); and, with
    ``probe`` (a function returning bytes/s), the bandwidth measured right after each block."""
    from ssmkit.ops.cpu_compile import set_cpu_compile

    torch.set_num_threads(threads)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    cache = allocate_cache(model, 1, prompt + (tokens + 4) * (repeats + 1) * len(modes) + 4)
    blocks: dict[str, list[float]] = {m: [] for m in modes}
    bws: dict[str, list[float]] = {m: [] for m in modes}
    first: dict[str, float] = {}
    try:
        with torch.inference_mode():
            logits = prefill(model, ids, cache)
            tok = logits.argmax(-1)
            for mode in modes:
                set_cpu_compile(mode == "compiled")
                t0 = time.perf_counter()
                tok = model.step(tok, cache).argmax(-1)
                first[mode] = time.perf_counter() - t0
                for _ in range(3):
                    tok = model.step(tok, cache).argmax(-1)
            for _ in range(repeats):
                for mode in modes:
                    set_cpu_compile(mode == "compiled")
                    t0 = time.perf_counter()
                    for _ in range(tokens):
                        tok = model.step(tok, cache).argmax(-1)
                    blocks[mode].append((time.perf_counter() - t0) / tokens)
                    if probe is not None:
                        bws[mode].append(probe())
    finally:
        set_cpu_compile(None)
    return blocks, first, bws


def decode_section(args=None) -> list[dict]:
    """One row per (model, dtype, threads, mode): tokens/s (best and median block), the weight
    bytes, the bandwidth measured at that thread count, the floor and the % of it reached (best
    and median block); mode "eager", and "compiled" with ``compile`` where a C++ compiler is found."""
    from ssmkit.ops.cpu_compile import compiler_available

    opt = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in DEFAULTS.items()}
    modes = ("eager", "compiled") if opt["compile"] and compiler_available() else ("eager",)
    threads_before = torch.get_num_threads()
    rows = []
    buf = torch.ones(opt["bandwidth_mib"] * 2**20 // 4)
    try:
        for name in opt["models"]:
            config = model_config(name)
            for dtype in opt["dtypes"]:
                model = build(config, dtype)
                nbytes = weight_bytes(model)
                for t in opt["threads"]:
                    # the bandwidth is measured after every block (this machine's moves by up to 2x
                    # within minutes): each block's share of the floor uses the bandwidth next to it
                    blocks, first, bws = time_decode(model, t, opt["tokens"], opt["repeats"], opt["prompt"],
                                                     modes, probe=lambda t=t: read_bandwidth(t, repeats=2, x=buf))
                    for mode in modes:
                        best, med = min(blocks[mode]), statistics.median(blocks[mode])
                        bw = statistics.median(bws[mode])
                        shares = sorted(100 * nbytes / (s * b) for s, b in zip(blocks[mode], bws[mode]))
                        row = {"section": "decode", "model": name, "dtype": dtype, "threads": t, "batch": 1,
                               "mode": mode, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                               "weight_MB": round(nbytes / 1e6, 1), "bandwidth_GBps": round(bw / 1e9, 1),
                               "bandwidth_runs_GBps": [round(b / 1e9, 1) for b in bws[mode]],
                               "floor_tok_s": round(bw / nbytes, 1), "tok_s": round(1 / best, 1),
                               "tok_s_median": round(1 / med, 1), "ms_per_token": round(best * 1e3, 2),
                               "pct_of_floor": round(shares[-1], 1),
                               "pct_of_floor_median": round(statistics.median(shares), 1),
                               "first_step_s": round(first[mode], 2)}
                        rows.append(row)
                        if opt["verbose"]:
                            print(f"  {name:15s} {dtype:9s} {t} thr {mode:8s} {row['tok_s']:7.1f} tok/s "
                                  f"(median {row['tok_s_median']:6.1f})  floor {row['floor_tok_s']:6.1f} "
                                  f"({row['weight_MB']:.0f} MB at {row['bandwidth_GBps']:.1f} GB/s)  "
                                  f"{row['pct_of_floor']:5.1f}% of floor (median {row['pct_of_floor_median']:5.1f}%)"
                                  + (f"  first step {first[mode]:.1f} s" if mode == "compiled" else ""),
                                  flush=True)
                del model
    finally:
        torch.set_num_threads(threads_before)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | weights | threads | mode | tokens/s (median) | floor tokens/s | % of floor (median) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} ({r['weight_MB']:.0f} MB) | {r['threads']} | {r['mode']} | "
                     f"{r['tok_s']} ({r['tok_s_median']}) | {r['floor_tok_s']} ({r['bandwidth_GBps']} GB/s) | "
                     f"{r['pct_of_floor']} ({r['pct_of_floor_median']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--tokens", type=int, default=32, help="decode steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per row (the best is reported)")
    p.add_argument("--compile", action="store_true",
                   help="also time each row with the compiled CPU kernels (ssmkit.ops.cpu_compile), interleaved")
    p.add_argument("--out", default="bench_out", help="folder of the JSON result")
    args = p.parse_args(argv)
    print(f"CPU decode, batch 1, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    rows = decode_section(args)
    print(table(rows))
    path = result_path(args.out, "cpu_decode", "cpu")
    write_json(path, {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
