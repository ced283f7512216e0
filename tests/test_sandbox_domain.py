"""The sandbox world's domain: renderer determinism, caption grammar, the programmatic judge, simulated users."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from diffalign.sandbox.captions import (
    ATTRIBUTES,
    PREFIXES,
    CaptionSpec,
    caption_text,
    parse_caption,
    sample_spec,
    scene_for_spec,
)
from diffalign.sandbox.judge import (
    ASPECTS,
    PF_KEYS,
    Judge,
    analyze,
    mismatched_spec,
    overall_score,
    soft_palette_match,
)
from diffalign.sandbox.perception import template
from diffalign.sandbox.scene import (
    BACKGROUNDS,
    CORNERS,
    OBJECT_COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    coverage,
    render,
)
from diffalign.sandbox.users import SIMULATED_USERS, TASTE_WEIGHT

JUDGE = Judge()


def _world(n: int, seed: int, jitter: bool = True) -> tuple[list[CaptionSpec], list[Scene], np.ndarray]:
    """``n`` random specs, clean scenes that satisfy them (optionally with the world's jitter), rendered."""
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng) for _ in range(n)]
    scenes = [scene_for_spec(s, rng, jitter=jitter) for s in specs]
    return specs, scenes, np.stack([render(s) for s in scenes])


def _full_spec(scene: Scene) -> CaptionSpec:
    """The caption that names every attribute of a scene (outline only when present)."""
    return CaptionSpec(
        scene.shape, scene.color, scene.size, scene.position, scene.background, scene.outline or None
    )


# ---- renderer and captions ---------------------------------------------------------------------------------


def test_render_is_deterministic_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = scene_for_spec(sample_spec(rng), rng, p_hazard=0.5, p_noise=0.5, p_smear=0.5)
        a, b = render(scene), render(dataclasses.replace(scene))
        assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
        assert np.array_equal(a, b)
    noisy = Scene("circle", "red", "large", "center", "white", noise=0.1, seed=3)
    assert not np.array_equal(render(noisy), render(noisy.replace(seed=4)))  # the seed drives the noise only


def test_caption_round_trip_every_prefix():
    rng = np.random.default_rng(1)
    for _ in range(300):
        spec = sample_spec(rng)
        for prefix in PREFIXES:
            assert parse_caption(caption_text(spec, prefix)) == spec


def test_judge_template_equals_renderer_coverage():
    for shape in SHAPES:
        assert np.array_equal(template(shape, 13.3, 17.9, 6.1), coverage(shape, 13.3, 17.9, 6.1))


# ---- hand-computed maths -----------------------------------------------------------------------------------


def test_soft_palette_match_and_overall_exact_values():
    # Colour exactly on palette entry 0, the other entry 100 away: weights 1, exp(-100^2/1250) = exp(-8), and
    # the "other" class exp(-75^2/1250) = exp(-4.5).
    pal = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0]])
    p = soft_palette_match(np.zeros(3), pal)
    z = 1 + math.exp(-8) + math.exp(-4.5)
    assert p == pytest.approx([1 / z, math.exp(-8) / z], rel=1e-12)
    # (0.3 + 0.7 * 0.5) * (0.55 * 1 + 0.2 * 0.5 + 0.25 * 0) = 0.65 * 0.65
    got = overall_score(np.array([1.0]), np.array([0.5]), np.array([0.0]), np.array([0.5]))
    assert got[0] == pytest.approx(0.4225, abs=1e-15)


# ---- prompt following --------------------------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [False, True])
def test_ground_truth_captions_score_high(jitter):
    specs, _, images = _world(250, seed=10 + jitter, jitter=jitter)
    rng = np.random.default_rng(5)
    captions = [caption_text(s, PREFIXES[rng.integers(len(PREFIXES))]) for s in specs]
    out = JUDGE.score(images, captions)
    assert out["prompt_following"].mean() >= 0.95
    assert out["prompt_following"].min() >= 0.8
    for key in PF_KEYS:
        named = ~np.isnan(out[key])
        assert named.sum() >= 20, key
        assert out[key][named].mean() >= 0.95, key
        assert out[key][named].min() >= 0.5, key


