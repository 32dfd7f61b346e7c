"""Plot a ``benchmarks/generation.py`` JSON: prefill time and tokens/s against prompt length for
the ssmkit Mamba model and the same-size ssmkit attention model (PNG).

    python benchmarks/plot_generation.py docs/benchmarks/gpu_generation_h100_2026-11-27.json
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--out", default=None, help="PNG path (default: the JSON's path with .png)")
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(a.json) as f:
        res = json.load(f)
    rows = [r for r in res["attention_vs_mamba"] if "mamba" in r and "attention" in r]
    P = [r["prompt"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("mamba", "o-"), ("attention", "s--")):
        ax1.plot(P, [r[name]["prefill_s"] * 1e3 for r in rows], style, label=f"ssmkit {name}")
        ax2.plot(P, [r[name]["tokens_per_s"] for r in rows], style, label=f"ssmkit {name}")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_yscale("log")
    ax1.set_ylabel("prefill ms (batch 1)")
    ax2.set_ylabel(f"tokens/s, prompt + {res['info']['new_tokens']} new (batch 1)")
    info = res["info"]
    fig.suptitle(f"~1.4B models, bf16, CUDA-graph decoding — {info['device']}, {info['date']}")
    fig.tight_layout()
    out = a.out or os.path.splitext(a.json)[0] + ".png"
    fig.savefig(out, dpi=110)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
