"""mamba_ssm-layout entry points: the same numbers as ssmkit's ops after transposing."""

import torch

from ssmkit.compat.mamba1 import selective_scan_fn, selective_state_update
from ssmkit.ops import selective_scan
from ssmkit.ops import selective_scan_step as ssu
from ssmkit.testing import assert_close


def _inputs(b=2, d=6, L=9, n=4, groups=None):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (b, n, L) if groups is None else (b, groups, n, L)
    return dict(u=r(b, d, L), delta=r(b, d, L), A=-r(d, n).abs(), B=r(*bc), C=r(*bc), D=r(d), z=r(b, d, L),
                delta_bias=r(d))


def test_selective_scan_fn_layout():
    for groups in (None, 3):
        p = _inputs(groups=groups)
        out, last = selective_scan_fn(**p, delta_softplus=True, return_last_state=True)
        assert out.shape == (2, 6, 9) and last.shape == (2, 6, 4)
        B = p["B"].permute(0, 2, 1) if groups is None else p["B"].permute(0, 3, 1, 2)
        C = p["C"].permute(0, 2, 1) if groups is None else p["C"].permute(0, 3, 1, 2)
        y, h = selective_scan(p["u"].transpose(1, 2), p["delta"].transpose(1, 2), p["A"], B, C, p["D"],
                              p["z"].transpose(1, 2), p["delta_bias"], dt_softplus=True, return_final_state=True)
        assert_close("out", y.transpose(1, 2), out, 1e-12)
        assert_close("last", h, last, 1e-12)
        assert selective_scan_fn(**p).shape == (2, 6, 9)


def test_selective_scan_fn_fixed_B_and_grad():
    p = _inputs()
    fixedB = torch.randn(6, 4, dtype=torch.float64)
    out = selective_scan_fn(p["u"], p["delta"].abs(), p["A"], fixedB, p["C"])
    # channel d uses its own row of B at every step: compare with the per-channel reference
    b, d, L = p["u"].shape
    h = torch.zeros(b, d, 4, dtype=torch.float64)
    ys = []
    for t in range(L):
        dt = p["delta"][:, :, t].abs()
        h = torch.exp(dt[..., None] * p["A"]) * h + (dt * p["u"][:, :, t])[..., None] * fixedB
        ys.append((h * p["C"][:, None, :, t]).sum(-1))
    assert_close("out", torch.stack(ys, -1), out, 1e-12)
    u = p["u"].clone().requires_grad_()
    selective_scan_fn(u, p["delta"], p["A"], p["B"], p["C"]).sum().backward()
    assert u.grad is not None and u.grad.shape == u.shape


def test_selective_state_update_layouts():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # Mamba-1 layout
    state = r(2, 6, 4)
    args = dict(x=r(2, 6), dt=r(2, 6), A=-r(6, 4).abs(), B=r(2, 4), C=r(2, 4), D=r(6), z=r(2, 6), dt_bias=r(6),
                dt_softplus=True)
    want_state = state.clone()
    want = ssu(want_state, **args)
    got = selective_state_update(state, **args)
    assert_close("y", want, got, 1e-6)
    assert_close("state", want_state, state, 1e-6)
    # multi-head layout (batch, H, P, N) with groups
    H, P, N, G = 4, 3, 5, 2
    state = r(2, H, P, N)
    margs = dict(x=r(2, H, P), dt=r(2, H, P), A=-r(H, P, N).abs(), B=r(2, G, N), C=r(2, G, N), D=r(H, P),
                 z=r(2, H, P), dt_bias=r(H, P), dt_softplus=True)
    flat_state = state.reshape(2, H * P, N).clone()
    want = ssu(flat_state, margs["x"].reshape(2, -1), margs["dt"].reshape(2, -1), margs["A"].reshape(-1, N),
               margs["B"], margs["C"], margs["D"].reshape(-1), margs["z"].reshape(2, -1),
               margs["dt_bias"].reshape(-1), dt_softplus=True)
    got = selective_state_update(state, **margs)
    assert got.shape == (2, H, P)
    assert_close("y", want.reshape(2, H, P), got, 1e-6)
    assert_close("state", flat_state.reshape(2, H, P, N), state, 1e-6)


def _mamba2_call(b, pool, H=4, P=3, N=5, G=2, tied=True):
    """Arguments as mamba_ssm's Mamba2.step passes them: A, dt, dt_bias, D repeated over headdim
    (stride-0 views) when ``tied``; plain tensors of the same values otherwise."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    A, dt, bias, D = -r(H).abs(), r(b, H), r(H), r(H)
    args = dict(x=r(b, H, P), dt=dt[..., None].expand(b, H, P), A=A[:, None, None].expand(H, P, N),
                B=r(b, G, N), C=r(b, G, N), D=D[:, None].expand(H, P), z=r(b, H, P),
                dt_bias=bias[:, None].expand(H, P), dt_softplus=True)
    if not tied:
        args = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return r(pool, H, P, N), args


def test_selective_state_update_state_pool():
    """state_batch_indices: rows read/write a permuted part of a pool, -1 is padding (output 0,
    no state touched); the tied Mamba-2 call (through ssd_step) and the general multi-head path
    give the same numbers, equal to stepping the gathered rows."""
    idx = torch.tensor([3, -1, 0])
    results = []
    for tied in (True, False):
        pool, args = _mamba2_call(3, 5, tied=tied)
        before = pool.clone()
        y = selective_state_update(pool, **args, state_batch_indices=idx)
        assert (y[1] == 0).all()
        for untouched in (1, 2, 4):
            assert torch.equal(pool[untouched], before[untouched])
        rows, keep = torch.tensor([3, 0]), torch.tensor([0, 2])
        sub = before[rows].clone()
        sel = {k: (v[keep] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
        want = selective_state_update(sub, **{**sel, **{k: sel[k].contiguous() for k in ("A", "dt", "dt_bias", "D")}})
        assert_close("y", want, y[keep], 1e-12)
        assert_close("pool rows", sub, pool[rows], 1e-12)
        results.append((y, pool))
    assert_close("tied vs general y", results[1][0], results[0][0], 1e-12)
    assert_close("tied vs general state", results[1][1], results[0][1], 1e-12)
