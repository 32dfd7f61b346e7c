"""Attention: step == forward, stateful continuation, left padding, cu_seqlens, GQA, RoPE, errors."""

import math

import pytest
import torch

from ssmkit.layers import Attention, KVCacheState
from ssmkit.testing import assert_close


def make(**kw):
    kw = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, **kw}
    return Attention(**kw).double()


def naive_attention(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """Plain causal softmax attention with explicit RoPE loops (the obviously-correct form)."""
    B, L, _ = x.shape
    q, k, v = layer._qkv(x)
    H, Hk, D, r = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.rope_dim
    out = torch.zeros(B, L, H, D, dtype=x.dtype)

    def rot(t, p):
        t = t.clone()
        for i in range(r // 2):
            th = p * layer.rope_theta ** (-2 * i / r)
            a, b = t[..., i].clone(), t[..., i + r // 2].clone()
            t[..., i] = a * math.cos(th) - b * math.sin(th)
            t[..., i + r // 2] = b * math.cos(th) + a * math.sin(th)
        return t

    qs = torch.stack([rot(q[:, t], t) for t in range(L)], 1)
    ks = torch.stack([rot(k[:, t], t) for t in range(L)], 1)
    for h in range(H):
        g = h // (H // Hk)
        s = torch.einsum("bld,bsd->bls", qs[:, :, h], ks[:, :, g]) / D**0.5
        s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
        out[:, :, h] = torch.einsum("bls,bsd->bld", s.softmax(-1), v[:, :, g])
    return layer.out_proj(out.flatten(2))


def test_forward_matches_naive_attention_with_rope_and_gqa():
    layer = make()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert_close("y", naive_attention(layer, x), layer(x), rel=1e-10)


def test_step_and_stateful_forward_match_one_pass():
    layer = make(max_seqlen=16)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    full = layer(x)
    st = layer.allocate_state(2)
    ys = [layer.step(x[:, t], st) for t in range(10)]
    assert_close("step", full, torch.stack(ys, 1), rel=1e-12)
    # chunked continuation: 4 + 1 + 5 tokens
    y1, s1 = layer(x[:, :4], return_state=True)
    y2, s2 = layer(x[:, 4:5], state=s1, return_state=True)
    before = s2.k.clone()
    y3, s3 = layer(x[:, 5:], state=s2, return_state=True)
    assert torch.equal(s2.k, before), "input state must not be modified"
    assert_close("chunks", full, torch.cat([y1, y2, y3], 1), rel=1e-12)
    assert int(s3.offset[0]) == 10 and int(s3.pos[0]) == 10


def test_left_padding_equals_alone():
    layer = make()
    a = torch.randn(1, 4, 32, dtype=torch.float64)
    b = torch.randn(1, 7, 32, dtype=torch.float64)
    x = torch.cat([torch.cat([torch.randn(1, 3, 32, dtype=torch.float64), a], 1), b], 0)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    y, st = layer(x, mask=mask, return_state=True)
    assert torch.isfinite(y).all()
    assert_close("row0", layer(a), y[:1, 3:], rel=1e-12)
    assert_close("row1", layer(b), y[1:], rel=1e-12)
    # decoding continues each row as if alone
    nxt = torch.randn(2, 32, dtype=torch.float64)
    ya = layer(torch.cat([a, nxt[:1, None]], 1))[:, -1]
    yb = layer(torch.cat([b, nxt[1:, None]], 1))[:, -1]
    yt = layer.step(nxt, st)
    assert_close("step0", ya, yt[:1], rel=1e-12)
    assert_close("step1", yb, yt[1:], rel=1e-12)


def test_cu_seqlens_equals_separate_sequences():
    layer = make()
    a, b = torch.randn(1, 3, 32, dtype=torch.float64), torch.randn(1, 5, 32, dtype=torch.float64)
    y = layer(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 3, 8]))
    assert_close("seq a", layer(a), y[:, :3], rel=1e-12)
    assert_close("seq b", layer(b), y[:, 3:], rel=1e-12)


def test_gradients_flow_and_rope_off():
    layer = make(rope_dim=0, n_kv_heads=4)
    x = torch.randn(1, 5, 32, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.in_proj.weight.grad.abs().sum() > 0
    assert layer.inv_freq is None


def test_state_bytes_and_fields():
    layer = Attention(64, n_heads=4, n_kv_heads=1)
    st = layer.allocate_state(3, max_seqlen=10)
    assert isinstance(st, KVCacheState) and st.k.shape == (3, 10, 1, 16)
    assert st.nbytes() == 2 * 3 * 10 * 16 * 4 + 3 * 10 + 2 * 3 * 8
    assert st.bytes_per_slot() == 2 * 3 * 16 * 4 + 3


def test_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        Attention(32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="d_model"):
        Attention(30, n_heads=4)
    with pytest.raises(ValueError, match="rope_dim"):
        Attention(32, n_heads=4, rope_dim=3)
    layer = make()
    with pytest.raises(ValueError, match="x must have"):
        layer(torch.randn(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 3, 32, dtype=torch.float64), mask=torch.ones(2, 4))
    st = layer.allocate_state(1, max_seqlen=4)
    with pytest.raises(ValueError, match="KV cache .* is full"):
        layer(torch.randn(1, 5, 32, dtype=torch.float64), state=st)
    with pytest.raises(TypeError, match="KVCacheState"):
        layer.step(torch.randn(1, 32, dtype=torch.float64), state=object())


def test_output_gate_and_zero_centred_qk_norm():
    """Qwen3-Next attention: RMS-normalised q/k heads (weight as offset from 1) and a sigmoid output gate."""
    layer = make(head_dim=12, rope_dim=4, qk_norm="zero_centred_rms", output_gate=True, max_seqlen=16)
    assert layer.in_proj.weight.shape == (12 * (2 * 4 + 2 * 2), 32)
    with torch.no_grad():
        layer.q_norm.weight.normal_(0, 0.3)
        layer.k_norm.weight.normal_(0, 0.3)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q, gate, k, v = layer.in_proj(x).split([48, 48, 24, 24], -1)

    def norm(t, w):
        return t / (t.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * (1 + w)

    qk = torch.cat([norm(q.unflatten(-1, (4, 12)), layer.q_norm.weight).flatten(2),
                    norm(k.unflatten(-1, (2, 12)), layer.k_norm.weight).flatten(2)], -1)
    # the naive attention of the normalised q / k (a layer whose projections are the identity)
    plain = make(head_dim=12, rope_dim=4)
    plain.in_proj, plain.out_proj = torch.nn.Identity(), torch.nn.Identity()
    att = naive_attention(plain, torch.cat([qk, v], -1))
    want = layer.out_proj(att * torch.sigmoid(gate))
    assert_close("gated attention", want, layer(x), rel=1e-10)
    st = layer.allocate_state(2)
    assert_close("step", layer(x), torch.stack([layer.step(x[:, t], st) for t in range(9)], 1), rel=1e-12)
    with pytest.raises(ValueError, match="qk_norm"):
        make(qk_norm="layer")
