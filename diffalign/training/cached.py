"""Training data through the on-disk latent/text-embedding cache (built once, reused while its key matches)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.cache import build_latent_cache, collate_cached, model_fingerprint
from ..models import pipeline as mp
from .data import TrainData, epoch_loader, require_pairs


def encoder_id(comps: mp.Components) -> str:
    """What the cached values depend on: the VAE, text encoder(s) and tokenizer(s) — not the UNet."""
    root = Path(comps.model_path)
    parts: list = []
    for sub in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        p = root / sub
        parts.append(p if p.exists() else f"{comps.model_path}/{sub}")
    parts += [comps.vae, *comps.text_encoders, f"scaling={comps.vae_scaling_factor}", f"sdxl={comps.sdxl}"]
    return model_fingerprint(*parts)


def default_cache_root(cfg) -> Path:
    return (
        Path(cfg.cache_dir)
        if cfg.cache_dir
        else Path(cfg.output_dir).resolve().parent / ".cache" / "diffalign"
    )


def _collate_with_index(examples):
    batch = collate_cached(examples)
    batch["index"] = torch.tensor([ex["row_index"] for ex in examples], dtype=torch.long)
    return batch


def build_cached_data(cfg, comps: mp.Components, accelerator, pairs, info: dict) -> TrainData:
    if cfg.random_crop:
        raise ValueError(
            "random_crop=True cannot be used with use_cache=True (the cache stores centre crops, flipped and not); "
            "set random_crop false or use_cache false"
        )
    if getattr(cfg, "cache_mode", "upfront") == "lazy":
        return build_lazy_data(cfg, comps, accelerator, pairs, info)
    root = default_cache_root(cfg)
    with (
        accelerator.main_process_first()
    ):  # the main process builds; the others find it complete and reuse it
        cached = build_latent_cache(
            pairs,
            lambda pix: mp.encode_images(comps, pix),
            lambda captions: mp.encode_prompts(comps, list(captions)),
            cache_root=root,
            model_id=encoder_id(comps),
            batch_size=cfg.cache_batch_size,
            storage_dtype=getattr(torch, cfg.cache_dtype),  # part of the cache key: switching dtype rebuilds
            num_workers=cfg.dataloader_num_workers,
            random_flip=cfg.random_flip,
            seed=cfg.seed,
            show_progress=accelerator.is_local_main_process,
            log=accelerator.print,
        )
    require_pairs(cfg, len(cached), cached.stats)  # images that failed to decode while encoding are gone too
    loader, sampler = epoch_loader(cached, cfg, _collate_with_index)
    info = {
        **info,
        "cache": str(cached.directory),
        "cache_reused": bool(cached.reused),
        "cache_dtype": cfg.cache_dtype,
    }
    # The cache's stats: the dataset's filtering plus the rows whose images failed while the cache was encoded.
    return TrainData(loader, sampler, len(cached), True, cached, info)


def build_lazy_data(cfg, comps: mp.Components, accelerator, pairs, info: dict) -> TrainData:
    """Pairs through a :class:`~diffalign.data.lazy_cache.LatentStore` filled as training goes (``cache_mode:
    lazy``): the batches carry stored encodings where they exist and pixels elsewhere; the step completes them
    (:meth:`LatentStore.complete`)."""
    from ..data.cache import cache_key, key_digest
    from ..data.lazy_cache import LAYOUT, LatentStore, LazyCachedPairs, collate_lazy

    dtype = getattr(torch, cfg.cache_dtype)
    key = {**cache_key(pairs, encoder_id(comps), dtype), "flips": "as drawn", "layout": LAYOUT}
    directory = default_cache_root(cfg) / f"latents-{key_digest(key)[:16]}"
    store = LatentStore(directory, key, rank=accelerator.process_index, storage_dtype=dtype)
    accelerator.print(f"latent cache (lazy): {len(store):,} encoded pairs stored in {directory}")
    dataset = LazyCachedPairs(pairs, store, random_flip=cfg.random_flip, seed=cfg.seed)
    loader, sampler = epoch_loader(dataset, cfg, collate_lazy)
    info = {**info, "cache": str(directory), "cache_mode": "lazy", "cache_dtype": cfg.cache_dtype,
            "cache_pairs_at_start": len(store)}  # fmt: skip
    data = TrainData(loader, sampler, len(pairs), True, pairs, info)
    data.latent_store = store
    return data
