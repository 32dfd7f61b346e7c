"""Mamba-2's decode step, gated RMSNorm and fused layer body on a CUDA device (marked gpu):
the Triton ``ssd_step`` against float64 at the 1.3B shape (H 64, P 64, N 128) with a state pool;
the Triton gated RMSNorm, forward and backward, against float64 at d_inner 4096 in groups;
``mamba_split_conv1d_scan_combined`` on the GPU against the same call in float64 on the reference
forms.
Relative RMS error 1e-5 for float32 inputs, 5e-3 for bfloat16 (y rounded once: 2^-9)."""

import pytest
import torch

from ssmkit.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

from ssmkit.compat.mamba_ssm import mamba_split_conv1d_scan_combined  # noqa: E402
from ssmkit.ops.dispatch import force_backend  # noqa: E402
from ssmkit.ops.fused.gated_norm import gated_rms_norm  # noqa: E402
from ssmkit.ops.ssd import ssd_step  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4])
def test_ssd_step_state_pool(dtype, T):
    b, pool, H, P, G, N = 48, 64, 64, 64, 1, 128
    g = torch.Generator(device="cuda").manual_seed(T)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)

    x, z, dt = r(b, T, H, P), r(b, T, H, P), r(b, T, H, scale=0.5) - 1.0
    B, C = r(b, T, G, N), r(b, T, G, N)
    A = -(torch.rand(H, generator=g, device="cuda") * 4 + 0.5)
    D, bias = torch.randn(H, device="cuda"), torch.randn(H, device="cuda") * 0.3
    state = torch.randn(pool, H, P, N, device="cuda")
    idx = torch.randperm(pool, device="cuda")[:b].to(torch.int32)
    idx[::7] = -1
    s = state.clone()
    y = ssd_step(s, x, dt, A, B, C, D, z, bias, dt_softplus=True, state_batch_indices=idx, backend="triton")
    s64 = state.double()
    y64 = ssd_step(s64, *(t.double() for t in (x, dt, A, B, C, D, z, bias)), dt_softplus=True,
                   state_batch_indices=idx, backend="reference")
    assert torch.isfinite(y).all()
    assert rel_err(y.double(), y64) <= TOL[dtype], rel_err(y.double(), y64)
    assert rel_err(s.double(), s64) <= 1e-5, rel_err(s.double(), s64)
    assert (y[idx < 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nbg", [False, True])
def test_gated_norm_fwd_bwd(dtype, nbg):
    g = torch.Generator(device="cuda").manual_seed(int(nbg))
    M, d, gs = 4096, 4096, 512
    x = torch.randn(M, d, generator=g, device="cuda").to(dtype).requires_grad_()
    z = torch.randn(M, d, generator=g, device="cuda").to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(d, generator=g, device="cuda")).requires_grad_()
    gy = torch.randn(M, d, generator=g, device="cuda").to(dtype)
    y = gated_rms_norm(x, w, z, group_size=gs, norm_before_gate=nbg, backend="triton")
    got = [y, *torch.autograd.grad(y, (x, z, w), gy)]
    ts = [t.detach().double().requires_grad_() for t in (x, z, w)]
    y64 = gated_rms_norm(ts[0], ts[2], ts[1], group_size=gs, norm_before_gate=nbg, backend="reference")
    want = [y64, *torch.autograd.grad(y64, ts, gy.double())]
    for name, a, b in zip(("y", "dx", "dz", "dweight"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel_err(a.double(), b) <= TOL[dtype], (name, rel_err(a.double(), b))
    again = torch.autograd.grad(gated_rms_norm(x, w, z, group_size=gs, norm_before_gate=nbg, backend="triton"),
                                (x, z, w), gy)
    assert all(torch.equal(a, b) for a, b in zip(got[1:], again))  # deterministic


def test_mamba_split_conv1d_scan_combined():
    torch.manual_seed(0)
    b, L, H, P, G, N, W, dm = 2, 1000, 8, 64, 2, 64, 4, 256
    dim, conv = H * P, H * P + 2 * G * N
    ts = [torch.randn(b, L, dim + conv + H, device="cuda"), torch.randn(conv, W, device="cuda") * 0.5,
          torch.randn(conv, device="cuda"), torch.randn(H, device="cuda") * 0.3,
          -(torch.rand(H, device="cuda") + 0.5), torch.randn(H, device="cuda"),
          1 + 0.2 * torch.randn(dim, device="cuda"), torch.randn(dm, dim, device="cuda") / dim**0.5]
    gy = torch.randn(b, L, dm, device="cuda")

    def run(ts):
        ts = [t.detach().requires_grad_() for t in ts]
        out, hT = mamba_split_conv1d_scan_combined(*ts[:6], 256, return_final_states=True, rmsnorm_weight=ts[6],
                                                   outproj_weight=ts[7], headdim=P, ngroups=G,
                                                   norm_before_gate=False)
        return [out, hT, *torch.autograd.grad([out, hT], ts, [gy.to(out.dtype), torch.ones_like(hT)])]

    got = run(ts)  # the forms "auto" picks on CUDA
    with force_backend("reference"):  # float64: the reference forms of conv, SSD and norm
        want = run([t.double() for t in ts])
    for i, (a, w) in enumerate(zip(got, want)):
        assert rel_err(a.double(), w) <= 1e-5, (i, rel_err(a.double(), w))
