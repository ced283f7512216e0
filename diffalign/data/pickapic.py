"""Preference pairs from Pick-a-Pic-format data: filtering, tie policy, pair-consistent augmentation, resumable order.

Each example is a (winner, loser) image pair for one caption, **winner first**. Compared with the public
Diffusion-DPO script (Wallace et al., 2023, arXiv 2311.12908) this module fixes four known defects:

* ties (labels 0.5/0.5) are *dropped* by default, never read as "image 0 wins";
* the winner and the loser get the **same** crop and the **same** horizontal flip;
* the default split is ``train`` (not ``validation``);
* the order is a deterministic per-epoch shuffle, so a resumed run starts at the exact sample
  (:mod:`diffalign.data.sampler`), without replaying the loader.

Every row that is not used is counted by reason (:data:`SKIP_REASONS`) in :class:`PairStats`.

The parts live in their own modules and are all importable from here:

* :mod:`~diffalign.data.pair_filter`: skip reasons, the tie policy, :func:`classify_row`, :class:`PairStats`;
* :mod:`~diffalign.data.pair_images`: :func:`decode_rgb`, the shared augmentation :class:`PairTransform`,
  :func:`build_example`;
* :mod:`~diffalign.data.splits`: :func:`load_pickapic_split`;
* :mod:`~diffalign.data.stream`: :class:`PickAPicPairStream`;
* this module: the map-style :class:`PickAPicPairs` and the collation :func:`collate_pairs`.

Where skips are counted: rows removed by the metadata pass (labels, captions; and images too when
``verify_images=True``) are counted in ``dataset.stats`` when the dataset is built. Rows whose images turn out
bad while an example is produced (``verify_images=False``, the cheap default) are replaced by the next good
position (so batches keep their size and the order stays deterministic) and the reason travels in
``example["skipped"]`` of the example requested at the bad row's own position (so each bad row is counted once
per epoch); :func:`collate_pairs` sums them and :meth:`PairStats.add_batch` adds them, so they are counted even
when DataLoader workers run in other processes.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .pair_filter import (
    IMAGE_REASONS,
    LABEL_REASONS,
    SKIP_REASONS,
    TIE,
    TIE_POLICIES,
    PairSkip,
    PairStats,
    classify_row,
)
from .pair_images import CROP_MODES, PairTransform, build_example, decode_rgb, example_rng
from .sampler import split_index
from .schema import PAIR_REQUIRED_COLUMNS, validate_table
from .splits import describe_source, load_pickapic_split
from .stream import PickAPicPairStream

__all__ = [
    "CROP_MODES",
    "IMAGE_REASONS",
    "LABEL_REASONS",
    "SKIP_REASONS",
    "TIE_POLICIES",
    "PairSkip",
    "PairStats",
    "PairTransform",
    "PickAPicPairStream",
    "PickAPicPairs",
    "build_example",
    "classify_row",
    "collate_pairs",
    "decode_rgb",
    "example_rng",
    "label_w",
    "load_pickapic_split",
]


# ----------------------------------------------------------------------------------------------------------------
# Collation


def label_w(examples: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """``[B]`` float32: P(image in slot 0 preferred) of each example (its ``pref_prob``: 1.0, or 0.5 for a tie)."""
    return torch.tensor([ex["pref_prob"] for ex in examples], dtype=torch.float32)


def collate_pairs(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack examples: ``pixel_values`` [B, 2, 3, H, W] (slot 0 = winner, slot 1 = loser), ``captions`` list[str],
    ``original_sizes``/``crop_top_lefts`` [B, 2, 2] long, ``ranking_ids``/``user_ids``/``winners`` [B] long,
    ``label_0``/``label_1`` [B] float64 (source labels), ``label_w`` [B] float32, ``is_tie``/``flipped`` [B] bool,
    ``row_indices`` [B] long (source rows; -1 if unknown) and ``skipped`` (reason -> count summed over the batch).

    ``label_w`` is the probability that the image in slot 0 is preferred: 1.0 for a decided pair (winner first),
    0.5 for a tie kept with ``tie_policy="keep"``. A loss must read it (a soft label) instead of assuming that
    slot 0 always won.
    """
    return {
        "pixel_values": torch.stack([ex["pixel_values"] for ex in examples]),
        **stack_pair_metadata(examples),
        "winners": torch.tensor([ex["winner"] for ex in examples], dtype=torch.long),
        "label_0": torch.tensor([ex["label_0"] for ex in examples], dtype=torch.float64),
        "label_1": torch.tensor([ex["label_1"] for ex in examples], dtype=torch.float64),
    }


