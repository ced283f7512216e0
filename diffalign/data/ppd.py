"""Multi-user preference data for personalised preference tuning (PPD, Dang et al., CVPR 2025; issue #13).

PPD learns a user embedding from a few of a user's preferences and must *generalise to users training never saw*.
That needs pairs labelled by many users with known tastes, and a held-out set of users. This module makes such data
by **relabelling the shipped sandbox pairs** (``diffalign/sandbox/assets/pickapic``) with the simulated population
of :mod:`diffalign.sandbox.user_population` (240 users, ids 1000..1239; :func:`split_users`: 192 train, 48 unseen).
No image is sampled: the images (and their JPEG bytes) are the shipped ones, only users and labels change, so the
build takes about a minute on a CPU and nothing new is shipped in the repository. The dataset name ``"sandbox-ppd"``
(:func:`diffalign.data.sources.resolve_dataset`) builds it once into a cache directory (:func:`ensure_ppd_data`).

Labels: the project's Bradley-Terry draw (:func:`diffalign.data.labelling.bradley_terry_labels`) on **the assigned
user's** score (``overall + strength * taste``, :meth:`PopulationUser.score_analyses`) of the *decoded* JPEGs, with
the temperature and tie margin of the source build (its ``build_report.json`` config; T = 0.05, margin 0.015)::

    P(image 0 preferred) = sigmoid((s0 - s1) / T);   |s0 - s1| < margin -> tie 0.5/0.5;   u ~ U[0, 1) seeded

Layout (``out_dir``; every ``data/`` split has exactly the Pick-a-Pic v2 columns, so ``load_pickapic_split``,
:class:`~diffalign.data.pickapic.PickAPicPairs` and ``datasets.load_dataset(out_dir)`` read it like the shipped data)::

    data/train-00000-of-00001.parquet              every decided source train pair x ``users_per_pair`` TRAIN users
    data/context-00000-of-00001.parquet            a few pairs per UNSEEN user (from the source ``validation`` split)
    data/questionnaire-00000-of-00001.parquet      EVERY user answering the same few questions, chosen among the
                                                   context split's pairs, one taste axis each (ppd_questionnaire.py)
    data/validation_unique-00000-of-00001.parquet  byte copies of the shipped splits (generic evaluation prompts;
    data/test_unique-00000-of-00001.parquet        their labels are the shipped hand-made users' 1..4)
    test_users.json      per unseen user: captions of the source ``test_unique`` split (no images, so not a split)
    users.json           every user: id, kind, strength, weights, taste axes, split (train / unseen)
    build_report.json    counts per split, skipped rows and why, the seed, sha256 of every source file
    README.md

Rules
    ``train``: source rows that are not decided (a source tie 0.5/0.5, or a missing/invalid label: the reasons of
    :func:`~diffalign.data.pair_filter.classify_row`) are skipped and counted; each remaining pair is copied to
    ``users_per_pair`` distinct train users (seeded, balanced: :func:`_assign_users`) and each copy labelled by its
    user. A
    copy the user scores within the tie margin is kept as a 0.5/0.5 tie, as in the shipped data (training drops ties
    by default and counts them); the report counts them.
    ``context``: per unseen user, the source ``validation`` rows in a seeded order (per user: ``(seed, user_id)``), the
    first ``context_pairs_per_unseen_user`` the user does not score within the tie margin (a tie states no
    preference to learn from; those skipped are counted), labelled by that user. Source labels are ignored here.
    ``test_users``: per unseen user, ``test_prompts_per_unseen_user`` distinct captions of the source ``test_unique``
    split (specs disjoint from train by construction of the source). Captions whose taste coverage is > 0 come first
    (coverage: the share of the user's ``sum |w_k|`` on components the caption leaves open, i.e. the user's taste can
    move their score; 0 means the user ranks like the judge there), in a seeded order; others only fill up when too
    few qualify (counted as ``fallback_captions``).
    ``ranking_id``: new ids, unique over the directory: after the largest id of the five source files (so they never
    meet the copied ``*_unique`` splits), train then context in row order; ``created_at`` follows the builder's
    convention (base + 30 s x ranking_id); ``image_{0,1}_uid``/``url`` and the JPEG bytes are the source's (they say
    which source pair a row is); ``num_example_per_prompt`` is recounted per split.

Default build (shipped data, seed 0, 2 users per pair; 50 s on a busy 2-core CPU, 5.7 MB)::

    train       6,370 rows = 3,185 decided source pairs x 2 (324 source ties skipped); 192 train users, 33-34 rows
                each; 269 copies the user scores within the tie margin kept as 0.5/0.5 (the loader drops them)
    context     384 rows = 48 unseen users x 8 (44 drawn pairs skipped as that user's ties)
    test_users  384 captions = 48 x 8, from 200 test_unique captions; none needed the coverage-0 fallback
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..sandbox import SANDBOX_DATA
from ..sandbox.captions import CaptionSpec
from ..sandbox.judge import Analysis, Judge, analyze, parse_prompts
from ..sandbox.user_population import (
    AXES,
    COMPONENT_NAMES,
    PopulationUser,
    open_mask,
    population,
    split_users,
    taste_vector,
)
from .build_plan import BuilderConfig
from .labelling import bradley_terry_labels
from .pair_filter import classify_row
from .pickapic_rows import BASE_CREATED_AT, CREATED_AT_STEP, decode_jpeg, fill_examples_per_prompt
from .schema import PICKAPIC_SPLITS, split_path, write_pickapic_split

DATASET_NAME = "sandbox-ppd"
PPD_VERSION = 1
"""Bump when the output of the same inputs changes on purpose (the cache digest also hashes the code)."""

TRAIN_SPLIT = "train"
CONTEXT_SPLIT = "context"
COPIED_SPLITS: tuple[str, ...] = ("validation_unique", "test_unique")
CONTEXT_SOURCE_SPLIT = "validation"
TEST_PROMPT_SOURCE_SPLIT = "test_unique"
TEST_USERS_FILE = "test_users.json"
USERS_FILE = "users.json"
REPORT_FILE = "build_report.json"

TEST_PROMPT_RULE = (
    "per unseen user, distinct captions of the source test_unique split in a seeded order, those with taste "
    "coverage > 0 first (coverage: share of the user's sum |w_k| on components the caption leaves open); captions "
    "with coverage 0 only fill up when too few qualify (fallback_captions)"
)

_STREAMS = {"assign": 1, "train_draws": 2, "context": 3, "test_prompts": 4}
"""Independent random streams of a build: ``default_rng([seed, stream(, user_id)])``."""

NAMED_BUILD: dict[str, Any] = {}
"""Keyword arguments of :func:`build_ppd_data` for the dataset name ``"sandbox-ppd"`` (empty: the defaults)."""

NAMED_BUILDS: dict[str, dict[str, Any]] = {DATASET_NAME: NAMED_BUILD, "sandbox-ppd-6u": {"users_per_pair": 6}}
"""Every dataset name that resolves to a PPD build: name -> keyword arguments of :func:`build_ppd_data`.
``sandbox-ppd-6u``: each pair copied to 6 train users (19,110 rows), the questionnaire config's data (README, PPD)."""

