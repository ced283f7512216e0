"""Preference data: the Pick-a-Pic v2 schema, filtered winner-first pairs with pair-consistent augmentation,
a resumable per-epoch shuffle, and out-of-core latent/text-embedding caches.

The names below are imported from their submodules on first use (PEP 562), so ``import diffalign.data.schema`` (the
configuration check of a local dataset's columns) does not load torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CachedPairs": "cache",
    "PREPROCESS_VERSION": "cache",
    "build_latent_cache": "cache",
    "cache_key": "cache",
    "collate_cached": "cache",
    "key_digest": "cache",
    "model_fingerprint": "cache",
    "PairSkip": "pair_filter",
    "PairStats": "pair_filter",
    "SKIP_REASONS": "pair_filter",
    "TIE_POLICIES": "pair_filter",
    "classify_row": "pair_filter",
    "CROP_MODES": "pair_images",
    "PairTransform": "pair_images",
    "build_example": "pair_images",
    "decode_rgb": "pair_images",
    "example_rng": "pair_images",
    "PickAPicPairs": "pickapic",
    "collate_pairs": "pickapic",
    "EpochShuffleSampler": "sampler",
    "epoch_permutation": "sampler",
    "split_index": "sampler",
    "PAIR_REQUIRED_COLUMNS": "schema",
    "PICKAPIC_COLUMNS": "schema",
    "PICKAPIC_COLUMN_NAMES": "schema",
    "PICKAPIC_SCHEMA": "schema",
    "PICKAPIC_SPLITS": "schema",
    "SchemaError": "schema",
    "rows_to_table": "schema",
    "split_path": "schema",
    "validate_table": "schema",
    "write_pickapic_dataset": "schema",
    "write_pickapic_split": "schema",
    "load_pickapic_split": "splits",
    "split_captions": "splits",
    "PickAPicPairStream": "stream",
}

__all__ = [
    "CROP_MODES",
    "PAIR_REQUIRED_COLUMNS",
    "PICKAPIC_COLUMNS",
    "PICKAPIC_COLUMN_NAMES",
    "PICKAPIC_SCHEMA",
    "PICKAPIC_SPLITS",
    "PREPROCESS_VERSION",
    "SKIP_REASONS",
    "TIE_POLICIES",
    "CachedPairs",
    "EpochShuffleSampler",
    "PairSkip",
    "PairStats",
    "PairTransform",
    "PickAPicPairStream",
    "PickAPicPairs",
    "SchemaError",
    "build_example",
    "build_latent_cache",
    "cache_key",
    "classify_row",
    "collate_cached",
    "collate_pairs",
    "decode_rgb",
    "epoch_permutation",
    "example_rng",
    "key_digest",
    "load_pickapic_split",
    "model_fingerprint",
    "rows_to_table",
    "split_captions",
    "split_index",
    "split_path",
    "validate_table",
    "write_pickapic_dataset",
    "write_pickapic_split",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
