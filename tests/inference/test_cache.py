"""Decoding memory: fixed for SSM-only models, grows only by the attention KV for hybrids; the
cache's buffers are allocated once and updated in place."""

import torch

from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, decode_one_token, prefill


def tiny(pattern):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(d_model=16, n_layer=len(pattern), vocab_size=32, layer_pattern=pattern,
                                     ssm_cfg={"d_state": 4}, mamba2_cfg={"d_state": 4, "headdim": 8},
                                     attn_cfg={"n_heads": 2})).eval()


def test_ssm_only_state_bytes_equal_at_1k_and_100k_tokens():
    for pattern in ("MM", "2D", "MGS"):
        m = tiny(pattern)
        assert allocate_cache(m, 1, 1_000).nbytes() == allocate_cache(m, 1, 100_000).nbytes() > 0


def test_stepping_1k_tokens_keeps_the_same_buffers():
    m = tiny("M2")
    cache = allocate_cache(m, 1, 1_000)
    before_bytes, before_ptrs = cache.nbytes(), cache.data_ptrs()
    tok = torch.tensor([1])
    with torch.inference_mode():
        prefill(m, torch.tensor([[1, 2, 3]]), cache)
        for _ in range(1_000):
            logits = decode_one_token(m, tok, cache)
            tok = logits[:, :32].argmax(-1)
    assert cache.seqlen_offset == 1_003
    assert cache.nbytes() == before_bytes and cache.data_ptrs() == before_ptrs


def test_hybrid_grows_only_by_attention_kv():
    m = tiny("MAM2A")
    small, big = allocate_cache(m, 2, 1_000), allocate_cache(m, 2, 100_000)
    per_token = sum(st.bytes_per_slot() for letter, st in zip(m.config.layer_pattern, small.states) if letter == "A")
    assert per_token == 2 * (2 * 2 * 2 * 8 * 4 + 2)  # 2 layers x (k, v: batch 2 x 2 heads x 8 float32 + 2 flags)
    assert big.nbytes() - small.nbytes() == per_token * 99_000
    for letter, a, b in zip(m.config.layer_pattern, small.states, big.states):
        if letter != "A":
            assert a.nbytes() == b.nbytes()