_CODE_MODULES = (
    "diffalign.data.ppd",
    "diffalign.data.ppd_questionnaire",
    "diffalign.data.labelling",
    "diffalign.data.pickapic_rows",
    "diffalign.data.schema",
    "diffalign.sandbox.user_population",
    "diffalign.sandbox.users",
    "diffalign.sandbox.judge",
    "diffalign.sandbox.perception",
    "diffalign.sandbox.captions",
)
"""Modules whose source decides the bytes of a build: hashed into the cache digest (an edit rebuilds)."""


def _rng(seed: int, stream: str, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _STREAMS[stream], *(int(x) for x in extra)])


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Scoring source pairs


@dataclass
class _AnalysedPairs:
    """Both images of some source rows, decoded, analysed and judged once; then scored for any user cheaply."""

    specs: list[CaptionSpec]
    analyses_0: list[Analysis]
    analyses_1: list[Analysis]
    overall_0: np.ndarray
    overall_1: np.ndarray

    @classmethod
    def of(cls, rows: Sequence[Mapping[str, Any]], desc: str, progress: bool) -> _AnalysedPairs:
        specs = parse_prompts([r["caption"] for r in rows], len(rows))
        an0: list[Analysis] = []
        an1: list[Analysis] = []
        for r in tqdm(rows, desc=desc, unit="pair", disable=not progress, mininterval=2.0):
            an0.append(analyze(decode_jpeg(r["jpg_0"])))  # the decoded JPEGs, as the builder scores them
            an1.append(analyze(decode_jpeg(r["jpg_1"])))
        judge = Judge()
        return cls(
            specs,
            an0,
            an1,
            np.asarray(judge.score_analyses(an0, specs)["overall"], dtype=np.float64),
            np.asarray(judge.score_analyses(an1, specs)["overall"], dtype=np.float64),
        )

    def scores(self, user: PopulationUser, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(s0, s1)`` of rows ``idx`` for ``user``: ``overall + strength * taste``, (len(idx),) each."""
        idx = list(idx)
        specs = [self.specs[i] for i in idx]
        s0 = user.score_analyses([self.analyses_0[i] for i in idx], specs, self.overall_0[idx])
        s1 = user.score_analyses([self.analyses_1[i] for i in idx], specs, self.overall_1[idx])
        return s0, s1


def _relabelled(row: Mapping[str, Any], user_id: int, label_0: float, label_1: float) -> dict[str, Any]:
    """A copy of a source row for ``user_id`` with new labels (``ranking_id``/``created_at`` set later)."""
    out = dict(row)
    out["user_id"] = int(user_id)
    out["label_0"], out["label_1"] = float(label_0), float(label_1)
    out["has_label"] = True
    out["best_image_uid"] = (
        row["image_0_uid"] if label_0 == 1.0 else row["image_1_uid"] if label_1 == 1.0 else ""
    )
    return out


def _number(rows: list[dict[str, Any]], first_id: int) -> int:
    """Give ``rows`` consecutive ranking ids from ``first_id`` (and the builder's ``created_at``); the next id."""
    for k, r in enumerate(rows):
        r["ranking_id"] = first_id + k
        r["created_at"] = BASE_CREATED_AT + (first_id + k) * CREATED_AT_STEP
    fill_examples_per_prompt(rows)
    return first_id + len(rows)


# ---------------------------------------------------------------------------------------------------------------
# The three parts


def _train_rows(
    source: list[dict[str, Any]],
    users: Mapping[int, PopulationUser],
    train_ids: Sequence[int],
    seed: int,
    users_per_pair: int,
    temperature: float,
    tie_margin: float,
    progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    skipped: Counter[str] = Counter()
    kept: list[int] = []
    for i, r in enumerate(source):
        reason, _ = classify_row(r["caption"], r["label_0"], r["label_1"], r["has_label"], "drop")
        if reason is None:
            kept.append(i)
        else:
            skipped[reason] += 1
    pairs = [source[i] for i in kept]
    n, k = len(pairs), users_per_pair
    ids = np.asarray(train_ids, dtype=np.int64)
    assigned = _assign_users(ids, n, k, _rng(seed, "assign"))  # (n, k)
    draws = _rng(seed, "train_draws").random((n, k))
    analysed = _AnalysedPairs.of(pairs, "scoring train pairs", progress)
    s0, s1 = np.empty((n, k)), np.empty((n, k))
    for uid in np.unique(assigned):
        p, c = np.nonzero(assigned == uid)
        s0[p, c], s1[p, c] = analysed.scores(users[int(uid)], p)
    l0, l1 = bradley_terry_labels(s0.ravel(), s1.ravel(), draws.ravel(), temperature, tie_margin)
    rows = [
        _relabelled(pairs[p], int(assigned[p, c]), l0[p * k + c], l1[p * k + c])
        for p in range(n)
        for c in range(k)
    ]
    decided = l0 != 0.5
    higher_0 = (s0.ravel() > s1.ravel())[decided]
    per_user = Counter(int(u) for u in assigned.ravel())
    info = {
        "source_rows": len(source),
        "source_skipped": dict(sorted(skipped.items())),
        "source_pairs_used": n,
        "rows": len(rows),
        "user_ties_kept": int((~decided).sum()),
        "image_0_win_share": round(float((l0[decided] == 1.0).mean()), 4) if decided.any() else None,
        "score_agreement": round(float(((l0[decided] == 1.0) == higher_0).mean()), 4)
        if decided.any()
        else None,
        "users": len(per_user),
        "rows_per_user": _spread(per_user.values()),
    }
    return rows, info


def _assign_users(ids: np.ndarray, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n, k) user ids: ``k`` distinct users per pair, the least-used so far, ties broken by a seeded random key.

    Balanced on purpose: every user gets ``floor(nk/U)`` or ``ceil(nk/U)`` rows (a uniform draw per pair gave 19..51
    rows per user on the shipped data), so per-user numbers are comparable; which pairs a user gets is still random.
    """
    counts = np.zeros(len(ids), dtype=np.int64)
    out = np.empty((n, k), dtype=np.int64)
    for p in range(n):
        pick = np.argsort(counts + rng.random(len(ids)), kind="stable")[:k]  # random key < 1: count first
        counts[pick] += 1
        out[p] = ids[pick]
    return out


def _context_rows(
    source: list[dict[str, Any]],
    users: Mapping[int, PopulationUser],
    unseen_ids: Sequence[int],
    seed: int,
    per_user: int,
    temperature: float,
    tie_margin: float,
    progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    analysed = _AnalysedPairs.of(source, "scoring context pairs", progress)
    rows: list[dict[str, Any]] = []
    ties_skipped: Counter[int] = Counter()
    counts: dict[int, int] = {}
    for uid in unseen_ids:
        user = users[int(uid)]
        rng = _rng(seed, "context", uid)
        order = rng.permutation(len(source))
        draws = rng.random(len(source))  # one per position of the order, whether used or not
        s0, s1 = analysed.scores(user, order)
        l0, l1 = bradley_terry_labels(s0, s1, draws, temperature, tie_margin)
        took = 0
        for j, i in enumerate(order):
            if took == per_user:
                break
            if l0[j] == 0.5:  # within the tie margin: no preference stated
                ties_skipped[int(uid)] += 1
                continue
            rows.append(_relabelled(source[int(i)], int(uid), l0[j], l1[j]))
            took += 1
        counts[int(uid)] = took
    info = {
        "source_split": CONTEXT_SOURCE_SPLIT,
        "source_rows": len(source),
        "rows": len(rows),
        "users": len(counts),
        "pairs_per_user": _spread(counts.values()),
        "skipped": {"user_tie": int(sum(ties_skipped.values()))},
        "users_short": {str(u): c for u, c in counts.items() if c < per_user},
    }
    return rows, info


def taste_coverage(user: PopulationUser, specs: Sequence[CaptionSpec]) -> np.ndarray:
    """(len(specs),) in [0, 1]: the share of ``user``'s ``sum |w_k|`` on components each caption leaves open (0:
    the user's taste cannot move their score for that caption; they rank like the judge)."""
    w = np.abs(np.asarray(user.weights, dtype=np.float64))
    return (open_mask(specs).astype(np.float64) @ w) / w.sum()


def _test_users(
    captions: Sequence[str],
    users: Mapping[int, PopulationUser],
    unseen_ids: Sequence[int],
    seed: int,
    per_user: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    distinct = list(dict.fromkeys(captions))
    specs = parse_prompts(distinct, len(distinct))
    rows: list[dict[str, Any]] = []
    fallback = 0
    for uid in unseen_ids:
        cover = taste_coverage(users[int(uid)], specs)
        order = _rng(seed, "test_prompts", uid).permutation(len(distinct))
        ranked = [i for i in order if cover[i] > 0] + [i for i in order if cover[i] == 0]
        for i in ranked[:per_user]:
            fallback += int(cover[i] == 0)
            rows.append(
                {"user_id": int(uid), "caption": distinct[i], "taste_coverage": round(float(cover[i]), 6)}
            )
    info = {
        "source_split": TEST_PROMPT_SOURCE_SPLIT,
        "source_captions": len(distinct),
        "rows": len(rows),
        "users": len(unseen_ids),
        "fallback_captions": fallback,
        "rule": TEST_PROMPT_RULE,
        "file": TEST_USERS_FILE,
    }
    return rows, info


def _spread(values: Iterable[int]) -> dict[str, float]:
    v = np.asarray(list(values), dtype=np.float64)
    if not v.size:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(v.min()), "max": int(v.max()), "mean": round(float(v.mean()), 2)}


# ---------------------------------------------------------------------------------------------------------------
# The build


def _read_rows(source_dir: Path, split: str, limit: int | None) -> list[dict[str, Any]]:
    table = pq.read_table(split_path(source_dir, split))
    return (table.slice(0, limit) if limit is not None else table).to_pylist()


def _labelling_convention(source_dir: Path) -> tuple[float, float, str]:
    """``(temperature, tie_margin, where from)``: the source build's, else the builder's defaults."""
    report = source_dir / REPORT_FILE
    if report.is_file():
        cfg = json.loads(report.read_text(encoding="utf-8")).get("config", {})
        if "temperature" in cfg and "tie_margin" in cfg:
            return float(cfg["temperature"]), float(cfg["tie_margin"]), f"{REPORT_FILE} of the source"
    d = BuilderConfig()
    return d.temperature, d.tie_margin, "BuilderConfig defaults (the source has no build report)"


def _users_json(users: Mapping[int, PopulationUser], unseen: set[int]) -> dict[str, Any]:
    return {
        "components": list(COMPONENT_NAMES),
        "axes": list(AXES),
        "users": [
            {
                "user_id": u.user_id,
                "kind": u.kind,
                "strength": u.strength,
                "weights": u.weight_dict,
                "axes": dict(zip(AXES, taste_vector(u, scaled=False).tolist(), strict=True)),
                "split": "unseen" if u.user_id in unseen else "train",
            }
            for u in sorted(users.values(), key=lambda u: u.user_id)
        ],
    }


def build_ppd_data(
    out_dir: str | Path,
    *,
    source_dir: str | Path = SANDBOX_DATA,
    users: Sequence[PopulationUser] | None = None,
    seed: int = 0,
    users_per_pair: int = 2,
    context_pairs_per_unseen_user: int = 8,
    test_prompts_per_unseen_user: int = 8,
    questions: int = 4,
    max_source_pairs: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Relabel the Pick-a-Pic-schema pairs of ``source_dir`` for a user population; write ``out_dir`` (module
    docstring: layout and rules) and return the report (also ``out_dir/build_report.json``).

    ``users``: the population (default :func:`population`), split by :func:`split_users` with its defaults, so the
    unseen ids are the ones any other code computes. ``max_source_pairs``: read only the first N rows of each source
    split (train, validation, test_unique): small builds for tests. Deterministic in all arguments.
    """
    t0 = time.perf_counter()
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; build the PPD data into a new or empty directory")
    if not split_path(source_dir, TRAIN_SPLIT).is_file():
        raise FileNotFoundError(
            f"{source_dir} has no {split_path(source_dir, TRAIN_SPLIT).relative_to(source_dir)}: the source must be "
            "a Pick-a-Pic-schema directory (build the sandbox data with scripts/build_preference_data.py)"
        )
    members = list(population() if users is None else users)
    by_id = {u.user_id: u for u in members}
    train_ids, unseen_ids = split_users(members)
    if not 1 <= users_per_pair <= len(train_ids):
        raise ValueError(
            f"users_per_pair must be in [1, {len(train_ids)}] (the train users), got {users_per_pair}"
        )
    if min(context_pairs_per_unseen_user, test_prompts_per_unseen_user, questions) < 1:
        raise ValueError(
            "context_pairs_per_unseen_user, test_prompts_per_unseen_user and questions must be >= 1"
        )
    temperature, tie_margin, convention = _labelling_convention(source_dir)

    train, train_info = _train_rows(
        _read_rows(source_dir, TRAIN_SPLIT, max_source_pairs),
        by_id,
        train_ids,
        seed,
        users_per_pair,
        temperature,
        tie_margin,
        progress,
    )
    context, context_info = _context_rows(
        _read_rows(source_dir, CONTEXT_SOURCE_SPLIT, max_source_pairs),
        by_id,
        unseen_ids,
        seed,
        context_pairs_per_unseen_user,
        temperature,
        tie_margin,
        progress,
    )
    from .ppd_questionnaire import QUESTIONNAIRE_SPLIT, questionnaire_rows

    quiz, quiz_info = questionnaire_rows(
        context,
        by_id,
        [*train_ids, *unseen_ids],
        seed=seed,
        n=questions,
        temperature=temperature,
        progress=progress,
    )  # every user answers the same pairs (diffalign/data/ppd_questionnaire.py)
    test_captions = [r["caption"] for r in _read_rows(source_dir, TEST_PROMPT_SOURCE_SPLIT, max_source_pairs)]
    test_rows, test_info = _test_users(test_captions, by_id, unseen_ids, seed, test_prompts_per_unseen_user)

    source_files = [split_path(source_dir, s) for s in PICKAPIC_SPLITS if split_path(source_dir, s).is_file()]
    first_id = 1 + max(
        (max(pq.read_table(f, columns=["ranking_id"]).column("ranking_id").to_pylist(), default=0))
        for f in source_files
    )
    next_id = _number(train, first_id)
    next_id = _number(context, next_id)
    _number(quiz, next_id)
    write_pickapic_split(train, out_dir, TRAIN_SPLIT)
    write_pickapic_split(context, out_dir, CONTEXT_SPLIT)
    write_pickapic_split(quiz, out_dir, QUESTIONNAIRE_SPLIT)
    copied: dict[str, Any] = {}
    for split in COPIED_SPLITS:
        src = split_path(source_dir, split)
        if src.is_file():  # generic evaluation reads these prompts; a byte copy, shipped labels and users
            shutil.copyfile(src, split_path(out_dir, split))
            copied[split] = {"rows": pq.ParquetFile(src).metadata.num_rows, "copied_from_source": True}
    unseen = set(unseen_ids)
    _write_json(out_dir / USERS_FILE, _users_json(by_id, unseen))
    _write_json(out_dir / TEST_USERS_FILE, {"rule": TEST_PROMPT_RULE, "rows": test_rows})

    hashed = [*source_files, source_dir / REPORT_FILE]
    report: dict[str, Any] = {
        "dataset": DATASET_NAME,
        "version": PPD_VERSION,
        "seed": seed,
        "users_per_pair": users_per_pair,
        "context_pairs_per_unseen_user": context_pairs_per_unseen_user,
        "test_prompts_per_unseen_user": test_prompts_per_unseen_user,
        "questions": questions,
        "max_source_pairs": max_source_pairs,
        "labelling": {"temperature": temperature, "tie_margin": tie_margin, "from": convention},
        "users": {
            "total": len(members),
            "train": len(train_ids),
            "unseen": len(unseen_ids),
            "population": "population() defaults" if users is None else "given",
            "kinds": {
                s: dict(sorted(Counter(by_id[i].kind for i in ids).items()))
                for s, ids in (("train", train_ids), ("unseen", unseen_ids))
            },
        },
        "splits": {
            TRAIN_SPLIT: train_info,
            CONTEXT_SPLIT: context_info,
            QUESTIONNAIRE_SPLIT: quiz_info,
            "test_users": test_info,
            **copied,
        },  # fmt: skip
        "ranking_ids": {"first": first_id, "last": first_id + len(train) + len(context) + len(quiz) - 1},
        "source": {
            "dir": str(source_dir),
            "sha256": {str(f.relative_to(source_dir)): _sha256(f) for f in hashed if f.is_file()},
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    _write_json(out_dir / REPORT_FILE, report)
    (out_dir / "README.md").write_text(_readme(report), encoding="utf-8")
    return report


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _readme(report: Mapping[str, Any]) -> str:
    s = report["splits"]
    return (
        "---\npretty_name: sandbox-ppd, multi-user preference pairs (diffalign)\n---\n"
        "# sandbox-ppd: multi-user preference pairs (diffalign)\n\n"
        f"The shipped sandbox pairs relabelled by {report['users']['train']} train users of the simulated population "
        f"({report['users_per_pair']} users per pair), plus context pairs and test captions for "
        f"{report['users']['unseen']} unseen users. Splits: train {s['train']['rows']:,}, context "
        f"{s['context']['rows']:,} rows; test captions per unseen user in `{TEST_USERS_FILE}`; users in "
        f"`{USERS_FILE}`; every count in `{REPORT_FILE}`. How it is built: `diffalign/data/ppd.py`.\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# The named dataset: built once into a cache


def cache_root() -> Path:
    """Where derived datasets are cached: ``$DIFFALIGN_CACHE``, else ``$XDG_CACHE_HOME/diffalign``, else
    ``~/.cache/diffalign`` (the XDG convention; the project had no cache-root convention of its own)."""
    if os.environ.get("DIFFALIGN_CACHE"):
        return Path(os.environ["DIFFALIGN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "diffalign"


def ppd_digest(source_dir: str | Path = SANDBOX_DATA, **build_kwargs: Any) -> str:
    """16 hex digits of sha256 over the inputs of a build: the source files' bytes, the keyword arguments of
    :func:`build_ppd_data`, :data:`PPD_VERSION` and the source of the modules that decide the bytes
    (:data:`_CODE_MODULES`): any change gives a new cache directory instead of stale data."""
    source_dir = Path(source_dir)
    if build_kwargs.get("users") is not None:
        raise ValueError(
            "a cached PPD build uses the default population; call build_ppd_data for other users"
        )
    h = hashlib.sha256()
    h.update(json.dumps({"version": PPD_VERSION, **build_kwargs}, sort_keys=True, default=str).encode())
    for f in sorted(source_dir.glob("data/*.parquet")) + [source_dir / REPORT_FILE]:
        if f.is_file():
            h.update(f.name.encode() + _sha256(f).encode())
    for name in _CODE_MODULES:
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        h.update(name.encode() + _sha256(Path(module.__file__)).encode())
    return h.hexdigest()[:16]


def ensure_ppd_data(
    root: str | Path | None = None, *, source_dir: str | Path = SANDBOX_DATA, **build_kwargs: Any
) -> Path:
    """The directory of the PPD build of ``source_dir`` with ``build_kwargs`` (default :data:`NAMED_BUILD`),
    ``<root>/sandbox-ppd-<digest>`` (root: :func:`cache_root`); built on first use in a temporary sibling and
    renamed into place, so a reader never sees a half-built directory and concurrent first uses are safe (the
    second rename loses and its copy is removed)."""
    kwargs = {**NAMED_BUILD, **build_kwargs}
    root = Path(root) if root is not None else cache_root()
    final = root / f"{DATASET_NAME}-{ppd_digest(source_dir, **kwargs)}"
    if (final / REPORT_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        print(f"building the {DATASET_NAME} data into {final} (once; about a minute)", file=sys.stderr)
        build_ppd_data(tmp, source_dir=source_dir, progress=True, **kwargs)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / REPORT_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------------
# Reading a build


def named_build_dir(name: str | Path) -> Path | None:
    """The cached build of a :data:`NAMED_BUILDS` name (built on first use); ``None`` for anything else, and for a
    name that is also an existing directory (a path wins)."""
    if str(name) not in NAMED_BUILDS or Path(name).is_dir():
        return None
    return ensure_ppd_data(**NAMED_BUILDS[str(name)])


def _data_dir(data_dir: str | Path) -> Path:
    """A build's directory; a :data:`NAMED_BUILDS` name resolves (and builds) the cached one."""
    return named_build_dir(data_dir) or Path(data_dir)


def load_context_pairs(
    data_dir: str | Path, user_id: int, split: str = CONTEXT_SPLIT
) -> list[dict[str, Any]]:
    """The context pairs of one (unseen) user, in build order: ``{"caption", "preferred", "rejected"`` (JPEG bytes),
    ``"ranking_id"}``: the few examples a new user gives, to infer their embedding from (``split``: ``context``, or
    ``questionnaire`` for the user's answers to the build's fixed questions)."""
    table = pq.read_table(
        split_path(_data_dir(data_dir), split),
        columns=["caption", "jpg_0", "jpg_1", "label_0", "ranking_id", "user_id"],
        filters=[("user_id", "=", int(user_id))],
    )
    return [
        {
            "caption": r["caption"],
            "preferred": r["jpg_0"] if r["label_0"] == 1.0 else r["jpg_1"],
            "rejected": r["jpg_1"] if r["label_0"] == 1.0 else r["jpg_0"],
            "ranking_id": r["ranking_id"],
        }
        for r in table.to_pylist()
    ]


def load_test_prompts(data_dir: str | Path) -> dict[int, list[str]]:
    """``{unseen user id: [captions]}`` of ``test_users.json``, in build order."""
    rows = json.loads((_data_dir(data_dir) / TEST_USERS_FILE).read_text(encoding="utf-8"))["rows"]
    out: dict[int, list[str]] = {}
    for r in rows:
        out.setdefault(int(r["user_id"]), []).append(r["caption"])
    return out


def train_pairs_by_user(data_dir: str | Path) -> dict[int, list[int]]:
    """``{train user id: [row indices of the train split]}`` (the row order of the Parquet file, which
    ``load_pickapic_split`` keeps): per-user batches or per-user held-out rows without reading the images."""
    ids = pq.read_table(split_path(_data_dir(data_dir), TRAIN_SPLIT), columns=["user_id"]).column("user_id")
    out: dict[int, list[int]] = {}
    for i, uid in enumerate(ids.to_pylist()):
        out.setdefault(int(uid), []).append(i)
    return out


def load_users(data_dir: str | Path) -> list[dict[str, Any]]:
    """The ``users.json`` entries of a build (id, kind, strength, weights, axes, split)."""
    return json.loads((_data_dir(data_dir) / USERS_FILE).read_text(encoding="utf-8"))["users"]


__all__ = [
    "CONTEXT_SPLIT", "DATASET_NAME", "NAMED_BUILD", "NAMED_BUILDS", "PPD_VERSION", "build_ppd_data", "cache_root",
    "ensure_ppd_data", "load_context_pairs", "load_test_prompts", "load_users", "named_build_dir", "ppd_digest",
    "taste_coverage", "train_pairs_by_user",
]  # fmt: skip
