"""selective_scan: the chunked form against the sequential reference (outputs, final states and
gradients of every input, float64 and float32), gradcheck, split-and-carry, packed sequences,
decode steps == forward, dtypes and clear errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import cpu_compile, selective_scan, selective_scan_step, selective_state_update
from ssmkit.ops.cpu_compile import compiler_available, set_cpu_compile
from ssmkit.ops.dispatch import available
from ssmkit.ops.selective_scan import chunked as chunked_mod
from ssmkit.ops.selective_scan import compiled as compiled_mod
from ssmkit.testing import assert_close

NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]


def make(bsz, L, dim, N, G=None, dtype=torch.float64, D=True, z=True, bias=True, init=True, seed=0):
    """Inputs as a dict (None where absent); B/C 3-D when G is None."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    bc = (bsz, L, N) if G is None else (bsz, L, G, N)
    return {
        "x": r(bsz, L, dim),
        "dt": r(bsz, L, dim, scale=0.5),
        "A": (-torch.rand(dim, N, generator=g, dtype=torch.float64) * 2 - 0.05).to(dtype),
        "B": r(*bc),
        "C": r(*bc),
        "D": r(dim) if D else None,
        "z": r(bsz, L, dim) if z else None,
        "dt_bias": r(dim, scale=0.5) if bias else None,
        "initial_state": r(bsz, dim, N) if init else None,
    }


def run(inp, backend, softplus=True, grads=True, cu_seqlens=None, seed=1):
    """Forward + backward with fixed cotangents; returns (y, h, {name: grad})."""
    leaves = {k: v.detach().clone().requires_grad_(grads) for k, v in inp.items() if v is not None}
    args = {k: leaves.get(k) for k in NAMES}
    y, h = selective_scan(
        args["x"], args["dt"], args["A"], args["B"], args["C"], D=args["D"], z=args["z"],
        dt_bias=args["dt_bias"], dt_softplus=softplus, initial_state=args["initial_state"],
        return_final_state=True, cu_seqlens=cu_seqlens, backend=backend,
    )
    if not grads:
        return y, h, {}
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    names = list(leaves)
    gr = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), [leaves[k] for k in names])
    return y, h, dict(zip(names, gr))


def compare(ref, out, rel):
    assert_close("y", ref[0], out[0], rel)
    assert_close("final_state", ref[1], out[1], rel)
    for k in ref[2]:
        assert_close(f"grad {k}", ref[2][k], out[2][k], rel)


@pytest.fixture
def chunk(request):
    old = chunked_mod.CHUNK
    yield lambda c: setattr(chunked_mod, "CHUNK", c)
    chunked_mod.CHUNK = old


def test_forms_registered():
    assert {"reference", "chunked"} <= set(available("selective_scan"))
    assert "reference" in available("selective_scan_step")


@settings(max_examples=30)
@given(
    bsz=st.integers(1, 2), L=st.integers(1, 19), Dg=st.integers(1, 4), N=st.integers(1, 7),
    G=st.sampled_from([None, 1, 2, 3]), c=st.sampled_from([1, 3, 4, 8, 64]),
    D=st.booleans(), z=st.booleans(), bias=st.booleans(), init=st.booleans(), softplus=st.booleans(),
)
def test_chunked_matches_reference_float64(bsz, L, Dg, N, G, c, D, z, bias, init, softplus):
    old = chunked_mod.CHUNK
    chunked_mod.CHUNK = c
    try:
        dim = Dg * (G or 1)
        inp = make(bsz, L, dim, N, G, D=D, z=z, bias=bias, init=init, seed=L * 7 + N)
        compare(run(inp, "reference", softplus), run(inp, "chunked", softplus), 1e-10)
    finally:
        chunked_mod.CHUNK = old


