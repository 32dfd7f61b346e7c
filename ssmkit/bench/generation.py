"""Generation throughput against batch size: an SSM language model (Mamba by default; Mamba-2 or
Gated DeltaNet with ``ssm``) and a same-size attention model, each up to the largest batch that
fits (the Mamba paper's Fig. 8, the "5x generation throughput" claim).

For each model, batch sizes double from 1 (up to ``max_batch``, or until the card runs out of
memory): random prompts of ``prompt`` tokens, ``new`` greedy tokens, tokens/s = batch x new /
(prefill + decode wall time), median of ``reps`` timed runs after a warm-up run, and the peak
memory of the run. On CUDA both models decode through a captured CUDA graph with an eager prefill
(:func:`ssmkit.inference.cuda_graph.generate_cuda_graph`; attention: SDPA over a static KV cache),
bf16; on the CPU through :func:`ssmkit.generate`, float32. A batch that runs out of memory ends
that model's sweep and is recorded as such, never hidden.

Sizes: ``1.4b`` is Mamba 1.4B (d_model 2048, 48 layers) or Mamba-2 1.3B against a 1.3B attention +
SwiGLU model (d_model 2048, 24 layers, 16 heads, d_ff 5632), the paper's pair; ``130m`` is Mamba
130M, Mamba-2 130M or Gated DeltaNet 130M (the ``gated-deltanet-130m`` preset) against a 12-layer
d_model 768 attention model; ``tiny`` is for a quick check.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

# The SSM side of each size: a preset name or ModelConfig keywords.
SIZES: dict[str, dict[str, Any]] = {
    "1.4b": {"mamba": "mamba-1.4b", "mamba2": "mamba2-1.3b",
             "attention": dict(d_model=2048, n_layer=24, mlp="swiglu", d_intermediate=5632, heads=16)},
    "130m": {"mamba": "mamba-130m", "mamba2": "mamba2-130m", "gated-deltanet": "gated-deltanet-130m",
             "attention": dict(d_model=768, n_layer=12, mlp="swiglu", d_intermediate=2048, heads=12)},
    "tiny": {"mamba": dict(d_model=64, n_layer=2, vocab_size=50277),
             "mamba2": dict(d_model=64, n_layer=2, vocab_size=50277, layer_pattern="22",
                            mamba2_cfg={"d_state": 16, "headdim": 16, "chunk_size": 16}),
             "gated-deltanet": dict(d_model=64, n_layer=2, vocab_size=50277, layer_pattern="GG",
                                    deltanet_cfg={"num_heads": 2, "head_dim": 16}),
             "attention": dict(d_model=64, n_layer=2, mlp="swiglu", d_intermediate=128, heads=4)},
}
SSMS = ("mamba", "mamba2", "gated-deltanet")
LABELS = {"mamba": "Mamba", "mamba2": "Mamba-2", "gated-deltanet": "Gated DeltaNet", "attention": "attention"}


def build(size: str, kind: str, device: torch.device, dtype: torch.dtype):
    """The ``kind`` (one of :data:`SSMS`, or "attention") model of ``size``, random weights, eval mode."""
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    if kind not in SIZES[size]:
        have = ", ".join(k for k in SIZES if kind in SIZES[k])
        raise ValueError(f"size {size!r} has no {kind} model; sizes with one: {have}")
    spec = SIZES[size][kind]
    if isinstance(spec, str):
        cfg = ModelConfig.from_name(spec)
    elif kind != "attention":
        cfg = ModelConfig(**spec)
    else:
        cfg = ModelConfig(d_model=spec["d_model"], n_layer=spec["n_layer"], vocab_size=50277,
                          layer_pattern="A" * spec["n_layer"], mlp=spec["mlp"],
                          d_intermediate=spec["d_intermediate"], attn_cfg={"n_heads": spec["heads"]})
    torch.manual_seed(0)
    with torch.device(device):
        model = LanguageModel(cfg)
    return model.to(dtype=dtype).eval()


def _one(model, batch: int, prompt: int, new: int, reps: int) -> dict:
    device = model.device
    ids = torch.randint(0, 50000, (batch, prompt), device=device)
    if device.type == "cuda":
        from ssmkit.inference.cuda_graph import generate_cuda_graph

        def run():
            generate_cuda_graph(model, ids, max_new_tokens=new, prefill_graph=False)
    else:
        from ssmkit.inference.generate import generate

        def run():
            generate(model, ids, max_new_tokens=new)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run()  # warm-up: graph capture, compilation
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    res = {"batch": batch, "seconds": t, "tokens_per_s": batch * new / t}
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def sweep(model, *, prompt: int, new: int, max_batch: int, reps: int, progress=None) -> list[dict]:
    """Rows ``{"batch", "tokens_per_s", "seconds", "peak_gib"}`` for batch 1, 2, 4, ... up to
    ``max_batch``; the first batch that runs out of memory ends the sweep with ``{"batch", "oom": True}``."""
    rows: list[dict] = []
    b = 1
    while b <= max_batch:
        try:
            row = _one(model, b, prompt, new, reps)
        except torch.OutOfMemoryError:
            row = {"batch": b, "oom": True}
        finally:
            if model.device.type == "cuda":
                from ssmkit.inference.cuda_graph import clear_graphs

                clear_graphs()
                torch.cuda.empty_cache()
        rows.append(row)
        if progress:
            progress(row)
        if row.get("oom"):
            break
        b *= 2
    return rows


def summary(res: dict[str, list[dict]]) -> dict:
    """The best throughput of each model, and the SSM / attention ratio at each batch both ran and
    at their bests (``res``: the SSM's rows first, then "attention")."""
    best = {k: max((r for r in rows if not r.get("oom")), key=lambda r: r["tokens_per_s"], default=None)
            for k, rows in res.items()}
    out: dict[str, Any] = {"best": best}
    ssm = next((k for k in res if k != "attention"), None)
    if ssm and best.get(ssm) and best.get("attention"):
        out["best_ratio"] = best[ssm]["tokens_per_s"] / best["attention"]["tokens_per_s"]
        att = {r["batch"]: r for r in res["attention"] if not r.get("oom")}
        out["ratio_per_batch"] = {r["batch"]: r["tokens_per_s"] / att[r["batch"]]["tokens_per_s"]
                                  for r in res[ssm] if not r.get("oom") and r["batch"] in att}
    return out


def plot(res: dict[str, list[dict]], path: str, title: str, params: dict[str, int] | None = None) -> str | None:
    """Tokens/s against batch size (log-log), one line per model; ``params``: parameter counts
    for the legend."""
    params = params or {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, rows), mk in zip(res.items(), ("o", "s")):
        ok = [r for r in rows if not r.get("oom")]
        label = LABELS.get(name, name) + (f" ({params[name] / 1e9:.2f}B)" if name in params else "")
        ax.plot([r["batch"] for r in ok], [r["tokens_per_s"] for r in ok], marker=mk, label=label)
        oom = [r for r in rows if r.get("oom")]
        if oom and ok:
            ax.annotate("out of memory", (ok[-1]["batch"], ok[-1]["tokens_per_s"]), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("generation throughput (tokens/s)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
