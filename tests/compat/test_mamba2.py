"""``mamba_chunk_scan_combined``: mamba_ssm's argument names, layouts, returns, seq_idx and varlen."""

import pytest
import torch

from ssmkit.compat.mamba2 import mamba_chunk_scan_combined
from ssmkit.ops.ssd import ssd
from ssmkit.testing import assert_close


def inputs(b=2, l=14, h=4, p=3, g=2, n=5):
    torch.manual_seed(0)
    return (torch.randn(b, l, h, p, dtype=torch.float64), torch.randn(b, l, h, dtype=torch.float64),
            -torch.rand(h, dtype=torch.float64) - 0.5, torch.randn(b, l, g, n, dtype=torch.float64),
            torch.randn(b, l, g, n, dtype=torch.float64))


def test_same_as_ssd_and_return_conventions():
    x, dt, A, B, C = inputs()
    D, z, bias = torch.randn(4, 3, dtype=x.dtype), torch.randn_like(x), torch.randn(4, dtype=x.dtype)
    h0 = torch.randn(2, 4, 3, 5, dtype=x.dtype)
    out = mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=D, z=z, dt_bias=bias, initial_states=h0,
                                    dt_softplus=True, dt_limit=(0.0, 1.0))
    assert isinstance(out, torch.Tensor)
    out2, final = mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=D, z=z, dt_bias=bias, initial_states=h0,
                                            dt_softplus=True, dt_limit=(0.0, 1.0), return_final_states=True)
    y, hT = ssd(x, dt, A, B, C, chunk_size=4, D=D, z=z, dt_bias=bias, dt_softplus=True, dt_limit=(0.0, 1.0),
                initial_state=h0, return_final_state=True, backend="reference")
    assert_close("out", y, out, rel=1e-12)
    assert_close("out (with states)", y, out2, rel=1e-12)
    assert_close("final_states", hT, final, rel=1e-12)


def test_seq_idx_resets_state_per_row():
    x, dt, A, B, C = inputs(b=2, l=12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12], dtype=torch.int32)
    out, final = mamba_chunk_scan_combined(x, dt, A, B, C, 4, seq_idx=seq_idx, dt_softplus=True,
                                           return_final_states=True)
    for r, bounds in enumerate([(0, 5, 9, 12), (0, 12)]):
        for a, e in zip(bounds[:-1], bounds[1:]):
            y, s = ssd(x[r : r + 1, a:e], dt[r : r + 1, a:e], A, B[r : r + 1, a:e], C[r : r + 1, a:e],
                       dt_softplus=True, return_final_state=True, backend="reference")
            assert_close(f"row {r} segment {a}:{e}", y, out[r : r + 1, a:e], rel=1e-12)
        assert_close(f"row {r} final state (last sequence)", s, final[r : r + 1], rel=1e-12)


def test_cu_seqlens_varlen_states():
    x, dt, A, B, C = inputs(b=1, l=10)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out, varlen = mamba_chunk_scan_combined(x, dt, A, B, C, 4, cu_seqlens=cu, dt_softplus=True,
                                            return_varlen_states=True)
    assert varlen.shape == (2, 4, 3, 5)
    for i, (a, e) in enumerate([(0, 3), (3, 10)]):
        y, s = ssd(x[:, a:e], dt[:, a:e], A, B[:, a:e], C[:, a:e], dt_softplus=True, return_final_state=True)
        assert_close(f"sequence {i}", y, out[:, a:e], rel=1e-12)
        assert_close(f"varlen state {i}", s, varlen[i : i + 1], rel=1e-12)
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        mamba_chunk_scan_combined(x, dt, A, B, C, 4, return_varlen_states=True)


@pytest.mark.peer
def test_matches_hugging_face_torch_fallback():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2 import modeling_mamba2

    if not hasattr(modeling_mamba2, "mamba2_chunk_scan"):
        pytest.skip(f"transformers {transformers.__version__} has no torch chunk-scan function to compare with")
    x, dt, A, B, C = inputs(b=1, l=11, h=4, g=1)
    D, bias, h0 = torch.randn(4, dtype=x.dtype), torch.randn(4, dtype=x.dtype), torch.randn(1, 4, 3, 5, dtype=x.dtype)
    fn = getattr(modeling_mamba2.mamba2_chunk_scan, "__wrapped__", modeling_mamba2.mamba2_chunk_scan)
    ref, ref_state = fn(x, dt, A, B, C, chunk_size=4, D=D, dt_bias=bias, initial_states=h0, dt_softplus=True,
                        return_final_states=True)
    out, state = mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=D, dt_bias=bias, initial_states=h0,
                                           dt_softplus=True, return_final_states=True)
    assert_close("HF chunk scan output", ref, out, rel=1e-6)  # HF upcasts only to float32
    assert_close("HF chunk scan state", ref_state, state, rel=1e-6)
