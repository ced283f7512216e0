"""The personalised evaluation of PPD runs (diffalign.eval.personal, scripts/eval_ppd.py) on a tiny run directory
built here (the sandbox pipeline, a random LoRA, a random user branch, a fresh sandbox-CLIP user encoder) and a
small sandbox-ppd build: 2 users x 2 captions x 1 seed x 4 sampling steps, so the whole file runs in seconds.

What must hold: the numbers in eval.json agree with each other and with a recomputation from the saved per-image
scores; the base side is the stock pipeline's images; a zero LoRA and a zero user branch give the base exactly (all
ties, 0.5); retrieval is perfect for an encoder that knows the users; interpolation endpoints are the users' own.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffalign.data.ppd import build_ppd_data, load_context_pairs, load_test_prompts
from diffalign.errors import ConfigError
from diffalign.eval import personal
from diffalign.eval import personal_interpolation as pi
from diffalign.eval.compare import generate
from diffalign.models.lora import add_lora, save_lora
from diffalign.models.user_attention import add_user_attention, save_user_attention, user_processors
from diffalign.models.user_encoder import ClipPairFeaturizer, UserEncoder
from diffalign.sandbox import SANDBOX_PIPELINE

STEPS = 4
GEN = {"steps": STEPS, "guidance": 5.0}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]


def stock_pipeline() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(SANDBOX_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_run(run_dir: Path, encoder: UserEncoder, *, random: bool) -> Path:
    """A PPD run directory as training writes it; ``random=False``: LoRA and user value projections at zero."""
    unet = stock_pipeline().unet
    add_lora(unet, rank=4, alpha=None, target_modules=TARGETS)  # lora_B starts at zero
    gen = torch.Generator().manual_seed(0)
    if random:
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    save_lora(run_dir / "lora", unet)
    add_user_attention(unet, user_dim=32)  # to_v_user starts at zero
    if random:
        with torch.no_grad():
            for proc in user_processors(unet).values():
                proc.to_v_user.weight.copy_(0.3 * torch.randn(proc.to_v_user.weight.shape, generator=gen))
    save_user_attention(unet, run_dir / "user_attention.safetensors")
    encoder.save(run_dir / "user_encoder")
    return run_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppd_eval")
    build_ppd_data(root / "ppd", max_source_pairs=80)
    encoder = UserEncoder.build(ClipPairFeaturizer("sandbox-clip"))
    runs = {name: make_run(root / name, encoder, random=name == "random") for name in ("random", "zero")}
    users = personal.unseen_user_ids(root / "ppd")
    return {"root": root, "data": root / "ppd", "runs": runs, "users": users[:2]}


@pytest.fixture(scope="module")
def random_pipe(world):
    return personal.load_personalized(SANDBOX_PIPELINE, world["runs"]["random"])


@pytest.fixture(scope="module")
def evaluated(world, random_pipe):
    """One evaluation of the random run, against the zero run's LoRA (a generic run that is exactly the base)."""
    pipe, encoder = random_pipe
    against = personal.load_generic(SANDBOX_PIPELINE, world["runs"]["zero"])
    cache: dict = {}
    out = world["root"] / "eval_random"
    result = personal.evaluate_personal(
        pipe, encoder, world["data"], user_ids=world["users"], k=4, seeds=(0,), num_prompts=2,
        output_dir=out, against=against, base_images=cache, **GEN,
    )  # fmt: skip
    return result, cache, out


def _recount(a: np.ndarray, b: np.ndarray) -> dict:
    d = a - b
    wins, losses = int((d > 1e-6).sum()), int((d < -1e-6).sum())
    ties = len(d) - wins - losses
    return {"wins": wins, "ties": ties, "losses": losses, "n": len(d), "win_rate": (wins + ties / 2) / len(d)}


