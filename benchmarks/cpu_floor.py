"""CPU prefill against the model's own matmul floor, 130M shapes, batch 1.

For Mamba, Mamba-2 and Gated DeltaNet language models of about 130M parameters (random weights),
batch 1, ``--seqlen`` tokens (1024), with 1 and 2 torch threads:

* ssmkit prefill: ``LanguageModel(ids, logits_to_keep=1)`` under ``torch.inference_mode`` (the
  logits of the last position only, as a prefill before decoding keeps);
* the floor: every matmul that model must do, each timed alone with torch at its shape in the
  same run: its linear layers (``(seqlen, in) @ (in, out)``), the LM head at the last position,
  and for Mamba-2 the SSD's own chunk matmuls at the CPU block length the chunked form uses.
  A linear layer's time is the faster of PyTorch's two float32 CPU products at its shape,
  ``F.linear`` (MKL) and oneDNN's matmul (``ssmkit.ops.cpu_linear``, which the model's layers
  use); the floor through ``F.linear`` alone is reported beside it (``floor_f_linear_ms``).
  The Mamba layers' scan, the convolutions, norms and gates are not matmuls and count as overhead.

Both are medians of ``--repeats`` runs, interleaved (model, floor, model, floor, ...), so that
load from other processes hits both alike; the ratio is ssmkit / floor.

``decode_section`` (CPU decoding with float32 / bfloat16 / int8 weights) lives in
``benchmarks/_cpu_decode.py`` and is run after the prefill section when that file is present;
``--compile`` applies to it too (eager and compiled decode steps, interleaved).

Run:  flock /tmp/bench.lock python benchmarks/cpu_floor.py
Writes docs/benchmarks/cpu_floor.json (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import cpu_name, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Gated DeltaNet at about 130M parameters: d_model 768, 24 layers, 6 heads with keys of 128 and
# values of 192 (expand_v 1.5), the GPT-2 vocabulary, as the Mamba presets.
GDN_130M = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "layer_pattern": "G" * 24,
            "deltanet_cfg": {"num_heads": 6, "head_dim": 128, "expand_v": 1.5}}
MODELS = {"mamba": "mamba-130m", "mamba2": "mamba2-130m", "gated-deltanet": GDN_130M}



def build(name: str) -> nn.Module:
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    spec = MODELS[name]
    cfg = ModelConfig.from_name(spec) if isinstance(spec, str) else ModelConfig(**spec)
    torch.manual_seed(0)
    return LanguageModel(cfg).eval()


def floor_matmuls(model: nn.Module, seqlen: int) -> Counter:
    """The matmuls of one prefill of ``seqlen`` tokens, batch 1: ``Counter`` of shapes
    ``(batch, M, K, N)`` (``batch`` > 1 for batched chunk matmuls) -> how often they occur."""
    from ssmkit.layers.mamba2 import Mamba2
    from ssmkit.ops.ssd.chunked import CPU_BLOCK

    shapes: Counter = Counter()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            m = 1 if mod_name == "lm_head" else seqlen  # the head runs on the kept position only
            shapes[(1, m, mod.in_features, mod.out_features)] += 1
        elif isinstance(mod, Mamba2):
            # SSD per group: C Bᵀ (Q x N x Q), the diagonal blocks per head (Q x Q x P), the chunk
            # states Bᵀ (Δx) (N x Q x H/G·P) and the state-to-output C h (Q x N x H/G·P).
            Q = min(mod.chunk_size, seqlen, CPU_BLOCK)
            c, g = -(-seqlen // Q), mod.ngroups
            hg, p, n = mod.nheads // g, mod.headdim, mod.d_state
            shapes[(c * g, Q, n, Q)] += 1
            shapes[(c * g * hg, Q, Q, p)] += 1
            shapes[(c * g, n, Q, hg * p)] += 1
            shapes[(c * g, Q, n, hg * p)] += 1
    if "lm_head" not in dict(model.named_modules()):
        raise RuntimeError("the model has no lm_head module")
    return shapes


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def floor_runner(shapes: Counter):
    """A function timing each shape (best of 2 after a warm-up) -> ``(floor, F.linear floor)`` in
    seconds, summed over the shapes weighted by their counts: a linear layer's shape counts at the
    faster of ``F.linear`` and oneDNN's product in the first, at ``F.linear``'s in the second."""
    from ssmkit.ops import cpu_linear

    ops = []
    for (bt, m, k, n), count in shapes.items():
        a, w = torch.randn(bt, m, k), torch.randn(bt, k, n)
        if bt == 1:  # a linear layer: x @ Wᵀ with W (out, in)
            wt = w[0].t().contiguous()
            fns = [functools.partial(torch.nn.functional.linear, a[0], wt)]
            if cpu_linear.fast_form_available():
                fns.append(functools.partial(cpu_linear._onednn, a[0], wt, None))
        else:
            fns = [functools.partial(torch.bmm, a, w)]
        for fn in fns:
            fn()
        ops.append((fns, count))

    def run() -> tuple[float, float]:
        best = reference = 0.0
        for fns, count in ops:
            times = [min(_timed(fn), _timed(fn)) for fn in fns]
            best += min(times) * count
            reference += times[0] * count
        return best, reference

    return run


def prefill_section(args) -> list[dict]:
    """ssmkit prefill vs the matmul floor for every model in ``args.models`` and thread count in
    ``args.threads``, with the eager forms and, with ``args.compile``, the compiled CPU kernels
    (their compile time reported apart); one dict per (model, threads, mode)."""
    from ssmkit.ops.cpu_compile import compiler_available, set_cpu_compile

    modes = ["eager"] + (["compiled"] if args.compile and compiler_available() else [])
    threads0 = torch.get_num_threads()
    rows = []
    for name in args.models:
        model = build(name)
        params = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, model.config.vocab_size, (1, args.seqlen))
        prefill = functools.partial(model, ids, logits_to_keep=1)
        shapes = floor_matmuls(model, args.seqlen)
        flops = sum(2 * bt * m * k * n * c for (bt, m, k, n), c in shapes.items())
        floor = floor_runner(shapes)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for mode in modes:
                set_cpu_compile(mode == "compiled")
                with torch.inference_mode():
                    model(ids[:, :64], logits_to_keep=1)  # warm-up: thread pool, allocator
                    first = _timed(prefill)  # with "compiled": compiles for this shape and thread count
                    floor()
                    t_model, t_floor, t_ref = [], [], []
                    for _ in range(args.repeats):
                        t_model.append(_timed(prefill))
                        best, ref = floor()
                        t_floor.append(best)
                        t_ref.append(ref)
                ms, fs = statistics.median(t_model) * 1e3, statistics.median(t_floor) * 1e3
                rs = statistics.median(t_ref) * 1e3
                row = {"model": name, "params_M": round(params / 1e6, 1), "threads": threads, "mode": mode,
                       "seqlen": args.seqlen, "batch": 1, "ssmkit_ms": round(ms, 1), "floor_ms": round(fs, 1),
                       "ratio": round(ms / fs, 3), "floor_f_linear_ms": round(rs, 1),
                       "ratio_f_linear": round(ms / rs, 3), "floor_gflop": round(flops / 1e9, 1),
                       "ssmkit_runs_ms": [round(t * 1e3, 1) for t in t_model],
                       "floor_runs_ms": [round(t * 1e3, 1) for t in t_floor]}
                if mode == "compiled":
                    row["first_call_s"] = round(first, 2)  # compile time + one prefill
                rows.append(row)
                extra = f"  (first call {first:.1f} s)" if mode == "compiled" else ""
                print(f"{name:15s} {threads:7d} {mode:9s} {ms:10.1f} {fs:9.1f} {ms / fs:6.2f}x "
                      f"{rs:9.1f} {ms / rs:6.2f}x{extra}", flush=True)
    set_cpu_compile(None)
    torch.set_num_threads(threads0)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs of model and floor (median)")
    ap.add_argument("--compile", action="store_true",
                    help="also measure with the compiled CPU kernels (ssmkit.ops.cpu_compile)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode section")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "cpu_floor.json"))
    args = ap.parse_args(argv)

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_at_start": os.getloadavg(),
            "command": "python benchmarks/cpu_floor.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"CPU: {info['cpu']} ({info['cores']} cores), torch {torch.__version__}, load {info['load_avg_at_start']}")
    print(f"prefill, batch 1, {args.seqlen} tokens, logits of the last position; medians of {args.repeats}")
    print(f"{'model':15s} {'threads':>7s} {'mode':9s} {'ssmkit ms':>10s} {'floor ms':>9s} {'ratio':>7s} "
          f"{'F.linear floor':>9s} {'ratio':>7s}")
    result = {"machine": info, "prefill": prefill_section(args)}

    if not args.no_decode:
        try:
            import _cpu_decode  # CPU decoding with quantized weights (its own section)
        except ImportError:
            _cpu_decode = None
        if _cpu_decode is not None and hasattr(_cpu_decode, "decode_section"):
            result["decode"] = _cpu_decode.decode_section(args)

    result["machine"]["load_avg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
