"""CPU benchmark: Mamba-3 language models of the 130M shape beside Mamba-2's, same run, batch 1.

Models (random weights, float32): ``mamba2-130m``, ``mamba3-130m`` (SISO, half the state rotated)
and the same shape with MIMO rank 4 (``--no-mimo`` skips it): d_model 768, 24 layers, 24 heads
x 64, d_state 128, the GPT-2 vocabulary. Measured with 1 and 2 torch threads (``--threads``):

* prefill: ``LanguageModel(ids, logits_to_keep=1)`` on ``--seqlen`` (1024) tokens under
  ``torch.inference_mode``, and the floor of each model: its linear layers' matmuls alone
  (``(seqlen, in) @ (in, out)``, the LM head at the last position), timed in the same loop;
* decoding: tokens/s of ``decode_one_token`` after a 16-token prefill, ``--decode-tokens`` tokens.

Every figure is the median of ``--repeats`` runs taken in turn (model A, model B, ..., floor,
model A, ...), so that load from other processes hits all of them alike.

Run:  flock /tmp/bench.lock python benchmarks/mamba3_cpu.py
Writes docs/benchmarks/mamba3_cpu.json (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_json  # noqa: E402
from cpu_floor import cpu_name  # noqa: E402


def models(mimo: bool, tiny: bool = False) -> dict[str, dict]:
    from ssmkit.models.config import PRESETS

    size = "tiny" if tiny else "130m"
    m2, m3 = ("tiny-mamba2", "tiny-mamba3") if tiny else ("mamba2-130m", "mamba3-130m")
    out = {f"mamba2-{size}": dict(PRESETS[m2]), f"mamba3-{size}": dict(PRESETS[m3])}
    if mimo:
        m = dict(PRESETS[m3])
        m["mamba3_cfg"] = {**m["mamba3_cfg"], "is_mimo": True, "mimo_rank": 4, "chunk_size": 16}
        out[f"mamba3-mimo4-{size}"] = m
    return out


def build(spec: dict) -> nn.Module:
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    torch.manual_seed(0)
    return LanguageModel(ModelConfig.from_dict(spec)).eval()


def linear_floor(model: nn.Module, seqlen: int):
    """A function running every linear layer's matmul of one prefill alone (fresh inputs)."""
    mats = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            m = 1 if name == "lm_head" else seqlen
            mats.append((torch.randn(m, mod.in_features), mod.weight.detach().t().contiguous()))

    def run():
        for a, w in mats:
            a @ w
    return run


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mimo", action="store_true", help="skip the MIMO rank-4 model")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke test of this program)")
    ap.add_argument("--out", default="docs/benchmarks/mamba3_cpu.json")
    args = ap.parse_args(argv)

    from ssmkit.inference import allocate_cache, decode_one_token, prefill

    specs = models(not args.no_mimo, args.tiny)
    built = {name: build(spec) for name, spec in specs.items()}
    ids = torch.randint(0, min(s["vocab_size"] for s in specs.values()), (1, args.seqlen))
    floors = {name: linear_floor(m, args.seqlen) for name, m in built.items()}
    result = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "command": "python benchmarks/mamba3_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "seqlen": args.seqlen, "batch": 1, "decode_tokens": args.decode_tokens,
              "params": {n: sum(p.numel() for p in m.parameters()) for n, m in built.items()}, "rows": []}
    print(f"CPU: {result['cpu']} ({result['logical_cpus']} logical), torch {torch.__version__}")
    threads0 = torch.get_num_threads()
    with torch.inference_mode():
        for th in args.threads:
            torch.set_num_threads(th)
            pre = {n: [] for n in built}
            flo = {n: [] for n in built}
            dec = {n: [] for n in built}
            for m in built.values():  # warm-up
                m(ids[:, :64], logits_to_keep=1)
            for _ in range(args.repeats):
                for n, m in built.items():
                    pre[n].append(timed(lambda m=m: m(ids, logits_to_keep=1)))
                    flo[n].append(timed(floors[n]))
                for n, m in built.items():
                    cache = allocate_cache(m, 1, 16 + args.decode_tokens + 1)
                    tok = prefill(m, ids[:, :16], cache).argmax(-1)

                    def run(m=m, cache=cache, tok=tok):
                        t = tok
                        for _ in range(args.decode_tokens):
                            t = decode_one_token(m, t, cache).argmax(-1)
                    dec[n].append(args.decode_tokens / timed(run))
            for n in built:
                row = {"model": n, "threads": th, "prefill_s": statistics.median(pre[n]),
                       "floor_s": statistics.median(flo[n]), "decode_tok_per_s": statistics.median(dec[n])}
                row["prefill_over_floor"] = row["prefill_s"] / row["floor_s"]
                result["rows"].append(row)
                print(f"{th} thread(s) {n:>18}: prefill {args.seqlen} tokens {row['prefill_s'] * 1e3:7.0f} ms "
                      f"(linear-layer floor {row['floor_s'] * 1e3:5.0f} ms, x{row['prefill_over_floor']:.2f}); "
                      f"decode {row['decode_tok_per_s']:6.1f} tok/s")
    torch.set_num_threads(threads0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
