"""Preference pairs read from a stream of Pick-a-Pic rows, filtered on the fly (:class:`PickAPicPairStream`)."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from .pair_filter import TIE_POLICIES, PairSkip, PairStats, classify_row
from .pair_images import PairTransform, build_example, example_rng
from .schema import PAIR_REQUIRED_COLUMNS, SchemaError
from .splits import describe_source, load_pickapic_split


class PickAPicPairStream(IterableDataset):
    """Preference pairs from a stream of rows (``load_dataset(..., streaming=True)`` or any iterable of dicts).

    Filtering happens on the fly, with the same checks and skip reasons as the map-style
    :class:`~diffalign.data.pickapic.PickAPicPairs`. Every skipped row's reason travels in the ``skipped`` dict of
    the next example the same worker yields (skips after a worker's last example ride on that last example, which
    is held back until the worker's rows end), so :meth:`PairStats.add_batch` counts every one; only a worker that
    yields no example at all has nowhere to put its skips and warns instead.

    Each example carries ``source_row`` (its row number in the stream) for resumption: restart with ``skip_rows =
    last source_row + 1`` (the stream is re-read from the start and rows before it are passed over without
    decoding images; for a ``datasets.IterableDataset`` ``.skip`` is used). Augmentation is seeded by ``(seed,
    epoch, source_row)`` (:meth:`set_epoch`; accelerate's loaders call it). With DataLoader workers, worker ``w``
    of ``K`` takes rows with ``source_row % K == w`` (every worker reads the stream; only its own rows are decoded).
    """

    def __init__(
        self,
        source: Any,
        split: str = "train",
        *,
        resolution: int = 512,
        crop: str = "random",
        random_flip: bool = True,
        tie_policy: str = "drop",
        seed: int = 0,
        skip_rows: int = 0,
        load_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if tie_policy not in TIE_POLICIES:
            raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
        if (
            isinstance(source, Iterable)
            and not isinstance(source, (str, Path))
            and not hasattr(source, "features")
        ):
            self.rows_source: Any = source
        else:
            self.rows_source = load_pickapic_split(source, split, streaming=True, **(load_kwargs or {}))
        self.source = (
            describe_source(source, split) if not isinstance(source, list) else f"list of rows [{split}]"
        )
        self.transform = PairTransform(resolution, crop, random_flip)
        self.tie_policy = tie_policy
        self.seed = seed
        self.skip_rows = skip_rows
        self.epoch = 0
        self.max_pairs: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Key the augmentation of the next passes by ``epoch``."""
        self.epoch = int(epoch)

    def limit(self, n: int) -> None:
        """End each pass after the first ``n`` rows (from ``skip_rows`` on) that pass the metadata checks, as
        :meth:`~diffalign.data.pickapic.PickAPicPairs.limit` keeps the first ``n`` indexed pairs (one whose images
        then fail is skipped and counted, not replaced)."""
        if n <= 0:
            raise ValueError(f"limit must be positive, got {n}")
        self.max_pairs = n

    def first_examples(self, n: int) -> PairStats:
        """Read the stream (in this process) until ``n`` examples were produced or it ended: a cheap start-up
        check. Returns the counts seen on the way (``pairs_indexed`` = examples produced, at most ``n``)."""
        stats = PairStats(source=self.source)
        for example in self._examples(unattached=stats.skipped):
            stats.pairs_indexed += 1
            stats.ties_kept += example["is_tie"]
            stats.skipped.update(example["skipped"])
            if stats.pairs_indexed >= n:
                break
        stats.rows_seen = stats.pairs_indexed + sum(stats.skipped.values())
        return stats

    def _rows(self) -> Iterator[Mapping[str, Any]]:
        src = self.rows_source
        if self.skip_rows and hasattr(src, "skip"):
            yield from src.skip(self.skip_rows)
            return
        for i, row in enumerate(src):
            if i >= self.skip_rows:
                yield row

    def _check_columns(self, row: Mapping[str, Any]) -> None:
        missing = [c for c in PAIR_REQUIRED_COLUMNS if c not in row]
        if missing:
            raise SchemaError(
                f"{self.source}: missing column {missing[0]!r} in the streamed rows (found: "
                f"{', '.join(row)}). Pick-a-Pic v2 rows need {', '.join(PAIR_REQUIRED_COLUMNS)}."
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._examples()

    def _examples(self, unattached: Counter | None = None) -> Iterator[dict[str, Any]]:
        """The examples of this worker. Skips that no example can carry (the worker yields none) go to
        ``unattached`` when given, else into a warning."""
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        pending: Counter = Counter()  # skips not yet attached to an example
        held: dict[str, Any] | None = None  # the last example, yielded once the next one exists
        passed = 0  # rows of all workers that passed the metadata checks (what the limit counts)
        for r, row in enumerate(self._rows(), start=self.skip_rows):
            if r == self.skip_rows:
                self._check_columns(row)
            if self.max_pairs is not None and passed >= self.max_pairs:
                break
            reason, winner = classify_row(
                row.get("caption"),
                row.get("label_0"),
                row.get("label_1"),
                row.get("has_label", True),
                self.tie_policy,
            )
            passed += reason is None
            if r % nworkers != wid:
                continue
            if reason is None:
                try:
                    rng = example_rng(self.seed, self.epoch, r)
                    example = build_example(row, winner, self.transform, rng)
                except PairSkip as skip:
                    reason = skip.reason
            if reason is not None:
                pending[reason] += 1
                continue
            if held is not None:
                yield held
            example["source_row"] = r
            example["row_index"] = r
            example["skipped"] = dict(pending)
            pending.clear()
            held = example
        if held is not None:
            held["skipped"] = dict(Counter(held["skipped"]) + pending)
            yield held
        elif unattached is not None:
            unattached.update(pending)
        elif pending:
            warnings.warn(
                f"{self.source}: {sum(pending.values())} rows skipped ({dict(pending)}) and no usable pair in "
                f"{'this worker' if nworkers > 1 else 'the stream'}; they are not in any batch's 'skipped' counts",
                stacklevel=2,
            )