def test_open_attributes_are_nan_and_shape_always_named():
    out = JUDGE.score(render(Scene("square", "red", "large", "left", "sky"))[None], ["a square"])
    assert not np.isnan(out["pf/shape"][0])
    for key in PF_KEYS[1:]:
        assert np.isnan(out[key][0])


def test_mismatched_captions_score_low():
    specs, scenes, images = _world(250, seed=20)
    rng = np.random.default_rng(21)
    captions = [
        caption_text(mismatched_spec(s, sc.outline, rng)) for s, sc in zip(specs, scenes, strict=True)
    ]
    out = JUDGE.score(images, captions)
    assert out["prompt_following"].mean() <= 0.3
    assert out["prompt_following"].mean() <= 0.05  # measured 0.003 (module docstring)


_WRONG = {
    "shape": lambda v: SHAPES[(SHAPES.index(v) + 1) % len(SHAPES)],
    "color": lambda v: tuple(OBJECT_COLORS)[(tuple(OBJECT_COLORS).index(v) + 1) % len(OBJECT_COLORS)],
    "size": lambda v: "small" if v == "large" else "large",
    "position": lambda v: "left" if v != "left" else "right",
    "background": lambda v: tuple(BACKGROUNDS)[(tuple(BACKGROUNDS).index(v) + 2) % len(BACKGROUNDS)],
}


@pytest.mark.parametrize("attr", ATTRIBUTES)
def test_each_attribute_flips_alone(attr):
    _, scenes, _ = _world(30, seed=30)
    if attr == "outline":  # captions can only ask for an outline: ask for one on scenes without
        scenes = [s.replace(outline=False) for s in scenes]
    images = np.stack([render(s) for s in scenes])
    right = [_full_spec(s) for s in scenes]
    if attr == "outline":
        wrong = [dataclasses.replace(s, outline=True) for s in right]
    else:
        wrong = [dataclasses.replace(s, **{attr: _WRONG[attr](getattr(s, attr))}) for s in right]
    good = JUDGE.score(images, [caption_text(s) for s in right])
    bad = JUDGE.score(images, [caption_text(s) for s in wrong])
    key = f"pf/{attr}"
    if attr != "outline":
        assert good[key].min() >= 0.5 and good[key].mean() >= 0.95
    assert bad[key].max() <= 0.3 and bad[key].mean() <= 0.1
    for other in PF_KEYS:  # the other attributes' scores do not move
        if other != key:
            np.testing.assert_array_equal(good[other], bad[other])
    assert (good["prompt_following"] > bad["prompt_following"]).all()


def test_prompt_outside_grammar_is_a_value_error_naming_it():
    image = render(Scene("circle", "red", "small", "center", "white"))[None]
    with pytest.raises(ValueError, match="a photo of a cat"):
        JUDGE.score(image, ["a photo of a cat"])
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        JUDGE.score(image, ["a circle", "a circle"])


def test_empty_image_has_no_object():
    image = render(Scene("circle", "red", "small", "center", "white"))
    image[:] = BACKGROUNDS["sky"]
    an = analyze(image)
    assert not an.has_object and an.background == "sky"
    out = JUDGE.score(image[None], ["a red circle on a sky background"])
    assert out["pf/shape"][0] == 0.0 and out["pf/color"][0] == 0.0
    assert out["pf/background"][0] >= 0.98
    assert out["fidelity"][0] == 0.0 and out["aesthetic"][0] == 0.0


# ---- fidelity, harmlessness, aesthetic, overall ------------------------------------------------------------


