"""A fixed questionnaire for PPD's user context: every user answers the same few pairs, each chosen to ask about one
taste axis (issue #13).

Why: the PPD paper embeds a user from ~4 of their Pick-a-Pic pairs, drawn at random. On the sandbox, 4 random pairs
say almost nothing about a user (even the judge's own attribute read-out retrieves an unseen user from them no
better than chance: README), because most random pairs differ by a defect everyone punishes, not by taste. The
demo's personalised mode already asks a visitor 4 pairs chosen for what they reveal; this module makes that the
data's context too, so that the encoder is trained and evaluated on exactly the kind of pairs it is shown.

Questions (:func:`select_questions`, deterministic for a build): among the *distinct* pairs of the build's
``context`` split (source ``validation`` rows, never training pairs), for taste axis ``j % 6`` (``AXES`` order:
size, background, temperature, contrast, centred, outlined) the pair whose two images differ most on that axis,
less how much the judge's ``overall`` differs between them, among the pairs whose caption leaves the axis open and
whose two images both show an object and are both in the better half by the judge (a pair with a broken or empty
image asks about the defect, not about taste); looser fallbacks when no pair qualifies. A pair is asked once.

Answers (:func:`questionnaire_rows`): every user of the population — train and unseen — answers every question by
the build's Bradley-Terry draw on that user's score (``overall + strength * taste``), *forced*: a questionnaire
answer is always a choice, so there is no tie margin (a near tie is a coin flip). Draws come from the stream
``(seed, "questionnaire", user_id)``. Rows are ordered by user (train users first, then unseen, each ascending),
then question; they keep the Pick-a-Pic columns, so the split reads like any other
(``data/questionnaire-00000-of-00001.parquet``).

Measured on the default build (``python -m diffalign.data.ppd_questionnaire``, 6 questions, Bradley-Terry answers):
over the 240 users, "chose the image with more of the asked axis" correlates with the sign of the user's taste on
that axis at r = +0.50 (size), +0.26 (background), +0.39 (temperature), +0.45 (contrast), +0.52 (centred), +0.55
(outlined); the users give 55 distinct answer patterns on the 6 questions and 16 (of 16 possible) on the first 4.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..sandbox.judge import Judge, analyze, parse_prompts
from ..sandbox.user_population import (
    AXES,
    COMPONENT_NAMES,
    OPPOSED_AXES,
    SIGNED_AXES,
    PopulationUser,
    component_values,
    open_mask,
)
from .pickapic_rows import decode_jpeg

QUESTIONNAIRE_SPLIT = "questionnaire"
QUESTIONNAIRE_STREAM = 5  # the build's random stream for the answers (diffalign.data.ppd._STREAMS goes to 4)
_INDEX = {name: i for i, name in enumerate(COMPONENT_NAMES)}


def axis_values(values: np.ndarray) -> np.ndarray:
    """Nine component values or weights (``COMPONENT_NAMES`` order, ``[..., 9]``) → the six signed axes
    (``AXES`` order, ``[..., 6]``): ``large − small`` etc. for an opposed pair, the component itself otherwise."""
    values = np.asarray(values, dtype=np.float64)
    cols = []
    for a in AXES:
        if a in OPPOSED_AXES:
            pos, neg = OPPOSED_AXES[a]
            cols.append(values[..., _INDEX[pos]] - values[..., _INDEX[neg]])
        else:
            cols.append(values[..., _INDEX[SIGNED_AXES[a]]])
    return np.stack(cols, axis=-1)


def open_axes(mask: np.ndarray) -> np.ndarray:
    """``[B, 9]`` bool "component open" (:func:`~diffalign.sandbox.user_population.open_mask`) → ``[B, 6]`` bool per
    axis: an opposed axis is open when either of its ends is."""
    cols = []
    for a in AXES:
        ends = OPPOSED_AXES.get(a, (SIGNED_AXES.get(a),) * 2)
        cols.append(mask[:, _INDEX[ends[0]]] | mask[:, _INDEX[ends[1]]])
    return np.stack(cols, axis=-1)


def distinct_pairs(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the first row of each distinct image pair ``(image_0_uid, image_1_uid)``, in row order (users
    share source pairs, so a split can hold one pair several times)."""
    seen, out = set(), []
    for i, r in enumerate(rows):
        if (key := (r["image_0_uid"], r["image_1_uid"])) not in seen:
            seen.add(key)
            out.append(i)
    return out


def select_questions(rows: Sequence[Mapping[str, Any]], n: int) -> list[tuple[int, str]]:
    """``n`` ``(row index, axis)`` questions among ``rows`` (dicts with ``caption``, ``jpg_0``, ``jpg_1``; distinct
    pairs), question ``j`` asking about axis ``AXES[j % 6]`` (module docstring: the rule)."""
    if n < 1 or len(rows) < n:
        raise ValueError(f"{len(rows)} distinct pairs; {n} questions need at least {max(n, 1)}")
    specs = parse_prompts([r["caption"] for r in rows], len(rows))
    scored = []
    for key in ("jpg_0", "jpg_1"):
        analyses = [analyze(decode_jpeg(r[key])) for r in rows]
        values, has_object = component_values(analyses)
        overall = np.asarray(Judge().score_analyses(analyses, specs)["overall"], dtype=np.float64)
        scored.append((axis_values(values), has_object, overall))
    (ax0, obj0, ov0), (ax1, obj1, ov1) = scored
    worse = np.minimum(ov0, ov1)
    good = obj0 & obj1 & (worse >= np.median(worse))
    opened = open_axes(open_mask(specs))  # [rows, axes]: the caption leaves the axis open
    gain = np.abs(ax0 - ax1) - np.abs(ov0 - ov1)[:, None]  # [rows, axes]
    picked: list[int] = []
    out = []
    for j in range(n):
        a = j % len(AXES)
        merit = np.where(opened[:, a] & good, gain[:, a], -np.inf)
        merit = np.where(
            np.isfinite(merit), merit, np.where(opened[:, a], gain[:, a] - 10.0, -20.0)
        )  # fallbacks
        i = int(next(i for i in np.argsort(-merit, kind="stable") if i not in picked))
        picked.append(i)
        out.append((i, AXES[a]))
    return out


