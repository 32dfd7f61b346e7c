"""Task generators: deterministic for a seed, and every batch valid (lengths, vocab, masks)."""

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ssmkit.tasks import (
    IGNORE_INDEX,
    MQAR,
    Copying,
    InductionHeads,
    ListOps,
    SelectiveCopying,
    get_task,
    task_names,
)
from ssmkit.tasks import listops as lo

SMALL = {
    "copying": dict(n_tokens=5, lag=7, vocab=10),
    "selective-copying": dict(length=40, n_tokens=6, vocab=12),
    "induction-heads": dict(length=33, vocab=16),
    "mqar": dict(length=64, num_kv_pairs=8, vocab=64),
    "listops": dict(length=64, max_depth=4, max_args=4, min_length=5, max_length=60),
    "pathfinder": dict(size=32, n_paddles=6, n_distractors=1),
}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def check_common(task, batch, B):
    L = task.seqlen
    for t in (batch.inputs, batch.targets, batch.loss_mask):
        assert t.shape == (B, L)
    assert batch.inputs.dtype == torch.long and batch.loss_mask.dtype == torch.bool
    assert batch.inputs.min() >= 0 and batch.inputs.max() < task.vocab_size
    scored = batch.targets[batch.loss_mask]
    assert scored.min() >= 0 and scored.max() < task.vocab_size
    assert (batch.targets[~batch.loss_mask] == IGNORE_INDEX).all()
    assert batch.loss_mask.any(-1).all()


@pytest.mark.parametrize("name", task_names())
def test_deterministic_for_seed(name):
    task = get_task(name, **SMALL[name])
    a, b = task.sample(6, gen(3)), task.sample(6, gen(3))
    c = task.sample(6, gen(4))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert torch.equal(a.loss_mask, b.loss_mask)
    assert not torch.equal(a.inputs, c.inputs)
    check_common(task, a, 6)


def test_copying_layout():
    t = Copying(**SMALL["copying"])
    b = t.sample(8, gen(0))
    n = t.n_tokens
    assert t.seqlen == 2 * n + t.lag
    assert torch.equal(b.targets[:, -n:], b.inputs[:, :n])
    assert (b.inputs[:, n:-n] == 0).all() and (b.inputs[:, -n:] == 1).all()
    assert b.loss_mask.sum(-1).eq(n).all()


@given(length=st.integers(8, 80), n=st.integers(1, 4), vocab=st.integers(4, 20), seed=st.integers(0, 9))
@hsettings(max_examples=15)
def test_selective_copying_targets_are_the_data_in_order(length, n, vocab, seed):
    t = SelectiveCopying(length=length, n_tokens=n, vocab=vocab)
    b = t.sample(4, gen(seed))
    check_common(t, b, 4)
    region = b.inputs[:, : length - n]
    assert (b.inputs[:, length - n :] == 1).all()
    for r in range(4):
        data = region[r][region[r] >= 2]
        assert data.numel() == n  # exactly n data tokens among the noise
        assert torch.equal(b.targets[r, length - n :], data)
        assert b.loss_mask[r].nonzero().flatten().tolist() == list(range(length - n, length))


@given(length=st.integers(4, 100), vocab=st.integers(4, 20), seed=st.integers(0, 9))
@hsettings(max_examples=15)
def test_induction_heads_recall(length, vocab, seed):
    t = InductionHeads(length=length, vocab=vocab)
    b = t.sample(5, gen(seed))
    check_common(t, b, 5)
    for r in range(5):
        x = b.inputs[r]
        trig = (x == 0).nonzero().flatten().tolist()
        assert len(trig) == 2 and trig[1] == length - 1 and trig[0] <= length - 3
        assert b.loss_mask[r].nonzero().flatten().tolist() == [length - 1]
        assert b.targets[r, -1] == x[trig[0] + 1] and x[trig[0] + 1] != 0


def test_induction_heads_with_seqlen_for_long_evaluation():
    t = InductionHeads(length=16).with_seqlen(4096)
    b = t.sample(2, gen(0))
    assert b.inputs.shape == (2, 4096)
    check_common(t, b, 2)