def test_eval_json_is_the_common_format_and_recomputes(world, evaluated):
    result, _, out = evaluated
    saved = json.loads((out / "eval.json").read_text())
    assert (out / "per_user.md").is_file() and (out / "samples.png").is_file()
    assert saved["win_rate"] == result["win_rate"] and saved["per_user"] == result["per_user"]
    wr = saved["win_rate"]
    assert (
        wr["n"] == 4 == saved["num_prompts"] == saved["num_images_per_side"]
    )  # 2 users x 2 captions x 1 seed
    assert wr["wins"] + wr["ties"] + wr["losses"] == wr["n"]
    assert wr["win_rate"] == pytest.approx((wr["wins"] + wr["ties"] / 2) / wr["n"])
    assert (
        wr["method"] == "wilson"
        and wr["confidence"] == 0.95
        and wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"]
    )
    assert saved["primary"] == "user_score" and saved["k"] == 4 and saved["user_ids"] == world["users"]
    for aspect in ("user_score", "overall", "prompt_following", "aesthetic"):
        assert set(saved["aspects"][aspect]) == {"base", "aligned"}

    rows = saved["images"]
    assert [(r["user_id"], r["seed"]) for r in rows] == [(u, 0) for u in world["users"] for _ in range(2)]
    pers = np.array([r["user_score"]["personalized"] for r in rows])
    base = np.array([r["user_score"]["base"] for r in rows])
    assert saved["aspects"]["user_score"]["aligned"]["mean"] == pytest.approx(pers.mean())
    rates = []
    for p in saved["per_user"]:
        mine = [i for i, r in enumerate(rows) if r["user_id"] == p["user_id"]]
        expect = _recount(pers[mine], base[mine])
        assert {k: p[k] for k in expect} == pytest.approx(expect)
        assert p["mean_user_score"]["base"] == pytest.approx(base[mine].mean())
        rates.append(p["win_rate"])
    assert {k: wr[k] for k in ("wins", "ties", "losses", "n")} == {
        k: v for k, v in _recount(pers, base).items() if k != "win_rate"
    }
    assert saved["mean_user_win_rate"] == pytest.approx(np.mean(rates))
    assert (saved["min_user_win_rate"], saved["max_user_win_rate"]) == (min(rates), max(rates))
    # the against run is the base exactly: vs against = vs base, and against vs base is all ties
    va = saved["vs_against"]
    assert va["win_rate"] == wr and va["against_vs_base"]["ties"] == 4
    assert [r["user_score"]["against"] for r in rows] == [r["user_score"]["base"] for r in rows]


def test_base_side_is_the_stock_pipeline_scored_by_each_user(world, evaluated, random_pipe):
    result, cache, _ = evaluated
    rows = result["images"]
    stock = generate(stock_pipeline(), [r["prompt"] for r in rows], [r["seed"] for r in rows], **GEN)
    cached = np.stack([cache[(r["prompt"], r["seed"], STEPS, 5.0)] for r in rows])
    np.testing.assert_array_equal(cached, stock)
    users = personal.population_users(world["data"])
    for r, image in zip(rows, stock, strict=True):
        assert r["user_score"]["base"] == pytest.approx(
            users[r["user_id"]].score(image[None], [r["prompt"]])[0]
        )
    # the personalised side really is another model: the LoRA and the user tokens change the images
    pipe, encoder = random_pipe
    tokens = personal.user_tokens(encoder, world["data"], rows[0]["user_id"], 4)
    mine = personal.generate_personalized(pipe, [rows[0]["prompt"]], [0], tokens, **GEN)
    assert (mine != stock[:1]).any()


