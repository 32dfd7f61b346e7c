"""``mamba_split_conv1d_scan_combined``: mamba_ssm's fused Mamba-2 layer body against a plain
composition written here (depthwise conv + SiLU, the reference SSD, the gated RMSNorm from its
definition, out_proj) in float64: output, final states and every gradient; with and without the
norm and out_proj, the gated-MLP channels, packed sequences, and the recompute's saved memory."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.compat.mamba_ssm import mamba_split_conv1d_scan_combined
from ssmkit.ops.dispatch import force_backend
from ssmkit.ops.ssd import ssd
from ssmkit.testing import assert_close, grad_on_another_thread

B_, L_, H, P, G, N, W, OUT = 2, 10, 4, 4, 2, 3, 4, 6
DIM = H * P
CONV = DIM + 2 * G * N


def _params(*, d_mlp=0, norm=True, outproj=True, D_channel=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).requires_grad_()  # noqa: E731
    p = dict(
        zxbcdt=r(B_, L_, 2 * d_mlp + DIM + CONV + H), conv1d_weight=r(CONV, W, scale=0.5), conv1d_bias=r(CONV),
        dt_bias=r(H, scale=0.3), A=(-torch.rand(H, generator=g, dtype=torch.float64) - 0.2).requires_grad_(),
        D=r(H, P) if D_channel else r(H), initial_states=r(B_, H, P, N),
        rmsnorm_weight=(1 + 0.2 * torch.randn(DIM, generator=g, dtype=torch.float64)).requires_grad_() if norm else None,
        outproj_weight=r(OUT, d_mlp + DIM) if outproj else None, outproj_bias=r(OUT) if outproj else None)
    return p


def _plain(p, *, d_mlp, nbg, eps=1e-6, dt_limit=(0.0, math.inf)):
    zx0, z, xBC, dt = p["zxbcdt"].split([2 * d_mlp, DIM, CONV, H], dim=-1)
    xBC = F.conv1d(xBC.transpose(1, 2), p["conv1d_weight"][:, None], p["conv1d_bias"], padding=W - 1,
                   groups=CONV)[..., :L_]
    xBC = F.silu(xBC).transpose(1, 2)
    x, Bm, Cm = xBC.split([DIM, G * N, G * N], dim=-1)
    z4 = z.reshape(B_, L_, H, P)
    norm = p["rmsnorm_weight"]
    y, hT = ssd(x.reshape(B_, L_, H, P), dt, p["A"], Bm.reshape(B_, L_, G, N), Cm.reshape(B_, L_, G, N), p["D"],
                z=z4 if norm is None else None, dt_bias=p["dt_bias"], dt_softplus=True, dt_limit=dt_limit,
                initial_state=p["initial_states"], return_final_state=True, backend="reference")
    y = y.reshape(B_, L_, DIM)
    if norm is not None:
        u = y if nbg else y * F.silu(z)
        ug = u.unflatten(-1, (G, DIM // G))
        y = (ug / torch.sqrt(ug.square().mean(-1, keepdim=True) + eps)).flatten(-2) * norm
        if nbg:
            y = y * F.silu(z)
    if d_mlp:
        x0, z0 = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(x0) * z0, y], -1)
    if p["outproj_weight"] is not None:
        y = F.linear(y, p["outproj_weight"], p["outproj_bias"])
    return y, hT


def _check(*, d_mlp=0, norm=True, outproj=True, D_channel=False, nbg=False, dt_limit=(0.0, math.inf)):
    p = _params(d_mlp=d_mlp, norm=norm, outproj=outproj, D_channel=D_channel)
    out, hT = mamba_split_conv1d_scan_combined(
        p["zxbcdt"], p["conv1d_weight"], p["conv1d_bias"], p["dt_bias"], p["A"], p["D"], 4,
        initial_states=p["initial_states"], dt_limit=dt_limit, return_final_states=True,
        rmsnorm_weight=p["rmsnorm_weight"], outproj_weight=p["outproj_weight"], outproj_bias=p["outproj_bias"],
        headdim=None if D_channel else P, ngroups=G, norm_before_gate=nbg)
    want, want_h = _plain(p, d_mlp=d_mlp, nbg=nbg, dt_limit=dt_limit)
    assert out.shape == (B_, L_, OUT if outproj else d_mlp + DIM)
    assert_close("out", want, out, rel=1e-12)
    assert_close("final_states", want_h, hT, rel=1e-12)
    live = [(k, v) for k, v in p.items() if v is not None]
    gen = torch.Generator().manual_seed(9)
    gy, gh = torch.randn(out.shape, generator=gen, dtype=out.dtype), torch.randn(hT.shape, generator=gen, dtype=out.dtype)
    got = torch.autograd.grad((out * gy).sum() + (hT * gh).sum(), [v for _, v in live])
    ref = torch.autograd.grad((want * gy).sum() + (want_h * gh).sum(), [v for _, v in live])
    for (name, _), a, b in zip(live, ref, got):
        assert_close(f"d{name}", a, b, rel=1e-11)


def test_norm_and_outproj():
    _check()


def test_no_norm_no_outproj_D_per_channel():
    _check(norm=False, outproj=False, D_channel=True)


def test_norm_after_gate_with_mlp_channels_and_dt_limit():
    _check(d_mlp=3, outproj=False, nbg=True, dt_limit=(0.05, 2.0))
    _check(d_mlp=3, nbg=True)


def test_seq_idx_resets_conv_and_state():
    """Two sequences packed in each row (seq_idx): the same as running them one by one."""
    p = _params(outproj=False)
    kw = dict(rmsnorm_weight=p["rmsnorm_weight"], headdim=P, ngroups=G, norm_before_gate=False)
    args = [p[k] for k in ("zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D")]
    seq_idx = torch.zeros(B_, L_, dtype=torch.int32)
    seq_idx[0, 6:] = 1
    seq_idx[1, 3:] = 1
    out = mamba_split_conv1d_scan_combined(*args, 4, seq_idx=seq_idx, **kw)
    for r, cut in ((0, 6), (1, 3)):
        for a, e in ((0, cut), (cut, L_)):
            part = mamba_split_conv1d_scan_combined(args[0][r:r + 1, a:e], *args[1:], 4, **kw)
            assert_close(f"row {r} tokens {a}:{e}", part, out[r:r + 1, a:e], rel=1e-12)


def test_recompute_keeps_only_inputs_and_normalised_output():
    """With autograd recording, the conv/SSD/norm intermediates are not kept: the tensors saved
    for backward are the inputs, out_proj's input and nothing the size of the activations more."""
    p = _params()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mamba_split_conv1d_scan_combined(
            p["zxbcdt"], p["conv1d_weight"], p["conv1d_bias"], p["dt_bias"], p["A"], p["D"], 4,
            initial_states=p["initial_states"], rmsnorm_weight=p["rmsnorm_weight"],
            outproj_weight=p["outproj_weight"], outproj_bias=p["outproj_bias"], headdim=P, ngroups=G)
    inputs = sum(v.numel() for v in p.values() if v is not None)
    assert sum(saved) <= inputs + B_ * L_ * DIM, (sum(saved), inputs)
    out.sum().backward()
    assert p["conv1d_weight"].grad is not None and p["rmsnorm_weight"].grad is not None


