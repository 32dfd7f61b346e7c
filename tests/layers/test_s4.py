"""S4 and S4D layers: convolution view == recurrence, step == forward, state in/out, masks,
packed sequences, bidirectional, gradients and bad input."""

import copy

import pytest
import torch
from torch.func import functional_call

from ssmkit.layers import S4, S4D, S4State
from ssmkit.ops.conv.ssm_kernel import dplr_bilinear
from ssmkit.testing import assert_close

LAYERS = [S4D, S4]


def _linear_layer(cls, H=2, N=8, **kw):
    """A float64 layer whose block is the identity around the SSM (no activation, no GLU,
    output linear = I), so forward returns the SSM output y = K * u + D u itself."""
    m = cls(H, d_state=N, activation=None, postact=None, **kw).double()
    with torch.no_grad():
        m.output_linear.weight.copy_(torch.eye(H, dtype=torch.float64))
        m.output_linear.bias.zero_()
    return m


def _unrolled(m, u, x0):
    """x_k = Ā x_{k-1} + B̄ u_k, y_k = Re(C x_k) (x2 for S4D's kept half) + D u_k, as a plain loop."""
    if isinstance(m, S4D):
        log_Abar, Bbar, C = m.discretized()
        Abar = torch.exp(log_Abar)
        apply = lambda x: Abar * x  # noqa: E731
        scale = 2.0
    else:
        Lam, P, B, C, dt = m.full_system()
        Ad, Bbar = dplr_bilinear(Lam, P, P, B, dt)
        apply = lambda x: torch.einsum("hnm,bhm->bhn", Ad, x)  # noqa: E731
        scale = 1.0
    x, ys = x0.clone(), []
    for k in range(u.shape[1]):
        x = apply(x) + Bbar * u[:, k, :, None]
        ys.append(scale * torch.einsum("hn,bhn->bh", C[0], x).real + m.D[0] * u[:, k])
    return torch.stack(ys, 1), x


def _random_state(m, batch):
    st = m.allocate_state(batch)
    st.ssm.copy_(torch.randn(st.ssm.shape, dtype=st.ssm.dtype))
    return st


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("L", [1, 257, 4096])
def test_conv_view_equals_recurrence(cls, L):
    m = _linear_layer(cls)
    u = torch.randn(2, L, 2, dtype=torch.float64)
    st = _random_state(m, 2)
    y, new = m(u, state=st, return_state=True)
    y_rec, x_rec = _unrolled(m, u, st.ssm)
    assert_close("y", y_rec, y, rel=1e-10)
    assert_close("final state", torch.view_as_real(x_rec), torch.view_as_real(new.ssm), rel=1e-10)
    # zero initial state too
    assert_close("y (x0=0)", _unrolled(m, u, torch.zeros_like(st.ssm))[0], m(u), rel=1e-10)


@pytest.mark.parametrize("cls, kw", [(S4D, {"init": "diag-inv"}), (S4D, {"discretization": "bilinear", "init": "legs"}),
                                     (S4D, {"init": "diag-real"}), (S4, {"measure": "legt"}), (S4, {})])
def test_step_equals_forward(cls, kw):
    m = cls(3, d_state=8, channels=2, **kw).double()
    u = torch.randn(2, 40, 3, dtype=torch.float64)
    st = _random_state(m, 2)
    st0 = st.clone()
    y, new = m(u, state=st, return_state=True)
    torch.testing.assert_close(st.ssm, st0.ssm)  # forward does not modify its input state
    with torch.no_grad():  # generation mode (S4 caches its step matrices)
        ys = torch.stack([m.step(u[:, t], st) for t in range(u.shape[1])], 1)
    assert_close("y", y, ys, rel=1e-10)
    assert_close("state", torch.view_as_real(new.ssm), torch.view_as_real(st.ssm), rel=1e-10)


@pytest.mark.parametrize("cls", LAYERS)
def test_step_with_grad_and_after_parameter_update(cls):
    m = cls(2, d_state=4).double()
    u = torch.randn(1, 6, 2, dtype=torch.float64)
    for _ in range(2):
        st = m.allocate_state(1)
        with torch.no_grad():
            ys = torch.stack([m.step(u[:, t], st) for t in range(6)], 1)
        assert_close("step (no grad)", m(u), ys, rel=1e-10)
        st = m.allocate_state(1)
        ys = torch.stack([m.step(u[:, t], st) for t in range(6)], 1)
        ys.sum().backward()  # the step is differentiable too
        assert m.log_dt.grad is not None
        with torch.no_grad():  # an optimizer-like in-place update must not leave stale step caches
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))


