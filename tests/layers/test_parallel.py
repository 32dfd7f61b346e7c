"""ParallelHybrid (layer letter P): Mamba-2 and attention on the same input, their outputs added."""

import torch

from ssmkit.layers.parallel import ParallelHybrid, ParallelState

MAMBA = {"d_state": 8, "headdim": 8, "chunk_size": 4, "in_multiplier": 1.3,
         "in_proj_multipliers": (0.5, 1.5, 0.7, 1.2, 0.9)}
ATTN = {"n_heads": 4, "n_kv_heads": 2, "key_multiplier": 0.6}


def _layer():
    torch.manual_seed(0)
    return ParallelHybrid(32, mamba=MAMBA, attn=ATTN, attn_in_multiplier=1.5, attn_out_multiplier=0.8,
                          ssm_out_multiplier=2.0, layer_idx=0).eval()


def test_output_is_the_scaled_sum_of_the_branches():
    layer = _layer()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = 2.0 * layer.mamba(x) + 0.8 * layer.attn(1.5 * x)
        assert torch.allclose(layer(x), want, atol=1e-6)


def test_state_continues_and_steps():
    """prefill + chunk with the state, and token steps, equal one pass; the state's ops keep both parts."""
    layer = _layer()
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        full = layer(x)
        y1, st = layer(x[:, :6], return_state=True)
        y2, st2 = layer(x[:, 6:8], state=st, return_state=True)
        assert torch.allclose(torch.cat([y1, y2], 1), full[:, :8], atol=1e-5)
        state = layer.allocate_state(3, max_seqlen=16)
        assert isinstance(state, ParallelState) and state.max_seqlen == 16
        _, state = layer(x[:, :8], return_state=True)
        snap = state.clone()
        ys = torch.stack([layer.step(x[:, t], state) for t in (8, 9)], 1)
        assert torch.allclose(ys, full[:, 8:], atol=1e-5)
        assert not torch.equal(snap.ssm.ssm_state, state.ssm.ssm_state)  # the clone is a copy
        rows = snap.index_select(torch.tensor([2, 0]))
        assert torch.equal(rows.ssm.ssm_state, snap.ssm.ssm_state[[2, 0]]) and torch.equal(rows.kv.k, snap.kv.k[[2, 0]])
        assert set(snap.tensors()) >= {"ssm.ssm_state", "kv.k"} and snap.nbytes() == state.nbytes()


def test_packed_sequences_equal_separate_ones():
    layer = _layer()
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        packed = layer(x, cu_seqlens=torch.tensor([0, 4, 9]))
        assert torch.allclose(packed, torch.cat([layer(x[:, :4]), layer(x[:, 4:])], 1), atol=1e-5)