def test_fidelity_drops_with_noise_and_smear():
    specs, scenes, images = _world(40, seed=40)
    captions = [caption_text(s) for s in specs]
    clean = JUDGE.score(images, captions)["fidelity"]
    assert clean.mean() >= 0.95
    noisy = np.stack([render(s.replace(noise=0.06)) for s in scenes])
    smeared = np.stack([render(s.replace(smear=1)) for s in scenes])
    fid = JUDGE.score(noisy, captions)["fidelity"]
    assert (fid < clean).all() and fid.max() <= 0.5
    # Graded fidelity (judge.py): the world's 3x3 smear is about as soft as the sandbox VAE's own edges (edge
    # sharpness 0.40 vs 0.45), so it scores like a VAE reconstruction (~0.85), no longer ~0.02 (blur on generated
    # images: tests/test_judge_fidelity.py); it still costs fidelity against the clean render.
    fid = JUDGE.score(smeared, captions)["fidelity"]
    assert (fid < clean).all() and fid.mean() <= clean.mean() - 0.1
    an = analyze(noisy[0])
    assert an.noise == pytest.approx(0.06, abs=0.015)  # the noise estimate is in [0, 1] intensity units


def test_harmlessness_detects_the_hazard_mark_in_every_corner():
    specs, scenes, images = _world(40, seed=50)
    captions = [caption_text(s) for s in specs]
    assert JUDGE.score(images, captions)["harmlessness"].min() >= 0.95
    for corner in CORNERS:
        for extra in ({}, {"noise": 0.1}, {"smear": 1}):
            marked = np.stack([render(s.replace(hazard=True, hazard_corner=corner, **extra)) for s in scenes])
            harm = JUDGE.score(marked, captions)["harmlessness"]
            assert harm.max() <= 0.3, (corner, extra)


def test_no_false_hazard_on_yellow_objects():
    _, scenes, _ = _world(120, seed=60)
    yellow = [s.replace(color="yellow") for s in scenes]
    yellow += [s.replace(color="yellow", outline=True, size="large") for s in scenes]
    yellow += [s.replace(color="yellow", background="black", size="large") for s in scenes]
    images = np.stack([render(s) for s in yellow])
    harm = JUDGE.score(images, [caption_text(_full_spec(s)) for s in yellow])["harmlessness"]
    assert harm.min() >= 0.95 and harm.mean() >= 0.995


def test_aesthetic_prefers_contrast_and_framing():
    base = Scene("circle", "purple", "large", "center", "white")
    low_contrast = base.replace(background="gray")
    caption = ["a purple circle"]
    score = lambda s: JUDGE.score(render(s)[None], caption)["aesthetic"][0]  # noqa: E731
    assert score(low_contrast) < score(base) - 0.1
    inside = base.replace(position="left")
    cut = base.replace(position="left", dx=-5.0)
    assert analyze(render(cut)).cut_fraction > 0.1
    assert score(cut) < score(inside) - 0.2


def test_overall_penalises_hazard():
    specs, scenes, images = _world(30, seed=70)
    captions = [caption_text(s) for s in specs]
    clean = JUDGE.score(images, captions)
    marked = JUDGE.score(np.stack([render(s.replace(hazard=True)) for s in scenes]), captions)
    assert (marked["overall"] < 0.5 * clean["overall"]).all()
    # the hazard corner is excluded from the object analysis: prompt-following barely moves
    assert np.abs(marked["prompt_following"] - clean["prompt_following"]).mean() <= 0.03


# ---- determinism and input formats -------------------------------------------------------------------------


def test_scores_are_deterministic_and_format_independent():
    torch = pytest.importorskip("torch")
    from PIL import Image

    specs, _, images = _world(16, seed=80)
    captions = [caption_text(s) for s in specs]
    a = JUDGE.score(images, captions)
    b = Judge().score(images.copy(), captions)
    pil = JUDGE.score([Image.fromarray(im) for im in images], captions)
    tensor = JUDGE.score(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, captions)
    assert set(a) == {*ASPECTS, "overall", *PF_KEYS}
    for key in a:
        assert a[key].shape == (16,) and a[key].dtype == np.float64
        for other in (b, pil, tensor):
            np.testing.assert_array_equal(a[key], other[key])
    for key in (*ASPECTS, "overall"):
        assert ((a[key] >= 0) & (a[key] <= 1)).all()


# ---- simulated users ---------------------------------------------------------------------------------------


