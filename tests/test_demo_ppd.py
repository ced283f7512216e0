"""The demo's personalised mode (demo/personal.py, the "Personalised" tab of demo/app.py) on a tiny PPD run built
here the way tests/test_ppd_eval.py builds one (the sandbox pipeline, a random LoRA, a random user branch, a fresh
sandbox-CLIP user encoder) and a small sandbox-ppd build; 4 sampling steps, so the file runs in seconds.

What must hold: a missing run says how to train it; a user's description starts with their strongest taste axis;
the visitor's answers decide which image of each pair is the preferred one; the base image is the stock pipeline's
for that seed and the personalised one differs; the page still builds, with and without a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ppd_eval import make_run, stock_pipeline

from demo import core
from demo import personal as pm
from diffalign.data.ppd import build_ppd_data
from diffalign.eval import personal
from diffalign.eval.compare import generate
from diffalign.models.user_encoder import ClipPairFeaturizer, UserEncoder
from diffalign.sandbox import SANDBOX_PIPELINE
from diffalign.sandbox.user_population import AXES, COMPONENT_NAMES, PopulationUser, population, taste_vector

PROMPT = "a circle"  # leaves every taste attribute open
STEPS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_ppd")
    build_ppd_data(root / "ppd", max_source_pairs=80)
    run = make_run(root / "run", UserEncoder.build(ClipPairFeaturizer("sandbox-clip")), random=True)
    return {"root": root, "data": root / "ppd", "run": run, "users": personal.unseen_user_ids(root / "ppd")}


@pytest.fixture(scope="module")
def loaded(world):
    return personal.load_personalized(SANDBOX_PIPELINE, world["run"])


@pytest.fixture(scope="module")
def engine(world, loaded):
    cfg = pm.PersonalConfig(run_dir=world["run"], data=world["data"], base=str(SANDBOX_PIPELINE))
    eng = pm.PersonalEngine(cfg)
    eng._models = loaded  # the run, loaded once for the whole file
    return eng


def _req(seed: int = 3) -> core.Request:
    return core.validate_request(PROMPT, "", seed, STEPS, 5.0)


# ---------------------------------------------------------------------------------------------------------------
# Status, descriptions, answers


def test_missing_run_dir_says_how_to_train_it(world, tmp_path):
    ok, message = pm.ppd_status(tmp_path / "nope")
    assert not ok and pm.TRAIN_COMMAND in message and "does not exist" in message and "\n" not in message
    partial = tmp_path / "partial"
    (partial / "lora").mkdir(parents=True)
    (partial / "lora" / pm.LORA_FILE).write_bytes(b"x")
    ok, message = pm.ppd_status(partial)
    assert not ok and "user_attention.safetensors" in message and pm.LORA_FILE not in message
    assert pm.TRAIN_COMMAND in message
    assert pm.ppd_status(world["run"])[0]
    # a missing run never touches the data (a nonexistent data dir would fail otherwise)
    eng = pm.PersonalEngine(pm.PersonalConfig(run_dir=tmp_path / "nope", data=tmp_path / "no-data"))
    assert eng.prepare() == pm.ppd_status(tmp_path / "nope")
    with pytest.raises(Exception, match="train one with"):
        eng.run(pm.SOURCE_USER, 1000, [], _req())


def test_describe_user_starts_with_the_strongest_axis():
    w = dict.fromkeys(COMPONENT_NAMES, 0.0) | {"large": 0.5, "dark_background": 0.3, "warm": 0.2}
    user = PopulationUser(1, tuple(w[c] for c in COMPONENT_NAMES), 1.5, "strong")
    assert pm.describe_user(user) == "likes large objects, dark backgrounds, warm colours"
    assert pm.user_label(user) == "1 · strong · likes large objects, dark backgrounds, warm colours"
    for u in population(40):
        axes = taste_vector(u, scaled=False)
        i = int(np.argmax(np.abs(axes)))
        strongest = pm.AXIS_WORDS[AXES[i]][0 if axes[i] > 0 else 1]
        assert pm.describe_user(u).startswith(f"likes {strongest}"), (u, pm.describe_user(u))
        assert ("only slightly" in pm.describe_user(u)) == (u.kind == "weak")


def test_answers_decide_which_image_is_preferred(world, loaded, tmp_path):
    questions = pm.question_pairs(world["data"])
    assert questions == pm.question_pairs(world["data"])  # the same 4 pairs for every visitor
    assert len(questions) == 4 and len({(q.left, q.right) for q in questions}) == 4
    assert [q.axis for q in questions] == list(AXES[:4])
    # the build's questionnaire (what a questionnaire run trains on) is what a build without one gets by the rule
    import shutil

    from diffalign.data.ppd_questionnaire import QUESTIONNAIRE_SPLIT
    from diffalign.data.schema import split_path

    old = tmp_path / "old_build"
    shutil.copytree(world["data"], old)
    split_path(old, QUESTIONNAIRE_SPLIT).unlink()
    assert pm.question_pairs(old) == questions
    answers = [pm.LEFT, pm.RIGHT, pm.LEFT, pm.RIGHT]
    flipped = [pm.RIGHT, pm.LEFT, pm.RIGHT, pm.LEFT]
    mine, other = pm.pairs_for_answers(questions, answers), pm.pairs_for_answers(questions, flipped)
    for q, a, (cap, pref, rej), (cap2, pref2, rej2) in zip(questions, answers, mine, other, strict=True):
        assert cap == cap2 == q.caption
        assert (pref, rej) == ((q.left, q.right) if a == pm.LEFT else (q.right, q.left))
        assert (pref2, rej2) == (rej, pref)
    assert pm.pairs_for_answers(questions, ["left"] * 4) == pm.pairs_for_answers(questions, [pm.LEFT] * 4)
    with pytest.raises(core.InputError, match="pair 3 has no answer"):
        pm.pairs_for_answers(questions, [pm.LEFT, pm.LEFT, None, pm.LEFT])
    encoder = loaded[1]
    with torch.no_grad():
        assert not torch.allclose(encoder.embed(mine), encoder.embed(other))


# ---------------------------------------------------------------------------------------------------------------
# Generation


def test_personal_pair_base_is_the_stock_pipeline_and_personal_differs(world, loaded):
    pipe, encoder = loaded
    uid = world["users"][0]
    pairs = pm.sandbox_user_pairs(world["data"], uid)
    with torch.no_grad():  # the pairs the run's own evaluation embeds for this user
        torch.testing.assert_close(encoder.embed(pairs), personal.user_tokens(encoder, world["data"], uid, 4))
    base, mine = pm.personal_pair(pipe, encoder, PROMPT, 3, pairs, steps=STEPS, guidance=5.0)
    assert base.shape == mine.shape == (32, 32, 3) and base.dtype == mine.dtype == np.uint8
    stock = generate(stock_pipeline(), [PROMPT], [3], steps=STEPS, guidance=5.0)[0]
    np.testing.assert_array_equal(base, stock)
    assert (mine != base).any()  # the LoRA and the user branch are nonzero


def test_engine_runs_both_sources_and_scores_the_picked_user(world, engine):
    assert engine.prepare()[0]
    choices = engine.user_choices()
    assert [uid for _, uid in choices] == world["users"]
    assert all(label.startswith(f"{uid} · ") and " likes " in label for label, uid in choices)
    uid = world["users"][1]
    res = engine.run(pm.SOURCE_USER, uid, [], _req())
    user = personal.population_users(world["data"])[uid]
    b, p = user.score(np.stack([res.base, res.personal]), [PROMPT] * 2)
    assert (
        res.base_md == f"**user {uid}'s score** {b:.3f}"
        and res.personal_md == f"**user {uid}'s score** {p:.3f}"
    )
    assert f"user {uid}" in res.note and f"{p - b:+.3f}" in res.note
    mine = engine.run(pm.SOURCE_ANSWERS, None, [pm.LEFT] * 4, _req())
    np.testing.assert_array_equal(mine.base, res.base)  # the base sees no user
    assert mine.base_md == mine.personal_md == "" and "your 4 answers" in mine.note
    with pytest.raises(core.InputError, match="not one of"):
        engine.run(pm.SOURCE_USER, 1, [], _req())
    with pytest.raises(core.InputError, match="pick a sandbox user"):
        engine.run(pm.SOURCE_USER, None, [], _req())
    with pytest.raises(core.InputError, match="no answer"):
        engine.run(pm.SOURCE_ANSWERS, None, [pm.LEFT] * 3 + [None], _req())
    lines = pm.score_lines(user, res.base, res.personal, "not a sandbox caption")
    assert lines[0].startswith("⚠️") and "sandbox grammar" in lines[0]


def test_slider_scales_the_branch_as_trained(world, engine, monkeypatch):
    """The demo's slider (1 = as trained) multiplies the run's own user_scale (its config.json), as eval_ppd.py's
    default uses it: a run trained with user_scale 3 is shown at 3 with the slider at 1, at 1.5 with it at 0.5."""
    seen = []

    def fake_pair(pipe, encoder, prompt, seed, pairs, steps, guidance, *, user_scale):
        seen.append(user_scale)
        img = np.zeros((8, 8, 3), np.uint8)
        return img, img

    monkeypatch.setattr(pm, "personal_pair", fake_pair)
    cfg = Path(world["run"]) / "config.json"
    assert not cfg.exists()
    try:
        engine.run(pm.SOURCE_ANSWERS, None, [pm.LEFT] * 4, _req())  # no config.json: 1
        cfg.write_text(json.dumps({"user_scale": 3.0}))
        engine.run(pm.SOURCE_ANSWERS, None, [pm.LEFT] * 4, _req())
        engine.run(
            pm.SOURCE_ANSWERS,
            None,
            [pm.LEFT] * 4,
            core.validate_request(PROMPT, "", 3, STEPS, 5.0, scale=0.5),
        )
    finally:
        cfg.unlink(missing_ok=True)
    assert seen == [1.0, 3.0, 1.5]


# ---------------------------------------------------------------------------------------------------------------
# The page


def _blocks(app, kind):
    return [b for b in app.blocks.values() if type(b).__name__ == kind]


def test_app_builds_the_personalised_tab(world, engine, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    from demo.app import build_app, parse_args

    demo_engine = core.DemoEngine(core.DemoConfig(base="sandbox", aligned="", roots=[tmp_path.resolve()]))
    app = build_app(demo_engine, personal=engine)
    assert {"Side by side", "Gallery", "Personalised"} <= {t.label for t in _blocks(app, "Tab")}
    (dropdown,) = [d for d in _blocks(app, "Dropdown") if d.elem_id == "ppd-user"]
    assert [c[1] for c in dropdown.choices] == world["users"]
    assert len([r for r in _blocks(app, "Radio") if (r.elem_id or "").startswith("ppd-answer-")]) == 4
    # the click handler, called as Gradio would: images enlarged for the page, scores under them
    (fn,) = [f for f in app.fns.values() if f.name == "personalise"]
    base, mine, base_md, mine_md, note = fn.fn(
        PROMPT, 3, STEPS, 5.0, pm.SOURCE_USER, world["users"][0], *[None] * 4
    )
    assert base.shape == mine.shape == (256, 256, 3) and "user" in base_md and note.startswith("seed 3 · ")

    missing = pm.PersonalEngine(pm.PersonalConfig(run_dir=tmp_path / "nope"))
    app = build_app(demo_engine, personal=missing)
    (status,) = [m for m in _blocks(app, "Markdown") if m.elem_id == "ppd-status"]
    assert pm.TRAIN_COMMAND in status.value
    assert not [d for d in _blocks(app, "Dropdown") if d.elem_id == "ppd-user"]
    assert {"Side by side", "Gallery", "Personalised"} <= {t.label for t in _blocks(app, "Tab")}

    assert parse_args([], environ={}).ppd_run == str(pm.DEFAULT_PPD_RUN)
    assert parse_args(["--ppd_run", "x"], environ={}).ppd_run == "x" == parse_args(["--ppd-run", "x"]).ppd_run
