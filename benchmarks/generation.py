"""End-to-end generation throughput on the GPU: ssmkit (CUDA-graph decoding) vs mamba_ssm
``MambaLMHeadModel.generate(cg=True)`` in the same run, and vs a same-size ssmkit attention model.

Mamba 1.4B shape (d_model 2048, 48 layers), random weights, bf16, greedy; prompt 2048 + 128 new
tokens at batch 1 and 64: tokens/s = batch * new_tokens / (prefill + decode wall time), median
of ``--reps`` timed runs after a warm-up run (graph capture, Triton compilation). Prompts of at
most 8,192 tokens (batch x length) replay a captured prefill on repeated calls (the default of
``generate_cuda_graph`` for Mamba models); at batch 1 the run also times ssmkit with an eager
prefill. Then prompts 2K, 8K, 32K at batch 1 for the Mamba model and a ~1.3B attention + SwiGLU
model (24 layers, SDPA prefill, SDPA decode over a static KV cache in the graph), both with
eager prefills. Writes JSON (``--out``).

``--count-launches`` (no GPU needed) prints the kernel launches of one decode step of the Mamba
1.4B layer structure (a narrow model with the same ops) on the CUDA path, counted on CPU under the
Triton interpreter (:func:`ssmkit.inference.launches.count_step_launches`), and exits.

Peer: ``pip install mamba-ssm causal-conv1d --no-build-isolation`` (CUDA extensions built
against the installed torch, a few minutes; needs nvcc). ``--skip peer`` times ssmkit alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _light_import  # noqa: E402
from _results import result_path, write_json  # noqa: E402

_light_import.light()

import torch  # noqa: E402

NEW = 128
PREFILL_GRAPH_MAX_TOKENS = 8192  # ssmkit.inference.cuda_graph's default (not imported: light import)


def _time(fn, reps):
    fn()  # warm-up: compile, capture
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def ssmkit_model(kind: str):
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    if kind == "mamba":
        cfg = ModelConfig.from_name("mamba-1.4b")
    else:
        cfg = ModelConfig(d_model=2048, n_layer=24, vocab_size=50277, layer_pattern="A" * 24,
                          mlp="swiglu", d_intermediate=5632, attn_cfg={"n_heads": 16})
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: seconds, not a minute of CPU init
        m = LanguageModel(cfg)
    return m.to(dtype=torch.bfloat16).eval()


def bench_ssmkit(model, batch, prompt, reps, prefill_graph=None):
    from ssmkit.inference.cuda_graph import clear_graphs, generate_cuda_graph

    ids = torch.randint(0, 50000, (batch, prompt), device="cuda")
    out = {}
    clear_graphs()

    def run():
        out["ids"] = generate_cuda_graph(model, ids, max_new_tokens=NEW, prefill_graph=prefill_graph)

    t = _time(run, reps)
    # prefill alone (one new token), to tell where the time goes
    tp = _time(lambda: generate_cuda_graph(model, ids, max_new_tokens=1, prefill_graph=prefill_graph),
               reps)
    clear_graphs()
    return {"seconds": t, "tokens_per_s": batch * NEW / t, "prefill_s": tp,
            "decode_ms_per_token": 1e3 * (t - tp) / (NEW - 1)}, out["ids"]


def bench_mamba_ssm(batch, prompt, reps):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=2048, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=8)
    m = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 50000, (batch, prompt), device="cuda")

    def run():
        m.generate(input_ids=ids, max_length=prompt + NEW, cg=True, top_k=1,
                   return_dict_in_generate=False, output_scores=False)

    t = _time(run, reps)
    tp = _time(lambda: m.generate(input_ids=ids, max_length=prompt + 1, cg=True, top_k=1,
                                  return_dict_in_generate=False, output_scores=False), reps)
    return {"seconds": t, "tokens_per_s": batch * NEW / t, "prefill_s": tp,
            "decode_ms_per_token": 1e3 * (t - tp) / (NEW - 1)}


def count_launches(n_layer: int = 48) -> dict:
    """Launches of one decode step of a ``n_layer`` Mamba LM at batch 1, bf16 (narrow: d_model 64,
    same ops as the 1.4B), on the CUDA path (Triton forms, counted on CPU) and the CPU path."""
    from ssmkit.testing import use_triton_interpreter

    use_triton_interpreter()
    from ssmkit.inference import allocate_cache
    from ssmkit.inference.launches import count_step_launches
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    cfg = ModelConfig(d_model=64, n_layer=n_layer, vocab_size=1000, layer_pattern="M" * n_layer)
    m = LanguageModel(cfg).to(torch.bfloat16).eval()
    cache = allocate_cache(m, 1, 8)
    res = {}
    for name, backend in (("cuda_path", "triton"), ("cpu_path", None)):
        count_step_launches(m, cache, backend)  # warm the per-layer caches (A = -exp(A_log))
        c = count_step_launches(m, cache, backend)
        res[name] = {"total": sum(c.values()), "n_layer": n_layer, "by_op": dict(c)}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/gpu_generation_<card>_<date>.json")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--attn-prompts", default="2048,8192,32768")
    p.add_argument("--skip", default="", help="comma list of: peer, attn")
    p.add_argument("--count-launches", action="store_true", help="count decode launches on CPU and exit")
    a = p.parse_args(argv)
    if a.out_dir and not a.out:
        a.out = result_path(a.out_dir, 'gpu_generation', "cuda")
    if a.count_launches:
        print(json.dumps(count_launches(), indent=1))
        return 0
    skip = set(filter(None, a.skip.split(",")))
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "new_tokens": NEW}
    print(info, flush=True)
    res = {"info": info, "mamba_1.4b": [], "attention_vs_mamba": []}
    mamba = ssmkit_model("mamba")
    for b in map(int, a.batches.split(",")):
        row = {"batch": b, "prompt": 2048}
        try:
            row["ssmkit"], _ = bench_ssmkit(mamba, b, 2048, a.reps)
            if b * 2048 <= PREFILL_GRAPH_MAX_TOKENS:  # the same without the captured prefill
                row["ssmkit_eager_prefill"], _ = bench_ssmkit(mamba, b, 2048, a.reps, prefill_graph=False)
        except Exception as e:  # noqa: BLE001
            row["ssmkit_error"] = repr(e)
        print(row, flush=True)
        res["mamba_1.4b"].append(row)
    from ssmkit.inference.cuda_graph import clear_graphs

    clear_graphs()
    torch.cuda.empty_cache()
    if "peer" not in skip:
        mamba_cpu = mamba.to("cpu")  # make room for the peer's model
        torch.cuda.empty_cache()
        for row in res["mamba_1.4b"]:
            try:
                row["mamba_ssm"] = bench_mamba_ssm(row["batch"], 2048, a.reps)
                torch.cuda.empty_cache()
                for k in ("", "_eager_prefill"):
                    if "ssmkit" + k in row:
                        row["ratio" + k] = (row["ssmkit" + k]["tokens_per_s"]
                                            / row["mamba_ssm"]["tokens_per_s"])
            except Exception as e:  # noqa: BLE001
                row["mamba_ssm_error"] = repr(e)
            print(row, flush=True)
        mamba = mamba_cpu.to("cuda")
    if "attn" not in skip:
        attn = ssmkit_model("attention")
        info["params"] = {"mamba": sum(q.numel() for q in mamba.parameters()),
                          "attention": sum(q.numel() for q in attn.parameters())}
        for P in map(int, a.attn_prompts.split(",")):
            row = {"batch": 1, "prompt": P}
            for name, m in (("mamba", mamba), ("attention", attn)):
                try:  # both with an eager prefill: the like-for-like comparison
                    row[name], _ = bench_ssmkit(m, 1, P, max(1, a.reps - 1), prefill_graph=False)
                except Exception as e:  # noqa: BLE001
                    row[name + "_error"] = repr(e)
                clear_graphs()
                torch.cuda.empty_cache()
            if "mamba" in row and "attention" in row:
                row["mamba_over_attention"] = row["mamba"]["tokens_per_s"] / row["attention"]["tokens_per_s"]
            print(row, flush=True)
            res["attention_vs_mamba"].append(row)
    print("\n| model | batch | prompt | ssmkit tok/s | mamba_ssm tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in res["mamba_1.4b"]:
        m = r.get("mamba_ssm", {}).get("tokens_per_s", float("nan"))
        for k, note in (("ssmkit", ""), ("ssmkit_eager_prefill", " (eager prefill)")):
            if k in r or k == "ssmkit":
                s = r.get(k, {}).get("tokens_per_s", float("nan"))
                print(f"| Mamba 1.4B{note} | {r['batch']} | 2048 | {s:.0f} | {m:.0f} | {s / m:.2f} |")
    print("\n| prompt | ssmkit Mamba tok/s | ssmkit attention tok/s | Mamba / attention |")
    print("|---|---|---|---|")
    for r in res["attention_vs_mamba"]:
        s = r.get("mamba", {}).get("tokens_per_s", float("nan"))
        t = r.get("attention", {}).get("tokens_per_s", float("nan"))
        print(f"| {r['prompt']} | {s:.0f} | {t:.0f} | {s / t:.2f} |")
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
