"""End-to-end generation throughput on the GPU: ssmkit (CUDA-graph decoding) vs mamba_ssm
``MambaLMHeadModel.generate(cg=True)`` in the same run, and vs a same-size ssmkit attention model.

``--ssm mamba`` (default): Mamba 1.4B shape (d_model 2048, 48 layers); ``--ssm mamba2``: Mamba-2
1.3B shape (d_model 2048, 48 layers, d_state 128, headdim 64; the peer with
``ssm_cfg={"layer": "Mamba2"}``). Random weights, bf16, greedy; prompt 2048 + 128 new tokens at
batch 1 and 64: tokens/s = batch * new_tokens / (prefill + decode wall time), median of ``--reps``
timed runs after a warm-up run (graph capture, Triton compilation). Prompts of at most 8,192
tokens (batch x length) replay a captured prefill on repeated calls (the default of
``generate_cuda_graph`` for Mamba and Mamba-2 models); at batch 1 the run also times ssmkit with an
eager prefill. ``--backends auto,triton`` times ssmkit once per dispatch choice (``triton``: every
Triton form forced, as ``SSMKIT_BACKEND=triton``; for Mamba-2 the Triton SSD forward, ``ssd_step``
and gated RMSNorm, opt-in until they have run on a GPU); each row names its backend. Each peer
row says what the peer ran: its Mamba-2 conv step is ``causal_conv1d_update`` when the
``causal_conv1d`` package imports, else a PyTorch fallback (roll + sum), and its state update is
the Triton ``selective_state_update`` (state in the model dtype). Then prompts 2K, 8K, 32K at
batch 1 for the SSM model and a ~1.3B attention + SwiGLU model (24 layers, SDPA prefill, SDPA
decode over a static KV cache in the graph), both with eager prefills. Writes JSON (``--out``).

Mamba-2 against mamba_ssm, one command on a GPU machine::

    python benchmarks/generation.py --ssm mamba2 --backends auto,triton --skip attn --out-dir docs/benchmarks

``--count-launches`` (no GPU needed) prints the kernel launches of one decode step of the 48-layer
structure (a narrow model with the same ops) on the CUDA path, counted on CPU under the Triton
interpreter (:func:`ssmkit.inference.launches.count_step_launches`), and exits.

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


PRESETS = {"mamba": "mamba-1.4b", "mamba2": "mamba2-1.3b"}
LABELS = {"mamba": "Mamba 1.4B", "mamba2": "Mamba-2 1.3B"}


def _backend(name: str):
    """``force_backend(name)`` (``auto``: no forcing)."""
    import contextlib

    from ssmkit.ops.dispatch import force_backend

    return contextlib.nullcontext() if name == "auto" else force_backend(name)


def ssmkit_model(kind: str):
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    if kind in PRESETS:
        cfg = ModelConfig.from_name(PRESETS[kind])
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


def peer_paths(ssm: str) -> dict:
    """What the peer's decode step runs: its version, and for Mamba-2 the conv step
    (``causal_conv1d_update`` or its PyTorch fallback) and the state update."""
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    out = {"mamba_ssm": version("mamba-ssm") or version("mamba_ssm"),
           "causal_conv1d": version("causal-conv1d") or version("causal_conv1d")}
    if ssm == "mamba2":
        import mamba_ssm.modules.mamba2 as m2

        out["conv_step"] = ("causal_conv1d_update" if getattr(m2, "causal_conv1d_update", None) is not None
                            else "PyTorch fallback (roll + sum)")
        out["conv_prefill"] = ("causal_conv1d_fn" if getattr(m2, "causal_conv1d_fn", None) is not None
                               else "nn.Conv1d")
        out["ssm_step"] = ("selective_state_update (Triton), state in the model dtype"
                           if getattr(m2, "selective_state_update", None) is not None
                           else "PyTorch einsum, state in the model dtype")
    return out


def bench_mamba_ssm(batch, prompt, reps, ssm="mamba"):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    if ssm == "mamba2":  # the shapes of ssmkit's mamba2-1.3b preset (d_state 128, headdim 64)
        cfg = MambaConfig(d_model=2048, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=16,
                          ssm_cfg={"layer": "Mamba2", "d_state": 128, "headdim": 64, "expand": 2})
    else:
        cfg = MambaConfig(d_model=2048, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=8)
    m = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 50000, (batch, prompt), device="cuda")

    def run():
        m.generate(input_ids=ids, max_length=prompt + NEW, cg=True, top_k=1,
                   return_dict_in_generate=False, output_scores=False)

    t = _time(run, reps)
    tp = _time(lambda: m.generate(input_ids=ids, max_length=prompt + 1, cg=True, top_k=1,
                                  return_dict_in_generate=False, output_scores=False), reps)
    res = {"seconds": t, "tokens_per_s": batch * NEW / t, "prefill_s": tp,
           "decode_ms_per_token": 1e3 * (t - tp) / (NEW - 1), "ran": peer_paths(ssm)}
    return res


def count_launches(n_layer: int = 48, ssm: str = "mamba") -> dict:
    """Launches of one decode step of a ``n_layer`` Mamba (Mamba-2) LM at batch 1, bf16 (narrow:
    d_model 64, same ops as the 1.4B), on the CUDA path (Triton forms, counted on CPU) and the
    CPU path."""
    from ssmkit.testing import use_triton_interpreter

    use_triton_interpreter()
    from ssmkit.inference import allocate_cache
    from ssmkit.inference.launches import count_step_launches
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    cfg = ModelConfig(d_model=64, n_layer=n_layer, vocab_size=1000,
                      layer_pattern=("2" if ssm == "mamba2" else "M") * n_layer,
                      mamba2_cfg={"d_state": 16, "headdim": 16, "chunk_size": 16})
    m = LanguageModel(cfg).to(torch.bfloat16).eval()
    cache = allocate_cache(m, 1, 8)
    res = {}
    for name, backend in (("cuda_path", "triton"), ("cpu_path", None)):
        count_step_launches(m, cache, backend)  # warm the per-layer caches (A = -exp(A_log))
        c = count_step_launches(m, cache, backend)
        res[name] = {"total": sum(c.values()), "n_layer": n_layer, "by_op": dict(c)}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/gpu_generation[_mamba2]_<card>_<date>.json")
    p.add_argument("--ssm", default="mamba", choices=sorted(PRESETS), help="the SSM model (default mamba)")
    p.add_argument("--backends", default="auto", help="comma list of ssmkit dispatch choices: auto, triton")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--attn-prompts", default="2048,8192,32768")
    p.add_argument("--skip", default="", help="comma list of: peer, attn")
    p.add_argument("--count-launches", action="store_true", help="count decode launches on CPU and exit")
    a = p.parse_args(argv)
    backends = [b for b in a.backends.split(",") if b]
    if not backends or set(backends) - {"auto", "triton"}:
        p.error(f"--backends: expected a comma list of auto, triton; got {a.backends!r}")
    if a.out_dir and not a.out:
        a.out = result_path(a.out_dir, "gpu_generation" + ("" if a.ssm == "mamba" else "_" + a.ssm), "cuda")
    if a.count_launches:
        print(json.dumps(count_launches(ssm=a.ssm), indent=1))
        return 0
    skip = set(filter(None, a.skip.split(",")))
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "new_tokens": NEW, "ssm": a.ssm,
            "preset": PRESETS[a.ssm], "backends": backends}
    print(info, flush=True)
    key = {"mamba": "mamba_1.4b", "mamba2": "mamba2_1.3b"}[a.ssm]
    res = {"info": info, key: [], "attention_vs_mamba": []}
    ssm = ssmkit_model(a.ssm)
    for b in map(int, a.batches.split(",")):
        for backend in backends:
            row = {"batch": b, "prompt": 2048, "backend": backend}
            try:
                with _backend(backend):
                    row["ssmkit"], _ = bench_ssmkit(ssm, b, 2048, a.reps)
                    if b * 2048 <= PREFILL_GRAPH_MAX_TOKENS:  # the same without the captured prefill
                        row["ssmkit_eager_prefill"], _ = bench_ssmkit(ssm, b, 2048, a.reps, prefill_graph=False)
            except Exception as e:  # noqa: BLE001
                row["ssmkit_error"] = repr(e)
            print(row, flush=True)
            res[key].append(row)
    from ssmkit.inference.cuda_graph import clear_graphs

    clear_graphs()
    torch.cuda.empty_cache()
    if "peer" not in skip:
        ssm_cpu = ssm.to("cpu")  # make room for the peer's model
        torch.cuda.empty_cache()
        peer = {}
        for row in res[key]:
            try:
                if row["batch"] not in peer:  # once per batch, shared by the backends' rows
                    peer[row["batch"]] = bench_mamba_ssm(row["batch"], 2048, a.reps, a.ssm)
                    torch.cuda.empty_cache()
                row["mamba_ssm"] = peer[row["batch"]]
                for k in ("", "_eager_prefill"):
                    if "ssmkit" + k in row:
                        row["ratio" + k] = (row["ssmkit" + k]["tokens_per_s"]
                                            / row["mamba_ssm"]["tokens_per_s"])
            except Exception as e:  # noqa: BLE001
                row["mamba_ssm_error"] = repr(e)
                peer.setdefault(row["batch"], None)
            print(row, flush=True)
        ssm = ssm_cpu.to("cuda")
    if "attn" not in skip:
        attn = ssmkit_model("attention")
        info["params"] = {a.ssm: sum(q.numel() for q in ssm.parameters()),
                          "attention": sum(q.numel() for q in attn.parameters())}
        for P in map(int, a.attn_prompts.split(",")):
            row = {"batch": 1, "prompt": P}
            for name, m in ((a.ssm, ssm), ("attention", attn)):
                try:  # both with an eager prefill: the like-for-like comparison
                    row[name], _ = bench_ssmkit(m, 1, P, max(1, a.reps - 1), prefill_graph=False)
                except Exception as e:  # noqa: BLE001
                    row[name + "_error"] = repr(e)
                clear_graphs()
                torch.cuda.empty_cache()
            if a.ssm in row and "attention" in row:
                row[f"{a.ssm}_over_attention"] = row[a.ssm]["tokens_per_s"] / row["attention"]["tokens_per_s"]
            print(row, flush=True)
            res["attention_vs_mamba"].append(row)
    print("\n| model | backend | batch | prompt | ssmkit tok/s | mamba_ssm tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in res[key]:
        m = (r.get("mamba_ssm") or {}).get("tokens_per_s", float("nan"))
        for k, note in (("ssmkit", ""), ("ssmkit_eager_prefill", " (eager prefill)")):
            if k in r or k == "ssmkit":
                s = r.get(k, {}).get("tokens_per_s", float("nan"))
                print(f"| {LABELS[a.ssm]}{note} | {r['backend']} | {r['batch']} | 2048 | {s:.0f} | {m:.0f} "
                      f"| {s / m:.2f} |")
    ran = next((r["mamba_ssm"]["ran"] for r in res[key] if r.get("mamba_ssm")), None)
    if ran:
        print(f"\nmamba_ssm ran: {ran}")
    print(f"\n| prompt | ssmkit {LABELS[a.ssm]} tok/s | ssmkit attention tok/s | SSM / attention |")
    print("|---|---|---|---|")
    for r in res["attention_vs_mamba"]:
        s = r.get(a.ssm, {}).get("tokens_per_s", float("nan"))
        t = r.get("attention", {}).get("tokens_per_s", float("nan"))
        print(f"| {r['prompt']} | {s:.0f} | {t:.0f} | {s / t:.2f} |")
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
