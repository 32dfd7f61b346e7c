"""CPU benchmark: a 130M-shaped Mamba LM (d_model 768, 24 layers, d_inner 1536, N 16, vocab 50280)
with ssmkit's Mamba layer vs Hugging Face ``MambaForCausalLM`` (its pure-PyTorch slow path), the
same random weights in both, measured in the same run.

* forward: batch 1, ``--seqlen`` tokens (1024), logits of both compared;
* decoding: batch 1, tokens/s of greedy decoding after a short prompt (ssmkit: ``Mamba.step``;
  Hugging Face: ``generate`` with its cache), and the generated tokens compared.

Run:  flock /tmp/bench.lock python benchmarks/cpu_mamba.py
Writes docs/benchmarks/cpu_mamba.json and docs/benchmarks/cpu_mamba.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from ssmkit.bench.results import cpu_name
from ssmkit.layers.mamba import Mamba
from ssmkit.layers.norm import RMSNorm
from ssmkit.testing import rel_err

ROOT = Path(__file__).resolve().parents[1]




class Block(nn.Module):
    def __init__(self, d_model: int, layer_idx: int, **kw):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=1e-5)
        self.mixer = Mamba(d_model, layer_idx=layer_idx, **kw)


class PlainMambaLM(nn.Module):
    """Embedding, n x (x + Mamba(RMSNorm(x))), final RMSNorm, tied head (the Mamba LM layout)."""

    def __init__(self, vocab: int, d_model: int, n_layer: int, d_state: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(Block(d_model, i, d_state=d_state) for i in range(n_layer))
        self.norm_f = RMSNorm(d_model, eps=1e-5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        for blk in self.layers:
            h = h + blk.mixer(blk.norm(h))
        return self.norm_f(h) @ self.embedding.weight.t()

    def prefill(self, ids: torch.Tensor):
        h = self.embedding(ids)
        states = []
        for blk in self.layers:
            y, s = blk.mixer(blk.norm(h), return_state=True)
            h = h + y
            states.append(s)
        return self.norm_f(h[:, -1]) @ self.embedding.weight.t(), states

    def step(self, tok: torch.Tensor, states) -> torch.Tensor:
        h = self.embedding(tok)
        for blk, s in zip(self.layers, states):
            h = h + blk.mixer.step(blk.norm(h), s)
        return self.norm_f(h) @ self.embedding.weight.t()


def copy_from_hf(ours: PlainMambaLM, hf) -> None:
    sd = hf.state_dict()
    mapped = {"embedding.weight": sd["backbone.embeddings.weight"], "norm_f.weight": sd["backbone.norm_f.weight"]}
    for k, v in sd.items():
        if k.startswith("backbone.layers."):
            mapped[k[len("backbone."):]] = v
    ours.load_state_dict(mapped, strict=True)


def timeit(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50280)
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats of the ssmkit forward")
    ap.add_argument("--hf-repeat", type=int, default=1, help="timed repeats of the HF forward")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's choice, one per core)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "cpu_mamba"))
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores, torch threads {machine['torch_threads']}), "
          f"torch {torch.__version__}, load {machine['loadavg_start']}")

    ours = PlainMambaLM(args.vocab, args.d_model, args.layers).eval()
    hf = None
    if not args.skip_hf:
        from transformers import MambaConfig, MambaForCausalLM

        cfg = MambaConfig(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
                          state_size=16, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                          tie_word_embeddings=True, residual_in_fp32=True, layer_norm_epsilon=1e-5,
                          use_mambapy=False)
        hf = MambaForCausalLM(cfg).eval()
        copy_from_hf(ours, hf)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model: {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, {n_params / 1e6:.1f}M params")

    ids = torch.randint(0, args.vocab, (1, args.seqlen))
    res: dict = {"machine": machine, "config": vars(args), "params": n_params}
    with torch.inference_mode():
        ours(ids[:, :64])  # warm-up (allocator, thread pool)
        t_ours = timeit(lambda: ours(ids), args.repeat)
        logits = ours(ids)
        res["ssmkit_forward_s"] = t_ours
        print(f"ssmkit forward: {min(t_ours):.3f} s (runs {[round(t, 3) for t in t_ours]})")
        if hf is not None:
            hf(ids[:, :64])
            t_hf = timeit(lambda: hf(ids), args.hf_repeat)
            hf_logits = hf(ids).logits
            err = rel_err(hf_logits, logits)
            res["hf_forward_s"] = t_hf
            res["logits_rel_err"] = err
            print(f"HF slow-path forward: {min(t_hf):.3f} s; speed-up {min(t_hf) / min(t_ours):.2f}x; "
                  f"logits rel. error {err:.2e}")

        # --- decoding, batch 1 -------------------------------------------------------------------
        prompt = ids[:, :8]
        n = args.decode_tokens

        def ours_decode():
            last, states = ours.prefill(prompt)
            toks = []
            tok = last.argmax(-1)
            t0 = time.perf_counter()
            for _ in range(n):
                toks.append(tok)
                tok = ours.step(tok, states).argmax(-1)
            return time.perf_counter() - t0, torch.stack(toks, 1)

        ours_decode()
        runs = [ours_decode() for _ in range(2)]
        t_dec = min(r[0] for r in runs)
        ours_toks = runs[0][1]
        res["ssmkit_decode_tok_s"] = n / t_dec
        print(f"ssmkit decode: {n / t_dec:.1f} tokens/s ({n} tokens)")
        if hf is not None:
            def hf_gen(k):
                t0 = time.perf_counter()
                out = hf.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False)
                return time.perf_counter() - t0, out

            hf_gen(4)
            t1, _ = hf_gen(1)
            tn, out = hf_gen(n + 1)
            hf_rate = n / max(tn - t1, 1e-9)  # the difference removes prompt processing
            res["hf_decode_tok_s"] = hf_rate
            agree = (out[0, prompt.shape[1] : prompt.shape[1] + n] == ours_toks[0]).float().mean().item()
            res["decode_token_agreement"] = agree
            print(f"HF decode: {hf_rate:.1f} tokens/s; greedy tokens agree {agree * 100:.0f}%")
    machine["loadavg_end"] = os.getloadavg()

    rows = [(f"forward, batch 1, {args.seqlen} tokens (s)", f"{min(t_ours):.2f}",
             f"{min(res['hf_forward_s']):.2f}" if hf is not None else "-",
             f"{min(res['hf_forward_s']) / min(t_ours):.1f}x" if hf is not None else "-"),
            ("decode, batch 1 (tokens/s)", f"{res['ssmkit_decode_tok_s']:.1f}",
             f"{res['hf_decode_tok_s']:.1f}" if hf is not None else "-",
             f"{res['ssmkit_decode_tok_s'] / res['hf_decode_tok_s']:.1f}x" if hf is not None else "-")]
    md = [f"CPU: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
          f"torch {torch.__version__}, float32; "
          f"130M-shaped Mamba ({args.layers} layers, d_model {args.d_model}, vocab {args.vocab}), "
          "random weights shared by both.", "",
          "| measurement | ssmkit (`chunked`) | HF `MambaForCausalLM` (slow path) | ssmkit vs HF |",
          "|---|---|---|---|"]
    md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if hf is not None:
        md += ["", f"Logits agree to a relative error of {res['logits_rel_err']:.1e}; greedy decoding "
               f"agrees on {res['decode_token_agreement'] * 100:.0f}% of {n} tokens."]
    table = "\n".join(md)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
