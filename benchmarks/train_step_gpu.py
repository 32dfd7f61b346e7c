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
  defaults, for the Mamba-2 against Mamba-1 comparison on the same card;
* ``mamba2-triton``: the same with the Triton SSD (``ssd(..., backend="triton")``) chosen for
  "auto" in that process;
* ``gated-deltanet``: the ``gated-deltanet-130m`` preset (24 Gated DeltaNet layers, d_model 768,
  6 heads, keys of 128, values of 192, no MLP) with the Triton delta rule (chosen for "auto" in
  that process) and the defaults otherwise. Its peer, ``fla``, is the same-shaped LM built from
  flash-linear-attention's ``fla.layers.GatedDeltaNet``: embedding, 24 x (RMSNorm, the layer, the
  residual add), final RMSNorm, tied LM head, float32 logits and cross entropy (as the mamba_ssm
  row). fla autotunes its kernels on the first call (minutes): that process has a time limit
  (``--peer-timeout``) and keeps Triton's autotuning results in ``--triton-cache``, so a second
  run starts at once; where fla refuses (its gated backward on Hopper with Triton < 3.7.1), the
  row says so.

Each variant runs in a process of its own (``--variants`` picks them), so that one's memory and
compiled code do not affect the next. Peers (``--no-peer`` leaves them out): mamba_ssm's Mamba-1
LM with the Mamba-1 variants, its Mamba-2 LM (``mamba_ssm-mamba2``: ``MambaLMHeadModel`` with
``Mamba2`` layers, chunk 256; its fused training path where ``causal_conv1d`` is installed, else
its unfused path with a PyTorch ``Conv1d``, as the row says) with the Mamba-2 variants, fla with
``gated-deltanet``.

    pip install mamba-ssm --no-build-isolation      # the peers (optional)
    pip install flash-linear-attention
    python benchmarks/train_step_gpu.py --out-dir results/
    python benchmarks/train_step_gpu.py --variants gated-deltanet --out-dir results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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
    preset = {"mamba2": "mamba2-130m", "mamba2-triton": "mamba2-130m",
              "gated-deltanet": "gated-deltanet-130m"}.get(name, "mamba-130m")
    if name == "mamba2-triton":
        from ssmkit.ops import dispatch
        from ssmkit.ops.ssd import triton as _ssd_triton  # noqa: F401  (registers the Triton form)

        dispatch.register("ssd", "triton")(dispatch.get("ssd", "triton"))
    if name == "gated-deltanet":  # "auto" picks the Triton delta rule (forward, backward, decode)
        from ssmkit.ops import dispatch
        from ssmkit.ops.delta_rule import delta_rule  # noqa: F401  (registers its forms)

        for op in ("delta_rule", "delta_rule_step"):
            dispatch.register(op, "triton")(dispatch.get(op, "triton"))
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


def mamba_ssm_variant(ids, args, layer="Mamba1"):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    ssm_cfg = {"layer": layer}
    path = None
    if layer == "Mamba2":  # the fused training path needs the causal_conv1d package
        try:
            import causal_conv1d  # noqa: F401
            path = "fused path (causal_conv1d)"
        except ImportError:
            ssm_cfg["use_mem_eff_path"] = False
            path = "unfused path, PyTorch Conv1d (no causal_conv1d)"
    cfg = MambaConfig(d_model=768, n_layer=24, vocab_size=50277, ssm_cfg=ssm_cfg,
                      rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(cfg, device="cuda")

    def loss_fn(m, x):
        logits = m(x).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    res = _measure(_step_fn(model, opt, ids, loss_fn), args.warmup, args.steps, ids.numel())
    return {**res, "path": path} if path else res


class FlaGatedDeltaNetLM(torch.nn.Module):
    """The ``gated-deltanet-130m`` shape from fla's layer: embedding, ``n_layer`` x (RMSNorm, fla
    ``GatedDeltaNet``, residual add), final RMSNorm, LM head tied to the embedding."""

    def __init__(self, vocab: int = 50288, d_model: int = 768, n_layer: int = 24):
        super().__init__()
        from fla.layers import GatedDeltaNet
        try:
            from fla.modules import RMSNorm
        except ImportError:
            RMSNorm = torch.nn.RMSNorm  # noqa: N806

        self.embedding = torch.nn.Embedding(vocab, d_model)
        self.norms = torch.nn.ModuleList(RMSNorm(d_model, eps=1e-5) for _ in range(n_layer))
        self.mixers = torch.nn.ModuleList(
            GatedDeltaNet(hidden_size=d_model, expand_v=1.5, head_dim=128, num_heads=6, mode="chunk",
                          use_gate=True, use_short_conv=True, conv_size=4, layer_idx=i, norm_eps=1e-5)
            for i in range(n_layer))
        self.norm_f = RMSNorm(d_model, eps=1e-5)
        self.lm_head = torch.nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, ids):
        h = self.embedding(ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))[0]
        return self.lm_head(self.norm_f(h))