def questionnaire_rows(
    context: Sequence[Mapping[str, Any]],
    users: Mapping[int, PopulationUser],
    user_ids: Sequence[int],
    *,
    seed: int,
    n: int,
    temperature: float,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every user of ``user_ids`` answering the ``n`` questions chosen among the distinct pairs of ``context`` (the
    build's context rows, in split order): ``(rows, report)``; ranking ids are set by the caller."""
    from .labelling import bradley_terry_labels
    from .ppd import _AnalysedPairs, _relabelled

    distinct = distinct_pairs(context)
    pairs = [context[i] for i in distinct]
    questions = select_questions(pairs, n)
    asked = [pairs[i] for i, _ in questions]
    analysed = _AnalysedPairs.of(asked, "scoring the questionnaire", progress)
    rows: list[dict[str, Any]] = []
    left = np.zeros(n)
    for uid in user_ids:
        s0, s1 = analysed.scores(users[int(uid)], range(n))
        draws = np.random.default_rng([int(seed), QUESTIONNAIRE_STREAM, int(uid)]).random(n)
        l0, l1 = bradley_terry_labels(s0, s1, draws, temperature, tie_margin=0.0)
        rows += [_relabelled(asked[q], int(uid), l0[q], l1[q]) for q in range(n)]
        left += l0
    report = {
        "rows": len(rows),
        "users": len(user_ids),
        "questions": [
            {
                "axis": axis,
                "caption": pairs[i]["caption"],
                "image_0_uid": pairs[i]["image_0_uid"],
                "image_1_uid": pairs[i]["image_1_uid"],
                "share_preferring_image_0": round(float(left[q]) / max(len(user_ids), 1), 3),
            }
            for q, (i, axis) in enumerate(questions)
        ],  # fmt: skip
        "rule": "per question one taste axis (AXES order); forced Bradley-Terry answers, no tie margin",
    }
    return rows, report


def load_questions(data_dir) -> list[dict[str, Any]]:
    """The questions of a build, in order: ``{"caption", "left", "right", "axis"}`` (JPEG bytes), read from the
    ``questionnaire`` split's first user and the build report."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from .schema import split_path

    report = json.loads((Path(data_dir) / "build_report.json").read_text(encoding="utf-8"))
    meta = report["splits"][QUESTIONNAIRE_SPLIT]["questions"]
    table = pq.read_table(
        split_path(Path(data_dir), QUESTIONNAIRE_SPLIT), columns=["caption", "jpg_0", "jpg_1"]
    )
    rows = table.slice(0, len(meta)).to_pylist()
    return [{"caption": r["caption"], "left": r["jpg_0"], "right": r["jpg_1"], "axis": m["axis"]}
            for r, m in zip(rows, meta, strict=True)]  # fmt: skip


def _measure(n: int = 6) -> None:
    """Print how well each question's answers follow the users' taste on its axis (the docstring's figures)."""
    import pyarrow.parquet as pq

    from ..sandbox.user_population import population
    from .ppd import CONTEXT_SPLIT, ensure_ppd_data
    from .schema import split_path

    data = ensure_ppd_data()
    context = pq.read_table(split_path(data, CONTEXT_SPLIT)).to_pylist()
    users = {u.user_id: u for u in population()}
    rows, report = questionnaire_rows(context, users, sorted(users), seed=0, n=n, temperature=0.05)
    answers = np.array([r["label_0"] for r in rows]).reshape(len(users), n) * 2 - 1  # +1: image 0 preferred
    axes = np.array([axis_values(np.asarray(users[u].weights)) for u in sorted(users)])
    asked = rows[:n]
    more = [
        axis_values(component_values([analyze(decode_jpeg(r[k])) for r in asked])[0])
        for k in ("jpg_0", "jpg_1")
    ]
    more_in_0 = np.sign(more[0] - more[1])  # [questions, axes]: +1 when image 0 has more of the axis
    for q, meta in enumerate(report["questions"]):
        a = AXES.index(meta["axis"])
        r = np.corrcoef(answers[:, q] * more_in_0[q, a], np.sign(axes[:, a]))[0, 1]
        print(
            f"question {q} ({meta['axis']}): correlation of 'chose more {meta['axis']}' with the taste sign {r:+.3f}"
        )
    for m in (n, 4):
        print(f"distinct answer patterns on the first {m} questions: {len({tuple(a[:m]) for a in answers})}")


if __name__ == "__main__":
    _measure()
