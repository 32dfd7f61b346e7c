"""CPU decoding with the compiled kernels on (``SSMKIT_CPU_COMPILE=1``): the decode steps' linear
layers through the compiled GEMV (ssmkit.layers._decode.linear), Mamba, Mamba-2 and (Gated)
DeltaNet blocks as compiled graphs against their eager steps, and greedy decoding of tiny Mamba / Mamba-2 / gated
DeltaNet language models with compiled kernels on against off."""

import pytest
import torch

import ssmkit
from ssmkit.inference import allocate_cache, prefill
from ssmkit.layers import _decode
from ssmkit.layers._decode_mamba import mamba_block_step
from ssmkit.layers.quantized import Int8Linear
from ssmkit.ops import cpu_gemv
from ssmkit.ops.cpu_compile import compiler_available, set_cpu_compile

pytestmark = pytest.mark.skipif(not compiler_available(), reason="needs a C++ compiler for Inductor")


def test_decode_linear_runs_modules(cpu_compiled):
    """_decode.linear: an Int8Linear through the GEMV at batch 1 (nn.Linear: the greedy test), the
    module itself at batch > 1 and for other modules."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(1, 32)
    with torch.inference_mode():
        # int8: the module feeds bfloat16 activations to its kernel, the GEMV float32 ones
        ref = cpu_gemv.reference(x, q.qweight, q.bias, scale=q.scale)
        torch.testing.assert_close(_decode.linear(q, x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_decode.linear(lin, x.expand(3, 32)), lin(x.expand(3, 32)))
        seq = torch.nn.Sequential(lin)
        torch.testing.assert_close(_decode.linear(seq, x), lin(x))


def _greedy(model, ids, steps, forced=None):
    """Greedy tokens and the logits of ``steps`` decode steps after ``ids``; with ``forced`` (a token
    list) those tokens are fed instead of the argmax (teacher forcing: a near-tie decided the other
    way does not change every later step)."""
    cache = allocate_cache(model, 1, ids.shape[1] + steps + 1)
    toks, logits = [], []
    with torch.inference_mode():
        tok = prefill(model, ids, cache).argmax(-1)
        for i in range(steps):
            lg = model.step(tok if forced is None or i == 0 else torch.tensor([forced[i - 1]]), cache)
            tok = lg.argmax(-1)
            toks.append(tok.item())
            logits.append(lg)
    return toks, torch.cat(logits)


def _tiny(pattern, dtype):
    extra = {"M": {"ssm_cfg": {"d_state": 8}}, "2": {"ssm_cfg": {"d_state": 16, "headdim": 16}},
             "G": {"deltanet_cfg": {"num_heads": 2, "head_dim": 16}}}[pattern]
    torch.manual_seed(0)
    cfg = ssmkit.ModelConfig(d_model=64, n_layer=2, vocab_size=257, layer_pattern=pattern * 2, **extra)
    model = ssmkit.LanguageModel(cfg).eval()
    return ssmkit.models.quantize(model, "int8") if dtype == "int8" else model.to(getattr(torch, dtype))


def _check_greedy(pattern, dtype):
    model = _tiny(pattern, dtype)
    ids = torch.randint(0, 257, (1, 6), generator=torch.Generator().manual_seed(1))
    set_cpu_compile(False)
    toks0, logits0 = _greedy(model, ids, 12)
    set_cpu_compile(True)
    toks1, logits1 = _greedy(model, ids, 12, forced=toks0)
    # float32 sums in another order; int8: float32 activations where the eager kernel takes bfloat16
    tol = {"float32": 1e-4, "bfloat16": 5e-2, "int8": 3e-2}[dtype]
    torch.testing.assert_close(logits1, logits0, rtol=tol, atol=tol)
    # the same greedy token wherever the eager step's best two logits are apart by more than that
    top2 = logits0.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * (1 + top2[:, 0].abs())
    assert [a for a, c in zip(toks1, clear) if c] == [a for a, c in zip(toks0, clear) if c]
    if dtype == "float32":
        assert toks1 == toks0


def test_greedy_decoding_compiled_equals_eager(cpu_compiled):
    _check_greedy("M", "float32")


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["M", "2", "G"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_greedy_decoding_compiled_equals_eager_all(cpu_compiled, pattern, dtype):
    _check_greedy(pattern, dtype)


def _one_block(**cfg):
    """A one-layer LM (d_model 64) after a 5-token prefill: its block, and two equal
    ``(residual stream (1, 64), layer state)`` pairs to step on separately."""
    import copy

    torch.manual_seed(0)
    model = ssmkit.LanguageModel(ssmkit.ModelConfig(d_model=64, n_layer=1, vocab_size=257, **cfg)).eval()
    with torch.inference_mode():
        cache = allocate_cache(model, 1, 16)
        prefill(model, torch.randint(0, 257, (1, 5), generator=torch.Generator().manual_seed(2)), cache)
        h = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
        return model.backbone.layers[0], (h, cache.states[0]), (h.clone(), copy.deepcopy(cache.states[0]))


@pytest.mark.parametrize("pattern", ["M", "2"])
def test_mamba_block_step_matches_eager(cpu_compiled, pattern):
    """One Mamba / Mamba-2 (two groups) block as one compiled graph (_decode_mamba.mamba_block_step)
    against the eager block step: the residual stream and both states, float32; a state given new
    tensors between steps is stepped in those (the graph kept with the state is rebuilt)."""
    ssm = {"d_state": 8} if pattern == "M" else {"d_state": 16, "headdim": 16, "ngroups": 2}
    blk, (h, st), (h2, st2) = _one_block(layer_pattern=pattern, ssm_cfg=ssm)
    with torch.inference_mode():
        assert mamba_block_step(blk, h2, st2)
        plan = st2.__dict__["_decode_plan"]
        st2.ssm_state, st2.conv_state = st2.ssm_state.clone(), st2.conv_state.clone()
        assert mamba_block_step(blk, h2, st2) and st2.__dict__["_decode_plan"] is not plan
        assert not mamba_block_step(blk, h.expand(2, 64).clone(), st)  # batch 2: the eager step
        set_cpu_compile(False)
        assert not mamba_block_step(blk, h, st)
        for _ in range(2):
            h.add_(blk.mixer.step(torch.nn.functional.rms_norm(h, (64,), blk.norm.weight, blk.norm.eps), st))
    for a, b in ((h2, h), (st2.conv_state, st.conv_state), (st2.ssm_state, st.ssm_state)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated, hv", [(True, 2), (False, 4)])
def test_delta_block_step_matches_eager(cpu_compiled, gated, hv):
    """One Gated DeltaNet / DeltaNet block (the latter with two value heads per key head) as one compiled
    graph (_decode_delta.delta_block_step) against the eager block step: the residual stream and
    both states, float32."""
    from ssmkit.layers._decode_delta import delta_block_step

    cfg = {"num_heads": 2, "head_dim": 16, "num_v_heads": hv}
    blk, (h, st), (h2, st2) = _one_block(layer_pattern="G" if gated else "D", deltanet_cfg=cfg)
    with torch.inference_mode():
        for _ in range(2):  # the second call reuses the graph kept with the state
            assert delta_block_step(blk, h2, st2)
        plan = st2.__dict__["_decode_plan"]
        st2.ssm_state = st2.ssm_state.clone()  # a replaced state tensor: the plan is rebuilt
        assert delta_block_step(blk, h2, st2) and st2.__dict__["_decode_plan"] is not plan
        assert not delta_block_step(blk, h.expand(2, 64).clone(), st)  # batch 2: the eager step
        set_cpu_compile(False)
        assert not delta_block_step(blk, h, st)
        for _ in range(3):
            h.add_(blk.mixer.step(torch.nn.functional.rms_norm(h, (64,), blk.norm.weight, blk.norm.eps), st))
    for a, b in ((h2, h), (st2.conv_state, st.conv_state), (st2.ssm_state, st.ssm_state)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_greedy_decoding_gated_deltanet_compiled_equals_eager(cpu_compiled):
    _check_greedy("G", "float32")
