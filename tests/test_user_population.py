"""The seeded population of simulated users (``sandbox/user_population.py``): its distribution, its taste formula,
its held-out split, its labelling protocol and its interpolation ground truth. Cheap: ~200 rendered images."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from diffalign.sandbox.captions import CaptionSpec, parse_caption, sample_spec, scene_for_spec
from diffalign.sandbox.judge import Analysis, Judge, analyze
from diffalign.sandbox.scene import Scene, render
from diffalign.sandbox.user_population import (
    AXES,
    COMPONENT_NAMES,
    KIND_SHARES,
    OPPOSED_AXES,
    STRENGTH_RANGES,
    PopulationScorer,
    PopulationUser,
    from_simulated_user,
    interpolate,
    kind_counts,
    population,
    split_users,
    taste_matrix,
    taste_vector,
)
from diffalign.sandbox.users import COMPONENTS, NEUTRAL_TASTE, SIMULATED_USERS

JUDGE = Judge()
USERS = population()
S = Scene("circle", "red", "small", "center", "white")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def world_pairs() -> tuple[list, list[CaptionSpec], np.ndarray, np.ndarray]:
    """100 pairs of world images (same caption per pair, the world's defects), analysed and judged once."""
    rng = np.random.default_rng(7)
    specs, images = [], []
    for _ in range(100):
        spec = sample_spec(rng)
        for _ in range(2):
            scene = scene_for_spec(spec, rng, p_hazard=0.15, p_noise=0.15, p_smear=0.15)
            images.append(render(scene))
            specs.append(spec)
    analyses = [analyze(im) for im in images]
    return analyses, specs, np.stack(images), JUDGE.score_analyses(analyses, specs)["overall"]


# ---- the distribution ----------------------------------------------------------------------------------------


def test_population_is_deterministic_and_seeded():
    assert population() == USERS and population(240, 0) == USERS
    other = population(240, 1)
    assert other != USERS
    assert [u.user_id for u in other] == [u.user_id for u in USERS]
    assert sum(a.weights != b.weights for a, b in zip(USERS, other, strict=True)) > 200


def test_at_least_200_users_with_ids_apart_from_the_hand_made_ones():
    assert len(USERS) == 240 >= 200
    ids = [u.user_id for u in USERS]
    assert ids == list(range(1000, 1240))
    assert not set(ids) & set(SIMULATED_USERS)
    for u in USERS:
        assert len(u.weights) == len(COMPONENT_NAMES) == 9
        assert np.isclose(np.abs(u.weights).sum(), 1.0)  # canonical scale: only ratios matter


def test_kind_shares_are_as_documented():
    counts = Counter(u.kind for u in USERS)
    assert counts == {"strong": 60, "weak": 60, "moderate": 72, "contrarian": 48}
    for kind, share in KIND_SHARES.items():
        assert counts[kind] == round(share * 240)
    for n in (7, 200, 241, 1001):
        c = kind_counts(n)
        assert sum(c.values()) == n and all(abs(c[k] - KIND_SHARES[k] * n) < 1 for k in KIND_SHARES)
    # ids do not reveal kinds: the first 60 ids are not all of one kind
    assert len({u.kind for u in USERS[:60]}) == 4


def test_strengths_by_kind():
    for u in USERS:
        lo, hi = STRENGTH_RANGES[u.kind]
        assert lo <= u.strength <= hi
    assert min(u.strength for u in USERS if u.kind == "strong") >= 1.0  # taste can outweigh the whole judge
    assert max(u.strength for u in USERS if u.kind == "weak") <= 0.05


def test_opposed_axes_cannot_both_be_liked():
    for u in USERS:
        w = u.weight_dict
        for pos, neg in OPPOSED_AXES.values():
            assert w[pos] >= 0 and w[neg] >= 0 and w[pos] * w[neg] == 0
    # both ends of each pair occur in the population
    for pos, neg in OPPOSED_AXES.values():
        assert any(u.weight_dict[pos] > 0 for u in USERS) and any(u.weight_dict[neg] > 0 for u in USERS)
    weights = dict.fromkeys(COMPONENT_NAMES, 0.0) | {"large": 0.5, "small": 0.5}
    with pytest.raises(ValueError, match="opposed"):
        PopulationUser(1, tuple(weights.values()), 1.0, "strong")
    with pytest.raises(ValueError, match=">= 0"):
        PopulationUser(1, tuple((dict.fromkeys(COMPONENT_NAMES, 0.0) | {"warm": -1.0}).values()), 1.0, "x")


def test_contrarians_oppose_the_population_mean_direction():
    directions = np.array([taste_vector(u, scaled=False) for u in USERS])
    mean = directions.mean(0)
    assert (
        mean[AXES.index("size")] > 0 and mean[AXES.index("contrast")] > 0
    )  # the average user likes large, contrast
    for u, d in zip(USERS, directions, strict=True):
        if u.kind == "contrarian":
            assert _cos(d, mean) < 0, u
    mainstream = [_cos(d, mean) for u, d in zip(USERS, directions, strict=True) if u.kind != "contrarian"]
    assert np.mean(np.array(mainstream) > 0) > 0.9


# ---- the taste formula ---------------------------------------------------------------------------------------


def _constructed_analysis(radius: float = 5.75) -> Analysis:
    """An analysis with hand-set values: large 0.5 (r = 5.75), contrast 0.8, centred 1, light 0.8, dark 0.1,
    outlined 0.3, warm 0.7, cool 0.1."""
    base = analyze(render(S))
    return dataclasses.replace(
        base,
        has_object=True,
        radius=radius,
        contrast=0.8,
        center=(16.0, 16.0),
        background_match={"white": 0.6, "black": 0.1, "gray": 0.0, "sky": 0.2, "sand": 0.0},
        outline_evidence=0.3,
        color_match={"red": 0.5, "green": 0.05, "blue": 0.1, "yellow": 0.0, "purple": 0.0, "orange": 0.2},
    )


HAND_WEIGHTS = {
    "large": 0.2,
    "contrast": -0.3,
    "centred": 0.1,
    "dark_background": 0.25,
    "outlined": 0.05,
    "cool": 0.1,
}
HAND_USER = PopulationUser(
    1234, tuple(HAND_WEIGHTS.get(c, 0.0) for c in COMPONENT_NAMES), strength=1.5, kind="strong"
)


def test_hand_computed_score_on_a_constructed_analysis():
    an = _constructed_analysis()
    values = {c: COMPONENTS[c].value(an) for c in COMPONENT_NAMES}
    expected = {"large": 0.5, "small": 0.5, "contrast": 0.8, "centred": 1.0, "light_background": 0.8}
    expected |= {"dark_background": 0.1, "outlined": 0.3, "warm": 0.7, "cool": 0.1}
    assert values == pytest.approx(expected, abs=1e-12)

    # everything open: (0.2*0.5 + 0.3*(1-0.8) + 0.1*1 + 0.25*0.1 + 0.05*0.3 + 0.1*0.1) / (0.2+0.3+0.1+0.25+0.05+0.1)
    spec_open = parse_caption("a circle")
    taste_open = (0.1 + 0.06 + 0.1 + 0.025 + 0.015 + 0.01) / 1.0
    # size and colour named: large and cool drop out; contrast stays (the background is open)
    spec_named = parse_caption("a large red circle")
    taste_named = (0.06 + 0.1 + 0.025 + 0.015) / (0.3 + 0.1 + 0.25 + 0.05)
    spec_all = parse_caption("a large red circle with an outline in the center on a white background")
    for spec, taste in ((spec_open, taste_open), (spec_named, taste_named), (spec_all, NEUTRAL_TASTE)):
        assert HAND_USER.taste_of(an, spec) == pytest.approx(taste, abs=1e-12)
        score = HAND_USER.score_analyses([an], [spec], np.array([0.7]))
        assert score[0] == pytest.approx(0.7 + 1.5 * taste, abs=1e-12)
    assert taste_open == pytest.approx(0.31) and taste_named == pytest.approx(0.2 / 0.7)


def test_taste_counts_only_open_attributes():
    small_an, large_an = _constructed_analysis(radius=4.0), _constructed_analysis(radius=7.5)
    size_named = parse_caption("a small circle")
    size_open = parse_caption("a circle")
    assert HAND_USER.taste_of(small_an, size_named) == HAND_USER.taste_of(large_an, size_named)
    assert HAND_USER.taste_of(large_an, size_open) > HAND_USER.taste_of(small_an, size_open)
    # for every population user with a size axis: naming the size removes the axis from the taste
    sized = [u for u in USERS if taste_vector(u)[AXES.index("size")] != 0]
    assert len(sized) > 50
    t = taste_matrix(sized, [small_an, large_an], [size_named, size_named])
    np.testing.assert_array_equal(t[:, 0], t[:, 1])
    t = taste_matrix(sized, [small_an, large_an], [size_open, size_open])
    assert np.all(t[:, 0] != t[:, 1])


def test_batched_taste_equals_the_reference_and_hand_made_users_are_members(world_pairs):
    analyses, specs, images, overall = world_pairs
    users = USERS[::24]
    t = taste_matrix(users, analyses[:40], specs[:40])
    ref = np.array(
        [[u.taste_of(an, s) for an, s in zip(analyses[:40], specs[:40], strict=True)] for u in users]
    )
    np.testing.assert_allclose(t, ref, rtol=0, atol=1e-12)
    prompts = [f"a {s.shape}" for s in specs[:40]]  # everything open: every taste component counts
    for uid, hand in SIMULATED_USERS.items():
        member = from_simulated_user(hand)
        assert member.user_id == uid
        np.testing.assert_allclose(
            member.score(images[:40], prompts, JUDGE),
            hand.score(images[:40], prompts, JUDGE),
            rtol=0,
            atol=1e-15,
        )


def test_opposed_size_users_rank_large_and_small_oppositely():
    strong = [u for u in USERS if u.kind == "strong"]
    size_share = lambda u: taste_vector(u, scaled=False)[AXES.index("size")] / np.abs(u.weights).sum()  # noqa: E731
    likes_large, likes_small = max(strong, key=size_share), min(strong, key=size_share)
    assert likes_large.weight_dict["large"] > 0 and likes_small.weight_dict["small"] > 0
    caption = "a red circle in the center on a white background"  # the size is open
    images, prompts = np.stack([render(S.replace(size="large")), render(S)]), [caption, caption]
    a, b = likes_large.score(images, prompts, JUDGE), likes_small.score(images, prompts, JUDGE)
    assert a[0] > a[1] and b[0] < b[1]


def test_weak_users_follow_the_judge_and_strong_users_do_not(world_pairs):
    analyses, specs, _, overall = world_pairs
    taste = taste_matrix(USERS, analyses, specs)
    scores = overall[None] + np.array([u.strength for u in USERS])[:, None] * taste
    judge_delta = overall[0::2] - overall[1::2]
    assert np.all(judge_delta != 0)
    agree = ((scores[:, 0::2] - scores[:, 1::2]) * judge_delta > 0).mean(1)
    by_kind = {k: agree[[u.kind == k for u in USERS]] for k in KIND_SHARES}
    assert by_kind["weak"].mean() >= 0.9 and by_kind["weak"].min() >= 0.85
    assert by_kind["strong"].mean() <= by_kind["weak"].mean() - 0.1
    assert by_kind["strong"].mean() < by_kind["moderate"].mean() < by_kind["weak"].mean()


# ---- split, scorer, interpolation ----------------------------------------------------------------------------


def test_split_is_disjoint_covering_stratified_and_deterministic():
    train, unseen = split_users(USERS)
    assert set(train).isdisjoint(unseen)
    assert set(train) | set(unseen) == {u.user_id for u in USERS}
    assert len(unseen) >= 20 and list(unseen) == sorted(unseen)
    kind = {u.user_id: u.kind for u in USERS}
    counts = Counter(u.kind for u in USERS)
    for k in KIND_SHARES:
        n_unseen = sum(kind[i] == k for i in unseen)
        assert 1 <= n_unseen < counts[k] and n_unseen == round(0.2 * counts[k])
    assert split_users(USERS) == (train, unseen)
    assert split_users(list(reversed(USERS))) == (train, unseen)  # independent of the order of the list
    assert split_users(USERS, seed=1)[1] != unseen
    with pytest.raises(ValueError):
        split_users(USERS, unseen_fraction=1.0)


def test_population_scorer_equals_per_user_scores(world_pairs):
    _, specs, images, _ = world_pairs
    prompts = [f"a {s.shape}" if s.color is None else f"a {s.color} {s.shape}" for s in specs[:30]]
    rng = np.random.default_rng(0)
    ids = [USERS[i].user_id for i in rng.integers(0, 5, size=30)]  # repeats: several rows per user
    scorer = PopulationScorer(USERS, judge=JUDGE)
    got = scorer.score(images[:30], prompts, ids)
    by_id = {u.user_id: u for u in USERS}
    for i, uid in enumerate(ids):
        np.testing.assert_array_equal(
            got[i], by_id[uid].score(images[i : i + 1], prompts[i : i + 1], JUDGE)[0]
        )
    assert scorer.user_ids == tuple(range(1000, 1240))
    with pytest.raises(KeyError):
        scorer.score(images[:1], prompts[:1], [1])


def test_interpolation_endpoints_and_midpoint():
    a = next(u for u in USERS if u.kind == "strong" and u.weight_dict["large"] > 0)
    b = next(u for u in USERS if u.kind == "contrarian" and u.weight_dict["small"] > 0)
    for alpha, end in ((0.0, a), (1.0, b)):
        got = interpolate(a, b, alpha)
        assert got.weights == end.weights and got.strength == end.strength
    mid = interpolate(a, b, 0.5)
    assert mid.kind == "interpolated"
    assert mid.strength == pytest.approx((a.strength + b.strength) / 2)
    np.testing.assert_allclose(
        taste_vector(mid, scaled=False), (taste_vector(a, scaled=False) + taste_vector(b, scaled=False)) / 2
    )
    for alpha in np.linspace(0, 1, 11):
        w = interpolate(a, b, float(alpha)).weight_dict
        assert w["large"] * w["small"] == 0  # an in-between user never likes both ends
