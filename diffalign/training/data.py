"""The training loop's data: Pick-a-Pic-schema pairs, cached (latents + text embeddings), on the fly, or streamed.

All paths yield ``index`` [B] (keys the pair's timestep/noise draws), ``label_w`` [B] float32 (P(slot 0 preferred):
1.0, winner first; 0.5 for a kept tie: the loss's soft label), and ``latents`` [B, 2, C, h, w] + ``text`` {name:
[B, ...]} (cached) or ``pixel_values`` [B, 2, 3, H, W] + ``captions``. Streaming: :func:`build_streaming_data`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.pickapic import PairStats, PickAPicPairs, PickAPicPairStream, collate_pairs
from ..data.sampler import EpochShuffleSampler
from ..data.sources import resolve_dataset
from ..models import pipeline as mp


@dataclass
class TrainData:
    """The loader and what it reads. ``num_pairs``: usable pairs, 0 when not known before a pass (streaming).
    ``pairs``: the dataset whose ``stats`` are reported (the latent cache's when cached: they include the rows
    whose images failed while it was encoded)."""

    dataloader: DataLoader
    sampler: EpochShuffleSampler | None
    num_pairs: int
    cached: bool
    pairs: Any
    info: dict = field(default_factory=dict)
    used: int = 0
    _skipped: dict = field(default_factory=dict)
    latent_store: Any = None  # cache_mode lazy: the store the step completes batches from and records into

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        elif hasattr(self.pairs, "set_epoch"):  # a stream: the epoch keys its augmentation
            self.pairs.set_epoch(epoch)

    def describe(self) -> dict:
        out = dict(self.info)
        if hasattr(self.pairs, "stats"):
            out["filtering"] = self.pairs.stats.as_dict()
        return out

    def count(self, batch: dict) -> None:
        """Count a delivered batch (examples used, and rows skipped on the way, by reason)."""
        self.used += len(batch["index"])
        for reason, n in batch.get("skipped", {}).items():
            self._skipped[reason] = self._skipped.get(reason, 0) + int(n)

    def report(self, accelerator) -> dict:
        """Print what was used and what was skipped (and why), summed over processes."""
        from accelerate.utils import gather_object

        parts = gather_object([{"used": self.used, "skipped": dict(self._skipped)}])
        used = sum(p["used"] for p in parts)
        skipped: dict[str, int] = {}
        for p in parts:
            for k, v in p["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        summary = {"examples_used": used, "skipped_during_training": skipped}
        if hasattr(self.pairs, "stats"):
            accelerator.print(self.pairs.stats.report().replace(", 0 examples used", ""))
        how = (
            "streamed rows, by reason"
            if self.sampler is None
            else "bad images, replaced by the next good row"
        )
        accelerator.print(
            f"training consumed {used:,} examples"
            + (f"; rows skipped on the way ({how}): {skipped}" if skipped else "")
        )
        self.info.update(summary)
        return summary


def _collate_with_index(examples):
    batch = collate_pairs(examples)
    batch["index"] = batch["row_indices"]
    return batch


def require_pairs(cfg, num_pairs: int, stats: PairStats, minimum: int | None = None) -> None:
    """Fail before training, in one line, when ``num_pairs`` usable pairs cannot fill a batch (``minimum``, by
    default ``cfg.train_batch_size``): the loop would otherwise run empty epochs for ever. Raises
    :class:`~diffalign.errors.ConfigError` naming the dataset, the split and what was skipped, by reason."""
    from ..errors import ConfigError

    minimum = cfg.train_batch_size if minimum is None else minimum
    if num_pairs >= minimum:
        return
    have = (
        "0 usable pairs"
        if num_pairs == 0
        else f"only {num_pairs} usable pairs, fewer than train_batch_size={cfg.train_batch_size}"
    )
    hint = "; tie_policy drop drops ties, tie_policy keep trains on them" if stats.skipped["tie"] else ""
    raise ConfigError(
        f"dataset {cfg.dataset!r} split {cfg.split!r} has {have} ({stats.rows_seen:,} rows read, "
        f"{stats.skipped_summary()}{hint}): nothing to train on; choose another split, fix the data or lower "
        "train_batch_size"
    )


def build_train_data(cfg, comps: mp.Components, accelerator) -> TrainData:
    """Pairs for ``cfg.dataset``/``cfg.split``: streamed (``cfg.streaming``), through the latent cache
    (``cfg.use_cache``), or encoded on the fly."""
    source = resolve_dataset(cfg.dataset)
    augmentation = dict(
        resolution=cfg.resolution,
        crop="random" if cfg.random_crop else "center",
        random_flip=cfg.random_flip,
        tie_policy=cfg.tie_policy,
        seed=cfg.seed,
    )
    info = {"dataset": cfg.dataset, "split": cfg.split, "tie_policy": cfg.tie_policy}
    if cfg.streaming:
        return build_streaming_data(cfg, PickAPicPairStream(source, cfg.split, **augmentation), info)
    with accelerator.main_process_first():
        pairs = PickAPicPairs(
            source, cfg.split, **augmentation, show_progress=accelerator.is_local_main_process
        )
    info["pairs"] = len(pairs)
    if cfg.max_train_samples:
        pairs.limit(cfg.max_train_samples)
        info["max_train_samples"] = cfg.max_train_samples
    require_pairs(cfg, len(pairs), pairs.stats)
    if cfg.use_cache and "caption_1" in pairs.data.column_names:
        from ..errors import ConfigError

        raise ConfigError(
            f"dataset {cfg.dataset!r} has a caption_1 column (each image its own prompt, subject-driven data); the "
            "latent cache stores one caption per pair: set use_cache false"
        )
    if cfg.use_cache:
        from .cached import build_cached_data

        return build_cached_data(cfg, comps, accelerator, pairs, info)
    loader, sampler = epoch_loader(pairs, cfg, _collate_with_index)
    return TrainData(loader, sampler, len(pairs), False, pairs, info)


def build_streaming_data(cfg, stream: PickAPicPairStream, info: dict) -> TrainData:
    """The on-the-fly loader over ``datasets.load_dataset(..., streaming=True)`` rows (``streaming: true``).

    No Arrow copy of the split is made and nothing is indexed up front, so the number of usable pairs is unknown
    until a pass ends (``num_pairs`` is 0); the start-up check only makes sure a first pair exists. The order is
    the source order (no shuffle); ``index`` is the row number in the stream; the augmentation is keyed by (seed,
    epoch, row); the last batch of a pass may be short (nothing is dropped). A resumed run is exact when the
    source yields the same rows in the same order (local Parquet does; a remote dataset does unless it changed),
    but not cheap: the batches already consumed in the current epoch are read and decoded again to be skipped.
    """
    if cfg.max_train_samples:
        stream.limit(cfg.max_train_samples)
        info["max_train_samples"] = cfg.max_train_samples
    first = stream.first_examples(1)
    if not first.pairs_indexed:
        require_pairs(cfg, 0, first, minimum=1)
    loader = DataLoader(
        stream,
        batch_size=cfg.train_batch_size,
        collate_fn=_collate_with_index,
        num_workers=cfg.dataloader_num_workers,
        drop_last=False,  # the source order is the same every epoch: a dropped tail would never be trained on
    )
    info["streaming"] = "pairs counted while read"
    return TrainData(loader, None, 0, False, stream, info)


def source_rows(dataset) -> np.ndarray:
    """The source row of every position of a training dataset (int64 [len]): the latent cache's, a lazily cached
    dataset's pairs', or :class:`PickAPicPairs`' own index."""
    if hasattr(dataset, "row_indices"):
        return dataset.row_indices()
    return np.asarray(getattr(dataset, "pairs", dataset).rows, dtype=np.int64)