def test_zero_lora_and_zero_user_branch_give_the_base_exactly(world, tmp_path):
    pipe, encoder = personal.load_personalized(SANDBOX_PIPELINE, world["runs"]["zero"])
    uid = world["users"][0]
    prompts = load_test_prompts(world["data"])[uid][:2]
    tokens = personal.user_tokens(encoder, world["data"], uid, 4)
    assert tokens.abs().sum() > 0  # the tokens are there; only the branch's values are zero
    mine = personal.generate_personalized(pipe, prompts, [0, 0], tokens, **GEN)
    with personal.base_context(pipe):
        base = generate(pipe, prompts, [0, 0], **GEN)
    np.testing.assert_array_equal(mine, base)
    result = personal.evaluate_personal(
        pipe, encoder, world["data"], user_ids=world["users"], num_prompts=2, output_dir=tmp_path,
        filename="zero.json", **GEN,
    )  # fmt: skip
    assert (tmp_path / "zero.json").is_file()
    assert (
        result["win_rate"]["win_rate"] == 0.5 and result["win_rate"]["ties"] == result["win_rate"]["n"] == 4
    )
    assert all(p["win_rate"] == 0.5 and p["ties"] == p["n"] for p in result["per_user"])
    assert all(r["user_score"]["personalized"] == r["user_score"]["base"] for r in result["images"])
    assert (
        result["vs_branch_off"]["win_rate"]["ties"] == 4
    )  # no values in the branch: the tokens change nothing


def test_branch_off_side_is_the_lora_without_tokens(world, evaluated, random_pipe):
    """Personalised against the same run with its user branch off (LoRA on, no tokens): the comparison that says
    whether the tokens, rather than the LoRA, carry the user's taste. Its images are the pipeline's own without
    tokens, each scored by the row's user, and its counts recompute from the per-image scores."""
    result, _, _ = evaluated
    rows = result["images"]
    pipe, _ = random_pipe
    off = generate(pipe, [r["prompt"] for r in rows], [r["seed"] for r in rows], **GEN)
    users = personal.population_users(world["data"])
    for r, image in zip(rows, off, strict=True):
        assert r["user_score"]["branch_off"] == pytest.approx(
            users[r["user_id"]].score(image[None], [r["prompt"]])[0]
        )
    pers = np.array([r["user_score"]["personalized"] for r in rows])
    branch_off = np.array([r["user_score"]["branch_off"] for r in rows])
    base = np.array([r["user_score"]["base"] for r in rows])
    vo = result["vs_branch_off"]
    assert {k: vo["win_rate"][k] for k in ("wins", "ties", "losses", "n")} == {
        k: v for k, v in _recount(pers, branch_off).items() if k != "win_rate"
    }
    assert vo["branch_off_vs_base"]["win_rate"] == pytest.approx(_recount(branch_off, base)["win_rate"])
    assert (branch_off != pers).any() and (
        branch_off != base
    ).any()  # a third side: not the tokens, not the base
    assert "branch off" in personal.format_personal(result)


class OneHotEncoder:
    """Knows which user gave which context pairs: the embedding of any k of a user's pairs, in order, is the user's
    one-hot, so retrieval must be perfect."""

    def __init__(self, data_dir: Path, user_ids: list[int], k: int = 4) -> None:
        self.owner: dict[tuple, int] = {}
        for j, uid in enumerate(user_ids):
            pairs = [(p["caption"], p["preferred"], p["rejected"]) for p in load_context_pairs(data_dir, uid)]
            for start in range(0, len(pairs) - k + 1):
                self.owner[tuple(pairs[start : start + k])] = j
        self.n = len(user_ids)

    def embed(self, pairs):
        return torch.nn.functional.one_hot(torch.tensor(self.owner[tuple(pairs)]), self.n).float()[None]


def test_user_retrieval(world, random_pipe):
    ids = personal.unseen_user_ids(world["data"])[:3]
    real = personal.user_retrieval(random_pipe[1], world["data"], user_ids=ids, k=4)
    assert 0.0 <= real["top1_accuracy"] <= 1.0 and real["chance"] == pytest.approx(1 / 3)
    assert real["num_users"] == 3 and set(real["nearest"]) == {str(u) for u in ids}
    ids = personal.unseen_user_ids(world["data"])[:6]
    known = personal.user_retrieval(OneHotEncoder(world["data"], ids), world["data"], user_ids=ids, k=4)
    assert known["top1_accuracy"] == 1.0 and known["top1_accuracy_reverse"] == 1.0
    assert known["same_user_cosine"] == pytest.approx(1.0)
    assert known["different_user_cosine"] == pytest.approx(0.0) and known["chance"] == pytest.approx(1 / 6)