def test_recompute_on_another_thread_uses_the_forced_forms():
    """Autograd runs a CUDA backward on a thread of its own: the recomputation there picks the
    forms ``force_backend`` picked for the forward (a different form saves different tensors)."""
    p = _params()
    with force_backend("reference"):
        out, hT = mamba_split_conv1d_scan_combined(
            p["zxbcdt"], p["conv1d_weight"], p["conv1d_bias"], p["dt_bias"], p["A"], p["D"], 4,
            initial_states=p["initial_states"], return_final_states=True, rmsnorm_weight=p["rmsnorm_weight"],
            outproj_weight=p["outproj_weight"], outproj_bias=p["outproj_bias"], headdim=P, ngroups=G,
            norm_before_gate=False)
    live = [v for v in p.values() if v is not None]
    got = grad_on_another_thread(out.sum() + hT.sum(), live)
    want = torch.autograd.grad(sum(x.sum() for x in _plain(p, d_mlp=0, nbg=False)), live)
    for a, b in zip(want, got):
        assert_close("grad", a, b, rel=1e-11)


def test_bad_inputs():
    p = _params()
    args = [p[k] for k in ("zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D")]
    with pytest.raises(ValueError, match="headdim must be a positive int"):
        mamba_split_conv1d_scan_combined(*args, 4)
    with pytest.raises(ValueError, match="do not fit"):
        mamba_split_conv1d_scan_combined(args[0][..., :-1], *args[1:], 4, headdim=P, ngroups=G)
    with pytest.raises(ValueError, match="ngroups must be a positive int dividing nheads=4"):
        mamba_split_conv1d_scan_combined(*args, 4, headdim=P, ngroups=3)
    with pytest.raises(ValueError, match="outproj_bias needs outproj_weight"):
        mamba_split_conv1d_scan_combined(*args, 4, headdim=P, ngroups=G, outproj_bias=p["outproj_bias"])
