"""Pathfinder (Linsley et al., 2018), as used by the Long Range Arena (Tay et al., 2021): is there a
path between the two marked points?

Each image holds two long *target contours* and a few short *distractor* contours. A contour is a
chain of ``n_paddles`` short straight dashes ("paddles", ``paddle`` pixels long, ``gap`` pixels
apart) whose direction turns by at most ``max_turn`` degrees from one paddle to the next, so it
curves smoothly across the image. Two filled discs mark contour ends: in a positive image both
ends of the same target contour (label 1), in a negative image one end of each target contour
(label 0). Both classes draw the same contours, so neither the amount of ink nor the markers'
distance gives the label away; only following the dashes from one marker does. Contours keep a
clearance of ``gap + radius + 1`` pixels from one another (more than a gap between dashes, with
a marker disc on either), so neither dashes nor markers join two contours.

LRA's Pathfinder-32 is 32x32 and Path-X 128x128 (16,384 pixels), both with the "hard" contours
of 14 paddles. The images are binary (path or background) and read as a sequence of pixels row by
row, then one query token; the model answers at the query position. Token ids: 0 background,
1 ink, 2 the query, 3 "not connected", 4 "connected".

``Pathfinder(size=32)`` scales the stroke with the image: paddles, gaps and the marker radius are
``size // 32`` pixels (at least 1), so a contour of 14 paddles is 27 pixels long at 32x32 and
108 at 128x128.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ssmkit.tasks.base import Batch, Task, check_batch_size, check_generator, make_batch, require

BACKGROUND, INK, QUERY, NO, YES = 0, 1, 2, 3, 4
VOCAB = 5


@dataclasses.dataclass
class Pathfinder(Task):
    size: int = 32          # image side in pixels (LRA: 32, Path-X: 128)
    n_paddles: int = 14     # paddles per target contour (LRA's "hard" difficulty: 14)
    n_distractors: int = 4  # short contours of n_paddles // 3 paddles each
    max_turn: float = 30.0  # degrees a contour may turn between paddles
    max_tries: int = 200    # redraws per contour before the whole image is redrawn
    pool: int = 0           # > 0: batches come from a fixed set of this many images (LRA's training
    pool_seed: int = 0      # set is finite), drawn once from pool_seed; 0: fresh images every batch

    name = "pathfinder"

    def __post_init__(self):
        require(8 <= self.size <= 512, f"size must be in [8, 512], got {self.size}")
        require(self.n_paddles >= 2, f"n_paddles must be >= 2, got {self.n_paddles}")
        require(self.n_distractors >= 0, f"n_distractors must be >= 0, got {self.n_distractors}")
        require(0 <= self.max_turn <= 90, f"max_turn must be in [0, 90] degrees, got {self.max_turn}")
        require(self.max_tries >= 1, f"max_tries must be >= 1, got {self.max_tries}")
        require(self.pool >= 0, f"pool must be >= 0, got {self.pool}")
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- geometry
    @property
    def paddle(self) -> int:
        return max(1, self.size // 32)

    @property
    def gap(self) -> int:
        return max(1, self.size // 32)

    @property
    def radius(self) -> int:
        return max(1, self.size // 32)

    @property
    def clearance(self) -> int:
        """Least Chebyshev distance, in pixels, between two contours' pixels, minus one."""
        return self.gap + self.radius + 1

    @property
    def path_length(self) -> int:
        """Length of a target contour from end to end, in pixels (paddles and the gaps between)."""
        return self.n_paddles * self.paddle + (self.n_paddles - 1) * self.gap

    @property
    def vocab_size(self) -> int:
        return VOCAB

    @property
    def seqlen(self) -> int:
        return self.size * self.size + 1

    def _contour(self, rng: np.random.Generator, n: int, taken: np.ndarray, tries: int | None = None):
        """Pixels ``(k, 2)`` and the two end points of one contour of ``n`` paddles that stays
        ``radius + 1`` inside the image and more than ``clearance`` away from ``taken`` and from
        its own earlier paddles; None
        if ``tries`` (default ``max_tries``) draws fail.

        Each paddle draws a few turns within ``max_turn`` and keeps a valid one (inside, clear)
        whose straight continuation stays inside for a few more paddles; when none does, the valid
        one heading most towards the centre: contours longer than the image is wide fit by
        curving instead of being redrawn."""
        S, m, clear = self.size, self.radius + 1, self.clearance
        t = np.arange(0, self.paddle - 1 + 1e-9, 0.5)[:, None]
        blocked = _dilate(taken, clear)
        centre = np.array([(S - 1) / 2, (S - 1) / 2])
        reach = 3 * (self.paddle + self.gap)
        # the last few paddles lie within the clearance of the next one along the contour itself
        recent = math.ceil(1.5 * (clear + 1) / (self.paddle + self.gap))
        for _ in range(tries or self.max_tries):
            p = rng.uniform(m, S - 1 - m, size=2)
            theta = rng.uniform(0, 2 * math.pi)
            own = np.zeros_like(taken)  # this contour, dilated, but for its last `recent` paddles
            paddles: list[np.ndarray] = []
            start = p
            for i in range(n):
                th = theta + np.radians(rng.uniform(-self.max_turn, self.max_turn, size=8) if i else np.zeros(1))
                d = np.stack([np.cos(th), np.sin(th)], -1)                    # (c, 2)
                seg = p + t[None] * d[:, None]                                 # (c, T, 2)
                pix = np.rint(seg).astype(np.int64)  # (repeats are harmless)
                ok = ((seg >= m) & (seg <= S - 1 - m)).all((1, 2))
                pc = np.clip(pix, 0, S - 1)
                ok &= ~(blocked[pc[..., 0], pc[..., 1]] | own[pc[..., 0], pc[..., 1]]).any(1)
                if not ok.any():
                    break
                ahead = seg[:, -1] + d * reach
                inside = ok & ((ahead >= m) & (ahead <= S - 1 - m)).all(1)
                if inside.any():
                    k = int(inside.argmax())
                else:  # the valid turn heading most towards the centre
                    k = int(np.where(ok, (d * (centre - seg[:, -1])).sum(1), -np.inf).argmax())
                if len(paddles) >= recent:
                    _stamp(own, paddles[-recent], clear)
                paddles.append(pix[k])
                theta, p = th[k], seg[k, -1] + d[k] * (1 + self.gap)
                if i == 0:
                    start = seg[k, 0]
            if len(paddles) == n:
                end = paddles[-1][-1]
                return np.concatenate(paddles), np.rint(start).astype(np.int64), end
        return None

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, int, dict]:
        """One image: ``(uint8 (size, size) with 0/1, label, info)``; ``info`` holds the marked
        points and the target contours' length in pixels."""
        S = self.size
        for _ in range(100):  # the two target contours (redrawn together until both fit)
            taken = np.zeros((S, S), dtype=bool)
            contours = []
            for _ in range(2):
                c = self._contour(rng, self.n_paddles, taken)
                if c is None:
                    break
                taken[c[0][:, 0], c[0][:, 1]] = True
                contours.append(c)
            if len(contours) == 2:
                break
        else:
            raise ValueError(f"two contours of n_paddles={self.n_paddles} do not fit a {S}x{S} image with "
                             f"max_turn={self.max_turn}: use fewer paddles or a larger size")
        n_drawn = 0
        for _ in range(self.n_distractors):  # where they fit (drawn before the label is chosen)
            c = self._contour(rng, max(self.n_paddles // 3, 1), taken, tries=10)
            if c is not None:
                taken[c[0][:, 0], c[0][:, 1]] = True
                n_drawn += 1
        label = int(rng.random() < 0.5)
        (_, a0, a1), (_, b0, b1) = contours[0], contours[1]
        marks = (a0, a1) if label else (a0, b0 if rng.random() < 0.5 else b1)
        img = taken.astype(np.uint8)
        yy, xx = np.mgrid[0:S, 0:S]
        for c in marks:
            img[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= self.radius ** 2] = 1
        return img, label, {"marks": [tuple(map(int, c)) for c in marks], "path_length": self.path_length,
                            "distractors": n_drawn}

    def images(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images as token rows ``(n, size * size)`` uint8 and their labels ``(n,)`` int64."""
        pix = torch.empty(n, self.size * self.size, dtype=torch.uint8)
        labels = torch.empty(n, dtype=torch.long)
        for i in range(n):
            img, labels[i], _ = self.draw(rng)
            pix[i] = torch.from_numpy(img.reshape(-1))
        return pix, labels

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        check_batch_size(batch_size)
        check_generator(generator)
        if self.pool:
            if self._pool is None:
                self._pool = self.images(self.pool, np.random.default_rng(self.pool_seed))
            idx = torch.randint(0, self.pool, (batch_size,), generator=generator)
            pix, labels = self._pool[0][idx], self._pool[1][idx]
        else:
            pix, labels = self.images(batch_size, np.random.default_rng(
                int(torch.randint(0, 2**62, (1,), generator=generator))))
        L = self.seqlen
        inputs = torch.full((batch_size, L), QUERY, dtype=torch.long)
        inputs[:, :-1] = pix.long()
        targets = torch.zeros(batch_size, L, dtype=torch.long)
        targets[:, -1] = torch.where(labels.bool(), YES, NO)
        mask = torch.zeros(batch_size, L, dtype=torch.bool)
        mask[:, -1] = True
        return make_batch(inputs, targets, mask)


def _stamp(mask: np.ndarray, pix: np.ndarray, r: int) -> None:
    """Set every pixel within Chebyshev distance ``r`` of ``pix (k, 2)`` in ``mask``."""
    for y, x in pix:
        mask[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1] = True


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` grown by Chebyshev distance ``r``."""
    out = mask.copy()
    S = mask.shape[0]
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out[max(dy, 0):S + min(dy, 0), max(dx, 0):S + min(dx, 0)] |= \
                mask[max(-dy, 0):S + min(-dy, 0), max(-dx, 0):S + min(-dx, 0)]
    return out
