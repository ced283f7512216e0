"""A resumable, deterministic per-epoch shuffle for map-style pair datasets.

The public Diffusion-DPO script resumed by replaying the data loader from the start. Here the order of epoch ``e``
is ``permutation(n)`` drawn from ``numpy.random.default_rng([seed, e])``: a pure function of (seed, epoch), so a
resumed run can start at sample ``k`` of the epoch without touching any data.

**The epoch travels inside the index.** The sampler yields ``epoch * n + i`` (``i`` = the dataset position) and
the datasets of this package (:class:`~diffalign.data.pickapic.PickAPicPairs`,
:class:`~diffalign.data.cache.CachedPairs`) decode it with ``divmod(index, n)``. Per-example augmentation is
seeded by (seed, epoch, position), so it is identical across resumes and independent of how many DataLoader
workers there are, and workers need no ``set_epoch`` call (persistent workers are fine). Plain indices in
``[0, n)`` mean epoch 0.

Resuming with accelerate (``split_batches=False``, P processes, per-process batch B): after ``s`` optimizer
micro-steps in the current epoch, ``s * B * P`` samples of the global order were consumed, so::

    sampler = EpochShuffleSampler(len(dataset), seed=cfg.seed)
    sampler.set_epoch(epoch); sampler.set_start(s * B * P)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=B, sampler=sampler, collate_fn=collate_pairs))

(accelerate shards the *batches* of this global order over processes). Equivalently, keep ``start = 0`` and use
``accelerator.skip_first_batches(loader, s)``: with a map-style dataset it skips batch *indices* only, no data is
loaded. Do not combine both. ``set_start`` only affects the current epoch: the next ``set_epoch`` resets it to 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: ``default_rng([seed, epoch]).permutation(n)`` (int64 [n])."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def grouped_permutation(groups: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """An epoch order that keeps every group's positions next to each other: the groups (the distinct values of
    ``groups``, one per dataset position) in the order ``default_rng([seed, epoch]).permutation``, each group's
    positions ascending (int64 [n]). A batch then holds whole groups, cut only at its two ends."""
    groups = np.asarray(groups)
    ids, inverse = np.unique(groups, return_inverse=True)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.random.default_rng([seed, epoch]).permutation(len(ids))] = np.arange(len(ids))
    return np.lexsort((np.arange(len(groups)), rank[inverse])).astype(np.int64)


class EpochShuffleSampler(Sampler[int]):
    """Yields ``epoch * n + perm[k]`` for ``k = start .. n-1`` (see the module docstring).

    Args:
        n: dataset length.
        seed: shuffle seed (shared by all processes).
        shuffle: False gives the identity order (still epoch-encoded), e.g. for evaluation.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        if n <= 0:
            raise ValueError(f"EpochShuffleSampler needs a non-empty dataset, got n={n}")
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.groups: np.ndarray | None = None

    def set_groups(self, groups: np.ndarray | None) -> None:
        """Shuffle whole groups instead of positions (:func:`grouped_permutation`; ``groups``: one id per
        position), e.g. the copies of one image pair labelled by different users; ``None``: positions again."""
        if groups is not None and len(groups) != self.n:
            raise ValueError(f"groups has {len(groups)} entries for a dataset of {self.n} positions")
        self.groups = None if groups is None else np.asarray(groups)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order and reset the start to 0 (accelerate calls this on each epoch)."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Begin the current epoch at global sample ``start`` (0 <= start <= n)."""
        if not 0 <= start <= self.n:
            raise ValueError(f"start must be in [0, {self.n}], got {start}")
        self.start = int(start)

    def order(self) -> np.ndarray:
        """Dataset positions of the whole current epoch (int64 [n])."""
        if self.shuffle and self.groups is not None:
            return grouped_permutation(self.groups, self.seed, self.epoch)
        if self.shuffle:
            return epoch_permutation(self.n, self.seed, self.epoch)
        return np.arange(self.n, dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.n
        for i in self.order()[self.start :]:
            yield offset + int(i)

    def __len__(self) -> int:
        return self.n - self.start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n", self.n) != self.n:
            raise ValueError(
                f"sampler state was saved for a dataset of {state['n']} pairs, this one has {self.n}: the data "
                "or its filtering changed since the checkpoint; resuming at the same position is not possible"
            )
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.start = int(state["start"])


def split_index(index: int, n: int) -> tuple[int, int]:
    """``index = epoch * n + position`` -> ``(epoch, position)``."""
    if index < 0:
        raise IndexError(f"negative index {index}")
    return divmod(int(index), n)
