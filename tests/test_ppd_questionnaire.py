"""The PPD questionnaire (diffalign/data/ppd_questionnaire.py): every simulated user answers the same few pairs, each
chosen to ask about one taste axis; the answers are the users' own forced Bradley-Terry choices and reveal their
taste. A small build (the first 80 rows of each source split, seconds)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffalign.data import ppd
from diffalign.data.pickapic_rows import decode_jpeg
from diffalign.data.ppd_questionnaire import (
    QUESTIONNAIRE_SPLIT,
    axis_values,
    distinct_pairs,
    load_questions,
    open_axes,
)
from diffalign.data.schema import split_path
from diffalign.sandbox.judge import analyze, parse_prompts
from diffalign.sandbox.user_population import AXES, component_values, open_mask, population, split_users

SUBSET = 80
QUESTIONS = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("ppdq") / "ds"
    report = ppd.build_ppd_data(out, max_source_pairs=SUBSET, users_per_pair=2, questions=QUESTIONS)
    tables = {
        s: pq.read_table(split_path(out, s)).to_pylist() for s in ("train", "context", QUESTIONNAIRE_SPLIT)
    }
    return out, report, tables


def _by_user(rows):
    out = defaultdict(list)
    for r in rows:
        out[r["user_id"]].append(r)
    return out


def test_every_user_answers_the_same_questions_in_the_same_order(built):
    out, report, tables = built
    quiz = tables[QUESTIONNAIRE_SPLIT]
    train_ids, unseen_ids = split_users(population())
    per_user = _by_user(quiz)
    assert list(per_user) == [*train_ids, *unseen_ids]  # train users first, then unseen, ascending
    asked = [(r["image_0_uid"], r["image_1_uid"]) for r in quiz[:QUESTIONS]]
    assert len(set(asked)) == QUESTIONS
    for rows in per_user.values():
        assert [(r["image_0_uid"], r["image_1_uid"]) for r in rows] == asked
    context_pairs = {(r["image_0_uid"], r["image_1_uid"]) for r in tables["context"]}
    assert set(asked) <= context_pairs  # validation pairs, never training pairs
    train_pairs = {(r["image_0_uid"], r["image_1_uid"]) for r in tables["train"]}
    assert not set(asked) & train_pairs
    assert {r["label_0"] for r in quiz} <= {0.0, 1.0}  # forced choices: no tie
    assert all(r["label_0"] + r["label_1"] == 1.0 for r in quiz)
    info = report["splits"][QUESTIONNAIRE_SPLIT]
    assert info["rows"] == len(quiz) == 240 * QUESTIONS and info["users"] == 240
    assert [q["axis"] for q in info["questions"]] == list(AXES[:QUESTIONS])
    ids = [r["ranking_id"] for t in tables.values() for r in t]
    assert len(set(ids)) == len(ids) and report["ranking_ids"]["last"] == max(ids)


def test_answers_are_forced_bradley_terry_draws_of_each_users_score(built):
    """Hand computation: the user's own score (``PopulationUser.score`` on the decoded JPEGs) and the draw of the
    stream (seed 0, 5, user id) decide each answer: image 0 iff u < sigmoid((s0 - s1) / T), T = 0.05."""
    _, report, tables = built
    users = {u.user_id: u for u in population()}
    temperature = report["labelling"]["temperature"]
    for uid, rows in list(_by_user(tables[QUESTIONNAIRE_SPLIT]).items())[::17]:
        imgs = np.stack([decode_jpeg(r[f"jpg_{s}"]) for s in (0, 1) for r in rows])
        s = users[uid].score(imgs, [r["caption"] for r in rows] * 2)
        p0 = 1.0 / (1.0 + np.exp(-(s[:QUESTIONS] - s[QUESTIONS:]) / temperature))
        u = np.random.default_rng([0, 5, uid]).random(QUESTIONS)
        assert [r["label_0"] for r in rows] == (u < p0).astype(float).tolist(), uid


def test_each_question_asks_about_its_axis(built):
    """The rule, recomputed: question j's pair is, among the distinct context pairs whose caption leaves axis j open
    and whose two images both show an object and are both in the better half by the judge, and not asked by an
    earlier question, the one with the largest
    |difference on the axis| - |difference of the judge's overall|; and it differs on the axis more than the median
    such pair."""
    from diffalign.sandbox.judge import Judge

    _, report, tables = built
    pairs = [tables["context"][i] for i in distinct_pairs(tables["context"])]
    specs = parse_prompts([r["caption"] for r in pairs], len(pairs))
    values, objects, overall = [], [], []
    for k in ("jpg_0", "jpg_1"):
        analyses = [analyze(decode_jpeg(r[k])) for r in pairs]
        v, has = component_values(analyses)
        values.append(axis_values(v))
        objects.append(has)
        overall.append(np.asarray(Judge().score_analyses(analyses, specs)["overall"]))
    diff = np.abs(values[0] - values[1])
    worse = np.minimum(*overall)
    good = objects[0] & objects[1] & (worse >= np.median(worse))
    opened = open_axes(open_mask(specs))
    index = {(r["image_0_uid"], r["image_1_uid"]): i for i, r in enumerate(pairs)}
    asked = np.zeros(
        len(pairs), dtype=bool
    )  # a pair is asked once: an earlier question's pair is not eligible
    for q in report["splits"][QUESTIONNAIRE_SPLIT]["questions"]:
        a = AXES.index(q["axis"])
        i = index[(q["image_0_uid"], q["image_1_uid"])]
        eligible = opened[:, a] & good & ~asked
        asked[i] = True
        assert eligible[i], q["axis"]
        gain = diff[:, a] - np.abs(overall[0] - overall[1])
        assert gain[i] == pytest.approx(gain[eligible].max()), q["axis"]
        assert diff[i, a] > np.median(diff[eligible, a]), q["axis"]


def test_answers_reveal_the_users_taste(built):
    """The effect the questionnaire exists for: users who like more of an axis prefer the image with more of it.
    Per question, the correlation over the 240 users between 'chose the image with more of the axis' and the
    sign of the user's taste on that axis is clearly positive (random context pairs carry almost none: README)."""
    _, report, tables = built
    users = {u.user_id: u for u in population()}
    quiz = _by_user(tables[QUESTIONNAIRE_SPLIT])
    first = next(iter(quiz.values()))
    values = [
        axis_values(component_values([analyze(decode_jpeg(r[k])) for r in first])[0])
        for k in ("jpg_0", "jpg_1")
    ]
    more_in_0 = np.sign(values[0] - values[1])  # [questions, axes]
    for j, q in enumerate(report["splits"][QUESTIONNAIRE_SPLIT]["questions"]):
        a = AXES.index(q["axis"])
        chose_more = np.array([(2 * rows[j]["label_0"] - 1) * more_in_0[j, a] for rows in quiz.values()])
        taste = np.array([np.sign(axis_values(np.asarray(users[u].weights))[a]) for u in quiz])
        r = np.corrcoef(chose_more, taste)[0, 1]
        assert r > 0.25, (q["axis"], r)


def test_load_questions_and_the_users_questionnaire_pairs(built):
    out, _, tables = built
    questions = load_questions(out)
    assert [q["axis"] for q in questions] == list(AXES[:QUESTIONS])
    first = tables[QUESTIONNAIRE_SPLIT][:QUESTIONS]
    assert [(q["left"], q["right"]) for q in questions] == [(r["jpg_0"], r["jpg_1"]) for r in first]
    _, unseen_ids = split_users(population())
    rows = _by_user(tables[QUESTIONNAIRE_SPLIT])[unseen_ids[0]]
    pairs = ppd.load_context_pairs(out, unseen_ids[0], split=QUESTIONNAIRE_SPLIT)
    assert len(pairs) == QUESTIONS
    for p, r in zip(pairs, rows, strict=True):
        assert p["preferred"] == (r["jpg_0"] if r["label_0"] == 1.0 else r["jpg_1"])
    assert len(ppd.load_context_pairs(out, unseen_ids[0])) == 8  # the random context split is unchanged
