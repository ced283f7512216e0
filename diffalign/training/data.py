"""The training loop's data: Pick-a-Pic-schema pairs, cached (latents + text embeddings) or encoded on the fly.

Both paths yield batches with ``index`` [B] (the pair's identity, which keys its timestep/noise draws), and either
``latents`` [B, 2, C, h, w] + ``text`` {name: [B, ...]} (cached) or ``pixel_values`` [B, 2, 3, H, W] + ``captions``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.pickapic import PickAPicPairs, collate_pairs
from ..data.sampler import EpochShuffleSampler
from ..data.sources import resolve_dataset
from ..models import pipeline as mp


@dataclass
class TrainData:
    dataloader: DataLoader
    sampler: EpochShuffleSampler | None
    num_pairs: int
    cached: bool
    pairs: Any
    info: dict = field(default_factory=dict)
    used: int = 0
    _skipped: dict = field(default_factory=dict)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

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
        accelerator.print(
            f"training consumed {used:,} examples"
            + (
                f"; rows skipped on the way (bad images, replaced by the next good row): {skipped}"
                if skipped
                else ""
            )
        )
        self.info.update(summary)
        return summary


def _collate_with_index(examples):
    batch = collate_pairs(examples)
    batch["index"] = batch["row_indices"]
    return batch


def build_train_data(cfg, comps: mp.Components, accelerator) -> TrainData:
    """Pairs for ``cfg.dataset``/``cfg.split``, through the latent cache when ``cfg.use_cache``."""
    source = resolve_dataset(cfg.dataset)
    with accelerator.main_process_first():
        pairs = PickAPicPairs(
            source,
            cfg.split,
            resolution=cfg.resolution,
            crop="random" if cfg.random_crop else "center",
            random_flip=cfg.random_flip,
            tie_policy=cfg.tie_policy,
            seed=cfg.seed,
            show_progress=accelerator.is_local_main_process,
        )
    info = {"dataset": cfg.dataset, "split": cfg.split, "tie_policy": cfg.tie_policy, "pairs": len(pairs)}
    if cfg.max_train_samples:
        pairs.limit(cfg.max_train_samples)
        info["max_train_samples"] = cfg.max_train_samples
    if cfg.use_cache:
        from .cached import build_cached_data

        return build_cached_data(cfg, comps, accelerator, pairs, info)
    loader, sampler = epoch_loader(pairs, cfg, _collate_with_index)
    return TrainData(loader, sampler, len(pairs), False, pairs, info)


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
