"""LanguageModel: forward/loss, every mixer letter, cached decoding == full forward, continuation,
left padding, bf16 with float32 states, bad input."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, decode_one_token, prefill
from ssmkit.testing import assert_close

TINY = {
    "mamba": dict(d_model=32, n_layer=2, vocab_size=50, ssm_cfg={"d_state": 4}),
    "mamba2": dict(d_model=32, n_layer=2, vocab_size=50, layer_pattern="22",
                   mamba2_cfg={"d_state": 8, "headdim": 16, "chunk_size": 4}),
    "hybrid-attn-moe": dict(d_model=32, n_layer=4, vocab_size=50, layer_pattern="MA2A", ssm_cfg={"d_state": 4},
                            mamba2_cfg={"d_state": 8, "headdim": 16, "chunk_size": 4},
                            attn_cfg={"n_heads": 4, "n_kv_heads": 2}, mlp="moe", d_intermediate=48,
                            moe_cfg={"n_experts": 4, "top_k": 2, "every": 2}),
    "all-letters": dict(d_model=32, n_layer=6, vocab_size=50, layer_pattern="M2ADGS", ssm_cfg={"d_state": 4},
                        mamba2_cfg={"d_state": 8, "headdim": 16, "chunk_size": 4},
                        attn_cfg={"n_heads": 2}, mlp="swiglu", d_intermediate=32),
}


def build(name, **kw):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(**{**TINY[name], **kw})).eval()


def test_forward_shapes_and_loss_like_hf():
    m = build("mamba")
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    out = m(ids, labels=labels)
    assert out.logits.shape == (2, 9, 56) and out.logits.dtype == torch.float32
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 56), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref) and out.aux_loss is None and out.cache is None
    out.loss.backward()
    assert m.backbone.embedding.weight.grad is not None
    assert m.lm_head.weight is m.backbone.embedding.weight  # tied


def test_training_engineer_config_and_moe_aux_loss():
    m = LanguageModel(ModelConfig(d_model=64, n_layer=2, vocab_size=16, layer_pattern="MM",
                                  ssm_cfg={"use_gate": False}, mlp="none"))
    assert m(torch.randint(0, 16, (2, 5))).logits.shape == (2, 5, 16)
    h = build("hybrid-attn-moe")
    out = h(torch.randint(0, 50, (2, 6)))
    assert out.aux_loss is not None and out.aux_loss.item() > 0


@pytest.mark.parametrize("name", ["mamba", "mamba2", "hybrid-attn-moe", "all-letters"])
def test_cached_decoding_equals_full_forward(name):
    """Teacher forcing: prefill 3 tokens, then step one by one: logits == one forward (<= 1e-5)."""
    m = build(name)
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        full = m(ids).logits
        cache = allocate_cache(m, 2, 11)
        got = [prefill(m, ids[:, :3], cache)]
        got += [decode_one_token(m, ids[:, t], cache) for t in range(3, 11)]
    assert (torch.stack(got, 1) - full[:, 2:]).abs().max().item() <= 1e-5
    assert cache.seqlen_offset == 11


@pytest.mark.parametrize("name", ["mamba", "hybrid-attn-moe"])
def test_multi_token_continuation_equals_one_pass(name):
    m = build(name)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = m(ids).logits
        cache = allocate_cache(m, 2, 12)
        a = m(ids[:, :5], cache=cache).logits
        decode_one_token(m, ids[:, 5], cache)
        b = m(ids[:, 6:], cache=cache).logits
    assert_close("first chunk", full[:, :5], a, rel=1e-5)
    assert_close("continuation", full[:, 6:], b, rel=1e-5)


@pytest.mark.parametrize("name", ["mamba", "all-letters"])
def test_left_padded_batch_equals_each_prompt_alone(name):
    m = build(name)
    p1, p2 = torch.randint(0, 50, (1, 4)), torch.randint(0, 50, (1, 7))
    batch = torch.cat([torch.cat([torch.full((1, 3), 7), p1], 1), p2])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        out = m(batch, attention_mask=mask).logits
        assert_close("row 0", m(p1).logits, out[:1, 3:], rel=1e-5)
        assert_close("row 1", m(p2).logits, out[1:], rel=1e-5)


def test_bf16_model_keeps_float32_ssm_states():
    m = build("hybrid-attn-moe").to(torch.bfloat16)
    cache = allocate_cache(m, 1, 8)
    with torch.no_grad():
        prefill(m, torch.randint(0, 50, (1, 4)), cache)
        logits = decode_one_token(m, torch.tensor([3]), cache)
    assert torch.isfinite(logits).all()
    for letter, st in zip(m.config.layer_pattern, cache.states):
        for name, t in st.tensors().items():
            if letter != "A" and "ssm" in name:
                assert t.dtype == torch.float32, (letter, name)
            if letter == "A" and name in ("k", "v"):
                assert t.dtype == torch.bfloat16


def test_bad_input_raises_clear_errors():
    m = build("mamba")
    with pytest.raises(TypeError, match="integer dtype"):
        m(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, seqlen\)"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids in \[0, 56\)"):
        m(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="labels"):
        m(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="InferenceCache"):
        m(torch.zeros(1, 4, dtype=torch.long), cache=[1])
    with pytest.raises(TypeError, match="ModelConfig"):
        LanguageModel({"d_model": 4})
    with pytest.raises(ValueError, match="ssm_cfg does not fit Mamba"):
        LanguageModel(ModelConfig(d_model=8, n_layer=1, vocab_size=8, ssm_cfg={"bogus": 1}))


def test_packed_sequences_with_cu_seqlens_equal_separate_sequences():
    m = build("all-letters")
    a, b = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        y = m(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 5, 12])).logits
        assert_close("seq a", m(a).logits, y[:, :5], rel=1e-5)
        assert_close("seq b", m(b).logits, y[:, 5:], rel=1e-5)


def test_loss_without_logits_equals_the_loss_from_logits():
    """return_logits=False: the loss by the chunked cross entropy (no (batch, seqlen, vocab)
    logits), equal to the loss from the logits, with the same gradients; ignored labels too."""
    torch.manual_seed(0)
    m = LanguageModel(ModelConfig(d_model=16, n_layer=2, vocab_size=50, layer_pattern="MA",
                                  attn_cfg={"n_heads": 2}))
    ids = torch.randint(0, 50, (2, 11))
    labels = ids.clone()
    labels[0, 3:6] = -100
    full = m(ids, labels=labels)
    g_full = torch.autograd.grad(full.loss, list(m.parameters()))
    lean = m(ids, labels=labels, return_logits=False)
    assert lean.logits is None
    g_lean = torch.autograd.grad(lean.loss, list(m.parameters()))
    assert_close("loss", full.loss, lean.loss, rel=1e-6)
    for a, b in zip(g_full, g_lean):
        assert_close("grad", a, b, rel=1e-5)
    with pytest.raises(ValueError, match="return_logits=False needs labels"):
        m(ids, return_logits=False)


def test_scan_state_budget_is_shared_among_mamba_layers():
    m = LanguageModel(ModelConfig(d_model=16, n_layer=4, vocab_size=50, layer_pattern="MAMM",
                                  attn_cfg={"n_heads": 2}))
    mambas = [blk.mixer for blk in m.backbone.layers if blk.mixer.__class__.__name__ == "Mamba"]
    assert [x.scan_state_mem_limit for x in mambas] == [LanguageModel.DEFAULT_SCAN_STATE_BUDGET // 3] * 3
    m.set_scan_state_budget(None)
    assert all(x.scan_state_mem_limit is None for x in mambas)
    with pytest.raises(ValueError, match="nbytes"):
        m.set_scan_state_budget(-1)


def test_activation_checkpointing_recomputes_with_the_forced_forms_on_another_thread():
    """A CUDA backward runs on autograd's own thread: the checkpointed blocks recompute there with
    the forms ``force_backend`` chose for the forward, and the gradients are the plain ones."""
    from ssmkit.ops.dispatch import force_backend
    from ssmkit.testing import grad_on_another_thread

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(
        d_model=16, n_layer=3, vocab_size=40, layer_pattern="M2G", ssm_cfg={"d_state": 4},
        mamba2_cfg={"d_state": 4, "headdim": 8, "chunk_size": 4},
        deltanet_cfg={"num_heads": 2, "head_dim": 4, "chunk_size": 4}, residual_in_fp32=False)).double().train()
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    with force_backend("reference"):
        want = torch.autograd.grad(model(ids, labels=ids).loss, params)
        model.set_activation_checkpointing(True)
        loss = model(ids, labels=ids).loss
    for a, b in zip(want, grad_on_another_thread(loss, params)):
        assert_close("grad", a, b, rel=1e-10)