@pytest.mark.parametrize("cls", LAYERS)
def test_continuing_from_state_equals_one_pass(cls):
    m = cls(3, d_state=6).double()
    u = torch.randn(2, 30, 3, dtype=torch.float64)
    y_all, s_all = m(u, return_state=True)
    y1, s1 = m(u[:, :11], return_state=True)
    y2, s2 = m(u[:, 11:12], state=s1, return_state=True)
    y3, s3 = m(u[:, 12:], state=s2, return_state=True)
    assert_close("y", y_all, torch.cat([y1, y2, y3], 1), rel=1e-10)
    assert_close("state", torch.view_as_real(s_all.ssm), torch.view_as_real(s3.ssm), rel=1e-10)


@pytest.mark.parametrize("cls", LAYERS)
def test_left_padding_mask_matches_each_prompt(cls):
    m = cls(3, d_state=4).double()
    a = torch.randn(1, 7, 3, dtype=torch.float64)
    b = torch.randn(1, 4, 3, dtype=torch.float64)
    st = _random_state(m, 2)
    batch = torch.zeros(2, 7, 3, dtype=torch.float64)
    batch[0], batch[1, 3:] = a[0], b[0]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    y, new = m(batch, state=st, return_state=True, mask=mask)
    for r, (seq, pad) in enumerate([(a, 0), (b, 3)]):
        st_r = S4State(ssm=st.ssm[r : r + 1].clone())
        y_r, s_r = m(seq, state=st_r, return_state=True)
        assert_close(f"y row {r}", y_r[0], y[r, pad:], rel=1e-10)
        assert_close(f"state row {r}", torch.view_as_real(s_r.ssm[0]), torch.view_as_real(new.ssm[r]), rel=1e-10)
    assert y[1, :3].abs().max() == 0


