"""Context-parallel ops over 2 and 4 gloo CPU processes equal the single-process op: outputs,
final states and every gradient (inputs and shared parameters), float64 <= 1e-10 and float32 <=
1e-5, with unequal shard lengths, shards shorter than the conv window and packed sequences that
cross shard boundaries. One spawn of 4 processes runs every case (2-rank cases on a subgroup)."""

import math
import zlib

import pytest
import torch
import torch.distributed as dist

from ssmkit.ops import causal_conv1d, delta_rule, selective_scan, ssd
from ssmkit.ops import context_parallel as cp
from ssmkit.testing import run_on_ranks

# (world, shard lengths, cu_seqlens of the packed case)
LAYOUTS = {
    2: ([9, 15], [0, 4, 13, 14, 24]),
    4: ([3, 7, 1, 13], [0, 4, 10, 13, 14, 24]),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _inputs(op, dtype, batch, L, gen):
    """Full-sequence tensors: ``(seq, params, kwargs)``; seq tensors have seqlen on axis 1."""
    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dtype)

    if op == "selective_scan":
        dim, N = 6, 3
        seq = dict(x=r(batch, L, dim), dt=r(batch, L, dim, scale=0.5), B=r(batch, L, 2, N), C=r(batch, L, 2, N),
                   z=r(batch, L, dim))
        params = dict(A=-torch.rand(dim, N, generator=gen, dtype=torch.float64).to(dtype) - 0.1,
                      D=r(dim), dt_bias=r(dim, scale=0.5))
        return seq, params, dict(dt_softplus=True)
    if op == "ssd":
        H, P, N = 4, 3, 5
        seq = dict(x=r(batch, L, H, P), dt=r(batch, L, H, scale=0.5), B=r(batch, L, 2, N), C=r(batch, L, 2, N),
                   z=r(batch, L, H, P))
        params = dict(A=-torch.rand(H, generator=gen, dtype=torch.float64).to(dtype) - 0.1, D=r(H),
                      dt_bias=r(H, scale=0.5))
        return seq, params, dict(dt_softplus=True, chunk_size=4, dt_limit=(0.0, math.inf))
    if op in ("delta_rule", "gated_delta_rule"):
        H, K, V = 2, 3, 4
        seq = dict(q=r(batch, L, H, K), k=r(batch, L, H, K), v=r(batch, L, H, V),
                   beta=torch.rand(batch, L, H, generator=gen, dtype=torch.float64).to(dtype))
        if op == "gated_delta_rule":
            seq["g"] = -torch.rand(batch, L, H, generator=gen, dtype=torch.float64).to(dtype) * 0.5
        return seq, {}, dict(use_qk_l2norm=True, scale=0.7, chunk_size=4)
    if op == "causal_conv1d":
        dim, W = 5, 4
        return dict(x=r(batch, L, dim)), dict(weight=r(dim, W), bias=r(dim)), dict(activation="silu")
    raise ValueError(op)


def _call(op, seq, params, kw, **extra):
    if op == "selective_scan":
        return selective_scan(seq["x"], seq["dt"], params["A"], seq["B"], seq["C"], params["D"], seq["z"],
                              params["dt_bias"], **kw, **extra)
    if op == "ssd":
        return ssd(seq["x"], seq["dt"], params["A"], seq["B"], seq["C"], params["D"], seq["z"], params["dt_bias"],
                   **kw, **extra)
    if op in ("delta_rule", "gated_delta_rule"):
        return delta_rule(seq["q"], seq["k"], seq["v"], beta=seq["beta"], g=seq.get("g"), **kw, **extra)
    return causal_conv1d(seq["x"], params["weight"], params["bias"], **kw, **extra)


def _call_cp(op, seq, params, kw, **extra):
    fn = {"gated_delta_rule": "delta_rule"}.get(op, op)
    if fn == "delta_rule":
        return cp.delta_rule(seq["q"], seq["k"], seq["v"], beta=seq["beta"], g=seq.get("g"), **kw, **extra)
    if fn == "causal_conv1d":
        return cp.causal_conv1d(seq["x"], params["weight"], params["bias"], **kw, **extra)
    f = getattr(cp, fn)
    return f(seq["x"], seq["dt"], params["A"], seq["B"], seq["C"], params["D"], seq["z"], params["dt_bias"],
             **kw, **extra)


