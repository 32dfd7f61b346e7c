"""CPU decoding: int8 weight-only quantisation on a trained byte-level model (logits and greedy
tokens against float32), the bfloat16 CPU step against the float32 step, the per-state decode
buffers (no re-allocation per token), and ``quantize``'s argument checks."""

import pytest
import torch

import ssmkit
from ssmkit.inference import allocate_cache, prefill
from ssmkit.layers.quantized import Int8Embedding, Int8Linear, quantize_int8
from ssmkit.models import quantize

TEXT = b"the state space model reads one token at a time and keeps a fixed state. " * 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-1 decoding of tiny models: one thread (two only add synchronisation, and under
    load from other processes a waiting OpenMP thread can cost more than the work)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(one_thread):
    """A 2-layer Mamba byte model trained for a few seconds on repeating text: trained weights (unlike
    random ones) make the logits sharp enough for quantisation error to show."""
    torch.manual_seed(0)
    cfg = ssmkit.ModelConfig(d_model=64, n_layer=2, vocab_size=257, layer_pattern="MM", ssm_cfg={"d_state": 8})
    model = ssmkit.LanguageModel(cfg)
    data = torch.tensor(list(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    with torch.random.fork_rng():
        gen = torch.Generator().manual_seed(0)
        for _ in range(40):
            starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
            batch = torch.stack([data[s:s + 64] for s in starts.tolist()])
            loss = model(batch, labels=batch, return_logits=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert loss.item() < 1.0, loss.item()  # it learned the text
    return model.eval()


def _copy(model):
    m = ssmkit.LanguageModel(model.config).eval()
    m.load_state_dict(model.state_dict())
    return m


def _decode_logits(model, ids, prompt_len):
    """Teacher-forced decoding: prefill ``ids[:, :prompt_len]``, then one step per later token;
    the logits of every step ``(batch, steps, vocab)``."""
    cache = allocate_cache(model, ids.shape[0], ids.shape[1])
    with torch.inference_mode():
        out = [prefill(model, ids[:, :prompt_len], cache)]
        for t in range(prompt_len, ids.shape[1] - 1):
            out.append(model.step(ids[:, t], cache))
    return torch.stack(out, 1)[..., :257]


def test_int8_matches_float32_on_a_trained_model(trained):
    prompt = torch.tensor([list(TEXT[:16])])
    ref_ids = ssmkit.generate(trained, prompt, max_new_tokens=256)  # float32 greedy continuation
    q = quantize(_copy(trained), "int8")
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.backbone.embedding, Int8Embedding)
    assert isinstance(q.backbone.layers[0].mixer.in_proj, Int8Linear)
    assert q.backbone.layers[0].mixer.conv1d.weight.dtype == torch.float32  # not quantised
    ref = _decode_logits(trained, ref_ids, 16)
    out = _decode_logits(q, ref_ids, 16)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
    # free-running greedy generation from the int8 model
    gen = ssmkit.generate(q, prompt, max_new_tokens=256)
    assert (gen[0, 16:] == ref_ids[0, 16:]).float().mean().item() >= 0.95


def test_bfloat16_cpu_step_matches_float32_step(trained):
    """The bf16 model's decode logits stay within bf16's error of the float32 model's (the bound
    measured as bf16 forward vs float32 forward, the same weights rounded the same way), and its
    greedy tokens agree."""
    ids = ssmkit.generate(trained, torch.tensor([list(TEXT[:16])]), max_new_tokens=64)
    bf = _copy(trained).to(torch.bfloat16)
    ref = _decode_logits(trained, ids, 16)
    out = _decode_logits(bf, ids, 16)
    with torch.inference_mode():
        bound = ((bf(ids).logits - trained(ids).logits).norm() / trained(ids).logits.norm()).item()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2 * bound + 1e-3 and rel < 0.03, (rel, bound)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.95


@pytest.mark.parametrize("pattern, kw", [
    ("M", {"ssm_cfg": {"d_state": 8}}),
    ("2", {"mamba2_cfg": {"d_state": 16, "headdim": 16, "ngroups": 2}}),
    ("G", {"deltanet_cfg": {"num_heads": 2}}),
])
@pytest.mark.parametrize("mode", ["float32", "bfloat16", "int8"])
def test_cpu_step_equals_forward_batch_2(pattern, kw, mode):
    """The CPU step of each mixer (batch 2) continues the prefill as the full forward does."""
    torch.manual_seed(0)
    cfg = ssmkit.ModelConfig(d_model=64, n_layer=2, vocab_size=256, layer_pattern=pattern * 2, **kw)
    m = ssmkit.LanguageModel(cfg).eval()
    if mode == "int8":
        quantize(m, "int8")
    else:
        m = m.to(getattr(torch, mode))
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        full = m(ids).logits[:, 5:-1]
    step = _decode_logits(m, ids, 6)
    tol = 1e-5 if mode == "float32" else 0.03
    assert ((step - full[..., :257]).norm() / full.norm()).item() < tol


def test_decode_buffers_are_reused():
    """The per-state buffers are built once: later steps allocate no new window / Ā buffers."""
    torch.manual_seed(0)
    m = ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-mamba")).eval()
    cache = allocate_cache(m, 1, 4)
    tok = torch.tensor([3])
    with torch.inference_mode():
        m.step(tok, cache)
        ptrs = [st.__dict__["_decode_ws"]["win"].data_ptr() for st in cache.states]
        m.step(tok, cache)
    assert ptrs == [st.__dict__["_decode_ws"]["win"].data_ptr() for st in cache.states]
    assert [st.__dict__["_decode_ws"]["dA"].data_ptr() for st in cache.states]


def test_quantize_int8_weight_roundtrip():
    w = torch.randn(48, 32)
    w[3] = 0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.abs().max() <= 127
    err = (q.float() * s.float()[:, None] - w).abs()
    assert (err <= s.float()[:, None] / 2 + 1e-6).all()  # half a step per channel


def test_quantize_arguments():
    m = ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-mamba"))
    for bad in ("int4", "INT8", 8, ""):
        with pytest.raises(ValueError, match=r"quantize must be None or one of \['int8'\]"):
            quantize(m, bad)
    with pytest.raises(ValueError, match="quantize must be"):
        ssmkit.from_pretrained("unused-path", quantize="int4")  # checked before anything is read
    quantize(m, "int8")
    with pytest.raises(ValueError, match="already quantised"):
        quantize(m, "int8")
    with pytest.raises(ValueError, match="needs a float LM head"):
        ids = torch.tensor([[1, 2, 3]])
        m(ids, labels=ids, return_logits=False)


def test_from_pretrained_quantize(tmp_path):
    torch.manual_seed(0)
    m = ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-mamba")).eval()
    m.save_pretrained(tmp_path)
    q = ssmkit.from_pretrained(tmp_path, quantize="int8")
    assert q.quantization == "int8" and isinstance(q.lm_head, Int8Linear)
    assert q.dtype == torch.float32
    q2 = ssmkit.LanguageModel.from_pretrained(tmp_path, quantize="int8", dtype=torch.bfloat16)
    assert q2.dtype == torch.bfloat16 and isinstance(q2.lm_head, Int8Linear)
