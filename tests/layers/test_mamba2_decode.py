"""Mamba-2's device decode step (``Mamba2.step`` off the CPU path, ``Mamba2.step_norm``) with the
Triton forms forced, run on CPU under the Triton interpreter: token by token it gives the full
forward's outputs and final states (float64), at batch 1 through the fused small-batch form
(add + RMSNorm + in_proj GEMV, conv update, ``ssd_step``, gated RMSNorm, out_proj GEMV) in five
launches per layer, and its eligibility rules."""

import math

import pytest
import torch

from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, prefill
from ssmkit.inference.launches import count_step_launches
from ssmkit.layers.mamba2 import Mamba2
from ssmkit.ops.dispatch import force_backend
from ssmkit.testing import assert_close

pytestmark = pytest.mark.triton

LAYERS = {
    "groups": dict(d_state=8, headdim=4, ngroups=2, dt_limit=(0.01, 0.5)),
    "D_per_channel": dict(d_state=4, headdim=8, D_has_hdim=True, norm_before_gate=True),
    "no_norm": dict(d_state=8, headdim=8, rmsnorm=False),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_triton_step_equals_forward(name):
    torch.manual_seed(0)
    m = Mamba2(16, chunk_size=4, **LAYERS[name]).double().eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        full, st_full = m(x, return_state=True)
        _, st = m(x[:, :3], return_state=True)
        ys = []
        with force_backend("triton"):
            for t in range(3, 7):
                ys.append(m.step(x[:, t], st))
    assert_close("y", torch.stack(ys, 1), full[:, 3:], rel=1e-10)
    assert_close("conv_state", st.conv_state, st_full.conv_state, rel=1e-12)
    assert_close("ssm_state", st.ssm_state, st_full.ssm_state, rel=1e-10)


MODEL = dict(d_model=32, vocab_size=64, mamba2_cfg={"d_state": 8, "headdim": 8, "chunk_size": 8})


def _lm(pattern, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=len(pattern), layer_pattern=pattern, attn_cfg={"n_heads": 2}, **MODEL, **kw)
    return LanguageModel(cfg).eval()


@pytest.mark.parametrize("pattern,batch", [("22", 1), ("22", 3), ("2A", 1)])
def test_lm_triton_decode_equals_forward(pattern, batch):
    """Batch 1 takes step_norm (norm + in_proj GEMV, float64 throughout), batch 3 the unfused
    step, whose block add + RMSNorm (Triton add_rms_norm) works in float32: float32 tolerance."""
    m = _lm(pattern).double()
    ids = torch.randint(0, 64, (batch, 7))
    with torch.inference_mode():
        full = m(ids).logits
        cache = allocate_cache(m, batch, 7)
        prefill(m, ids[:, :4], cache)
        with force_backend("triton"):
            got = [m.step(ids[:, t], cache) for t in range(4, 7)]
            for _ in range(3):
                cache.advance(1)
    fused = batch == 1 and "A" not in pattern
    assert_close("logits", torch.stack(got, 1), full[:, 4:], rel=1e-10 if fused else 1e-6)


def test_batch1_step_is_five_launches_per_layer():
    m = _lm("222").to(torch.bfloat16)
    cache = allocate_cache(m, 1, 8)
    count_step_launches(m, cache, "triton")  # first call fills the per-layer A = -exp(A_log)
    c = count_step_launches(m, cache, "triton")
    n = 3
    assert c["triton:norm_linear"] == 2 * n + 1, dict(c)  # in_proj, out_proj, LM head (+ final norm)
    assert c["triton:causal_conv1d_step"] == n and c["triton:ssd_step"] == n, dict(c)
    assert c["triton:gated_rms_norm"] == n and c["triton:add_rms_norm"] == 0, dict(c)
    assert sum(c.values()) <= 5 * n + 3, dict(c)  # + embedding, float cast of the logits


def test_fused_step_eligibility():
    mixer = _lm("2").backbone.layers[0].mixer
    x1, x3 = torch.randn(1, 32), torch.randn(3, 32)
    with torch.no_grad():
        assert not mixer.can_step_norm(x1)  # CPU tensors: the PyTorch forms
        with force_backend("triton"):
            assert mixer.can_step_norm(x1)
            assert not mixer.can_step_norm(x3)  # batch > FUSED_STEP_MAX_BATCH: cuBLAS is faster
            scaled = Mamba2(32, d_state=8, headdim=8, in_multiplier=0.5)
            assert not scaled.can_step_norm(x1)  # input scalings stay in _project
    with force_backend("triton"):
        assert not mixer.can_step_norm(x1)  # autograd on: the unfused (differentiable) step


def test_cached_A_follows_A_log():
    m = Mamba2(16, d_state=4, headdim=8)
    with torch.no_grad():
        a0 = m._A().clone()
        m.A_log.add_(math.log(2.0))
        assert_close("A", m._A(), 2 * a0, rel=1e-6)
