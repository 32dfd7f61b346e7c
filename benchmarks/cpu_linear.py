"""Float32 CPU linear layers: ``F.linear`` (MKL) against oneDNN's matmul (``ssmkit.ops.cpu_linear``),
alone at the Mamba-130M layers' shapes and inside the model (prefill and eager batch-1 decoding
with the oneDNN form on and off), interleaved in one process, 1 and 2 threads.

    python benchmarks/cpu_linear.py --out results/cpu_linear.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _results import cpu_name, write_json  # noqa: E402

from ssmkit.ops import cpu_linear  # noqa: E402

# (rows, in, out) of the Mamba-130M layers: in_proj, out_proj, x_proj, dt_proj at 1024 tokens;
# in_proj at 64, 16 and 1 rows (batched and batch-1 decoding)
SHAPES = [(1024, 768, 3072), (1024, 1536, 768), (1024, 1536, 80), (1024, 48, 1536),
          (64, 768, 3072), (16, 768, 3072), (1, 768, 3072)]


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return cpu_linear._onednn(x, w, None)


def ops_section(threads: int, rounds: int) -> list[dict]:
    rows = []
    for m, k, n in SHAPES:
        x, ws = torch.randn(m, k), [torch.randn(n, k) for _ in range(4)]
        t = {"F.linear": [], "oneDNN": []}
        F.linear(x, ws[0]), _onednn(x, ws[0])
        for _ in range(rounds):  # interleaved; 4 weights in turn, so no weight stays in cache
            for name, f in (("F.linear", F.linear), ("oneDNN", _onednn)):
                t0 = time.perf_counter()
                for w in ws:
                    f(x, w)
                t[name].append((time.perf_counter() - t0) / len(ws))
        row = {"threads": threads, "shape": [m, k, n]}
        row.update({f"{name}_ms": round(statistics.median(v) * 1e3, 3) for name, v in t.items()})
        row["speedup"] = round(row["F.linear_ms"] / row["oneDNN_ms"], 3)
        print(f"{threads} thr  {m:5d} x {k:4d} -> {n:4d}  F.linear {row['F.linear_ms']:8.3f} ms  "
              f"oneDNN {row['oneDNN_ms']:8.3f} ms  {row['speedup']:.2f}x", flush=True)
        rows.append(row)
    return rows


def model_section(threads: int, rounds: int, seqlen: int, tokens: int) -> list[dict]:
    from ssmkit.inference import allocate_cache, prefill
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    torch.manual_seed(0)
    rows = []
    for preset in ("mamba-130m", "mamba2-130m"):
        model = LanguageModel(ModelConfig.from_name(preset)).eval()
        ids = torch.randint(0, 50000, (1, seqlen))
        cache = allocate_cache(model, 1, 16 + 2 * rounds * (tokens + 1) + 8)
        t = {"prefill": {True: [], False: []}, "decode": {True: [], False: []}}
        with torch.inference_mode():
            tok = prefill(model, ids[:, :16], cache).argmax(-1)
            model(ids, logits_to_keep=1)
            for _ in range(rounds):
                for fast in (False, True):
                    cpu_linear._available = None if fast else False  # None: probed again, True here
                    t0 = time.perf_counter()
                    model(ids, logits_to_keep=1)
                    t["prefill"][fast].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    for _ in range(tokens):
                        tok = model.step(tok, cache).argmax(-1)
                    t["decode"][fast].append(tokens / (time.perf_counter() - t0))
        cpu_linear._available = None
        row = {"threads": threads, "model": preset,
               "prefill_ms_f_linear": round(statistics.median(t["prefill"][False]) * 1e3, 1),
               "prefill_ms_onednn": round(statistics.median(t["prefill"][True]) * 1e3, 1),
               "decode_tok_s_f_linear": round(statistics.median(t["decode"][False]), 1),
               "decode_tok_s_onednn": round(statistics.median(t["decode"][True]), 1)}
        print(f"{threads} thr  {preset:12s} prefill {seqlen} tokens: {row['prefill_ms_f_linear']:.0f} -> "
              f"{row['prefill_ms_onednn']:.0f} ms;  eager decode: {row['decode_tok_s_f_linear']:.1f} -> "
              f"{row['decode_tok_s_onednn']:.1f} tokens/s", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per timed block")
    p.add_argument("--no-model", action="store_true", help="time the products alone")
    p.add_argument("--out", default=None, help="JSON path")
    a = p.parse_args(argv)
    if not cpu_linear.fast_form_available():
        print("this PyTorch build has no oneDNN float32 matmul: nothing to compare")
        return 0
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "command": "python benchmarks/cpu_linear.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(info, flush=True)
    res = {"info": info, "ops": [], "model": []}
    threads0 = torch.get_num_threads()
    for th in a.threads:
        torch.set_num_threads(th)
        res["ops"] += ops_section(th, a.rounds)
        if not a.no_model:
            res["model"] += model_section(th, a.rounds, a.seqlen, a.tokens)
    torch.set_num_threads(threads0)
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
