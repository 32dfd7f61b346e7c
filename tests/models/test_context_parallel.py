"""A hybrid LanguageModel (Mamba, Mamba-2, Gated DeltaNet, attention; also Falcon-H1's parallel
Mamba-2 + attention layer) with its sequence sharded over 2 and 4 gloo CPU processes equals the
single-process model: logits, loss and every parameter gradient (float64 <= 1e-10, float32 <=
1e-5), with unequal shards, a packed sequence crossing shard boundaries, the chunked loss and
activation checkpointing. One spawn of 4 processes runs every case."""

import pytest
import torch
import torch.distributed as dist

from ssmkit import LanguageModel, ModelConfig
from ssmkit.ops import context_parallel as cp
from ssmkit.testing import run_on_ranks

CONFIG = dict(d_model=16, n_layer=4, vocab_size=40, layer_pattern="M2GA", ssm_cfg={"d_state": 4},
              mamba2_cfg={"d_state": 4, "headdim": 8, "chunk_size": 4},
              deltanet_cfg={"num_heads": 2, "head_dim": 4, "chunk_size": 4},
              attn_cfg={"n_heads": 2}, mlp="swiglu", d_intermediate=24,
              residual_in_fp32=False)  # float64 models keep a float64 residual stream
LAYOUTS = {2: ([9, 15], [0, 4, 13, 14, 24]), 4: ([3, 7, 1, 13], [0, 4, 10, 13, 14, 24])}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# (dtype, packed, chunked loss (return_logits=False), activation checkpointing). LMOutput.logits
# are float32 by contract, so the float64 cases take the loss-only path (float64 throughout).
CASES = [(torch.float64, False, True, False), (torch.float64, True, True, True), (torch.float32, False, False, True)]


def _rel(ref, out):
    ref, out = ref.detach().double(), out.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1.0))


def _case(rank, world, group, dtype, packed, chunked, ckpt, pattern=None):
    lens, cu = LAYOUTS[world]
    torch.manual_seed(0)
    config = CONFIG if pattern is None else {**CONFIG, "layer_pattern": pattern, "n_layer": len(pattern)}
    model = LanguageModel(ModelConfig(**config)).to(dtype).train()
    model.set_activation_checkpointing(ckpt)
    gen = torch.Generator().manual_seed(1)
    batch = 1 if packed else 2
    ids = torch.randint(0, 40, (batch, sum(lens)), generator=gen)
    labels = ids.clone()
    labels[:, 5] = -100  # an unscored label
    cu_t = torch.tensor(cu) if packed else None
    kw = dict(labels=labels, cu_seqlens=cu_t, return_logits=not chunked)
    ref = model(ids, **kw)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    model.set_context_parallel(group)
    a, b = sum(lens[:rank]), sum(lens[: rank + 1])
    out = model(ids[:, a:b], **{**kw, "labels": labels[:, a:b]})
    out.loss.backward()
    errs = {"loss": _rel(ref.loss, cp.all_reduce_sum(out.loss, group=group))}
    if not chunked:
        errs["logits"] = _rel(ref.logits[:, a:b], out.logits)
    for n, p in model.named_parameters():
        errs[f"d {n}"] = _rel(ref_grads[n], cp.all_reduce_sum(p.grad, group=group))
    return max(errs.values()), errs


# 4 ranks (one of them holding a single position) run the case with every feature only.
CASES_BY_WORLD = {2: CASES, 4: CASES[1:2]}


def _group_of_one_is_plain(group) -> bool:
    """With a group of one rank the model takes its plain path: the very same numbers."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(**CONFIG)).train()
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(2))
    plain = model(ids, labels=ids)
    model.set_context_parallel(group)
    one = model(ids, labels=ids)
    return bool(plain.logits.equal(one.logits) and plain.loss.equal(one.loss))


def _worker(rank, world):
    """4 processes: the 2-rank cases on ranks {0, 1}, then the 4-rank cases on all."""
    groups = {2: dist.new_group([0, 1]), 4: dist.group.WORLD}
    own = [dist.new_group([r]) for r in range(world)][rank]  # (every rank creates every group)
    out = {(size, case): _case(rank, size, group, *case) for size, group in groups.items() if rank < size
           for case in CASES_BY_WORLD[size]}
    out["group of one"] = _group_of_one_is_plain(own)
    if rank < 2:  # Falcon-H1's Mamba-2 and attention side by side
        out[(2, "P")] = _case(rank, 2, groups[2], torch.float64, True, True, False, pattern="P")
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_worker, 4)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_lm_matches_single_process(results, world):
    for rank, res in enumerate(results[:world]):
        assert res["group of one"]
        for key, val in res.items():
            if key == "group of one" or key[0] != world:
                continue
            (_, case), (_, errs) = key, val
            bad = {k: v for k, v in errs.items() if v > (TOL[case[0]] if case != "P" else 1e-10)}
            assert not bad, f"world {world} rank {rank} case {case}: {bad}"


def test_unsupported_layers_and_inputs_are_refused():
    m = LanguageModel(ModelConfig(d_model=16, n_layer=2, vocab_size=40, layer_pattern="MS", ssm_cfg={"d_state": 4}))
    with pytest.raises(ValueError, match="layer 1 .* no context-parallel form"):
        m.set_context_parallel(dist.group.WORLD if dist.is_initialized() else _FakeGroup())
    assert m.context_parallel is None


class _FakeGroup(dist.ProcessGroup):
    """Stands in for a group in a process without torch.distributed initialised (type check only)."""

    def __init__(self):
        super().__init__(0, 1)
