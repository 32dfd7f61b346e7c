"""The CUDA decode path (fused add+RMSNorm, Triton conv update, state update with dt_proj inside)
run on CPU under the Triton interpreter: same logits and states as the PyTorch step, and its
launch count per layer (Mamba, a hybrid with attention, Mamba-2); ``logits_to_keep`` and the prefill
that uses it."""

import pytest
import torch

from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, prefill
from ssmkit.inference.launches import count_step_launches
from ssmkit.ops.dispatch import force_backend
from ssmkit.testing import assert_close, matmul_error_bound

MAMBA = dict(d_model=32, n_layer=3, vocab_size=100, layer_pattern="MMM", ssm_cfg={"d_state": 8})
HYBRID = dict(d_model=32, n_layer=2, vocab_size=100, layer_pattern="MA", attn_cfg={"n_heads": 2},
              mlp="swiglu", d_intermediate=48)
MAMBA2 = dict(d_model=32, n_layer=2, vocab_size=100, layer_pattern="22", residual_in_fp32=True,
              mamba2_cfg={"d_state": 8, "headdim": 8, "ngroups": 2})


def _model(cfg, **kw):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(**cfg, **kw)).eval()


@pytest.mark.triton
@pytest.mark.parametrize("cfg", [MAMBA, HYBRID, MAMBA2], ids=["mamba", "hybrid", "mamba2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_triton_step_matches_pytorch_step(cfg, batch):
    m = _model(cfg)
    ids = torch.randint(0, 100, (batch, 6))
    c_ref = allocate_cache(m, batch, 16)
    with torch.inference_mode():
        prefill(m, ids, c_ref)
        c_tri = c_ref.clone()
        tok = ids[:, -1]
        for _ in range(3):
            ref = m.step(tok, c_ref)
            with force_backend("triton"):
                out = m.step(tok, c_tri)
            assert_close("logits", ref, out, rel=2e-5)
            tok = ref.argmax(-1)
    for a, b in zip(c_ref.states, c_tri.states):
        for k, v in a.tensors().items():
            assert_close(k, v, getattr(b, k), rel=2e-5)


@pytest.mark.triton
def test_launches_per_mamba_layer():
    """The CUDA path issues 6 launches per Mamba layer (add+norm, in_proj, conv, x_proj,
    state update with dt_proj, out_proj) + embedding + final norm, lm_head, float cast."""
    m = _model(MAMBA).to(torch.bfloat16)
    cache = allocate_cache(m, 2, 8)
    count_step_launches(m, cache, "triton")  # first call fills per-layer caches (A = -exp(A_log))
    c = count_step_launches(m, cache, "triton")
    n = MAMBA["n_layer"]
    assert c["triton:selective_scan_step"] == n and c["triton:causal_conv1d_step"] == n
    assert c["triton:add_rms_norm"] == n + 1
    assert sum(c.values()) <= 6 * n + 4, dict(c)
    ref = count_step_launches(m, cache)  # the CPU forms: many small ops
    assert sum(ref.values()) > 3 * sum(c.values())


def _full_logits_and_head_bound(m, ids):
    """Every position's logits, and how far a head GEMM over fewer rows may differ from them:
    only the LM head's GEMM shape changes (the blocks and the final norm are the same ops), so
    the two agree to twice the float32 dot-product bound of that GEMM."""
    seen = []
    hook = m.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        full = m(ids).logits
    finally:
        hook.remove()
    return full, 2 * matmul_error_bound(seen[0], m.lm_head.weight)


def test_logits_to_keep_equals_full_logits():
    m = _model(HYBRID)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        full, bound = _full_logits_and_head_bound(m, ids)
        for k in (1, 3, 7, 20):
            out = m(ids, logits_to_keep=k).logits
            kept = min(k, 7)
            assert out.shape == (2, kept, full.shape[-1])
            diff = (out.double() - full[:, -kept:].double()).abs()
            assert (diff <= bound[:, -kept:]).all(), f"k={k}: max excess {(diff - bound[:, -kept:]).max():.3e}"


def test_prefill_equals_last_position_of_forward():
    m = _model(MAMBA)
    ids = torch.randint(0, 100, (2, 9))
    with torch.inference_mode():
        full, bound = _full_logits_and_head_bound(m, ids)
        cache = allocate_cache(m, 2, 16)
        last = prefill(m, ids, cache)
    assert ((last.double() - full[:, -1].double()).abs() <= bound[:, -1]).all()
    assert cache.seqlen_offset == 9


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_logits_to_keep_bad_values(bad):
    m = _model(MAMBA)
    with pytest.raises(ValueError, match="logits_to_keep"):
        m(torch.zeros(1, 3, dtype=torch.long), logits_to_keep=bad)
    with pytest.raises(ValueError, match="logits_to_keep"):
        m(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long), logits_to_keep=1)


def _unfused_forward(m, ids):
    """The block stack written the old way: h = h + mixer(norm(h)), h = h + mlp(norm2(h))."""
    h = m.backbone.embedding(ids)
    for blk in m.backbone.layers:
        h = h.float() if blk.residual_in_fp32 else h
        h = h + blk.mixer(blk.norm(h.to(blk.norm.weight.dtype)))
        if blk.mlp_kind != "none":
            h = h + blk.mlp(blk.norm2(h.to(blk.norm2.weight.dtype)))
    x = m.backbone.norm_f(h.to(m.backbone.norm_f.weight.dtype))
    return m.lm_head(x.to(m.lm_head.weight.dtype)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_carried_residual_forward_equals_unfused_blocks(dtype):
    m = _model(HYBRID).to(dtype)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, _unfused_forward(m, ids))
        # and decoding: step from a prefilled cache == the last position of the full forward
        cache = allocate_cache(m, 2, 16)
        prefill(m, ids[:, :-1], cache)
        full = m(ids).logits[:, -1]
        step = m.step(ids[:, -1], cache)
    assert_close("step", full, step, rel=1e-5 if dtype == torch.float32 else 2e-2)


def test_batch1_step_is_four_launches_per_mamba_layer():
    """At batch 1 the CUDA path fuses further: norm + in_proj GEMV, conv + x_proj parts, state
    update, out_proj GEMV per layer; the LM head is a GEMV with the final norm in it."""
    m = _model(MAMBA).to(torch.bfloat16)
    cache = allocate_cache(m, 1, 8)
    count_step_launches(m, cache, "triton")
    c = count_step_launches(m, cache, "triton")
    n = MAMBA["n_layer"]
    assert c["triton:norm_linear"] == 2 * n + 1, dict(c)
    assert c["triton:causal_conv1d_step_proj"] == n
    assert c["triton:selective_scan_step_parts"] == n
    assert c["triton:add_rms_norm"] == 0
    assert sum(c.values()) <= 4 * n + 3, dict(c)  # + embedding, float cast of the logits


def test_fused_step_eligibility():
    from ssmkit.inference.cuda_graph import _prefill_capturable

    m = _model(MAMBA)
    mixer = m.backbone.layers[0].mixer
    x1, x3 = torch.randn(1, 32), torch.randn(3, 32)
    with torch.no_grad():
        assert not mixer.can_step_norm(x1)  # CPU tensors: the PyTorch forms
        with force_backend("triton"):
            assert mixer.can_step_norm(x1)
            assert not mixer.can_step_norm(x3)  # batch > FUSED_STEP_MAX_BATCH: cuBLAS is faster
    with force_backend("triton"):
        assert not mixer.can_step_norm(x1)  # autograd on: the unfused (differentiable) step
    assert _prefill_capturable(m)
    assert not _prefill_capturable(_model(HYBRID))  # attention, MLP: not captured automatically
