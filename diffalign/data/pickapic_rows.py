"""Rows of a preference-data build (:mod:`diffalign.data.builder`) in the Pick-a-Pic v2 schema, and their JPEGs.

Each image is stored as JPEG (quality 95, 4:4:4 chroma: at 32x32 pixels the default 4:2:0 subsampling would smear
colour across object edges). The **decoded** JPEGs are what is scored, so re-scoring the stored data reproduces the
labels' scores exactly. The rows are written to Parquet by :func:`diffalign.data.schema.write_pickapic_dataset`.

Columns (exactly :data:`diffalign.data.schema.PICKAPIC_COLUMNS`)
    ``are_different``: the two decoded images differ in at least one pixel. ``best_image_uid``: the winner's uid,
    and ``""`` for a tie (what the public files store for ties is unverified; the tie is carried by the labels
    0.5/0.5, which is what :mod:`diffalign.data.pickapic` reads). ``caption``. ``created_at``: deterministic,
    ``2023-04-01 00:00`` + 30 s × ``ranking_id``. ``has_label``: True. ``image_{0,1}_uid``: UUID-4-shaped strings
    from SHA-256 of (seed, ranking_id, side), deterministic. ``image_{0,1}_url``: ``sandbox://<uid>.jpg``.
    ``jpg_{0,1}``: JPEG bytes. ``label_{0,1}``: float64 1/0 or 0.5/0.5. ``model_{0,1}``: generator names.
    ``ranking_id``: int64, unique over all five splits (1, 2, ... in split order train, validation, test,
    validation_unique, test_unique). ``user_id``: int64. ``num_example_per_prompt``: int64, the number of rows
    of the split with the same caption.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .build_plan import PairPlan

BASE_CREATED_AT = _dt.datetime(2023, 4, 1)
CREATED_AT_STEP = _dt.timedelta(seconds=30)
URL_SCHEME = "sandbox://"


# ---------------------------------------------------------------------------------------------------------------
# JPEG


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """uint8 ``(H, W, 3)`` -> JPEG bytes (``quality``, 4:4:4 chroma: no colour subsampling)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB").save(
        buf, format="JPEG", quality=quality, subsampling=0
    )
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 ``(H, W, 3)`` RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Rows


def image_uid(seed: int, ranking_id: int, side: int) -> str:
    """A UUID-4-shaped uid, deterministic in (seed, ranking_id, side): SHA-256 -> 16 bytes -> ``uuid.UUID``."""
    digest = hashlib.sha256(f"diffalign-builder:{seed}:{ranking_id}:{side}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def make_row(
    plan: PairPlan,
    seed: int,
    jpg_0: bytes,
    jpg_1: bytes,
    are_different: bool,
    label_0: float,
    label_1: float,
) -> dict[str, Any]:
    """One Pick-a-Pic v2 row (``num_example_per_prompt`` is filled in per split by :func:`fill_examples_per_prompt`)."""
    uid_0, uid_1 = image_uid(seed, plan.ranking_id, 0), image_uid(seed, plan.ranking_id, 1)
    best = uid_0 if label_0 == 1.0 else uid_1 if label_1 == 1.0 else ""
    return {
        "are_different": bool(are_different),
        "best_image_uid": best,
        "caption": plan.caption,
        "created_at": BASE_CREATED_AT + plan.ranking_id * CREATED_AT_STEP,
        "has_label": True,
        "image_0_uid": uid_0,
        "image_0_url": f"{URL_SCHEME}{uid_0}.jpg",
        "image_1_uid": uid_1,
        "image_1_url": f"{URL_SCHEME}{uid_1}.jpg",
        "jpg_0": jpg_0,
        "jpg_1": jpg_1,
        "label_0": float(label_0),
        "label_1": float(label_1),
        "model_0": plan.model_0,
        "model_1": plan.model_1,
        "ranking_id": int(plan.ranking_id),
        "user_id": int(plan.user_id),
        "num_example_per_prompt": 0,
    }


def fill_examples_per_prompt(rows: list[dict[str, Any]]) -> None:
    """Set ``num_example_per_prompt`` of every row to the number of rows of the split with its caption."""
    counts = Counter(r["caption"] for r in rows)
    for r in rows:
        r["num_example_per_prompt"] = counts[r["caption"]]


@dataclass
class SplitResult:
    """Rows of one split plus what the report needs: per-pair scores (of the decoded JPEGs)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    score_0: list[float] = field(default_factory=list)
    score_1: list[float] = field(default_factory=list)