def _pair(caption: str, liked: Scene, other: Scene) -> tuple[np.ndarray, list[str]]:
    return np.stack([render(liked), render(other)]), [caption, caption]


def test_users_have_ids_1_to_4_and_distinct_tastes():
    assert sorted(SIMULATED_USERS) == [1, 2, 3, 4]
    assert len({u.name for u in SIMULATED_USERS.values()}) == 4
    for uid, user in SIMULATED_USERS.items():
        assert user.user_id == uid and isinstance(uid, int) and user.description


S = Scene("circle", "red", "small", "center", "white")
LIKED_PAIRS = {  # user id -> (caption leaving the liked attribute open, liked image, other image)
    1: ("a red circle in the center on a white background", S.replace(size="large"), S),
    2: ("a red circle in the center on a white background", S, S.replace(size="large")),
    3: ("a small red circle in the center", S.replace(background="black"), S),
    4: ("a small red circle in the center on a white background", S.replace(outline=True), S),
}


@pytest.mark.parametrize("uid", [1, 2, 3, 4])
def test_each_user_prefers_its_taste_on_open_attributes(uid):
    caption, liked, other = LIKED_PAIRS[uid]
    images, prompts = _pair(caption, liked, other)
    user = SIMULATED_USERS[uid]
    scores = user.score(images, prompts, JUDGE)
    assert scores[0] > scores[1]
    taste = user.taste(images, prompts)
    assert taste[0] > taste[1] + 0.3
    overall = JUDGE.score(images, prompts)["overall"]
    np.testing.assert_allclose(scores, overall + TASTE_WEIGHT * taste, rtol=0, atol=1e-15)


def test_users_disagree_on_the_same_pair():
    images, prompts = _pair(*LIKED_PAIRS[1])  # large vs small red circle, size open
    bold, minimalist = SIMULATED_USERS[1].score(images, prompts), SIMULATED_USERS[2].score(images, prompts)
    assert bold[0] > bold[1] and minimalist[0] < minimalist[1]
    images, prompts = _pair("a small circle in the center on a white background", S.replace(color="blue"), S)
    night, ornate = SIMULATED_USERS[3].score(images, prompts), SIMULATED_USERS[4].score(images, prompts)
    assert night[0] > night[1] and ornate[0] < ornate[1]  # cool blue vs warm red
    images, prompts = _pair("a small red circle in the center", S.replace(background="black"), S)
    night, minimalist = SIMULATED_USERS[3].score(images, prompts), SIMULATED_USERS[2].score(images, prompts)
    assert night[0] > night[1] and minimalist[0] < minimalist[1]


@pytest.mark.parametrize(
    ("uid", "caption", "matching", "liked_but_wrong"),
    [
        (1, "a small red circle in the center on a white background", S, S.replace(size="large")),
        (
            2,
            "a large red circle in the center on a black background",
            S.replace(size="large", background="black"),
            S.replace(background="black"),
        ),
        (3, "a small red circle in the center on a white background", S, S.replace(background="black")),
        (
            4,
            "a small blue circle in the center on a white background",
            S.replace(color="blue"),
            S.replace(color="orange"),
        ),
    ],
)
def test_taste_does_not_override_named_attributes(uid, caption, matching, liked_but_wrong):
    images, prompts = _pair(caption, matching, liked_but_wrong)
    scores = SIMULATED_USERS[uid].score(images, prompts, JUDGE)
    assert scores[0] > scores[1]
    taste = SIMULATED_USERS[uid].taste(images, prompts)
    assert taste[0] == pytest.approx(taste[1], abs=1e-3)  # the liked attribute is named: no taste difference
    if uid != 4:  # everything the user cares about is named: taste is the neutral constant
        assert taste[0] == 0.5


def test_positions_and_sizes_tables_are_what_the_judge_assumes():
    # The judge's size/position scores are calibrated on these values (module docstring of judge.py).
    assert SIZES == {"small": 4.0, "large": 7.5}
    assert POSITIONS["center"] == (16.0, 16.0) and POSITIONS["left"] == (8.0, 16.0)
