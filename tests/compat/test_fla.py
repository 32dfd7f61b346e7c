"""ssmkit.compat.fla: flash-linear-attention's argument order (g before beta), layout and defaults."""

import pytest
import torch

from ssmkit.compat import chunk_gated_delta_rule
from ssmkit.ops import delta_rule
from ssmkit.testing import assert_close


def _inputs(b=2, l=9, h=2, k=4, v=3):
    gen = torch.Generator().manual_seed(0)
    q, kk = (torch.randn(b, l, h, k, generator=gen, dtype=torch.float64) for _ in range(2))
    vv = torch.randn(b, l, h, v, generator=gen, dtype=torch.float64)
    g = -torch.rand(b, l, h, generator=gen, dtype=torch.float64)
    beta = torch.rand(b, l, h, generator=gen, dtype=torch.float64)
    s0 = torch.randn(b, h, k, v, generator=gen, dtype=torch.float64)
    return q, kk, vv, g, beta, s0


def test_positional_g_then_beta_matches_native_keywords():
    q, k, v, g, beta, s0 = _inputs()
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, None, s0, True, True)
    o_ref, s_ref = delta_rule(q, k, v, beta=beta, g=g, scale=q.shape[-1] ** -0.5, use_qk_l2norm=True,
                              initial_state=s0, return_final_state=True, backend="reference")
    assert_close("o", o_ref, o, rel=1e-10)
    assert_close("final state", s_ref, s, rel=1e-10)
    # the two have the same shape: swapping them gives another result, which is why native is by keyword
    swapped = delta_rule(q, k, v, beta=g.neg().sigmoid(), g=-beta, scale=q.shape[-1] ** -0.5, use_qk_l2norm=True)
    assert (swapped - o).abs().max() > 1e-3


def test_head_first_and_no_final_state():
    q, k, v, g, beta, _ = _inputs()
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.5)
    assert s is None
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    o_hf, _ = chunk_gated_delta_rule(t(q), t(k), t(v), t(g), t(beta), scale=0.5, head_first=True)
    assert_close("head_first", o, t(o_hf), rel=1e-12)


def test_grouped_value_heads_rejected():
    q, k, v, g, beta, _ = _inputs()
    with pytest.raises(ValueError, match="grouped value heads"):
        chunk_gated_delta_rule(q, k, torch.cat([v, v], 2), g, beta)
