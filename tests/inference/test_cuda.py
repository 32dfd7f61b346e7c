"""On a GPU: cached decoding == full forward, left padding, no host synchronisation in
``decode_one_token`` and capture of it in a CUDA graph (skipped without CUDA)."""

import pytest
import torch

import ssmkit
from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, decode_one_token, prefill

pytestmark = pytest.mark.gpu

PATTERNS = {"mamba": "MM", "mamba2": "22", "hybrid": "MA2A", "all": "M2ADGS"}


def build(pattern, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_layer=len(pattern), vocab_size=100, layer_pattern=pattern,
                      ssm_cfg={"d_state": 8}, mamba2_cfg={"d_state": 16, "headdim": 16, "chunk_size": 8},
                      attn_cfg={"n_heads": 4, "n_kv_heads": 2}, mlp="moe", d_intermediate=64,
                      moe_cfg={"n_experts": 4, "top_k": 2, "every": 2})
    return LanguageModel(cfg).to(device="cuda", dtype=dtype).eval()


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_cached_decoding_equals_full_forward_on_gpu(name):
    m = build(PATTERNS[name])
    ids = torch.randint(0, 100, (2, 12), device="cuda")
    with torch.inference_mode():
        full = m(ids).logits
        cache = allocate_cache(m, 2, 12)
        got = [prefill(m, ids[:, :4], cache)] + [decode_one_token(m, ids[:, t], cache) for t in range(4, 12)]
    assert (torch.stack(got, 1) - full[:, 3:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_decode_step_has_no_host_sync_and_captures_in_a_cuda_graph(name):
    m = build(PATTERNS[name])
    cache = allocate_cache(m, 2, 64)
    tok = torch.tensor([3, 4], device="cuda")
    with torch.inference_mode():
        prefill(m, torch.randint(0, 100, (2, 5), device="cuda"), cache)
        ref_cache = cache.clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            decode_one_token(m, tok, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cache.copy_(ref_cache)
        # eager reference: three steps
        eager_cache = ref_cache.clone()
        eager = [decode_one_token(m, tok + i, eager_cache) for i in range(3)]
        # graph: warm up on a side stream, capture one step, replay three times
        static_tok = tok.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            decode_one_token(m, static_tok, cache)
        torch.cuda.current_stream().wait_stream(s)
        cache.copy_(ref_cache)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = m.step(static_tok, cache)
        cache.copy_(ref_cache)
        for i in range(3):
            static_tok.copy_(tok + i)
            g.replay()
            assert (static_out - eager[i]).abs().max().item() <= 1e-4, i


def test_left_padded_generation_and_bf16_on_gpu():
    m = build("MA2A")
    p1, p2 = torch.randint(0, 100, (1, 3), device="cuda"), torch.randint(0, 100, (1, 6), device="cuda")
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long, device="cuda"), p1], 1), p2])
    mask = torch.ones(2, 6, dtype=torch.long, device="cuda")
    mask[0, :3] = 0
    out = ssmkit.generate(m, batch, max_new_tokens=6, attention_mask=mask)
    assert torch.equal(out[0, 6:], ssmkit.generate(m, p1, max_new_tokens=6)[0, 3:])
    assert torch.equal(out[1, 6:], ssmkit.generate(m, p2, max_new_tokens=6)[0, 6:])
    mb = build("MA2A", torch.bfloat16)
    out = ssmkit.generate(mb, p2, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=0)
    assert out.shape == (1, 14)
