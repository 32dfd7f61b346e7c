"""CPU benchmark: 24 stacked Mamba-2 mixers of the 130M shape, ssmkit vs Hugging Face, same weights.

Shape (mamba2-130m): d_model 768, expand 2 -> 24 heads x 64, d_state 128, one group, conv 4,
chunk 256. Measured in one run, on the same machine and weights:

* forward of batch 1 x ``--seqlen`` tokens through the stack: ssmkit ``Mamba2`` vs HF
  ``Mamba2Mixer`` (its torch path, ``n_groups=1``), best of ``--repeats`` / ``--hf-repeats`` runs,
  outputs checked to agree; plus the time of the stack's ``in_proj``/``out_proj`` matmuls alone
  (a floor no implementation can beat in float32);
* decoding tokens/s at batch 1: ssmkit ``step`` (state update per token, no recompute) vs HF
  mixers with a ``DynamicCache`` (best of two rounds), with 1 and with 2 torch threads (``--threads``).

Writes JSON and a markdown table (``--out``, default ``docs/benchmarks/cpu_mamba2.{json,md}``).
Run:  flock /tmp/bench.lock python benchmarks/cpu_mamba2.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ssmkit.bench.results import cpu_name


def machine() -> dict:
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg_at_start": os.getloadavg()}


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--hf-decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many forwards (ssmkit)")
    ap.add_argument("--hf-repeats", type=int, default=2, help="best of this many forwards (HF)")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face peer")
    ap.add_argument("--out", default="docs/benchmarks/cpu_mamba2")
    args = ap.parse_args()

    from ssmkit.layers import Mamba2
    from ssmkit.testing import rel_err

    torch.manual_seed(0)
    d_model, d_state, headdim, chunk = 768, 128, 64, 256
    ours = [Mamba2(d_model, d_state=d_state, headdim=headdim, ngroups=1, chunk_size=chunk, layer_idx=i).eval()
            for i in range(args.layers)]
    x = torch.randn(1, args.seqlen, d_model)
    info = {"machine": machine(), "layers": args.layers, "seqlen": args.seqlen, "batch": 1,
            "shape": {"d_model": d_model, "nheads": 24, "headdim": headdim, "d_state": d_state, "ngroups": 1,
                      "chunk_size": chunk}}
    hf = None
    if not args.no_hf:
        import transformers
        from transformers import Mamba2Config
        from transformers.cache_utils import DynamicCache
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

        cfg = Mamba2Config(hidden_size=d_model, num_heads=24, head_dim=headdim, state_size=d_state, n_groups=1,
                           expand=2, conv_kernel=4, chunk_size=chunk, num_hidden_layers=args.layers, vocab_size=16,
                           layer_norm_epsilon=1e-5)
        hf = []
        for i, m in enumerate(ours):
            mixer = Mamba2Mixer(cfg, layer_idx=i).eval()
            mixer.load_state_dict(m.state_dict())
            hf.append(mixer)
        info["hf"] = {"transformers": transformers.__version__}

    def stack(layers, h):
        for m in layers:
            h = m(h)
        return h

    def matmuls_only():
        for m in ours:
            m.out_proj(m.in_proj(x)[..., : m.d_inner])

    info["ssmkit"] = {"forward_s": {}, "matmul_floor_s": {}, "decode_tokens_per_s": {}}
    if hf is not None:
        info["hf"].update(forward_s={}, decode_tokens_per_s={})
    threads0 = torch.get_num_threads()
    with torch.inference_mode():
        for th in args.threads:
            torch.set_num_threads(th)
            stack(ours, x)  # warm-up
            t_ours = best_of(lambda: stack(ours, x), args.repeats)
            t_floor = best_of(matmuls_only, args.repeats)
            y_ours = stack(ours, x)
            info["ssmkit"]["forward_s"][th] = t_ours
            info["ssmkit"]["matmul_floor_s"][th] = t_floor
            print(f"{th} thread(s): ssmkit forward {args.layers} layers x {args.seqlen} tokens: {t_ours:.3f} s "
                  f"(in_proj + out_proj matmuls alone: {t_floor:.3f} s)")
            if hf is not None:
                y_hf = stack(hf, x)
                err = rel_err(y_hf, y_ours)
                t_hf = best_of(lambda: stack(hf, x), args.hf_repeats)
                info["hf"]["forward_s"][th] = t_hf
                info["hf"]["output_rel_diff"] = err
                print(f"{th} thread(s): HF Mamba2Mixer forward: {t_hf:.3f} s (rel. difference of outputs "
                      f"{err:.2e}); speed-up {t_hf / t_ours:.1f}x")

        # decoding: prefill a 16-token prompt, then one token at a time
        prompt = x[:, :16]
        states = [m.allocate_state(1) for m in ours]
        h = prompt
        for m, s in zip(ours, states):
            h, s_new = m(h, return_state=True)
            s.copy_(s_new)
        toks = torch.randn(max(args.decode_tokens, args.hf_decode_tokens) + 4, 1, d_model)
        if hf is not None:
            cache = DynamicCache(config=cfg)
            stack([lambda v, m=m: m(v, cache=cache) for m in hf], prompt)  # noqa: B023

        def decode_ours(n):
            for t in range(n):
                v = toks[t]
                for m, s in zip(ours, states):
                    v = m.step(v, s)

        def decode_hf(n):
            for t in range(n):
                v = toks[t][:, None]
                for m in hf:
                    v = m(v, cache=cache)

        for th in args.threads:
            torch.set_num_threads(th)
            decode_ours(4)
            tps = args.decode_tokens / best_of(lambda: decode_ours(args.decode_tokens), 2)
            info["ssmkit"]["decode_tokens_per_s"][th] = tps
            line = f"decode, {th} thread(s): ssmkit {tps:.1f} tokens/s"
            if hf is not None:
                decode_hf(2)
                tps_hf = args.hf_decode_tokens / best_of(lambda: decode_hf(args.hf_decode_tokens), 2)
                info["hf"]["decode_tokens_per_s"][th] = tps_hf
                line += f", HF {tps_hf:.1f} tokens/s ({tps / tps_hf:.1f}x)"
            print(line)
        torch.set_num_threads(threads0)

    info["machine"]["load_avg_at_end"] = os.getloadavg()
    with open(args.out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    m_ = info["machine"]
    with open(args.out + ".md", "w") as f:
        f.write(f"# {args.layers} Mamba-2 mixers (130M shape), batch 1, CPU\n\n")
        f.write(f"Machine: {m_['cpu']} ({m_['logical_cpus']} logical CPUs, shared), torch {torch.__version__}, "
                f"load average {m_['load_avg_at_start'][0]:.1f} "
                f"at start, {m_['load_avg_at_end'][0]:.1f} at end. Command: "
                f"`flock /tmp/bench.lock python benchmarks/cpu_mamba2.py`.\n\n")
        f.write("| | threads | ssmkit `Mamba2` | HF `Mamba2Mixer` (torch path) | speed-up |\n|---|---|---|---|---|\n")
        hf_i = info.get("hf", {})
        for th, t in info["ssmkit"]["forward_s"].items():
            t_hf = hf_i.get("forward_s", {}).get(th)
            f.write(f"| forward, 1 x {args.seqlen} tokens | {th} | {t:.2f} s | "
                    + (f"{t_hf:.2f} s | {t_hf / t:.1f}x |\n" if t_hf else "- | - |\n"))
        for th, tps in info["ssmkit"]["decode_tokens_per_s"].items():
            tps_hf = hf_i.get("decode_tokens_per_s", {}).get(th)
            f.write(f"| decoding (tokens/s) | {th} | {tps:.1f} | "
                    + (f"{tps_hf:.1f} | {tps / tps_hf:.1f}x |\n" if tps_hf else "- | - |\n"))
        floors = ", ".join(f"{v:.2f} s ({k} thread(s))" for k, v in info["ssmkit"]["matmul_floor_s"].items())
        f.write(f"\nThe stack's in_proj + out_proj matmuls alone take {floors} of the forward.")
        if "output_rel_diff" in hf_i:
            f.write(f" Outputs agree to a relative difference of {hf_i['output_rel_diff']:.1e} (float32).")
        f.write("\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