def test_reverse_retrieval_matches_free_context_among_same_pair_answers(monkeypatch):
    """Tokens = what the images show (large, per pair set) + who chose (small, the user's one-hot): questionnaire
    tokens share their content, context tokens do not. Forward (questionnaire -> context candidates), the content of
    the candidates decides and every query lands on one user; the reverse compares candidates that read the same
    pairs, so only the choices decide and every user is found."""
    ids, n = [11, 12, 13, 14, 15], 5
    g = torch.Generator().manual_seed(0)
    common, own = torch.randn(16, generator=g), torch.randn(n, 16, generator=g)

    def tokens(encoder, data_dir, uid, k, start=0, split="context"):
        j = ids.index(uid)
        content = common if split == "questionnaire" else own[j]
        return torch.cat([0.1 * torch.nn.functional.one_hot(torch.tensor(j), n).float(), 10 * content])[None]

    monkeypatch.setattr(personal, "user_tokens", tokens)
    monkeypatch.setattr(personal, "resolve_ppd_dir", lambda d: d)
    r = personal.user_retrieval(None, "unused", user_ids=ids, k=4, splits=("questionnaire", "context"))
    assert r["top1_accuracy_reverse"] == 1.0 and r["top1_accuracy"] == pytest.approx(1 / n)
    assert len(set(r["nearest"].values())) == 1  # the forward direction picks one candidate for everybody


def test_interpolation_endpoints_are_the_users_own(world, random_pipe, tmp_path):
    pipe, encoder = random_pipe
    a, b = world["users"]
    users = personal.population_users(world["data"])
    ta, tb = (personal.user_tokens(encoder, world["data"], u, 4) for u in (a, b))
    prompts = load_test_prompts(world["data"])[a][:2]
    curve = pi.interpolation_curve(pipe, ta, tb, users[a], users[b], prompts, alphas=(0, 0.5, 1), **GEN)
    assert [p["alpha"] for p in curve["points"]] == [0.0, 0.5, 1.0]
    assert isinstance(curve["monotone_a"], bool) and isinstance(curve["monotone_b"], bool)
    for point, tokens in ((curve["points"][0], ta), (curve["points"][-1], tb)):
        images = personal.generate_personalized(pipe, prompts, [0, 0], tokens, **GEN)
        assert point["score_a"] == pytest.approx(users[a].score(images, prompts).mean())
        assert point["score_b"] == pytest.approx(users[b].score(images, prompts).mean())
    assert pi.plot_interpolation(curve, tmp_path / "curve.png").stat().st_size > 0


def test_missing_run_files_are_named(world, tmp_path):
    with pytest.raises(ConfigError, match="user_attention.safetensors"):
        personal.load_personalized(
            SANDBOX_PIPELINE, world["runs"]["zero"] / "lora"
        )  # a generic run's LoRA only
    with pytest.raises(ConfigError, match="pytorch_lora_weights"):
        personal.load_personalized(SANDBOX_PIPELINE, tmp_path)