@settings(max_examples=8)
@given(L=st.integers(1, 150), N=st.sampled_from([1, 5, 16]), G=st.sampled_from([None, 2]))
def test_chunked_matches_reference_float32(L, N, G):
    inp = make(2, L, 6, N, G, dtype=torch.float32, seed=L)
    ref = run(inp, "reference")
    out = run(inp, "chunked")
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    compare(ref, out, 1e-5)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_gradcheck(backend, chunk):
    chunk(2)
    inp = make(1, 5, 2, 3, G=None)
    leaves = [inp[k].clone().requires_grad_() for k in NAMES]

    def f(*a):
        y, h = selective_scan(*a[:5], D=a[5], z=a[6], dt_bias=a[7], dt_softplus=True, initial_state=a[8],
                              return_final_state=True, backend=backend)
        return y, h

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_split_and_carry(backend, chunk):
    chunk(4)
    inp = make(2, 23, 4, 3, G=2)
    y, h, _ = run(inp, backend, grads=False)
    for cut in (0, 1, 4, 9, 22, 23):
        first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C", "z") and v is not None else v) for k, v in inp.items()}
        second = {k: (v[:, cut:] if k in ("x", "dt", "B", "C", "z") and v is not None else v) for k, v in inp.items()}
        y1, h1, _ = run(first, backend, grads=False)
        second["initial_state"] = h1
        y2, h2, _ = run(second, backend, grads=False)
        assert_close(f"y (cut {cut})", y, torch.cat([y1, y2], 1), 1e-12)
        assert_close(f"state (cut {cut})", h, h2, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_packed_equals_separate(backend, chunk):
    chunk(3)
    lens = [4, 1, 7, 0, 5]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    inp = make(1, sum(lens), 4, 3, G=None)
    inits = torch.randn(len(lens), 4, 3, dtype=torch.float64)
    inp["initial_state"] = inits
    y, h, gr = run(inp, backend, cu_seqlens=cu)
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        one = {k: (v[:, a:b] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
        one["initial_state"] = inits[i : i + 1]
        yi, hi, _ = run(one, backend, grads=False)
        assert_close(f"y{i}", yi, y[:, a:b], 1e-12)
        assert_close(f"h{i}", hi, h[i : i + 1], 1e-12)
    if backend == "chunked":
        ref = run(inp, "reference", cu_seqlens=cu)
        compare(ref, (y, h, gr), 1e-10)


def test_step_matches_forward_10k_tokens():
    """Decode steps in float32 == one chunked pass over 10,000 tokens."""
    L, dim, N = 10_000, 3, 4
    inp = make(1, L, dim, N, G=None, dtype=torch.float32, init=False)
    y, h = selective_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["dt_bias"],
                          dt_softplus=True, return_final_state=True)
    state = torch.zeros(1, dim, N)
    x, dt, B, C, z = (inp[k][0] for k in ("x", "dt", "B", "C", "z"))
    ys = [selective_scan_step(state, x[t : t + 1], dt[t : t + 1], inp["A"], B[t : t + 1], C[t : t + 1],
                              inp["D"], z[t : t + 1], inp["dt_bias"], dt_softplus=True) for t in range(L)]
    assert_close("y", y[0], torch.cat(ys), 1e-5)
    assert_close("state", h, state, 1e-5)


def test_state_update_several_tokens_and_groups():
    inp = make(2, 6, 6, 5, G=3, init=True)
    y, h, _ = run(inp, "reference", grads=False)
    state = inp["initial_state"].clone()
    y1 = selective_scan_step(state, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0],
                             inp["D"], inp["z"][:, 0], inp["dt_bias"], dt_softplus=True)
    with pytest.warns(DeprecationWarning, match="selective_scan_step"):  # the old name, positional options
        y2 = selective_state_update(state, inp["x"][:, 1:], inp["dt"][:, 1:], inp["A"], inp["B"][:, 1:],
                                    inp["C"][:, 1:], inp["D"], inp["z"][:, 1:], inp["dt_bias"], True)
    assert_close("y", y, torch.cat([y1[:, None], y2], 1), 1e-12)
    assert_close("state", h, state, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_float32_state(dtype):
    inp = make(1, 9, 4, 3, dtype=dtype)
    y, h = selective_scan(inp["x"], inp["dt"], inp["A"].float(), inp["B"], inp["C"], inp["D"], inp["z"],
                          inp["dt_bias"], dt_softplus=True, initial_state=inp["initial_state"], return_final_state=True)
    assert y.dtype == dtype and h.dtype == torch.float32
    ref = run({k: (v.float() if v is not None else None) for k, v in inp.items()}, "reference", grads=False)
    assert_close("y", ref[0], y.float(), 1e-2)


def test_defaults_no_optional_inputs():
    inp = make(2, 5, 3, 2, D=False, z=False, bias=False, init=False)
    y = selective_scan(inp["x"], inp["dt"].abs(), inp["A"], inp["B"], inp["C"])
    # Hand-computed first step: h_1 = Δ x B, y_1 = C·h_1.
    y0 = (inp["dt"].abs()[:, 0] * inp["x"][:, 0]) * (inp["B"][:, 0] * inp["C"][:, 0]).sum(-1, keepdim=True)
    assert_close("y0", y0, y[:, 0], 1e-12)


def test_bad_inputs():
    inp = make(2, 5, 4, 3, G=None, dtype=torch.float32)
    x, dt, A, B, C = (inp[k] for k in ("x", "dt", "A", "B", "C"))

    def call(**kw):
        a = {"x": x, "dt": dt, "A": A, "B": B, "C": C}
        a.update(kw)
        return selective_scan(**a)

    with pytest.raises(ValueError, match="dt"):
        call(dt=dt[:, :4])
    with pytest.raises(ValueError, match="dt"):
        call(dt=dt[:1])
    with pytest.raises(ValueError, match="A"):
        call(A=A[:3])
    with pytest.raises(ValueError, match="non-positive"):
        call(A=A.abs())
    with pytest.raises(ValueError, match="B"):
        call(B=B[:, :, :2])
    with pytest.raises(ValueError, match="groups"):
        call(B=torch.randn(2, 5, 3, 3), C=torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="C"):
        call(C=torch.randn(2, 5, 2, 3), B=torch.randn(2, 5, 1, 3))
    with pytest.raises(ValueError, match="D"):
        call(D=torch.ones(5))
    with pytest.raises(ValueError, match="z"):
        call(z=x[:, :, :2])
    with pytest.raises(ValueError, match="initial_state"):
        call(initial_state=torch.zeros(2, 4, 2))
    with pytest.raises(TypeError, match="x"):
        call(x=x.long())
    with pytest.raises(TypeError, match="A"):
        call(A=A.to(torch.complex64))
    with pytest.raises(ValueError, match="batch"):
        call(cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="sorted"):
        selective_scan(x[:1], dt[:1], A, B[:1], C[:1], cu_seqlens=torch.tensor([0, 4, 2, 5]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        selective_scan(x[:1], dt[:1], A, B[:1], C[:1], cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match="backend"):
        call(backend="nope")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            call(A=A.cuda())
    with pytest.raises(ValueError, match="state"):
        selective_scan_step(torch.zeros(2, 4, 2), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    with pytest.raises(TypeError, match="state"):
        selective_scan_step(torch.zeros(2, 4, 3, dtype=torch.bfloat16), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    with pytest.raises(ValueError, match="dt"):
        selective_scan_step(torch.zeros(2, 4, 3), x[:, 0], dt[:, 0, :2], A, B[:, 0], C[:, 0])


def test_mixed_devices_error():
    """A tensor on the 'meta' device stands in for a second device on CPU-only machines."""
    inp = make(1, 3, 2, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="same device"):
        selective_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D=torch.ones(2, device="meta"))


def test_value_checks_only_on_cpu_or_when_asked():
    """A > 0 and unsorted cu_seqlens are found by reading the data: done for CPU tensors (check=None)
    and with check=True; check=False skips the reads (what GPU tensors get by default)."""
    inp = make(1, 5, 4, 3, G=None, dtype=torch.float32)
    x, dt, B, C = (inp[k] for k in ("x", "dt", "B", "C"))
    A_pos = inp["A"].abs() + 0.1
    with pytest.raises(ValueError, match="non-positive"):
        selective_scan(x, dt, A_pos, B, C)
    with pytest.raises(ValueError, match="non-positive"):
        selective_scan(x, dt, A_pos, B, C, check=True)
    selective_scan(x, dt, A_pos, B, C, check=False)  # no read of A: runs
    with pytest.raises(ValueError, match="sorted"):
        selective_scan(x, dt, inp["A"], B, C, cu_seqlens=torch.tensor([0, 4, 2, 5]), check=True)
    with pytest.raises(TypeError, match="check"):
        selective_scan(x, dt, inp["A"], B, C, check="yes")


def test_options_are_keyword_only():
    inp = make(1, 3, 2, 2, dtype=torch.float32)
    with pytest.raises(TypeError):
        selective_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], None, None, None, True)


# -- the compiled inference kernel (ssmkit.ops.cpu_compile) ---------------------------------------

needs_compiler = pytest.mark.skipif(not compiler_available(), reason="needs a C++ compiler for torch.compile")


@pytest.fixture
def compiled_steps(monkeypatch):
    """Compiled path on, with chunks of 4 steps (short unrolled code: a few seconds to compile)."""
    monkeypatch.setattr(compiled_mod, "STEPS", 4)
    monkeypatch.setattr(cpu_compile, "_graphs", {})
    set_cpu_compile(True)
    yield
    set_cpu_compile(None)


@needs_compiler
def test_compiled_matches_reference(compiled_steps):
    """Inference through the compiled chunks: two packed sequences of 11 and 5 tokens (whole
    chunks of 4 plus tails of 3 and 1), groups, D, gate, Δ bias, initial states; and a single
    token (the tail alone). Float32 against the float64 reference."""
    inp = make(1, 16, 6, 3, G=2, init=False)
    inp["initial_state"] = torch.randn(2, 6, 3, dtype=torch.float64)
    cu = torch.tensor([0, 11, 16])
    with torch.inference_mode():
        ref = run(inp, "reference", grads=False, cu_seqlens=cu)
        f32 = {k: None if v is None else v.float() for k, v in inp.items()}
        out = run(f32, "chunked", grads=False, cu_seqlens=cu)
        compare(ref, out, 1e-5)
        one = {k: None if v is None else v[:1] if k == "initial_state" else v for k, v in f32.items()}
        one = {k: v[:, :1] if k in ("x", "dt", "z", "B", "C") else v for k, v in one.items()}
        ref1 = run({k: None if v is None else v.double() for k, v in one.items()}, "reference", grads=False)
        compare(ref1, run(one, "chunked", grads=False), 1e-5)
        # x and z as column slices of one projection (as the Mamba layer passes them): read in place
        xz = torch.cat([f32["x"], f32["z"]], -1)
        dim = f32["x"].shape[-1]
        y, h = selective_scan(xz[..., :dim], f32["dt"], f32["A"], f32["B"], f32["C"], D=f32["D"], z=xz[..., dim:],
                              dt_bias=f32["dt_bias"], dt_softplus=True, initial_state=f32["initial_state"],
                              return_final_state=True, cu_seqlens=cu)
        compare(ref, (y, h, {}), 1e-5)
        # batch 3 (each row through its own kernel calls), no D or gate, Δ without softplus
        b3 = {k: None if v is None else v.float() for k, v in make(3, 10, 6, 3, D=False, z=False, seed=2).items()}
        ref3 = run({k: None if v is None else v.double() for k, v in b3.items()}, "reference", softplus=False,
                   grads=False)
        compare(ref3, run(b3, "chunked", softplus=False, grads=False), 1e-5)
    assert "selective_scan" not in cpu_compile._failed
    assert sum(k[0] == "selective_scan" for k in cpu_compile._graphs) >= 2  # with and without softplus
    assert "selective_scan" not in cpu_compile._failed  # the compiled kernel ran, no eager fallback


def test_compiled_path_keeps_gradients(compiled_steps):
    """With autograd recording, the chunked form takes its differentiable eager path."""
    inp = make(1, 9, 4, 2)
    ref, out = run(inp, "reference"), run(inp, "chunked")
    compare(ref, out, 1e-10)


def test_compiled_failure_falls_back_to_eager(compiled_steps, monkeypatch):
    import torch._inductor.compile_fx as inductor

    def broken(*a, **kw):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(inductor, "compile_fx", broken)
    monkeypatch.setattr(cpu_compile, "compiler_available", lambda: True)
    monkeypatch.setattr(cpu_compile, "_failed", set())
    monkeypatch.setattr(cpu_compile, "_graphs", {})
    inp = {k: None if v is None else v.float() for k, v in make(1, 9, 4, 2).items()}
    with torch.inference_mode():
        ref = run({k: None if v is None else v.double() for k, v in inp.items()}, "reference", grads=False)
        with pytest.warns(RuntimeWarning, match="eager form"):
            out = run(inp, "chunked", grads=False)
        compare(ref, out, 1e-5)
        run(inp, "chunked", grads=False)  # no second warning: the failure is remembered
    assert "selective_scan" in cpu_compile._failed


def test_exp2_poly_accuracy():
    """The compiled kernel's 2^x: float32-accurate (a few 1e-7 relative) for exponents in
    [-126, 127]; 0 below 2^-126 (never a denormal)."""
    x = torch.linspace(-126.0, 127.0, 200_001)
    ref = torch.exp2(x.double())
    assert ((compiled_mod.exp2_poly(x).double() - ref) / ref).abs().max() < 3e-7
    tiny = torch.tensor([-126.5, -200.0, -1e30])
    assert compiled_mod.exp2_poly(tiny).tolist() == [0.0, 0.0, 0.0]
    x = x[x <= 0]  # the form for non-positive exponents (Δ A with Δ = softplus(...) >= 0, A <= 0)
    got = compiled_mod.exp2_poly(x, nonpositive=True).double()
    assert ((got - torch.exp2(x.double())) / torch.exp2(x.double())).abs().max() < 3e-7
    assert compiled_mod.exp2_poly(tiny, nonpositive=True).tolist() == [0.0, 0.0, 0.0]


def test_softplus_poly_accuracy():
    """The compiled kernel's softplus: float32-accurate (a few 1e-7 relative) for x >= -1; for
    x < -1, where softplus(x) ~ e^x, the rounding of x log2 e adds up to ~1e-7 |x| (as for any exp
    through exp2 in float32); 0 where softplus is below the normal floats (x < -87)."""
    x = torch.cat([torch.linspace(-87.0, 90.0, 400_001), torch.linspace(-1e-3, 1e-3, 2001)])
    ref = torch.nn.functional.softplus(x.double())
    rel = ((compiled_mod.softplus_poly(x).double() - ref) / ref).abs()
    assert (rel <= 2e-7 + 1.2e-7 * x.double().abs()).all()
    got = compiled_mod.softplus_poly(torch.tensor([-100.0, 1e30]))
    assert got.tolist() == [0.0, torch.tensor(1e30).item()]