def stack_pair_metadata(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What every batch of pairs carries besides pixels or latents (all collate functions share it): ``captions``
    (and ``captions_1``, the slot-1 images' own prompts, when the data has a ``caption_1`` column),
    ``original_sizes``/``crop_top_lefts`` [B, 2, 2] long, ``ranking_ids``/``user_ids``/``row_indices`` [B] long
    (-1 where unknown), ``label_w`` [B] float32, ``is_tie``/``flipped`` [B] bool, ``skipped`` (reason -> count
    summed over the batch)."""
    skipped: Counter = Counter()
    for ex in examples:
        skipped.update(ex.get("skipped", {}))
    own = {"captions_1": [ex["caption_1"] for ex in examples]} if "caption_1" in examples[0] else {}
    return {
        "captions": [ex["caption"] for ex in examples],
        **own,
        "original_sizes": torch.stack([ex["original_sizes"] for ex in examples]),
        "crop_top_lefts": torch.stack([ex["crop_top_lefts"] for ex in examples]),
        "ranking_ids": torch.tensor([ex["ranking_id"] for ex in examples], dtype=torch.long),
        "user_ids": torch.tensor([ex["user_id"] for ex in examples], dtype=torch.long),
        "row_indices": torch.tensor([ex.get("row_index", -1) for ex in examples], dtype=torch.long),
        "label_w": label_w(examples),
        "is_tie": torch.tensor([ex["is_tie"] for ex in examples], dtype=torch.bool),
        "flipped": torch.tensor([ex["flipped"] for ex in examples], dtype=torch.bool),
        "skipped": dict(skipped),
    }


# ----------------------------------------------------------------------------------------------------------------
# Map-style dataset


class PickAPicPairs(Dataset):
    """Map-style preference pairs over the rows that pass filtering; images are decoded lazily per item.

    Construction runs one *metadata pass* (caption, labels, has_label: the image columns are not read, and the
    Arrow table stays memory-mapped) that builds ``rows`` (int64 [N], source row of each pair) and ``winners``
    (int8 [N]: 0, 1, or -1 for a kept tie). ``verify_images=True`` also decodes every image in that pass (slow;
    exact counts before training, no substitution later).

    Indexing: ``dataset[epoch * N + position]`` (see :mod:`diffalign.data.sampler`); the augmentation of an example
    is seeded by ``(seed, epoch, position)``, so it is reproducible across resumes and worker counts.

    Args:
        source, split, streaming-less loading options: see :func:`load_pickapic_split`.
        resolution, crop, random_flip: see :class:`PairTransform`.
        tie_policy: ``"drop"`` (default) or ``"keep"`` (see :mod:`~diffalign.data.pair_filter`).
        seed: augmentation seed.
        max_substitutions: how many following rows to try when a row's images are bad before giving up.
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
        verify_images: bool = False,
        max_substitutions: int = 64,
        cache_dir: str | None = None,
        show_progress: bool = True,
        load_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if tie_policy not in TIE_POLICIES:
            raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
        self.split = split
        self.data = load_pickapic_split(
            source, split, streaming=False, cache_dir=cache_dir, **(load_kwargs or {})
        )
        import datasets

        if isinstance(self.data, datasets.IterableDataset):
            raise TypeError(
                f"{describe_source(source, split)} is a streamed dataset; use PickAPicPairStream for streams "
                "(map-style access needs a local/cached copy)"
            )
        self.source = describe_source(source, split)
        validate_table(self.data.features.arrow_schema, self.source, PAIR_REQUIRED_COLUMNS)
        self.transform = PairTransform(resolution, crop, random_flip)
        self.tie_policy = tie_policy
        self.seed = seed
        self.verify_images = verify_images
        self.max_substitutions = max_substitutions
        self.stats = PairStats(source=self.source)
        self.rows, self.winners = self._index(show_progress)

    # -- metadata pass -------------------------------------------------------------------------------------------
    def _index(self, show_progress: bool, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        names = set(self.data.column_names)
        columns = [c for c in ("caption", "label_0", "label_1", "has_label") if c in names]
        if self.verify_images:
            columns += ["jpg_0", "jpg_1"]
            batch_size = 64
        meta = self.data.select_columns(columns).with_format("arrow")
        rows: list[int] = []
        winners: list[int] = []
        offset = 0
        bar = tqdm(total=len(self.data), desc="indexing pairs", unit="row", disable=not show_progress)
        for table in meta.iter(batch_size=batch_size):
            cols = {c: table.column(c).to_pylist() for c in columns}
            for i in range(table.num_rows):
                reason, winner = classify_row(
                    cols["caption"][i],
                    cols["label_0"][i],
                    cols["label_1"][i],
                    cols["has_label"][i] if "has_label" in cols else True,
                    self.tie_policy,
                )
                if reason is None and self.verify_images:
                    try:
                        decode_rgb(cols["jpg_0"][i])
                        decode_rgb(cols["jpg_1"][i])
                    except PairSkip as skip:
                        reason = skip.reason
                if reason is not None:
                    self.stats.skip(reason)
                    continue
                rows.append(offset + i)
                winners.append(winner)
                self.stats.ties_kept += winner == TIE
            offset += table.num_rows
            bar.update(table.num_rows)
        bar.close()
        self.stats.rows_seen = offset
        self.stats.pairs_indexed = len(rows)
        return np.asarray(rows, dtype=np.int64), np.asarray(winners, dtype=np.int8)

    # -- access --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def load_pair(
        self,
        position: int,
        epoch: int = 0,
        transform: PairTransform | None = None,
        flip: bool | None = None,
        aug_position: int | None = None,
    ) -> dict[str, Any]:
        """Example at ``position`` (no substitution). Raises :class:`PairSkip` if its images are bad.

        The augmentation is drawn from ``example_rng(seed, epoch, aug_position or position)``; ``flip``
        overrides the drawn flip bit.
        """
        row_index = int(self.rows[position])
        row = self.data[row_index]
        rng = example_rng(self.seed, epoch, position if aug_position is None else aug_position)
        example = build_example(row, int(self.winners[position]), transform or self.transform, rng, flip=flip)
        example["row_index"] = row_index
        example["position"] = position
        return example

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``index = epoch * N + position``. A bad row is replaced by the next good position (cyclically); the
        augmentation stays keyed by the requested position and the skip reasons go in ``example["skipped"]``."""
        n = len(self.rows)
        epoch, position = split_index(index, n)
        skipped: Counter = Counter()
        tried: list[str] = []
        for attempt in range(min(self.max_substitutions, n)):
            try:
                example = self.load_pair((position + attempt) % n, epoch, aug_position=position)
            except PairSkip as skip:
                # Count a bad row only where it was requested itself, so each is counted once per epoch.
                if attempt == 0:
                    skipped[skip.reason] += 1
                tried.append(skip.reason)
                continue
            example["skipped"] = dict(skipped)
            return example
        raise RuntimeError(
            f"{self.source}: {len(tried)} consecutive rows from position {position} have bad images "
            f"({dict(Counter(tried))}); the data looks broken. Check it, or build the dataset with verify_images=True "
            "to remove bad rows up front."
        )

    def limit(self, n: int) -> None:
        """Keep only the first ``n`` pairs (small runs, debugging). ``stats.pairs_indexed`` and
        :meth:`fingerprint` (hence cache keys) follow; the pairs left out are counted in ``stats.limited`` (not
        as skipped)."""
        if n <= 0:
            raise ValueError(f"limit must be positive, got {n}")
        self.stats.limited += max(len(self.rows) - n, 0)
        self.rows, self.winners = self.rows[:n], self.winners[:n]
        self.stats.pairs_indexed = len(self.rows)
        self.stats.ties_kept = int((self.winners == TIE).sum())

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the pairs this dataset yields (used as part of cache keys)."""
        digest = hashlib.sha256(self.rows.tobytes() + self.winners.tobytes()).hexdigest()
        return {
            "source": self.source,
            "split": self.split,
            "dataset_fingerprint": getattr(self.data, "_fingerprint", None),
            "num_source_rows": self.stats.rows_seen,
            "tie_policy": self.tie_policy,
            "verify_images": self.verify_images,
            "num_pairs": len(self.rows),
            "pairs_sha256": digest,
        }