def _case(op, dtype, packed, lens, cu, rank, group):
    """Max relative error of this rank's shard against the single-process run."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{op} {dtype} {packed}".encode()))
    L = sum(lens)
    batch = 1 if packed else 2
    seq, params, kw = _inputs(op, dtype, batch, L, gen)
    cu_t = torch.tensor(cu) if packed else None
    final = op != "causal_conv1d" or packed is False
    # the single-process run on the whole sequence
    ref_seq = {k: v.clone().requires_grad_() for k, v in seq.items()}
    ref_par = {k: v.clone().requires_grad_() for k, v in params.items()}
    y, h = _call(op, ref_seq, ref_par, kw, return_final_state=True, cu_seqlens=cu_t)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    (y * gy).sum().backward()
    # this rank's shard
    a, b = sum(lens[:rank]), sum(lens[: rank + 1])
    my_seq = {k: v[:, a:b].clone().requires_grad_() for k, v in seq.items()}
    my_par = {k: v.clone().requires_grad_() for k, v in params.items()}
    y_cp, h_cp = _call_cp(op, my_seq, my_par, kw, group=group, return_final_state=True, cu_seqlens=cu_t)
    (y_cp * gy[:, a:b]).sum().backward()
    errs = {"y": _rel(y[:, a:b], y_cp)}
    if final and rank == len(lens) - 1:  # the last shard ends with the sequence's final state
        errs["final"] = _rel(h if not packed else h[-1:], h_cp if not packed else h_cp[-1:])
    for k, v in my_seq.items():
        errs[f"d{k}"] = _rel(ref_seq[k].grad[:, a:b], v.grad)
    for k, v in my_par.items():
        g = v.grad.clone()
        dist.all_reduce(g, group=group)  # shared parameters: the sum of the shards' gradients
        errs[f"d{k}"] = _rel(ref_par[k].grad, g)
    return max(errs.values()), errs


def _rel(ref, out):
    ref, out = ref.detach().double(), out.detach().double()
    # relative to the reference, or absolute where the reference is (near) zero
    return float((out - ref).norm() / ref.norm().clamp_min(1.0))


OPS = ("selective_scan", "ssd", "delta_rule", "gated_delta_rule", "causal_conv1d")


def _worker(rank, world):
    """4 processes: the 2-rank cases on ranks {0, 1}, then the 4-rank cases on all."""
    groups = {2: dist.new_group([0, 1]), 4: dist.group.WORLD}
    out = {}
    for size, group in groups.items():
        if rank >= size:
            continue
        lens, cu = LAYOUTS[size]
        for op in OPS:
            for dtype, packed in ((torch.float64, False), (torch.float64, True), (torch.float32, False)):
                out[(size, op, str(dtype), packed)] = _case(op, dtype, packed, lens, cu, rank, group)
    # an even split through cp.shard equals the explicit one
    t = torch.arange(2 * 10).reshape(2, 10)
    out["shard"] = all(torch.cat([cp.shard(t, r, n) for r in range(n)], 1).equal(t) for n in (2, 3, 4))
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_worker, 4)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("op", OPS)
def test_context_parallel_op_matches_single_process(results, op, world):
    for rank, res in enumerate(results[:world]):
        assert res["shard"]
        for key, val in res.items():
            if key == "shard" or key[:2] != (world, op):
                continue
            worst, errs = val
            _, _, dtype, packed = key
            tol = TOL[torch.float64 if dtype == "torch.float64" else torch.float32]
            assert worst <= tol, f"world {world} rank {rank} {op} {dtype} packed={packed}: {errs}"


def test_group_of_one_is_the_plain_op():
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    w, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    # no process group at all: a group of one rank (None) runs the op itself
    assert cp.causal_conv1d(x, w, b, group=None).equal(causal_conv1d(x, w, b))
    assert cp.group_size(None) == 1 and cp.shard_bounds(7, None) == [0, 7]
    with pytest.raises(TypeError, match="group must be"):
        cp.resolve_group("world")
