"""CPU decoding: llama.cpp (through llama-cpp-python) on a GGUF exported by ssmkit, next to ssmkit's
own greedy decoding of the same model, measured in the same run.

:func:`llama_cpp_decode` times llama.cpp's greedy decoding of one GGUF file at batch 1.

``main()``: a 130M-shaped Mamba (``ModelConfig.from_name("mamba-130m")``: 24 layers, d_model 768,
vocabulary 50280; random weights) exported to GGUF as f32, bf16 and q8_0 (``save_gguf``), then for
1 and 2 threads: llama.cpp's decode tokens/s of each file and ssmkit's (``ssmkit.generate``, greedy,
float32, ``torch.set_num_threads``), interleaved, the median of ``--repeat`` runs each. Decode speed
is the rate after the first new token (prompt processing left out): (n_new - 1) / (time of the last
token - time of the first). Greedy picks the argmax over the tokenizer's ids in both (ssmkit never
samples the embedding's padding rows).

Run:  flock /tmp/bench.lock python benchmarks/_llama_cpp.py
Needs: pip install gguf llama-cpp-python (built from source: pip install llama-cpp-python --no-binary :all:).
Writes docs/benchmarks/cpu_llama_cpp.json and docs/benchmarks/cpu_llama_cpp.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import cpu_name, write_json  # noqa: E402


@functools.lru_cache(maxsize=8)
def _load(gguf_path: str, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, verbose=False)


def llama_cpp_decode(gguf_path, prompt_ids, n_new: int, threads: int, *, vocab: int | None = None) -> dict:
    """llama.cpp's greedy decoding of ``n_new`` tokens after ``prompt_ids`` (batch 1) with ``threads``
    threads -> ``{"tokens_per_s", "tokens", "prompt_s"}``.

    ``tokens_per_s``: (n_new - 1) / (time of the last new token - time of the first), i.e. decoding
    only. ``vocab``: greedy over ids below it (default: all of llama.cpp's vocabulary). The model is
    loaded once per file and kept (loading is not timed); its recurrent state is cleared per call.
    """
    import llama_cpp

    prompt = [int(t) for t in prompt_ids]
    if not prompt or n_new < 2:
        raise ValueError("llama_cpp_decode needs a non-empty prompt and n_new >= 2")
    llm = _load(str(gguf_path), 1 << max(6, (len(prompt) + n_new).bit_length()))
    llama_cpp.llama_set_n_threads(llm.ctx, threads, threads)
    n_vocab = llm.n_vocab()
    vocab = vocab or n_vocab

    def argmax() -> int:
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(row[:vocab]))

    llm.reset()  # the next eval removes the sequence: a fresh recurrent state
    t0 = time.perf_counter()
    llm.eval(prompt)
    tokens = [argmax()]
    t_first = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tokens[-1]])
        tokens.append(argmax())
    t_last = time.perf_counter()
    return {"tokens_per_s": (n_new - 1) / (t_last - t_first), "tokens": tokens, "prompt_s": t_first - t0}


def ssmkit_decode(model, prompt_ids, n_new: int, threads: int, compiled: bool = False) -> dict:
    """ssmkit.generate's greedy decoding with ``threads`` torch threads (restored after), timed like
    :func:`llama_cpp_decode`; ``compiled``: with the compiled CPU decode kernels
    (:func:`ssmkit.ops.cpu_compile.set_cpu_compile`)."""
    import torch

    import ssmkit
    from ssmkit.ops.cpu_compile import set_cpu_compile

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    set_cpu_compile(compiled)
    stamps: list[float] = []
    try:
        t0 = time.perf_counter()
        out = ssmkit.generate(model, torch.tensor([list(prompt_ids)]), max_new_tokens=n_new,
                              streamer=lambda tok: stamps.append(time.perf_counter()))
    finally:
        torch.set_num_threads(before)
        set_cpu_compile(None)
    return {"tokens_per_s": (n_new - 1) / (stamps[-1] - stamps[0]),
            "tokens": out[0, len(prompt_ids):].tolist(), "prompt_s": stamps[0] - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mamba-130m", help="ModelConfig preset (pure Mamba or Mamba-2)")
    ap.add_argument("--dtypes", default="f32,bf16,q8_0", help="GGUF weight types to measure")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length (random ids)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--init", choices=["varied", "default"], default="varied",
                    help="varied: a unit-scale embedding and random final-norm gains, so the logits are far apart "
                         "and the greedy tokens vary (their agreement then means something); default: the "
                         "model's own initialisation, whose tied head repeats the last token. Speed is the same")
    ap.add_argument("--compiled", action="store_true",
                    help="also ssmkit with its compiled CPU decode kernels, in each GGUF type's weight format")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "cpu_llama_cpp"))
    args = ap.parse_args(argv)

    import llama_cpp
    import torch

    import ssmkit
    from ssmkit.models.checkpoint import atomic_write_text
    from ssmkit.models.formats.gguf import save_gguf

    threads = [int(t) for t in args.threads.split(",")]
    dtypes = args.dtypes.split(",")
    torch.manual_seed(0)
    config = ssmkit.ModelConfig.from_name(args.preset)
    model = ssmkit.LanguageModel(config).eval()
    if args.init == "varied":
        with torch.no_grad():
            model.backbone.embedding.weight.normal_(0.0, 1.0)
            model.backbone.norm_f.weight.normal_(0.0, 1.0)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version(),
               "loadavg_start": os.getloadavg(), "date": datetime.date.today().isoformat(),
               "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip()}
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores), {machine['date']}, torch {torch.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}, load {machine['loadavg_start']}")
    print(f"model: {args.preset}, {config.describe()}, {model.num_parameters() / 1e6:.1f}M parameters, random weights")
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for dt in dtypes:
            files[dt] = save_gguf(model, Path(tmp) / f"{args.preset}-{dt}.gguf", dtype=dt)
            print(f"exported {files[dt].name}: {files[dt].stat().st_size / 2**20:.0f} MiB")
        runs: dict[str, list[dict]] = {}
        # ssmkit in each GGUF type's weight format: eager float32, and compiled (SSMKIT_CPU_COMPILE)
        # float32, bfloat16 and int8 weights (per-channel scales, as q8_0 has per block)
        ours = {"ssmkit f32": (model, False)}
        if args.compiled:
            fmt = {"f32": "f32", "bf16": "bf16", "q8_0": "int8"}
            for dt in dtypes:
                m = copy.deepcopy(model)
                m = m.to(torch.bfloat16) if dt == "bf16" else ssmkit.models.quantize(m, "int8") if dt == "q8_0" else m
                ours[f"ssmkit {fmt[dt]} compiled"] = (m, True)
        names = list(ours) + [f"llama.cpp {dt}" for dt in dtypes]
        for th in threads:  # warm-up: thread pools, page cache, allocator, compiled kernels
            for m, comp in ours.values():
                ssmkit_decode(m, prompt, 4, th, comp)
            for dt in dtypes:
                llama_cpp_decode(files[dt], prompt, 4, th, vocab=config.vocab_size)
        for rep in range(args.repeat):
            for th in threads:
                for name in names:
                    if name in ours:
                        r = ssmkit_decode(*ours[name][:1], prompt, args.new, th, ours[name][1])
                    else:
                        r = llama_cpp_decode(files[name.split()[1]], prompt, args.new, th, vocab=config.vocab_size)
                    runs.setdefault(f"{name}, {th} thread{'s' * (th > 1)}", []).append(r)
                    print(f"  run {rep + 1}: {name:16s} {th} thread(s): {r['tokens_per_s']:7.1f} tokens/s")
    machine["loadavg_end"] = os.getloadavg()

    res = {"machine": machine, "config": vars(args), "model": config.to_dict(), "prompt": prompt, "results": {}}
    rows = []
    for key, rs in runs.items():
        med = statistics.median(r["tokens_per_s"] for r in rs)
        res["results"][key] = {"tokens_per_s_median": med, "tokens_per_s": [r["tokens_per_s"] for r in rs],
                               "tokens": rs[0]["tokens"], "distinct_tokens": len(set(rs[0]["tokens"]))}
    for th in threads:
        suffix = f", {th} thread{'s' * (th > 1)}"
        base = res["results"]["ssmkit f32" + suffix]
        for name in names:
            r = res["results"][name + suffix]
            agree = np.mean(np.array(r["tokens"]) == np.array(base["tokens"]))
            r["greedy_agreement_with_ssmkit"] = float(agree)
            rows.append((th, name, r["tokens_per_s_median"], r["tokens_per_s_median"] / base["tokens_per_s_median"],
                         agree))
    write_json(args.out + ".json", res)
    md = [f"CPU: {machine['cpu']}, {machine['cores']} cores; torch {torch.__version__}, llama-cpp-python "
          f"{llama_cpp.__version__} (llama.cpp built from source on this machine). Model: "
          f"`{args.preset}` ({config.describe()}, {model.num_parameters() / 1e6:.0f}M parameters, random "
          f"weights, {args.init} initialisation), batch 1, {args.prompt}-token prompt, {args.new} new tokens, greedy; decoding rate "
          f"after the first new token, median of {args.repeat} interleaved runs. The machine is shared: "
          f"runs with as many threads as cores compete with other work (every run is in the JSON).",
          "", "| threads | decoder | tokens/s | vs ssmkit | greedy tokens equal to ssmkit's |", "|---|---|---|---|---|"]
    md += [f"| {th} | {name} | {tps:.1f} | {rel:.2f}x | {agree * 100:.0f}% |" for th, name, tps, rel, agree in rows]
    distinct = res["results"][f"ssmkit f32, {threads[0]} thread{'s' * (threads[0] > 1)}"]["distinct_tokens"]
    md += ["", f"ssmkit's greedy continuation holds {distinct} distinct tokens of {args.new}."]
    busy = machine["loadavg_start"][0]  # (the end value counts this run's own threads)
    if max(threads) > 1 and busy + max(threads) > (machine["cores"] or 1) + 1.5:
        md += [f"Other work kept the load average at {busy:.1f} on {machine['cores']} cores: the rows with "
               f"{max(threads)} threads measure that contention (llama.cpp's threads wait by spinning) more than "
               "the decoders; the 1-thread rows are the comparison."]
    cmd = " ".join(["flock /tmp/bench.lock python benchmarks/_llama_cpp.py", *(sys.argv[1:] if argv is None else argv)])
    md += ["", f"Measured {machine['date']} with `{cmd}`; load average {machine['loadavg_start'][0]:.2f} at the "
           f"start, {machine['loadavg_end'][0]:.2f} at the end."]
    atomic_write_text(args.out + ".md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