@given(n=st.integers(1, 8), extra=st.integers(0, 40), seed=st.integers(0, 9))
@hsettings(max_examples=15)
def test_mqar_queries_recall_their_values(n, extra, seed):
    L = 4 * n + extra
    t = MQAR(length=L, num_kv_pairs=n, vocab=2 * n + 4)
    b = t.sample(3, gen(seed))
    check_common(t, b, 3)
    half = t.vocab // 2
    for r in range(3):
        x = b.inputs[r]
        keys, vals = x[0 : 2 * n : 2].tolist(), x[1 : 2 * n : 2].tolist()
        assert len(set(keys)) == n and all(1 <= k < half for k in keys)
        assert all(half <= v < t.vocab for v in vals)
        table = dict(zip(keys, vals))
        qpos = b.loss_mask[r].nonzero().flatten().tolist()
        assert len(qpos) == n and min(qpos) >= 2 * n
        assert sorted(x[q].item() for q in qpos) == sorted(keys)
        for q in qpos:
            assert b.targets[r, q] == table[x[q].item()] == x[q + 1]


def _parse(tokens):
    """Evaluate ListOps token ids independently of the generator (a stack machine)."""
    stack = []
    for tok in tokens:
        if tok == lo.CLOSE:
            args = []
            while not isinstance(stack[-1], str):
                args.append(stack.pop())
            op = stack.pop()
            stack.append({"MAX": max, "MIN": min, "MED": lambda v: sorted(v)[len(v) // 2],
                          "SM": lambda v: sum(v) % 10}[op](args))
        elif tok >= 11:
            stack.append(lo.OPS[tok - 11])
        else:
            stack.append(tok - lo.DIGIT0)
    assert len(stack) == 1
    return stack[0]


def test_listops_answers_and_padding():
    t = ListOps(**SMALL["listops"])
    b = t.sample(16, gen(0))
    check_common(t, b, 16)
    for r in range(16):
        (last,) = b.loss_mask[r].nonzero().flatten().tolist()
        toks = b.inputs[r, : last + 1].tolist()
        assert t.min_length <= len(toks) <= t.max_length
        assert (b.inputs[r, last + 1 :] == lo.PAD).all() and lo.PAD not in toks
        assert b.targets[r, last] - lo.DIGIT0 == _parse(toks)
    assert lo.to_text(("MAX", [2, 9, ("MIN", [4, 7]), 0])) == "[MAX 2 9 [MIN 4 7 ] 0 ]"
    assert lo.evaluate(("SM", [9, 8, ("MED", [1, 5, 3])])) == 0


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("selective-copying", dict(length=10, n_tokens=6)),
        ("copying", dict(n_tokens=0)),
        ("induction-heads", dict(vocab=2)),
        ("mqar", dict(length=20, num_kv_pairs=8)),
        ("mqar", dict(num_kv_pairs=8, vocab=10)),
        ("listops", dict(min_length=50, max_length=10)),
        ("selective-copying", dict(colour=3)),
        ("no-such-task", {}),
    ],
)
def test_bad_sizes_raise_value_error(name, kwargs):
    with pytest.raises(ValueError):
        get_task(name, **kwargs)


def test_bad_generator_and_batch_size():
    t = InductionHeads(length=8)
    with pytest.raises(TypeError, match="generator"):
        t.sample(2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        t.sample(0, gen(0))


def test_metric_counts_only_scored_positions():
    t = SelectiveCopying(length=20, n_tokens=4, vocab=8)
    b = t.sample(4, gen(0))
    logits = torch.nn.functional.one_hot(b.targets.clamp(min=0), 8).float()
    assert t.metric(logits, b) == {"acc": 1.0, "seq_acc": 1.0}
    logits[0, -1] = torch.roll(logits[0, -1], 1)
    m = t.metric(logits, b)
    assert m["acc"] == 15 / 16 and m["seq_acc"] == 3 / 4
