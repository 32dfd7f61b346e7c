"""The Pathfinder generator: geometry, labels, statistics, batches."""

from collections import deque

import numpy as np
import pytest
import torch

from ssmkit.tasks import get_task
from ssmkit.tasks.pathfinder import NO, QUERY, YES, Pathfinder


def connected(img: np.ndarray, a, b, r: int) -> bool:
    """Whether ink pixel ``b`` is reachable from ``a`` through ink, stepping at most ``r`` pixels
    (Chebyshev) at a time: ``r = gap + 1`` jumps the gaps between dashes."""
    S = img.shape[0]
    seen = np.zeros_like(img, dtype=bool)
    q = deque([tuple(a)])
    seen[tuple(a)] = True
    while q:
        y, x = q.popleft()
        if (y, x) == tuple(b):
            return True
        for yy in range(max(y - r, 0), min(y + r + 1, S)):
            for xx in range(max(x - r, 0), min(x + r + 1, S)):
                if img[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    q.append((yy, xx))
    return False


@pytest.mark.parametrize("size,n", [(32, 40), (128, 4)])
def test_markers_are_joined_by_dashes_exactly_in_positive_images(size, n):
    t = Pathfinder(size=size)
    rng = np.random.default_rng(0)
    labels = []
    for _ in range(n):
        img, label, info = t.draw(rng)
        assert img.shape == (size, size) and set(np.unique(img)) <= {0, 1}
        a, b = info["marks"]
        assert img[a] == 1 and img[b] == 1
        assert connected(img, a, b, t.gap + 1) == bool(label)
        assert info["path_length"] == t.path_length == 14 * t.paddle + 13 * t.gap
        labels.append(label)
    assert 0 < sum(labels) < n


def test_labels_balanced_and_paths_of_fixed_length():
    t = Pathfinder(size=32, n_paddles=4, n_distractors=0)  # cheap contours: the label draw is the same
    rng = np.random.default_rng(1)
    labels, ink = [], []
    for _ in range(2000):
        img, label, info = t.draw(rng)
        labels.append(label)
        ink.append(int(img.sum()))
    assert abs(np.mean(labels) - 0.5) <= 0.02
    # both classes draw the same two contours: the amount of ink does not give the label away
    ink, labels = np.array(ink), np.array(labels)
    assert abs(ink[labels == 1].mean() - ink[labels == 0].mean()) < 1.0


def test_batches_are_sequences_with_one_scored_answer():
    t = get_task("pathfinder", size=32, n_paddles=6, n_distractors=1)
    b = t.sample(6, torch.Generator().manual_seed(0))
    assert b.inputs.shape == (6, 32 * 32 + 1) and t.seqlen == 1025 and t.vocab_size == 5
    assert (b.inputs[:, -1] == QUERY).all() and b.inputs[:, :-1].max() <= 1
    assert b.loss_mask.sum() == 6 and b.loss_mask[:, -1].all()
    assert set(b.targets[:, -1].tolist()) <= {NO, YES}
    again = t.sample(6, torch.Generator().manual_seed(0))
    assert torch.equal(b.inputs, again.inputs) and torch.equal(b.targets, again.targets)


def test_pool_serves_a_fixed_image_set():
    t = Pathfinder(size=32, n_paddles=6, n_distractors=1, pool=8)
    g = torch.Generator().manual_seed(0)
    seen = {tuple(row.tolist()) for _ in range(4) for row in t.sample(8, g).inputs}
    assert len(seen) <= 8
    fresh = Pathfinder(size=32, n_paddles=6, n_distractors=1, pool=8)
    assert torch.equal(fresh.sample(8, torch.Generator().manual_seed(0)).inputs,
                       t.sample(8, torch.Generator().manual_seed(0)).inputs)


@pytest.mark.parametrize("kw,msg", [({"size": 4}, "size"), ({"n_paddles": 1}, "n_paddles"),
                                    ({"max_turn": 120}, "max_turn"), ({"pool": -1}, "pool")])
def test_bad_sizes_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Pathfinder(**kw)


def test_contours_that_cannot_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        Pathfinder(size=8, n_paddles=14, max_tries=2).draw(np.random.default_rng(0))
