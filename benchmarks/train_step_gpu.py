"""One language-model training step on the GPU: ssmkit vs ``mamba_ssm.MambaLMHeadModel`` in the
same run, tokens/s and peak memory.

Mamba 130M shape (d_model 768, 24 layers, vocab 50,280), random weights, float32 parameters with
bfloat16 autocast, AdamW, batch 8 x 2048 tokens: median step time of ``--steps`` timed steps after
``--warmup`` steps, and ``torch.cuda.max_memory_allocated`` over them. ssmkit variants:

* ``default``: the model's default saved-state budget (``LanguageModel.set_scan_state_budget``)
  and the loss without logits (``return_logits=False``: chunked cross entropy);
* ``per-call-logits``: the scan bounded per call only and every position's float32 logits (the
  behaviour before the model-level budget);
* ``compiled``: the default under ``torch.compile(model, fullgraph=True)``;
* ``mamba2``: the Mamba-2 130M shape (24 layers, d_model 768, N 128, headdim 64) with the
  defaults, for the Mamba-2 against Mamba-1 comparison on the same card.

Each variant runs in a process of its own (``--variants`` picks them), so that one's memory and
compiled code do not affect the next.

    pip install mamba-ssm --no-build-isolation      # the peer (optional: --no-peer)
    python benchmarks/train_step_gpu.py --out-dir results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _results import write_json  # noqa: E402


def _step_fn(model, opt, ids, loss_fn):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _measure(step, warmup, steps, tokens):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"step_ms": t * 1e3, "tokens_per_s": tokens / t,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def ssmkit_variant(name, ids, args):
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    torch.manual_seed(0)
    preset = "mamba2-130m" if name == "mamba2" else "mamba-130m"
    model = LanguageModel(ModelConfig.from_name(preset)).cuda()
    if name == "per-call-logits":
        if hasattr(model, "set_scan_state_budget"):
            model.set_scan_state_budget(None)

        def loss_fn(m, x):
            return m(x, labels=x).loss
    else:
        def loss_fn(m, x):
            return m(x, labels=x, return_logits=False).loss
    run = torch.compile(model, fullgraph=True) if name == "compiled" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return _measure(_step_fn(run, opt, ids, loss_fn), args.warmup, args.steps, ids.numel())


def mamba_ssm_variant(ids, args):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=768, n_layer=24, vocab_size=50277, ssm_cfg={"layer": "Mamba1"},
                      rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(cfg, device="cuda")

    def loss_fn(m, x):
        logits = m(x).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return _measure(_step_fn(model, opt, ids, loss_fn), args.warmup, args.steps, ids.numel())


VARIANTS = ("default", "per-call-logits", "compiled", "mamba2")


def _one(name: str, a) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, 50277, (a.batch, a.seqlen), device="cuda")
    if name == "mamba_ssm":
        return mamba_ssm_variant(ids, a)
    return ssmkit_variant(name, ids, a)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="ssmkit variants, comma-separated (default: all; each in a process of its own)")
    p.add_argument("--no-peer", action="store_true", help="leave mamba_ssm out")
    p.add_argument("--out-dir", default=".", help="where train_step_gpu.json goes (default .)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # (a variant, in this process)
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(_one(a.one, a)), flush=True)
        return 0
    os.makedirs(a.out_dir, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "torch": torch.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "shape": f"mamba-130m (mamba2-130m for the mamba2 variant), batch {a.batch} x {a.seqlen}, bf16 autocast, AdamW"}
    print(info, flush=True)
    names = ([] if a.no_peer else ["mamba_ssm"]) + [n.strip() for n in a.variants.split(",") if n.strip()]
    rows = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--batch", str(a.batch),
               "--seqlen", str(a.seqlen), "--warmup", str(a.warmup), "--steps", str(a.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        res = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if res:
            rows[name if name == "mamba_ssm" else f"ssmkit {name}"] = json.loads(res[-1][7:])
        else:
            print(name, "failed:", "\n".join(out.stderr.strip().splitlines()[-6:]) or out.returncode,
                  flush=True)
        print(name, rows.get(name if name == "mamba_ssm" else f"ssmkit {name}"), flush=True)
    print("\n| variant | step ms | tokens/s | peak GiB |\n|---|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['step_ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f}k | {r['peak_gib']:.1f} |")
    write_json(os.path.join(a.out_dir, "train_step_gpu.json"), {"info": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
