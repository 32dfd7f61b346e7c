import torch

from ssmkit.layers.norm import RMSNorm, RMSNormGated, rms_norm
from ssmkit.testing import assert_close


def test_rmsnorm_matches_formula():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    n = RMSNorm(8).double()
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert_close("rmsnorm", ref, n(x), rel=1e-12)


def test_gated_groups_normalise_each_group():
    x, z = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    n = RMSNormGated(8, group_size=4).double()
    g = x * torch.nn.functional.silu(z)
    ref = torch.cat([rms_norm(g[:, :4], None), rms_norm(g[:, 4:], None)], -1)
    assert_close("gated-group", ref, n(x, z), rel=1e-12)
    n2 = RMSNormGated(8, group_size=4, norm_before_gate=True).double()
    ref2 = torch.cat([rms_norm(x[:, :4], None), rms_norm(x[:, 4:], None)], -1) * torch.nn.functional.silu(z)
    assert_close("gated-before", ref2, n2(x, z), rel=1e-12)
