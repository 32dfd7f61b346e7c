"""generate(): greedy == argmax loop, left-padded batches == alone, sampling options, EOS/stop,
streamers, continuation from a cache, argument errors."""

import pytest
import torch

import ssmkit
from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache
from ssmkit.inference.sampling import apply_repetition_penalty, filter_logits, sample
from ssmkit.models.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=4, vocab_size=257, layer_pattern="MA2G", ssm_cfg={"d_state": 4},
                      mamba2_cfg={"d_state": 8, "headdim": 16, "chunk_size": 4}, attn_cfg={"n_heads": 2},
                      deltanet_cfg={}, mlp="moe", d_intermediate=32, moe_cfg={"n_experts": 2, "top_k": 1})
    return LanguageModel(cfg).eval()


def test_greedy_equals_argmax_of_full_forward(hybrid):
    ids = torch.randint(0, 257, (1, 5))
    out = ssmkit.generate(hybrid, ids, max_new_tokens=6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = hybrid(seq).logits[:, -1, :257].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("kw", [{}, {"repetition_penalty": 1.5}])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(hybrid, kw):
    prompts = [torch.randint(0, 257, (n,)) for n in (3, 8, 5)]
    alone = [ssmkit.generate(hybrid, p[None], max_new_tokens=7, **kw)[0, len(p):] for p in prompts]
    L = max(len(p) for p in prompts)
    batch = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, L - len(p):] = p
        mask[i, L - len(p):] = 1
    out = ssmkit.generate(hybrid, batch, max_new_tokens=7, attention_mask=mask, **kw)
    for i in range(3):
        assert torch.equal(out[i, L:], alone[i]), i


def test_sampling_is_reproducible_with_a_seed(hybrid):
    ids = torch.randint(0, 257, (2, 4))
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.3)
    a = ssmkit.generate(hybrid, ids, seed=123, **kw)
    b = ssmkit.generate(hybrid, ids, seed=123, **kw)
    c = ssmkit.generate(hybrid, ids, seed=7, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_rows_and_pads(hybrid):
    ids = torch.randint(0, 257, (2, 4))
    free = ssmkit.generate(hybrid, ids, max_new_tokens=6)
    eos = int(free[0, 5])  # the second token row 0 generates
    out = ssmkit.generate(hybrid, ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 5] == eos and (out[0, 6:] == 0).all()
    assert torch.equal(out[0, :6], free[0, :6])


def test_stop_sequences_and_streamers(hybrid):
    ids = torch.randint(0, 257, (1, 4))
    free = ssmkit.generate(hybrid, ids, max_new_tokens=8)
    stop = free[0, 6:8].tolist()
    got = []
    out = ssmkit.generate(hybrid, ids, max_new_tokens=8, stop=[stop], streamer=lambda t: got.append(int(t[0])))
    assert out.shape[1] == 8 and got == free[0, 4:8].tolist()

    class Streamer:
        def __init__(self):
            self.calls, self.ended = [], False

        def put(self, t):
            self.calls.append(t.clone())

        def end(self):
            self.ended = True

    s = Streamer()
    ssmkit.generate(hybrid, ids, max_new_tokens=3, streamer=s)
    assert s.ended and torch.equal(s.calls[0], ids) and len(s.calls) == 4
    tok = ByteTokenizer()
    text = tok.decode(free[0, 4:8].tolist())
    assert text, "the generated tokens decode to no text: pick another prompt"
    out = ssmkit.generate(hybrid, ids, max_new_tokens=8, stop=[text[-1]], tokenizer=tok)
    assert out.shape[1] <= 8
    with pytest.raises(ValueError, match="needs a tokenizer"):
        ssmkit.generate(hybrid, ids, max_new_tokens=2, stop=["x"])


def test_continue_from_a_cache(hybrid):
    ids = torch.randint(0, 257, (1, 9))
    cache = allocate_cache(hybrid, 1, 32)
    with torch.no_grad():
        hybrid(ids[:, :6], cache=cache)
    cont = ssmkit.generate(hybrid, ids[:, 6:], max_new_tokens=5, cache=cache)
    assert torch.equal(cont[:, 3:], ssmkit.generate(hybrid, ids, max_new_tokens=5)[:, 9:])
    with pytest.raises(ValueError, match="no room"):
        ssmkit.generate(hybrid, ids, max_new_tokens=30, cache=cache)


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    assert p[0] < 0.7
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, min_p=0.2)).tolist() == [[False, False, True, True]]
    seen = torch.tensor([[True, False, False, True]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.0, 0.0, -2.0]]
    assert sample(logits, temperature=0).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, generator=g) for _ in range(2000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 2000
    assert (freq - p).abs().max() < 0.04


@pytest.mark.parametrize("kw, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"top_k": -2}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"attention_mask": torch.tensor([[1, 1, 0]])}, "left padding"),
])
def test_bad_arguments(hybrid, kw, match):
    with pytest.raises(ValueError, match=match):
        ssmkit.generate(hybrid, torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 2, **kw})