def pair_groups(cfg, dataset) -> tuple[np.ndarray, dict[int, int]]:
    """Rows that hold the same image pair (the same two ``image_*_uid``, either order), e.g. one pair labelled by
    several users: ``(group id per dataset position, {source row: the group's first source row})``. The first
    keys the shuffle (:meth:`EpochShuffleSampler.set_groups`), the second the per-pair draws (t, ε), so the copies
    of a pair are batched together and noised alike. Raises a one-line ConfigError when the split lacks the
    columns."""
    from ..data.splits import load_pickapic_split
    from ..errors import ConfigError

    data = load_pickapic_split(resolve_dataset(cfg.dataset), cfg.split)
    missing = [c for c in ("image_0_uid", "image_1_uid") if c not in data.column_names]
    if missing:
        raise ConfigError(
            f"grouping the copies of a pair needs the columns image_0_uid, image_1_uid; dataset {cfg.dataset!r} "
            f"split {cfg.split!r} lacks {missing}: turn the grouping off or add the columns"
        )
    first: dict[tuple[str, str], int] = {}
    leader = np.empty(len(data), dtype=np.int64)
    for r, (a, b) in enumerate(zip(data["image_0_uid"], data["image_1_uid"], strict=True)):
        leader[r] = first.setdefault((min(str(a), str(b)), max(str(a), str(b))), r)
    rows = source_rows(dataset)
    return leader[rows], {int(r): int(leader[r]) for r in rows}


def epoch_loader(dataset, cfg, collate_fn) -> tuple[DataLoader, EpochShuffleSampler]:
    """The training DataLoader over ``dataset``: a reshuffle per epoch keyed by ``cfg.seed``, full batches only."""
    sampler = EpochShuffleSampler(len(dataset), seed=cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.train_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=cfg.dataloader_num_workers,
        drop_last=True,
    )
    return loader, sampler


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