def test_script_end_to_end(world, tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "eval_ppd", Path(__file__).parents[1] / "scripts/eval_ppd.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    a, b = world["users"]
    # the study pairs users who answered the questionnaire the other way; this run reads the paper's context
    # pairs, so the pair is given (the rule itself: test_opposite_answer_pairs_...)
    monkeypatch.setattr(pi, "opposite_answer_pairs", lambda *args, **kw: [(a, b)])
    summary = module.main(
        ["--run_dir", str(world["runs"]["random"]), "--model", str(SANDBOX_PIPELINE), "--data", str(world["data"]),
         "--num_users", "2", "--steps", "4", "--num-prompts", "2", "--against", str(world["runs"]["zero"]),
         "--interpolate", str(a), str(b), "--interpolate_pairs", "1", "--output_dir", str(tmp_path),
         "--device", "cpu"]
    )  # fmt: skip
    for name in (
        "eval.json",
        "per_user.md",
        "samples.png",
        "retrieval.json",
        "interpolation.png",
        "interpolation_study.json",
        "interpolation_study.png",
        "summary.json",
    ):
        assert (tmp_path / name).is_file(), name
    assert summary["win_rate"]["n"] == 4 and summary["vs_against"] is not None
    assert summary["retrieval"]["num_users"] == 2 and len(summary["interpolation"]["points"]) == 5
    study = summary["interpolation_study"]
    assert study["num_pairs"] == 1 and study["slope_a"]["n"] == 1 and "curves" not in study
    # one pair: no interval, so no trend is claimed
    assert study["trend_a"] is False and study["trend_b"] is False
    text = capsys.readouterr().out
    assert "win rate" in text and "user retrieval" in text and "interpolation" in text
    assert "per-pair slope per unit alpha" in text


def test_questionnaire_context_split(world, random_pipe, tmp_path):
    """A run trained with ``user_context_split: questionnaire`` is evaluated on the unseen users' answers: the split
    is read from the run's config.json; tokens are the encoder's embedding of those 4 answers; retrieval can compare
    them with the random context pairs; a split without enough rows is a one-line error naming it."""
    from diffalign.data.ppd_questionnaire import QUESTIONNAIRE_SPLIT

    assert (
        personal.run_context_split(world["runs"]["random"]) == "context"
    )  # no config.json: the paper's pairs
    (tmp_path / "config.json").write_text(json.dumps({"user_context_split": QUESTIONNAIRE_SPLIT}))
    assert personal.run_context_split(tmp_path) == QUESTIONNAIRE_SPLIT
    # the branch's scale is read the same way (eval_ppd.py's default): the trained one, else 1.0
    assert (
        personal.run_user_scale(world["runs"]["random"]) == 1.0 and personal.run_user_scale(tmp_path) == 1.0
    )
    (tmp_path / "config.json").write_text(json.dumps({"user_scale": 3.0}))
    assert personal.run_user_scale(tmp_path) == 3.0
    encoder, uid = random_pipe[1], world["users"][0]
    pairs = load_context_pairs(world["data"], uid, QUESTIONNAIRE_SPLIT)
    assert len(pairs) == 4
    tokens = personal.user_tokens(encoder, world["data"], uid, 4, split=QUESTIONNAIRE_SPLIT)
    with torch.no_grad():
        want = encoder.embed([(p["caption"], p["preferred"], p["rejected"]) for p in pairs])
    torch.testing.assert_close(tokens, want)
    assert not torch.allclose(tokens, personal.user_tokens(encoder, world["data"], uid, 4))
    with pytest.raises(ConfigError, match="'questionnaire' split"):
        personal.user_tokens(encoder, world["data"], uid, 5, split=QUESTIONNAIRE_SPLIT)
    ids = personal.unseen_user_ids(world["data"])[:3]
    both = personal.user_retrieval(
        encoder, world["data"], user_ids=ids, k=4, splits=(QUESTIONNAIRE_SPLIT, "context")
    )
    assert both["splits"] == [QUESTIONNAIRE_SPLIT, "context"] and both["num_users"] == 3


def test_the_evaluation_reads_the_users_of_the_data_the_run_trained_on(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert personal.run_dataset(run) == "sandbox-ppd"  # no config: the default build
    build = tmp_path / "build"
    build.mkdir()
    (build / "users.json").write_text("{}")
    for dataset, expected in (("sandbox-ppd-6u", "sandbox-ppd-6u"), (str(build), str(build)),
                              ("sandbox", "sandbox-ppd"), (str(tmp_path / "absent"), "sandbox-ppd")):  # fmt: skip
        (run / "config.json").write_text(json.dumps({"dataset": dataset}))
        assert personal.run_dataset(run) == expected, dataset


def test_opposite_answer_pairs_answered_every_question_the_other_way(world):
    from diffalign.data.ppd_questionnaire import QUESTIONNAIRE_SPLIT

    ids = personal.unseen_user_ids(world["data"])
    pairs = pi.opposite_answer_pairs(world["data"], ids)
    assert pairs and len(set(pairs)) == len(pairs) and all(a < b for a, b in pairs)
    assert pairs == pi.opposite_answer_pairs(world["data"], ids)  # seeded order
    assert sorted(pairs) != pairs or len(pairs) < 3  # not just the id order
    answer = {
        u: [r["preferred"] for r in load_context_pairs(world["data"], u, QUESTIONNAIRE_SPLIT)] for u in ids
    }
    opposite = {
        (a, b) for a in ids for b in ids if a < b and all(x != y for x, y in zip(answer[a], answer[b]))
    }
    assert set(pairs) == opposite  # every such pair, and only those (4 questions, two images each)
    with pytest.raises(ConfigError, match="use the questionnaire split"):
        pi.opposite_answer_pairs(world["data"], ids, split="context")  # each user's own pairs


def test_interpolation_study_averages_each_users_change_from_alpha_zero(world, random_pipe, monkeypatch):
    pipe, encoder = random_pipe
    pairs = pi.opposite_answer_pairs(world["data"], personal.unseen_user_ids(world["data"]))[:2]
    fake = {  # score_a, score_b per alpha, per pair
        pairs[0]: ([1.0, 0.9, 0.7], [0.0, 0.1, 0.2]),
        pairs[1]: ([2.0, 2.05, 1.9], [1.0, 0.8, 1.2]),
    }

    def curve(pipe, ta, tb, ua, ub, prompts, alphas, **kw):
        sa, sb = fake[(ua.user_id, ub.user_id)]
        assert len(prompts) >= 1 and tuple(alphas) == (0.0, 0.5, 1.0)
        pts = [{"alpha": x, "score_a": a, "score_b": b} for x, a, b in zip(alphas, sa, sb)]
        return {"points": pts, "monotone_a": sa == sorted(sa, reverse=True), "monotone_b": sb == sorted(sb)}

    monkeypatch.setattr(pi, "interpolation_curve", curve)
    got = pi.interpolation_study(pipe, encoder, world["data"], pairs, alphas=(0.0, 0.5, 1.0))
    # by hand: a: (0, -0.1, -0.3) and (0, +0.05, -0.1) -> (0, -0.025, -0.2); b: (0, 0.1, 0.2) and (0, -0.2, 0.2)
    assert got["delta_a"] == pytest.approx([0.0, -0.025, -0.2]) and got["delta_b"] == pytest.approx(
        [0.0, -0.05, 0.2]
    )
    assert got["monotone_a"] is True and got["monotone_b"] is False
    assert (got["pairs_monotone_a"], got["pairs_monotone_b"], got["num_pairs"]) == (1, 1, 2)
    # per-pair slopes by hand (3 equally spaced alphas: (last - first) / 1): a -0.3 and -0.1, b 0.2 and 0.2;
    # a's interval: -0.2 +- t(0.975, 1) 12.706 * 0.1414 / sqrt(2) = -0.2 +- 1.2706 (contains 0: no trend);
    # b's has zero width
    assert got["slope_a"]["mean"] == pytest.approx(-0.2)
    assert got["slope_a"]["ci_high"] == pytest.approx(1.0706, abs=1e-3)
    assert got["slope_b"]["mean"] == pytest.approx(0.2) and got["slope_b"]["ci_low"] == pytest.approx(0.2)
    assert got["trend_a"] is False and got["trend_b"] is True
    with pytest.raises(ConfigError, match="at least one pair"):
        pi.interpolation_study(pipe, encoder, world["data"], [])
