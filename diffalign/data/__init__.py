"""Preference data: the Pick-a-Pic v2 schema, filtered winner-first pairs with pair-consistent augmentation,
a resumable per-epoch shuffle, and out-of-core latent/text-embedding caches."""

from .cache import (
    PREPROCESS_VERSION,
    CachedPairs,
    build_latent_cache,
    cache_key,
    collate_cached,
    key_digest,
    model_fingerprint,
)
from .pair_filter import SKIP_REASONS, TIE_POLICIES, PairSkip, PairStats, classify_row
from .pair_images import CROP_MODES, PairTransform, build_example, decode_rgb, example_rng
from .pickapic import PickAPicPairs, collate_pairs
from .sampler import EpochShuffleSampler, epoch_permutation, split_index
from .schema import (
    PAIR_REQUIRED_COLUMNS,
    PICKAPIC_COLUMN_NAMES,
    PICKAPIC_COLUMNS,
    PICKAPIC_SCHEMA,
    PICKAPIC_SPLITS,
    SchemaError,
    rows_to_table,
    split_path,
    validate_table,
    write_pickapic_dataset,
    write_pickapic_split,
)
from .splits import load_pickapic_split, split_captions
from .stream import PickAPicPairStream

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
