"""Preference-data builder: Bradley–Terry labelling maths, the plan (splits, prompt disjointness), and end-to-end
builds with a tiny randomly initialised StableDiffusionPipeline (images are noise; the code path is the real one).

Hand-computed values used below (σ(x) = 1 / (1 + e^−x)):

    σ(0.1 / 0.05)  = σ(2)     = 0.8807970779778823
    σ(−0.1 / 0.05) = σ(−2)    = 0.11920292202211755
    σ(2^−6 / 0.05) = σ(0.3125) = 0.5774953651858118
    σ(0.25 / 0.05) = σ(5)     = 0.9933071490757153
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffalign.data import build_plan  # noqa: E402
from diffalign.data import builder as B  # noqa: E402
from diffalign.data.schema import PICKAPIC_COLUMNS, PICKAPIC_SCHEMA, PICKAPIC_SPLITS, split_path  # noqa: E402
from diffalign.sandbox import SANDBOX_PIPELINE, SANDBOX_UNET_EARLY  # noqa: E402
from diffalign.sandbox.captions import parse_caption  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; on a busy machine two threads fight (measured: 1.1 s vs 20 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# Bradley–Terry maths


def test_preference_probability_hand_values():
    p = B.preference_probability(np.array([0.1, -0.1, 0.0, 2**-6, 0.25]), 0.05)
    np.testing.assert_allclose(
        p, [0.8807970779778823, 0.11920292202211755, 0.5, 0.5774953651858118, 0.9933071490757153], rtol=1e-12
    )
    # T = 0 is the limit: a step function with 1/2 at 0
    np.testing.assert_array_equal(
        B.preference_probability(np.array([1e-9, -1e-9, 0.0]), 0.0), [1.0, 0.0, 0.5]
    )
    # no overflow for huge |Δ/T|
    np.testing.assert_array_equal(B.preference_probability(np.array([1e6, -1e6]), 1e-6), [1.0, 0.0])


def test_labels_ties_below_margin_and_draws():
    # Δ = 0, 2^-8, 2^-6, 0.25 (exact in binary); margin 2^-6 is strict: Δ = 2^-6 is NOT a tie
    s0 = np.array([0.5, 0.5, 0.5, 0.5, 0.25])
    s1 = np.array([0.5, 0.5 - 2**-8, 0.5 - 2**-6, 0.25, 0.5])
    draws = np.array([0.1, 0.1, 0.9, 0.1, 0.1])
    l0, l1 = B.bradley_terry_labels(s0, s1, draws, temperature=0.05, tie_margin=2**-6)
    # pair 2: P = 0.5775 and u = 0.9 -> image 1 wins; pair 3: P = 0.9933, u = 0.1 -> image 0 wins;
    # pair 4: Δ = -0.25, P = 0.0067, u = 0.1 -> image 1 wins
    np.testing.assert_array_equal(l0, [0.5, 0.5, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(l1, [0.5, 0.5, 1.0, 0.0, 1.0])
    assert l0.dtype == np.float64 and l1.dtype == np.float64


def test_zero_temperature_better_image_always_wins():
    rng = np.random.default_rng(3)
    s0, s1, u = rng.random(2000), rng.random(2000), rng.random(2000)
    l0, l1 = B.bradley_terry_labels(s0, s1, u, temperature=0.0, tie_margin=1e-3)
    tie = np.abs(s0 - s1) < 1e-3
    assert tie.any() and (~tie).sum() > 1900
    np.testing.assert_array_equal(l0[~tie], (s0 > s1)[~tie].astype(float))
    np.testing.assert_array_equal(l0[tie], 0.5)
    np.testing.assert_array_equal(l0 + l1, 1.0)


@pytest.mark.parametrize("delta, expected", [(0.1, 0.8807970779778823), (-0.1, 0.11920292202211755)])
def test_win_rate_matches_sigmoid_statistically(delta, expected):
    n = 40_000
    u = np.random.default_rng(0).random(n)
    l0, _ = B.bradley_terry_labels(
        np.full(n, 0.5 + delta), np.full(n, 0.5), u, temperature=0.05, tie_margin=0.01
    )
    # binomial sd = sqrt(p (1 - p) / n) <= 0.0017; 0.008 is > 4.5 sd
    assert abs(l0.mean() - expected) < 0.008


# ---------------------------------------------------------------------------------------------------------------
# Configuration and planning (pure numpy)


def test_parse_generator_and_pairs_per_prompt():
    assert B.parse_generator_spec("a:5") == B.GeneratorSpec("a", 5.0, None)
    assert B.parse_generator_spec("early:2.5:/x/unet") == B.GeneratorSpec("early", 2.5, "/x/unet")
    with pytest.raises(ValueError, match="NAME:GUIDANCE"):
        B.parse_generator_spec("nocolon")
    with pytest.raises(ValueError, match="not a number"):
        B.parse_generator_spec("a:five")
    assert B.parse_pairs_per_prompt("1-4") == (1, 4)
    assert B.parse_pairs_per_prompt("3") == (3, 3)
    assert B.parse_pairs_per_prompt(2) == (2, 2)
    with pytest.raises(ValueError):
        B.parse_pairs_per_prompt("4-1")
    with pytest.raises(ValueError, match="labeller"):
        B.BuilderConfig(labeller="nobody")


def _plan(**kw):
    cfg = B.BuilderConfig(
        **{
            "num_train_prompts": 300,
            "num_validation_prompts": 40,
            "num_test_prompts": 40,
            "num_unique": 50,
            **kw,
        }
    )
    return cfg, *B.plan_pairs(cfg, ["m-a", "m-b", "m-c"], [1, 2, 3, 4])


def test_plan_splits_are_prompt_disjoint_and_unique_splits_have_one_pair_per_prompt():
    cfg, plans, info = _plan()
    specs = {s: {p.spec for p in plans[s]} for s in PICKAPIC_SPLITS}
    captions = {s: {p.caption for p in plans[s]} for s in PICKAPIC_SPLITS}
    for i, a in enumerate(PICKAPIC_SPLITS):
        for b in PICKAPIC_SPLITS[i + 1 :]:
            assert not specs[a] & specs[b], (a, b)
            assert not captions[a] & captions[b], (a, b)
    for s in ("validation_unique", "test_unique"):
        assert len(plans[s]) == 50 and len(captions[s]) == 50 and len(specs[s]) == 50
    for s in ("train", "validation", "test"):
        per_prompt = Counter(p.prompt_index for p in plans[s])
        assert set(per_prompt.values()) <= {1, 2, 3, 4} and len(set(per_prompt.values())) > 1
    assert len(captions["validation"]) == 40 and len(specs["validation"]) == 40
    # captions are in the sandbox grammar and match their spec
    for p in plans["train"][:50]:
        assert parse_caption(p.caption) == p.spec
    ids = [p.ranking_id for s in PICKAPIC_SPLITS for p in plans[s]]
    assert ids == list(range(1, len(ids) + 1))
    assert info == {"repeated_captions": 0}
    assert {p.user_id for p in plans["train"]} == {1, 2, 3, 4}
    assert {p.model_0 for p in plans["train"]} == {"m-a", "m-b", "m-c"}


def test_plan_is_deterministic_and_prompts_do_not_depend_on_generators():
    _, a, _ = _plan(seed=7)
    _, b, _ = _plan(seed=7)
    assert a == b
    _, c, _ = _plan(seed=8)
    assert [p.caption for p in c["train"]] != [p.caption for p in a["train"]]
    cfg = B.BuilderConfig(
        num_train_prompts=300, num_validation_prompts=40, num_test_prompts=40, num_unique=50, seed=7
    )
    d, _ = B.plan_pairs(cfg, ["only-one"], [9])
    prompts = lambda plans, s: list(dict.fromkeys(p.caption for p in plans[s]))  # noqa: E731  (distinct, in order)
    for s in PICKAPIC_SPLITS:
        assert prompts(d, s) == prompts(a, s)
    assert {p.user_id for p in d["train"]} == {9}


def test_train_captions_repeat_only_when_the_world_runs_out(monkeypatch):
    rng = np.random.default_rng(0)
    prompts, repeats = B.draw_train_prompts(rng, 200, held_out=set(), max_redraws=20)
    assert repeats == 0 and len({c for _, c in prompts}) == 200
    # a world with a single caption: every prompt after the first is a counted repeat
    spec = parse_caption("a red circle")
    monkeypatch.setattr(build_plan, "sample_spec", lambda rng: spec)  # the plan draws captions
    monkeypatch.setattr(build_plan, "PREFIXES", ("",))
    prompts, repeats = B.draw_train_prompts(np.random.default_rng(0), 5, held_out=set(), max_redraws=3)
    assert repeats == 4 and {c for _, c in prompts} == {"a red circle"}
    with pytest.raises(ValueError, match="distinct caption specs"):
        B.draw_held_out_prompts(np.random.default_rng(0), {"validation_unique": 2})


def test_image_uid_and_jpeg_roundtrip():
    u = B.image_uid(0, 1, 0)
    assert u == B.image_uid(0, 1, 0) and u != B.image_uid(0, 1, 1) and u != B.image_uid(1, 1, 0)
    assert len(u) == 36 and u[14] == "4"  # UUID version 4 layout
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[8:24, 8:24] = (220, 40, 40)
    data = B.encode_jpeg(img, 95)
    assert data[:2] == b"\xff\xd8"
    dec = B.decode_jpeg(data)
    assert dec.shape == (32, 32, 3) and np.abs(dec.astype(int) - img).max() <= 12


# ---------------------------------------------------------------------------------------------------------------
# Tiny random pipeline


def tiny_unet(seed: int):
    """A random UNet on 8x8x4 latents (block_out_channels (8, 16)), cross-attention width 16."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def tiny_components(seed: int = 0):
    """A tiny random SD1.x pipeline's components: 32x32 images, VAE with 3 blocks (x4 down), 8x8x4 latents, the
    sandbox CLIP tokenizer (vocabulary 49,408) and a 1-layer text encoder of width 16."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.sandbox.tokenizer import build_clip_tokenizer

    unet = tiny_unet(seed)
    vae = AutoencoderKL(
        block_out_channels=(4, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_clip_tokenizer(),
            "scheduler": scheduler}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny pipeline (UNet A) plus a second UNet (B, other init) at ``<dir>/unet-b``."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("tiny-sd")
    c = tiny_components(0)
    pipe = StableDiffusionPipeline(
        **c, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(root / "pipeline")
    tiny_unet(1).save_pretrained(root / "unet-b")
    return root


class MeanBrightness:
    """A deterministic stand-in labeller: mean pixel value / 255 (differs between garbage images)."""

    name = "mean-brightness"

    def score(self, images, prompts, user_ids):
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


TINY_CFG = dict(num_inference_steps=2, batch_size=16, num_train_prompts=6, num_unique=3,
                num_validation_prompts=2, num_test_prompts=2, pairs_per_prompt=(1, 3), tie_margin=0.002)  # fmt: skip


def _generators(tiny_dir: Path, cfg):
    specs = [B.GeneratorSpec("tiny-a", 5.0), B.GeneratorSpec("tiny-b", 2.0, str(tiny_dir / "unet-b"))]
    return B.load_generators(str(tiny_dir / "pipeline"), specs, cfg)


@pytest.fixture(scope="module")
def tiny_generators(tiny_dir):
    return _generators(tiny_dir, B.BuilderConfig.quick(**TINY_CFG))


@pytest.fixture(scope="module")
def tiny_build(tiny_generators, tmp_path_factory):
    cfg = B.BuilderConfig.quick(**TINY_CFG)
    out = tmp_path_factory.mktemp("tiny-data")
    report = B.build_preference_data(cfg, tiny_generators, MeanBrightness(), out, progress=False)
    return cfg, out, report


def test_written_schema_is_exactly_pickapic(tiny_build):
    _, out, _ = tiny_build
    for split in PICKAPIC_SPLITS:
        schema = pq.read_schema(split_path(out, split))
        assert [(f.name, f.type) for f in schema] == list(PICKAPIC_COLUMNS)
        assert schema.remove_metadata().equals(PICKAPIC_SCHEMA)


def test_load_dataset_gives_five_splits(tiny_build):
    import datasets

    _, out, report = tiny_build
    ds = datasets.load_dataset(str(out))
    assert sorted(ds) == sorted(PICKAPIC_SPLITS)
    for split in PICKAPIC_SPLITS:
        assert ds[split].num_rows == report["splits"][split]["pairs"] > 0
    assert ds["train"].column_names == [name for name, _ in PICKAPIC_COLUMNS]


def test_rows_are_consistent(tiny_build):
    cfg, out, report = tiny_build
    tables = {s: pq.read_table(split_path(out, s)).to_pylist() for s in PICKAPIC_SPLITS}
    all_rows = [r for rows in tables.values() for r in rows]
    assert sorted(r["ranking_id"] for r in all_rows) == list(range(1, len(all_rows) + 1))
    uids = [r[f"image_{k}_uid"] for r in all_rows for k in (0, 1)]
    assert len(set(uids)) == len(uids)
    train_captions = {r["caption"] for r in tables["train"]}
    for split, rows in tables.items():
        counts = Counter(r["caption"] for r in rows)
        for r in rows:
            assert r["has_label"] is True and r["are_different"] is True
            assert r["num_example_per_prompt"] == counts[r["caption"]]
            assert r["model_0"] in {"tiny-a", "tiny-b"} and r["model_1"] in {"tiny-a", "tiny-b"}
            assert r["user_id"] in {1, 2, 3, 4}
            assert r["image_0_url"] == f"sandbox://{r['image_0_uid']}.jpg"
            assert (r["label_0"], r["label_1"]) in {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
            expected_best = {1.0: r["image_0_uid"], 0.0: r["image_1_uid"], 0.5: ""}[r["label_0"]]
            assert r["best_image_uid"] == expected_best
            assert r["created_at"] == B.BASE_CREATED_AT + r["ranking_id"] * B.CREATED_AT_STEP
            for k in (0, 1):
                im = Image.open(io.BytesIO(r[f"jpg_{k}"]))
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
        if split.endswith("_unique"):
            assert len(rows) == cfg.num_unique and set(counts.values()) == {1}
            assert not {r["caption"] for r in rows} & train_captions
    assert not {r["caption"] for r in tables["validation_unique"]} & {
        r["caption"] for r in tables["test_unique"]
    }
    # the labels follow the labeller: with T = 0.05 and brightness gaps, most decisive pairs go to the brighter image
    on_disk = json.loads((out / "build_report.json").read_text())
    assert on_disk["pairs"] == len(all_rows) == report["pairs"]
    assert on_disk["labeller"] == "mean-brightness" and on_disk["config"]["num_inference_steps"] == 2
    assert set(on_disk["models"]) == {"tiny-a", "tiny-b"}


def test_scores_of_stored_jpegs_reproduce_labels(tiny_build):
    """Labels were drawn from the scores of the *decoded* JPEGs: recompute them from the files."""
    cfg, out, _ = tiny_build
    rows = pq.read_table(split_path(out, "train")).to_pylist()
    plans, _ = B.plan_pairs(cfg, ["tiny-a", "tiny-b"], [1, 2, 3, 4])
    dec = lambda b: B.decode_jpeg(b)[None]  # noqa: E731
    s0 = np.array([MeanBrightness().score(dec(r["jpg_0"]), None, None)[0] for r in rows])
    s1 = np.array([MeanBrightness().score(dec(r["jpg_1"]), None, None)[0] for r in rows])
    draws = np.array([p.draw for p in plans["train"]])
    l0, _ = B.bradley_terry_labels(s0, s1, draws, cfg.temperature, cfg.tie_margin)
    np.testing.assert_array_equal(l0, [r["label_0"] for r in rows])


def test_build_is_deterministic(tiny_dir, tiny_build, tmp_path):
    """A fresh load of the models and a fresh build give identical tables (every column, bytes included)."""
    cfg, out, _ = tiny_build
    B.build_preference_data(cfg, _generators(tiny_dir, cfg), MeanBrightness(), tmp_path, progress=False)
    for split in PICKAPIC_SPLITS:
        assert pq.read_table(split_path(tmp_path, split)).equals(pq.read_table(split_path(out, split)))


def test_sampling_does_not_depend_on_batching(tiny_generators):
    gens = tiny_generators
    _, plans, _ = _plan(num_train_prompts=4, num_validation_prompts=0, num_test_prompts=0, num_unique=0)
    plans = [
        B.PairPlan(**{**p.__dict__, "model_0": "tiny-a", "model_1": "tiny-b"}) for p in plans["train"][:5]
    ]
    a0, a1 = B.sample_pair_images(plans, gens, batch_size=3)
    b0, b1 = B.sample_pair_images(plans, gens, batch_size=1)
    for x, y in zip(a0 + a1, b0 + b1, strict=True):
        assert x.shape == (32, 32, 3) and x.dtype == np.uint8
        assert np.abs(x.astype(int) - y).max() <= 1  # per-row generators; batch size only changes rounding
    assert not np.array_equal(a0[0], a1[0])


def test_foreign_parquet_files_are_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00002.parquet").write_bytes(b"")
    with pytest.raises(FileExistsError, match="train-00000-of-00002"):
        B.check_output_dir(tmp_path)


def test_nonfinite_scores_are_an_error():
    with pytest.raises(ValueError, match="non-finite.*'a red circle'"):
        B.check_scores(np.array([0.1, np.nan]), 2, MeanBrightness(), ["a blue square", "a red circle"])


# ---------------------------------------------------------------------------------------------------------------
# The script


def _run_script(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_preference_data", REPO / "scripts" / "build_preference_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


@pytest.mark.parametrize(
    "labeller",
    ["judge", "users"],
)
def test_script_on_tiny_pipeline(tiny_dir, tmp_path, labeller, capsys):
    out = tmp_path / "data"
    report = _run_script(
        ["--model", str(tiny_dir / "pipeline"), "--generator", "tiny-a:5",
         "--generator", f"tiny-b:2:{tiny_dir / 'unet-b'}", "--labeller", labeller, "--quick", "--steps", "2",
         "--num-train-prompts", "2", "--num-unique", "2", "--num-validation-prompts", "1", "--num-test-prompts", "1",
         "--output-dir", str(out), "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "validation_unique" in printed and "win rate" in printed and str(out) in printed
    assert report["labeller"] == ("judge/overall" if labeller == "judge" else "users")
    assert report["splits"]["validation_unique"]["pairs"] == 2
    assert report["generators"] == ["tiny-a", "tiny-b"]
    assert json.loads((out / "build_report.json").read_text())["command"].startswith("python scripts/")
    for split in PICKAPIC_SPLITS:
        assert split_path(out, split).is_file()


def test_script_quick_on_real_sandbox(tmp_path):
    # The shipped models are part of the repository: their absence is a failure, not a skip.
    assert (SANDBOX_PIPELINE / "model_index.json").is_file(), f"{SANDBOX_PIPELINE} missing from the checkout"
    assert (SANDBOX_UNET_EARLY / "config.json").is_file(), f"{SANDBOX_UNET_EARLY} missing from the checkout"
    report = _run_script(["--quick", "--output-dir", str(tmp_path), "--no-progress", "--device", "cpu"])
    assert report["generators"] == ["sandbox-base", "sandbox-base-cfg2", "sandbox-early"]
    assert report["labeller"] == "users"
    assert 20 <= report["pairs"] <= 60
    assert report["splits"]["train"]["are_different_share"] == 1.0
