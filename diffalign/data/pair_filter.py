"""Which Pick-a-Pic rows become preference pairs: skip reasons, the tie policy, and the counts of what was skipped.

Row filtering (first matching reason wins; every skipped row is counted by reason in :class:`PairStats`):

==================  =========================================================================================
``no_label``        ``has_label`` is False (the ranking was never answered).
``missing_label``   ``label_0`` or ``label_1`` is None/NaN.
``both_zero``       both labels are 0 (no image chosen).
``invalid_label``   labels that are not (1, 0), (0, 1), (0.5, 0.5) or a soft label (see below).
``tie``             (0.5, 0.5) with ``tie_policy="drop"``.
``empty_caption``   caption None, empty or only whitespace.
``missing_image``   ``jpg_0``/``jpg_1`` None or empty bytes.
``corrupt_image``   bytes PIL cannot decode (truncated/garbage).
``unsupported_mode`` decoded, but an image mode with no meaningful RGB reading (see :mod:`~diffalign.data.pair_images`).
==================  =========================================================================================

The label and caption reasons (:data:`LABEL_REASONS`) are decided from a row's metadata alone
(:func:`classify_row`); the image reasons (:data:`IMAGE_REASONS`) when its images are decoded
(:func:`~diffalign.data.pair_images.decode_rgb`, which raises :class:`PairSkip`).

Tie policies (:data:`TIE_POLICIES`): ``"drop"`` (default; counted as ``tie``), ``"keep"``: the tie is yielded in
source order (image 0 first) with ``pref_prob = 0.5`` and ``is_tie = True``; batches carry it as ``label_w``
(P(slot 0 preferred): 1.0 for decided pairs, 0.5 for ties), the soft label the DPO loss reads. A loss that
ignores ``label_w`` must not be fed ties: it would train them as "image 0 wins".
A "random winner" policy is deliberately not offered: it is label noise.

Soft labels: a row with ``label_0 + label_1 = 1`` (within 1e-6) and ``0 < label_0 < 1`` (other than 0.5) states a preference
probability, e.g. RPO's ``σ(r_ref − r_gen)`` (:mod:`diffalign.training.subject_pairs`). It is always kept (the tie policy
is about exact ties), in source order, with ``pref_prob = label_0``; :func:`classify_row` returns
``winner = SOFT_LABEL``. Pick-a-Pic itself has none.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TIE_POLICIES: tuple[str, ...] = ("drop", "keep")
TIE = -1  #: ``winner`` of a kept tie: source order, pref_prob 0.5
SOFT_LABEL = -2  #: ``winner`` of a soft-label row: source order, pref_prob = label_0
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


def is_missing(value: object) -> bool:
    """None or a float NaN (how a missing label or id reads from Parquet)."""
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
        ``winner`` is 0 or 1 (the source index of the preferred image), :data:`TIE` (-1) for a tie kept under
        ``tie_policy="keep"``, :data:`SOFT_LABEL` (-2) for a soft label (meaningless when ``reason`` is not None).
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if has_label is False:
        return "no_label", 0
    if is_missing(label_0) or is_missing(label_1):
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
        winner = TIE
    elif 0.0 < l0 < 1.0 and abs(l0 + l1 - 1.0) <= 1e-6:  # (labels computed in float32 sum to 1 within ~1e-7)
        winner = SOFT_LABEL
    else:
        return "invalid_label", 0
    if not isinstance(caption, str) or not caption.strip():
        return "empty_caption", 0
    return None, winner