def fla_variant(ids, args):
    torch.manual_seed(0)
    model = FlaGatedDeltaNetLM().cuda()

    def loss_fn(m, x):
        logits = m(x)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return _measure(_step_fn(model, opt, ids, loss_fn), args.warmup, args.steps, ids.numel())


VARIANTS = ("default", "per-call-logits", "compiled", "mamba2", "mamba2-triton", "gated-deltanet")
MAMBA1 = ("default", "per-call-logits", "compiled")


def _one(name: str, a) -> dict:
    if name == "fla":
        try:
            import fla  # noqa: F401
        except ImportError as e:
            return {"refused": f"fla is not installed ({e}): pip install flash-linear-attention"}
        except Exception as e:  # noqa: BLE001  (fla checks its setup on import)
            return {"refused": f"{type(e).__name__} on importing fla: {str(e).strip()[:300]}"}
    torch.manual_seed(0)
    ids = torch.randint(0, 50277, (a.batch, a.seqlen), device="cuda")
    if name == "mamba_ssm":
        return mamba_ssm_variant(ids, a)
    if name == "mamba_ssm-mamba2":
        return mamba_ssm_variant(ids, a, "Mamba2")
    if name == "fla":
        try:
            return fla_variant(ids, a)
        except Exception as e:  # noqa: BLE001  (fla refuses some setups: report its words)
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            return {"refused": f"{type(e).__name__}: {first}"}
    return ssmkit_variant(name, ids, a)


def _row_name(name: str) -> str:
    return name if name in ("mamba_ssm", "mamba_ssm-mamba2", "fla") else f"ssmkit {name}"


def _run_child(name: str, a) -> dict | None:
    """One variant in a process of its own; fla's with a time limit and a kept autotuning cache."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--batch", str(a.batch),
           "--seqlen", str(a.seqlen), "--warmup", str(a.warmup), "--steps", str(a.steps)]
    env, timeout = None, None
    if name == "fla":
        os.makedirs(a.triton_cache, exist_ok=True)
        env = dict(os.environ, TRITON_CACHE_DIR=a.triton_cache, TRITON_CACHE_AUTOTUNING="1")
        timeout = a.peer_timeout
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"refused": f"no result within {timeout:.0f} s (autotuning; --peer-timeout)"}
    res = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if res:
        return json.loads(res[-1][7:])
    print(name, "failed:", "\n".join(out.stderr.strip().splitlines()[-6:]) or out.returncode, flush=True)
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="ssmkit variants, comma-separated (default: all; each in a process of its own)")
    p.add_argument("--no-peer", action="store_true", help="leave the peers (mamba_ssm, fla) out")
    p.add_argument("--peer-timeout", type=float, default=540.0,
                   help="seconds for fla's process, autotuning included (default 540)")
    p.add_argument("--triton-cache", default=os.path.join(tempfile.gettempdir(), "ssmkit-fla-triton-cache"),
                   help="Triton cache of fla's process (its autotuning choices; kept between runs)")
    p.add_argument("--out-dir", default=".", help="where train_step_gpu.json goes (default .)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # (a variant, in this process)
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(_one(a.one, a)), flush=True)
        return 0
    variants = [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    os.makedirs(a.out_dir, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "torch": torch.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "shape": f"mamba-130m (mamba2-130m, gated-deltanet-130m for those variants and fla), "
                     f"batch {a.batch} x {a.seqlen}, bf16 autocast, AdamW"}
    print(info, flush=True)
    peers = [] if a.no_peer else (["mamba_ssm"] * any(v in MAMBA1 for v in variants)
                                  + ["mamba_ssm-mamba2"] * any(v.startswith("mamba2") for v in variants)
                                  + ["fla"] * ("gated-deltanet" in variants))
    rows = {}
    for name in peers + variants:
        res = _run_child(name, a)
        if res is not None:
            rows[_row_name(name)] = res
        print(name, res, flush=True)
    print("\n| variant | step ms | tokens/s | peak GiB |\n|---|---:|---:|---:|")
    for k, r in rows.items():
        if "refused" in r:
            print(f"| {k} | - | - | - |")
        else:
            print(f"| {k} | {r['step_ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f}k | {r['peak_gib']:.1f} |")
    for k, r in rows.items():
        if "refused" in r or "path" in r:
            print(f"{k}: {r.get('refused', r.get('path'))}")
    for v in ("mamba2", "mamba2-triton"):
        if f"ssmkit {v}" in rows and "tokens_per_s" in rows.get("mamba_ssm-mamba2", {}):
            ratio = rows[f"ssmkit {v}"].get("tokens_per_s", 0) / rows["mamba_ssm-mamba2"]["tokens_per_s"]
            print(f"{v}: ssmkit / mamba_ssm Mamba-2 tokens/s = {ratio:.2f}")
    if "ssmkit gated-deltanet" in rows and "tokens_per_s" in rows.get("fla", {}):
        ratio = rows["ssmkit gated-deltanet"].get("tokens_per_s", 0) / rows["fla"]["tokens_per_s"]
        print(f"gated-deltanet: ssmkit / fla tokens/s = {ratio:.2f}")
    write_json(os.path.join(a.out_dir, "train_step_gpu.json"), {"info": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
