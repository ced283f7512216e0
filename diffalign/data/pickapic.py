"""Preference pairs from Pick-a-Pic-format data: filtering, tie policy, pair-consistent augmentation, resumable order.

Each example is a (winner, loser) image pair for one caption, **winner first**. Compared with the public
Diffusion-DPO script (Wallace et al., 2023, arXiv 2311.12908) this module fixes four known defects:

* ties (labels 0.5/0.5) are *dropped* by default, never read as "image 0 wins";
* the winner and the loser get the **same** crop and the **same** horizontal flip;
* the default split is ``train`` (not ``validation``);
* the order is a deterministic per-epoch shuffle, so a resumed run starts at the exact sample
  (:mod:`diffalign.data.sampler`), without replaying the loader.

Row filtering (first matching reason wins; every skipped row is counted by reason in :class:`PairStats`):

==================  =========================================================================================
``no_label``        ``has_label`` is False (the ranking was never answered).
``missing_label``   ``label_0`` or ``label_1`` is None/NaN.
``both_zero``       both labels are 0 (no image chosen).
``invalid_label``   labels other than (1, 0), (0, 1) or (0.5, 0.5).
``tie``             (0.5, 0.5) with ``tie_policy="drop"``.
``empty_caption``   caption None, empty or only whitespace.
``missing_image``   ``jpg_0``/``jpg_1`` None or empty bytes.
``corrupt_image``   bytes PIL cannot decode (truncated/garbage).
``unsupported_mode`` decoded, but an image mode with no meaningful RGB reading (see below).
==================  =========================================================================================

Tie policies (:data:`TIE_POLICIES`): ``"drop"`` (default; counted as ``tie``), ``"keep"``: the tie is yielded in
source order (image 0 first) with ``pref_prob = 0.5`` and ``is_tie = True``; batches carry it as ``label_w``
(P(slot 0 preferred): 1.0 for decided pairs, 0.5 for ties), the soft label the DPO loss reads. A loss that
ignores ``label_w`` must not be fed ties: it would train them as "image 0 wins".
A "random winner" policy is deliberately not offered: it is label noise.

Image modes: ``RGB`` is used as is; ``L``, ``1``, ``CMYK`` (PIL undoes Adobe inversion) and ``YCbCr`` are converted
with PIL's standard formulas; modes with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) are
composited over **white** (a plain ``convert("RGB")`` would show whatever colour the transparent pixels store,
often black). 16-bit and float modes (``I``, ``I;16*``, ``F``) are skipped as ``unsupported_mode``: their value
range is not defined by the file, so any scaling would be a guess.

Where skips are counted: rows removed by the metadata pass (labels, captions; and images too when
``verify_images=True``) are counted in ``dataset.stats`` when the dataset is built. Rows whose images turn out
bad while an example is produced (``verify_images=False``, the cheap default) are replaced by the next good
position (so batches keep their size and the order stays deterministic) and the reason travels in
``example["skipped"]`` of the example requested at the bad row's own position (so each bad row is counted once
per epoch); :func:`collate_pairs` sums them and :meth:`PairStats.add_batch` adds them, so they are counted even
when DataLoader workers run in other processes.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from .sampler import split_index
from .schema import PAIR_REQUIRED_COLUMNS, SchemaError, validate_table

TIE_POLICIES: tuple[str, ...] = ("drop", "keep")
CROP_MODES: tuple[str, ...] = ("random", "center")
LABEL_REASONS: tuple[str, ...] = (
    "no_label",
    "missing_label",
    "both_zero",
    "invalid_label",
    "tie",
    "empty_caption",
)
IMAGE_REASONS: tuple[str, ...] = ("missing_image", "corrupt_image", "unsupported_mode")
SKIP_REASONS: tuple[str, ...] = LABEL_REASONS + IMAGE_REASONS

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_CONVERTIBLE_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "P"} | _ALPHA_MODES
_META_COLUMNS = ("caption", "label_0", "label_1", "has_label", "ranking_id", "user_id")


class PairSkip(Exception):
    """A row cannot become a training pair; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class PairStats:
    """Counts of rows read, pairs indexed, examples used and rows skipped (by reason).

    ``rows_seen``: source rows looked at by the metadata pass. ``pairs_indexed``: rows that passed it (and were
    not left out by a limit). ``limited``: pairs that passed but were left out by a limit (``max_train_samples``).
    ``used``: examples delivered to the training loop (added by :meth:`add_batch`). ``ties_kept``: ties indexed
    under ``tie_policy="keep"``. ``skipped``: reason -> count, from the metadata pass and from batches.
    """

    source: str = ""
    rows_seen: int = 0
    pairs_indexed: int = 0
    ties_kept: int = 0
    used: int = 0
    limited: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str, n: int = 1) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; valid: {', '.join(SKIP_REASONS)}")
        self.skipped[reason] += n

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        """Count a collated batch: ``used += B`` and the per-reason skips it carries."""
        self.used += len(batch["captions"])
        for reason, n in batch.get("skipped", {}).items():
            self.skip(reason, int(n))

    def merge(self, other: PairStats) -> PairStats:
        """Sum of two stats (e.g. gathered from several processes); ``source`` of ``self`` is kept."""
        return PairStats(
            source=self.source,
            rows_seen=self.rows_seen + other.rows_seen,
            pairs_indexed=self.pairs_indexed + other.pairs_indexed,
            ties_kept=self.ties_kept + other.ties_kept,
            used=self.used + other.used,
            limited=self.limited + other.limited,
            skipped=self.skipped + other.skipped,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows_seen": self.rows_seen,
            "pairs_indexed": self.pairs_indexed,
            "ties_kept": self.ties_kept,
            "used": self.used,
            "limited": self.limited,
            "skipped": {r: int(self.skipped[r]) for r in SKIP_REASONS if self.skipped[r]},
        }

    def skipped_summary(self) -> str:
        """``"skipped 13 rows: tie 12, corrupt_image 1"`` (reasons in table order) or ``"skipped 0 rows"``."""
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{r} {self.skipped[r]:,}" for r in SKIP_REASONS if self.skipped[r])
        return f"skipped {total:,} rows" + (f": {reasons}" if total else "")

    def report(self) -> str:
        """Human-readable summary for the end of a run."""
        lines = [
            f"preference data {self.source}: {self.rows_seen:,} rows read, {self.pairs_indexed:,} pairs indexed"
            + (f" ({self.ties_kept:,} ties kept)" if self.ties_kept else "")
            + (f", {self.limited:,} more left out by the limit" if self.limited else "")
            + f", {self.used:,} examples used",
            f"  {self.skipped_summary()}",
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Row classification


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def classify_row(
    caption: object,
    label_0: object,
    label_1: object,
    has_label: object = True,
    tie_policy: str = "drop",
) -> tuple[str | None, int]:
    """Decide what a row becomes, from its metadata only (no image decoding).

    Returns:
        ``(reason, winner)``: ``reason`` is a skip reason (see the module table) or None when the row is used;
        ``winner`` is 0 or 1 (the source index of the preferred image), or -1 for a tie kept under
        ``tie_policy="keep"`` (and meaningless when ``reason`` is not None).
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if has_label is False:
        return "no_label", 0
    if _is_missing(label_0) or _is_missing(label_1):
        return "missing_label", 0
    l0, l1 = float(label_0), float(label_1)
    if l0 == 0.0 and l1 == 0.0:
        return "both_zero", 0
    if (l0, l1) == (1.0, 0.0):
        winner = 0
    elif (l0, l1) == (0.0, 1.0):
        winner = 1
    elif (l0, l1) == (0.5, 0.5):
        if tie_policy == "drop":
            return "tie", 0
        winner = -1
    else:
        return "invalid_label", 0
    if not isinstance(caption, str) or not caption.strip():
        return "empty_caption", 0
    return None, winner


# ----------------------------------------------------------------------------------------------------------------
# Images


def decode_rgb(data: object) -> Image.Image:
    """JPEG (or any PIL-readable) bytes -> fully decoded RGB image.

    Raises:
        PairSkip: ``missing_image`` (None/empty), ``corrupt_image`` (undecodable) or ``unsupported_mode``.
    """
    if data is None or (isinstance(data, (bytes, bytearray, memoryview)) and len(data) == 0):
        raise PairSkip("missing_image")
    if isinstance(data, Mapping) and "bytes" in data:  # datasets Image feature storage {"bytes", "path"}
        return decode_rgb(data["bytes"])
    if isinstance(data, Image.Image):
        image = data
    else:
        try:
            image = Image.open(io.BytesIO(bytes(data)))
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise PairSkip("corrupt_image", str(err)) from err
    mode = image.mode
    if mode not in _CONVERTIBLE_MODES:
        raise PairSkip("unsupported_mode", mode)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class PairTransform:
    """Resize (shortest side -> ``resolution``, bilinear, antialiased), crop a square, maybe flip, scale to [-1, 1].

    Both images of a pair share the same draws: crop fractions ``(u_top, u_left)`` in [0, 1) and one flip bit.
    For an image resized to ``(H, W)``: random crop ``top = min(floor(u_top * (H - R + 1)), H - R)`` (uniform over
    the valid offsets), centre crop ``top = (H - R) // 2``; likewise ``left``. Images of the same size therefore get
    identical crops. The flip is applied *after* cropping.

    SDXL micro-conditioning, per image: ``original_size = (h, w)`` of the decoded image before resizing;
    ``crop_top_left = (top, left)`` in the resized image, where for a flipped image ``left`` is measured in the
    flipped image (``W - left - R``), i.e. the coordinates of what the model actually sees.
    """

    resolution: int = 512
    crop: str = "random"
    random_flip: bool = True

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def draw(self, rng: np.random.Generator) -> tuple[float, float, bool]:
        """The shared random draws of one pair: ``(u_top, u_left, flip)`` (always 3 draws, fixed order)."""
        u_top, u_left, u_flip = rng.random(3)
        return float(u_top), float(u_left), bool(self.random_flip and u_flip < 0.5)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """``(H, W)`` after scaling the shortest side of an ``(h, w)`` image to ``resolution``."""
        r = self.resolution
        scale = r / min(w, h)
        return max(r, round(h * scale)), max(r, round(w * scale))

    def _offset(self, size: int, u: float) -> int:
        margin = size - self.resolution
        if self.crop == "center":
            return margin // 2
        return min(int(math.floor(u * (margin + 1))), margin)

    def apply(
        self, image: Image.Image, u_top: float, u_left: float, flip: bool
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """One image -> ``(pixels [3, R, R] in [-1, 1], original_size (h, w), crop_top_left (top, left))``."""
        r = self.resolution
        w, h = image.size
        new_h, new_w = self.resized_size(h, w)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        top, left = self._offset(new_h, u_top), self._offset(new_w, u_left)
        image = image.crop((left, top, left + r, top + r))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            left = new_w - left - r
        array = np.asarray(image, dtype=np.uint8)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return pixels, (h, w), (top, left)

    def __call__(
        self, images: Sequence[Image.Image], rng: np.random.Generator, flip: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """A pair -> ``(pixel_values [2, 3, R, R], original_sizes [2, 2], crop_top_lefts [2, 2], flipped)``.

        ``flip`` overrides the drawn flip bit (the latent cache encodes both orientations).
        """
        u_top, u_left, drawn_flip = self.draw(rng)
        flip = drawn_flip if flip is None else flip
        outs = [self.apply(im, u_top, u_left, flip) for im in images]
        pixel_values = torch.stack([o[0] for o in outs])
        original_sizes = torch.tensor([o[1] for o in outs], dtype=torch.long)
        crop_top_lefts = torch.tensor([o[2] for o in outs], dtype=torch.long)
        return pixel_values, original_sizes, crop_top_lefts, flip


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one example's augmentation: ``default_rng([seed, epoch, position])``."""
    return np.random.default_rng([seed, epoch, position])


def _as_int(value: object, default: int = -1) -> int:
    return default if _is_missing(value) else int(value)  # type: ignore[arg-type]


def build_example(
    row: Mapping[str, Any],
    winner: int,
    transform: PairTransform,
    rng: np.random.Generator,
    flip: bool | None = None,
) -> dict[str, Any]:
    """A source row (whose metadata passed :func:`classify_row`) -> one example dict, winner first.

    Raises :class:`PairSkip` for image problems. Keys: ``pixel_values`` [2, 3, R, R] (winner, loser; for a kept
    tie: image 0, image 1), ``caption``, ``original_sizes`` [2, 2], ``crop_top_lefts`` [2, 2], ``flipped``,
    ``ranking_id``, ``user_id``, ``label_0``/``label_1`` (source values), ``winner`` (source index of
    the first image: 0 or 1, -1 for a tie kept in source order), ``pref_prob`` (P(first image preferred): 1.0, or 0.5
    for a tie), ``is_tie``, ``skipped`` ({} here).
    """
    images = [decode_rgb(row["jpg_0"]), decode_rgb(row["jpg_1"])]
    if winner == 1:
        images = images[::-1]
    pixel_values, original_sizes, crop_top_lefts, flipped = transform(images, rng, flip=flip)
    return {
        "pixel_values": pixel_values,
        "caption": row["caption"].strip(),
        "original_sizes": original_sizes,
        "crop_top_lefts": crop_top_lefts,
        "flipped": flipped,
        "ranking_id": _as_int(row.get("ranking_id")),
        "user_id": _as_int(row.get("user_id")),
        "label_0": float(row["label_0"]),
        "label_1": float(row["label_1"]),
        "winner": winner,
        "pref_prob": 0.5 if winner == -1 else 1.0,
        "is_tie": winner == -1,
        "skipped": {},
    }


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
    skipped: Counter = Counter()
    for ex in examples:
        skipped.update(ex.get("skipped", {}))
    return {
        "pixel_values": torch.stack([ex["pixel_values"] for ex in examples]),
        "captions": [ex["caption"] for ex in examples],
        "original_sizes": torch.stack([ex["original_sizes"] for ex in examples]),
        "crop_top_lefts": torch.stack([ex["crop_top_lefts"] for ex in examples]),
        "ranking_ids": torch.tensor([ex["ranking_id"] for ex in examples], dtype=torch.long),
        "user_ids": torch.tensor([ex["user_id"] for ex in examples], dtype=torch.long),
        "winners": torch.tensor([ex["winner"] for ex in examples], dtype=torch.long),
        "label_0": torch.tensor([ex["label_0"] for ex in examples], dtype=torch.float64),
        "label_1": torch.tensor([ex["label_1"] for ex in examples], dtype=torch.float64),
        "label_w": label_w(examples),
        "is_tie": torch.tensor([ex["is_tie"] for ex in examples], dtype=torch.bool),
        "flipped": torch.tensor([ex["flipped"] for ex in examples], dtype=torch.bool),
        "row_indices": torch.tensor([ex.get("row_index", -1) for ex in examples], dtype=torch.long),
        "skipped": dict(skipped),
    }


# ----------------------------------------------------------------------------------------------------------------
# Sources


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _split_files(directory: Path, split: str) -> list[str] | None:
    """The Parquet files of ``split`` in a local directory in the Hub layout, or None when ``datasets`` must resolve
    the files itself (a README declaring ``configs:``, or data that is not Parquet)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    readme = directory / "README.md"
    if readme.is_file() and "configs:" in readme.read_text(errors="ignore"):
        return None
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(directory)), base_path=str(directory))
    except FileNotFoundError:  # no data files found: let datasets say so in its own words
        return None
    if split not in files:
        raise ValueError(
            f"{directory}: split {split!r} not found (splits found: {', '.join(files) or 'none'}). A local "
            f"directory needs files named data/{split}-00000-of-00001.parquet "
            "(see diffalign.data.write_pickapic_dataset)."
        )
    names = [str(f) for f in files[split]]
    return names if all(n.endswith(".parquet") for n in names) else None


def _no_rows() -> Iterator[dict[str, Any]]:
    yield from ()


def _load_parquet_files(files: Sequence[str], split: str, kwargs: Mapping[str, Any]) -> Any:
    """``files`` as one split. Files with zero rows are left out (datasets' Parquet reader fails on them: it asks
    for batches of 0 rows); a split with no rows at all is an empty dataset with the files' schema."""
    import datasets
    import pyarrow.parquet as pq

    nonempty = [f for f in files if pq.ParquetFile(f).metadata.num_rows > 0]
    if nonempty:
        return datasets.load_dataset("parquet", data_files={split: nonempty}, split=split, **kwargs)
    schema = pq.read_schema(files[0])
    if kwargs.get("streaming"):
        features = datasets.Features.from_arrow_schema(schema)
        return datasets.IterableDataset.from_generator(_no_rows, features=features)
    return datasets.Dataset(schema.empty_table())


def load_pickapic_split(
    source: Any,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
    **load_kwargs: Any,
) -> Any:
    """Open one split of Pick-a-Pic-format data as a ``datasets.Dataset`` (or ``IterableDataset`` if streaming).

    ``source`` may be:

    * a ``datasets.Dataset`` / ``IterableDataset`` (returned unchanged; ``split`` is ignored);
    * a local directory in the Hub layout (``<dir>/data/<split>-NNNNN-of-NNNNN*.parquet``, as written by
      :func:`~diffalign.data.schema.write_pickapic_dataset`, or a local copy of the public files): only the files
      of ``split`` are read, so another split (an empty or a broken one) never stands in the way;
    * a ``.parquet`` file or a glob of them (e.g. ``/data/pap/train-*.parquet``): all matching files are ``split``;
    * any other string: a dataset name for ``datasets.load_dataset(name, split=split, streaming=streaming)``.

    A split with zero rows loads as an empty dataset (``datasets`` itself refuses such a split). Non-streaming
    sources are converted once to Arrow files in the ``datasets`` cache (``cache_dir``) and memory-mapped: random
    access without loading images into RAM.
    """
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    text = str(source)
    path = Path(text)
    kwargs = dict(load_kwargs, cache_dir=cache_dir, streaming=streaming)
    if path.is_dir():
        files = _split_files(path, split)
        if files is None:
            try:
                return datasets.load_dataset(str(path), split=split, **kwargs)
            except ValueError as err:
                if "split" in str(err).lower():
                    raise ValueError(f"{text}: split {split!r} not found ({err})") from err
                raise
        return _load_parquet_files(files, split, kwargs)
    if _is_glob(text) or path.suffix == ".parquet":
        files = sorted(_glob.glob(text)) if _is_glob(text) else [text]
        if not files or not all(Path(f).is_file() for f in files):
            raise FileNotFoundError(f"no Parquet file matches {text!r}")
        return _load_parquet_files(files, split, kwargs)
    return datasets.load_dataset(text, split=split, **kwargs)


def _describe(source: Any, split: str) -> str:
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        files = getattr(source, "cache_files", None) or []
        name = (
            files[0]["filename"]
            if files
            else (getattr(source.info, "dataset_name", None) or "in-memory dataset")
        )
        return f"{name} [{source.split or split}]"
    return f"{source} [{split}]"


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
        tie_policy: ``"drop"`` (default) or ``"keep"`` (module docstring).
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
                f"{_describe(source, split)} is a streamed dataset; use PickAPicPairStream for streams "
                "(map-style access needs a local/cached copy)"
            )
        self.source = _describe(source, split)
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
                self.stats.ties_kept += winner == -1
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
        self.stats.ties_kept = int((self.winners == -1).sum())

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


# ----------------------------------------------------------------------------------------------------------------
# Streaming


class PickAPicPairStream(IterableDataset):
    """Preference pairs from a stream of rows (``load_dataset(..., streaming=True)`` or any iterable of dicts).

    Filtering happens on the fly, with the same checks and skip reasons as :class:`PickAPicPairs`. Every skipped
    row's reason travels in the ``skipped`` dict of the next example the same worker yields (skips after a
    worker's last example ride on that last example, which is held back until the worker's rows end), so
    :meth:`PairStats.add_batch` counts every one; only a worker that yields no example at all has nowhere to put
    its skips and warns instead.

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
        self.source = _describe(source, split) if not isinstance(source, list) else f"list of rows [{split}]"
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
        :meth:`PickAPicPairs.limit` keeps the first ``n`` indexed pairs (one whose images then fail is skipped
        and counted, not replaced)."""
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