@pytest.mark.parametrize("cls", LAYERS)
def test_cu_seqlens_matches_separate_sequences(cls):
    m = cls(2, d_state=4).double()
    lens = [5, 1, 9]
    seqs = [torch.randn(1, n, 2, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    y, st = m(torch.cat(seqs, 1), cu_seqlens=cu, return_state=True)
    assert st.ssm.shape[0] == 3
    for i, s in enumerate(seqs):
        y_i, st_i = m(s, return_state=True)
        assert_close(f"y {i}", y_i[0], y[0, cu[i] : cu[i + 1]], rel=1e-10)
        assert_close(f"state {i}", torch.view_as_real(st_i.ssm[0]), torch.view_as_real(st.ssm[i]), rel=1e-10)


@pytest.mark.parametrize("cls", LAYERS)
def test_bidirectional_is_causal_plus_anticausal(cls):
    m = _linear_layer(cls, H=2, N=4, bidirectional=True)
    L = 12
    u = torch.randn(2, L, 2, dtype=torch.float64)
    K = m.kernel(L)  # (L, 2, H): forward kernel, backward kernel
    ref = torch.zeros_like(u)
    for t in range(L):
        for s in range(L):
            ref[:, t] += K[t - s, 0] * u[:, s] if s <= t else K[s - t - 1, 1] * u[:, s]
    ref += m.D[0] * u
    assert_close("y", ref, m(u), rel=1e-10)
    with pytest.raises(ValueError, match="bidirectional"):
        m.allocate_state(1)
    with pytest.raises(ValueError, match="bidirectional"):
        m(u, return_state=True)


@pytest.mark.parametrize("cls", LAYERS)
def test_gradcheck(cls):
    m = cls(2, d_state=4, channels=2).double()
    x = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    names = ["log_dt", "log_A_real", "A_imag", "B", "C", "D"] + (["P"] if cls is S4 else [])
    params = {n: getattr(m, n).detach().clone().requires_grad_() for n in names}

    def fn(x, *vals):
        return functional_call(m, dict(zip(names, vals)), (x,))

    assert torch.autograd.gradcheck(m, (x,))  # every column of the input Jacobian
    # fast_mode checks random directions (vector-Jacobian products) instead of every column
    assert torch.autograd.gradcheck(fn, (x, *params.values()), fast_mode=True)
    # with an initial state: gradient flows to the state's tensor too
    x0 = torch.randn(1, *m._state_shape(), dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: m(x, state=S4State(ssm=s)), (x, x0), fast_mode=True)


@pytest.mark.parametrize("cls", LAYERS)
def test_float32_bf16_and_state_dtype(cls):
    m = cls(4, d_state=8)
    st = m.allocate_state(2)
    assert st.ssm.dtype == torch.complex64 and st.ssm.shape[:2] == (2, 4)
    x = torch.randn(2, 16, 4)
    y, new = m(x, return_state=True)
    assert y.shape == x.shape and y.dtype == torch.float32 and new.ssm.dtype == torch.complex64
    y_ref = m.double()(x.double())
    assert_close("fp32", y_ref, y, rel=1e-5)
    # a bf16 model keeps its SSM parameters in float32 (their rounding would change the model)
    m = m.float()
    mb = copy.deepcopy(m).to(torch.bfloat16)
    assert mb.log_dt.dtype == mb.A_imag.dtype == mb.C.dtype == torch.float32
    assert mb.output_linear.weight.dtype == mb.D.dtype == torch.bfloat16
    torch.testing.assert_close(mb.A_imag, m.A_imag, rtol=0, atol=0)
    yb, sb = mb(x.bfloat16(), return_state=True)
    assert yb.dtype == torch.bfloat16 and sb.ssm.dtype == torch.complex64
    assert_close("bf16 model", m(x), yb, rel=3e-2)
    assert mb.step(x[:, 0].bfloat16(), mb.allocate_state(2)).dtype == torch.bfloat16
    assert cls(4, d_state=8, dtype=torch.bfloat16).A_imag.dtype == torch.float32


@pytest.mark.parametrize("cls", LAYERS)
def test_lr_marks_ssm_parameters(cls):
    m = cls(4, d_state=8, lr=1e-3)
    marked = {n for n, p in m.named_parameters() if hasattr(p, "_optim")}
    expected = {"log_dt", "log_A_real", "A_imag", "B"} | ({"P"} if cls is S4 else set())
    assert marked == expected
    assert m.log_dt._optim == {"lr": 1e-3, "weight_decay": 0.0}
    assert not any(hasattr(p, "_optim") for p in cls(4, d_state=8).parameters())


@pytest.mark.parametrize("cls", LAYERS)
def test_gate_free_variant(cls):
    m = cls(4, d_state=8, postact=None, activation=None)
    assert m.output_linear.out_features == 4
    x = torch.randn(1, 10, 4)
    y = m(x)
    assert_close("linear in x", m(2 * x), 2 * y - m.output_linear.bias, rel=1e-5)


@pytest.mark.parametrize("cls", LAYERS)
def test_bad_input(cls):
    m = cls(4, d_state=8)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(10, 4))
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(1, 10, 5))
    with pytest.raises(TypeError, match="x"):
        m(torch.ones(1, 10, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="d_state"):
        cls(4, d_state=0)
    with pytest.raises(ValueError, match="d_state"):
        cls(4, d_state=-2)
    with pytest.raises(ValueError, match="d_state"):
        cls(4, d_state=7)
    with pytest.raises(ValueError, match="d_model"):
        cls(0)
    with pytest.raises(ValueError, match="activation"):
        cls(4, activation="swish!")
    with pytest.raises(ValueError, match="state.ssm"):
        m(torch.randn(2, 3, 4), state=m.allocate_state(3))
    with pytest.raises(TypeError, match="state"):
        m.step(torch.randn(2, 4), None)
    with pytest.raises(ValueError, match="x_t"):
        m.step(torch.randn(2, 5), m.allocate_state(2))
    with pytest.raises(ValueError, match="mask"):
        m(torch.randn(2, 3, 4), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(2, 3, 4), cu_seqlens=torch.tensor([0, 3]))


def test_unknown_init_and_measure():
    with pytest.raises(ValueError, match="init"):
        S4D(4, init="hippo")
    with pytest.raises(ValueError, match="measure"):
        S4(4, measure="legz")
    with pytest.raises(ValueError, match="measure"):
        S4(4, measure="fourier")
    with pytest.raises(ValueError, match="discretization"):
        S4D(4, discretization="rk4")
