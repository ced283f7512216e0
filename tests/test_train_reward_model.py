"""The multi-aspect (VP-Score-style) reward-model trainer: metrics by hand, judge labels, prompt splits, the
heads-only learning test, backbone-by-reference checkpoints, and one real command-line run."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.rewards.aspect_pairs import (
    LABEL_KEYS,
    AspectPairs,
    judge_label_pairs,
    load_pickapic_images,
    prompt_key,
    render_pair_images,
    split_by_prompt,
)
from diffalign.rewards.multi_aspect import MultiAspectConfig, MultiAspectRewardModel
from diffalign.rewards.pair_metrics import accuracy_table, pair_accuracy
from diffalign.rewards.reward_model_config import RenderConfig, RewardTrainConfig
from diffalign.training.reward_model import (
    PairTensors,
    fit,
    fit_overall_weights,
    fold_standardization,
    joint_features,
    label_tensors,
    multi_aspect_loss,
    pixel_values,
    score_pairs,
    train_reward_model,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random transformers CLIPModel (32x32 images, projection 32) + processor with the real tokenizer."""
    from tiny_models import build_tiny_hf_clip

    return build_tiny_hf_clip(tmp_path_factory.mktemp("tinyclip"), vision_hidden=32, projection_dim=32)


# ---------------------------------------------------------------------------------------------------------------
# Metrics and loss by hand


def test_pair_accuracy_by_hand():
    s0 = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    s1 = np.array([0.0, 3.0, 3.0, 1.0, 2.0])
    p = np.array([1.0, 1.0, 0.0, 0.5, 0.0])
    # pair 0: 1 > 0, image 0 preferred -> right; pair 1: 2 < 3, image 0 preferred -> wrong;
    # pair 2: equal scores -> 1/2; pair 3: label tie -> excluded; pair 4: 5 > 2 but image 1 preferred -> wrong
    r = pair_accuracy(s0, s1, p)
    assert r["n"] == 4 and r["label_ties"] == 1 and r["predictor_ties"] == 1
    assert r["correct"] == 1.5 and r["accuracy"] == 1.5 / 4
    assert r["ci_low"] < 0.375 < r["ci_high"]
    # torch tensors give the same; all-tie labels give no accuracy
    assert pair_accuracy(torch.tensor(s0), torch.tensor(s1), p)["accuracy"] == 0.375
    assert pair_accuracy(s0[:1], s1[:1], np.array([0.5]))["accuracy"] is None
    with pytest.raises(ValueError, match="labels must be 1, 0 or 0.5"):
        pair_accuracy(s0, s1, np.array([1.0, 0.0, 0.3, 1.0, 1.0]))


def test_accuracy_table_shared_predictor_and_pooled():
    labels = {k: np.array([1.0, 0.0]) for k in LABEL_KEYS}
    labels["aesthetic"] = np.array([0.0, 0.5])  # 1 decisive label (image 1) + 1 tie
    one = {"*": np.array([1.0, 0.0])}  # always prefers image 0 on pair 0, image 1 on pair 1
    zero = {"*": np.array([0.0, 1.0])}
    t = accuracy_table(one, zero, labels)
    assert t["prompt_following"]["accuracy"] == 1.0 and t["overall"]["accuracy"] == 1.0
    assert t["aesthetic"]["accuracy"] == 0.0 and t["aesthetic"]["n"] == 1
    # pooled over the four aspects: pf 2/2 + aesthetic 0/1 + fidelity 2/2 + harmlessness 2/2 = 6/7
    assert t["pooled"]["n"] == 7 and t["pooled"]["accuracy"] == pytest.approx(6 / 7)


def test_multi_aspect_loss_by_hand():
    s0 = torch.tensor([[2.0, 0.0]])
    s1 = torch.tensor([[1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.5]])
    drop = (labels != 0.5).float()
    loss, m = multi_aspect_loss(s0, s1, labels, drop)
    assert loss.item() == pytest.approx(
        math.log(1 + math.exp(-1.0)), abs=1e-6
    )  # -log σ(2 - 1); the tie is out
    assert m["train/acc"] == 1.0
    # "soft" ties: the tie at d = 0 adds -[0.5 log σ(0) + 0.5 log σ(0)] = log 2; pooled mean over 2 terms
    loss, _ = multi_aspect_loss(s0, s1, labels, torch.ones_like(labels))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2, abs=1e-6)
    # image 1 preferred: -log σ(s1 - s0)
    loss, m = multi_aspect_loss(s0[:, :1], s1[:, :1], torch.tensor([[0.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(1.0)), abs=1e-6) and m["train/acc"] == 0.0


def test_fold_standardization_is_exact(tiny_clip_dir):
    from diffalign.rewards.hf_clip import load_clip_dir

    backbone, processor = load_clip_dir(tiny_clip_dir)
    for hidden in (0, 5):
        torch.manual_seed(1)
        model = MultiAspectRewardModel(backbone, processor, MultiAspectConfig(head_hidden=hidden))
        h = torch.randn(7, 96, dtype=torch.float64)
        mean, std = torch.randn(96, dtype=torch.float64), torch.rand(96, dtype=torch.float64) + 0.5
        model.heads.double()
        before = {a: head((h - mean) / std) for a, head in model.heads.items()}
        fold_standardization(model, mean, std)
        for a, head in model.heads.items():
            assert torch.allclose(head(h), before[a], atol=1e-10), (hidden, a)


# ---------------------------------------------------------------------------------------------------------------
# Data: judge labels, rendered pairs, prompt splits, Pick-a-Pic reading


def test_judge_labels_follow_the_judge_at_zero_temperature():
    from diffalign.sandbox.judge import Judge

    rng = np.random.default_rng(3)
    i0, i1, prompts = render_pair_images(30, rng, RenderConfig(0.4, 0.4, 0.4, 0.4))
    assert i0.shape == i1.shape == (30, 32, 32, 3) and i0.dtype == np.uint8 and len(prompts) == 30
    pairs = judge_label_pairs(i0, i1, prompts, temperature=0.0, tie_margin=0.0, rng=np.random.default_rng(0))
    s0, s1 = Judge().score(i0, prompts), Judge().score(i1, prompts)
    for k in LABEL_KEYS:
        np.testing.assert_array_equal(pairs.scores_0[k], s0[k])
        differ = s0[k] != s1[k]
        np.testing.assert_array_equal(
            pairs.labels[k][differ], (s0[k] > s1[k])[differ].astype(float), err_msg=k
        )
        # equal scores with tie_margin 0: P = 1/2, a fair draw (the builder's rule), never 0.5
        assert set(np.unique(pairs.labels[k])) <= {0.0, 1.0}
    # every aspect has decisive pairs both ways in rendered data with defects
    for k in ("prompt_following", "fidelity", "harmlessness"):
        assert 0 < pairs.labels[k].sum() < 30, k
    # a tie margin makes exactly the close pairs ties
    margin = 0.05
    tied = judge_label_pairs(
        i0, i1, prompts, temperature=0.0, tie_margin=margin, rng=np.random.default_rng(0)
    )
    for k in LABEL_KEYS:
        close = np.abs(s0[k] - s1[k]) < margin
        np.testing.assert_array_equal(tied.labels[k] == 0.5, close, err_msg=k)
    # with noise (T > 0) the labels depend on the draws, deterministically
    a = judge_label_pairs(i0, i1, prompts, temperature=0.3, tie_margin=0.0, rng=np.random.default_rng(5))
    b = judge_label_pairs(i0, i1, prompts, temperature=0.3, tie_margin=0.0, rng=np.random.default_rng(5))
    assert all(np.array_equal(a.labels[k], b.labels[k]) for k in LABEL_KEYS)
    assert any(not np.array_equal(a.labels[k], pairs.labels[k]) for k in LABEL_KEYS)


def test_split_by_prompt_keeps_prefixed_captions_together():
    prompts = [
        "a red circle",
        "an icon of a red circle",
        "a blue square",
        "a drawing of a blue square",
        "a green triangle",
        "a small cross",
        "not a sandbox caption",
        "Not a  sandbox caption",
    ]
    assert prompt_key(prompts[0]) == prompt_key(prompts[1])
    assert prompt_key(prompts[6]) == prompt_key(prompts[7])
    tr, ho = split_by_prompt(prompts, 0.4, np.random.default_rng(0))
    assert sorted([*tr, *ho]) == list(range(8)) and len(ho) > 0 and len(tr) > 0
    train_keys = {prompt_key(prompts[i]) for i in tr}
    assert not any(prompt_key(prompts[i]) in train_keys for i in ho)
    # ceil(0.4 * 5 distinct prompts) = 2 prompts held out
    assert len({prompt_key(prompts[i]) for i in ho}) == 2


def _pickapic_rows(images_0, images_1, captions):
    from diffalign.data.builder import encode_jpeg

    rows = []
    for i, (a, b, c) in enumerate(zip(images_0, images_1, captions)):
        rows.append(
            {
                "are_different": True,
                "best_image_uid": f"{i}-0",
                "caption": c,
                "created_at": datetime.datetime(2024, 1, 1),
                "has_label": True,
                "image_0_uid": f"{i}-0",
                "image_0_url": "",
                "image_1_uid": f"{i}-1",
                "image_1_url": "",
                "jpg_0": a if isinstance(a, bytes) else encode_jpeg(a),
                "jpg_1": b if isinstance(b, bytes) else encode_jpeg(b),
                "label_0": 1.0,
                "label_1": 0.0,
                "model_0": "m",
                "model_1": "m",
                "ranking_id": i,
                "user_id": 1,
                "num_example_per_prompt": 1,
            }
        )
    return rows


def test_pickapic_source_is_read_and_unusable_rows_are_counted(tmp_path):
    from diffalign.data.schema import write_pickapic_dataset

    i0, i1, prompts = render_pair_images(4, np.random.default_rng(1))
    small = np.zeros((16, 16, 3), np.uint8)
    rows = _pickapic_rows(
        [*i0, i0[0], small, b"not a jpeg", i0[1]],
        [*i1, i1[0], small, i1[2], i1[3]],
        [*prompts, "two cats on a sofa", "a red circle", "a red circle", "   "],
    )
    write_pickapic_dataset({"train": rows[:6], "test": rows[6:]}, tmp_path)
    a, b, p, skipped = load_pickapic_images(str(tmp_path), ["train", "test"])
    assert p == prompts and a.shape == (4, 32, 32, 3)
    # JPEG (quality 95, 4:4:4) round trip stays close to the rendered pixels
    assert np.abs(a.astype(int) - i0.astype(int)).mean() < 3
    assert dict(skipped) == {
        "caption_not_in_grammar": 1,
        "wrong_size": 1,
        "corrupt_image": 1,
        "empty_caption": 1,
    }
    a, _, p, _ = load_pickapic_images(str(tmp_path), ["train"], max_pairs=2)
    assert len(p) == 2 and len(a) == 2


# ---------------------------------------------------------------------------------------------------------------
# Learning: heads on a fixed random backbone learn a pixel statistic


def test_heads_learn_a_pixel_statistic_on_a_random_backbone(tiny_clip_dir):
    """Aspect "brightness": the image with the higher mean pixel wins (T = 0). Aspect "coin": random labels
    (nothing to learn; stays at chance). Heads only, 20 epochs on 240 pairs."""
    from diffalign.rewards.hf_clip import load_clip_dir

    backbone, processor = load_clip_dir(tiny_clip_dir)
    torch.manual_seed(0)
    model = MultiAspectRewardModel(backbone, processor, MultiAspectConfig(aspects=("brightness", "coin")))
    rng = np.random.default_rng(0)

    def make(n: int) -> AspectPairs:
        base = rng.uniform(40, 215, size=(2, n, 1, 1, 3))
        imgs = np.clip(base + rng.normal(0, 20, size=(2, n, 32, 32, 3)), 0, 255).astype(np.uint8)
        mean = imgs.reshape(2, n, -1).mean(-1)
        labels = {
            "brightness": (mean[0] > mean[1]).astype(float),
            "coin": rng.integers(0, 2, n).astype(float),
        }
        return AspectPairs(imgs[0], imgs[1], ["a red circle"] * n, labels=labels)

    def tensors(pairs: AspectPairs) -> PairTensors:
        f0 = joint_features(model, pixel_values(processor, pairs.images_0), pairs.prompts)
        f1 = joint_features(model, pixel_values(processor, pairs.images_1), pairs.prompts)
        labels, mask = label_tensors(pairs, model.config.aspects, "drop")
        return PairTensors(pairs.prompts, labels, mask, f0, f1)

    train, held = make(240), make(200)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    history = fit(
        model, tensors(train), epochs=20, batch_size=32, learning_rate=3e-3, seed=0, progress=False, log=str
    )
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    s0, s1 = score_pairs(model, tensors(held))
    bright = pair_accuracy(s0["brightness"], s1["brightness"], held.labels["brightness"])
    coin = pair_accuracy(s0["coin"], s1["coin"], held.labels["coin"])
    assert bright["accuracy"] > 0.75 and bright["ci_low"] > 0.5, bright
    assert coin["ci_low"] < 0.5 < coin["ci_high"], coin  # random labels: not distinguishable from chance
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())  # frozen
    # the folded heads score raw features exactly as the model's own forward pass does
    px = pixel_values(processor, held.images_0[:4])
    with torch.no_grad():
        out = model(px, held.prompts[:4])
    assert torch.allclose(out["brightness"], s0["brightness"][:4], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints that reference their frozen backbone


def test_backbone_reference_checkpoint(tiny_clip_dir, tmp_path):
    from diffalign.rewards.hf_clip import load_clip_dir

    clip = tmp_path / "models" / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    backbone, processor = load_clip_dir(clip)
    torch.manual_seed(4)
    model = MultiAspectRewardModel(backbone, processor).eval()
    out = model.save(tmp_path / "models" / "vp", backbone_ref=clip)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"]["path"] == "../clip" and len(cfg["backbone"]["sha256"]) == 64
    assert not (out / "backbone").exists() and (out / "heads.safetensors").stat().st_size < 10_000
    px = torch.randn(2, 3, 32, 32)
    loaded = MultiAspectRewardModel.load(out).eval()
    with torch.no_grad():
        a, b = model(px, ["a red circle", "a blue square"]), loaded(px, ["a red circle", "a blue square"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the pair moves together
    shutil.move(tmp_path / "models", tmp_path / "moved")
    assert MultiAspectRewardModel.load(tmp_path / "moved" / "vp").config.aspects == model.config.aspects
    # a rebuilt backbone no longer matches its heads
    other = tmp_path / "moved" / "clip"
    changed, _ = load_clip_dir(other)
    with torch.no_grad():
        changed.logit_scale.add_(1.0)
    changed.save_pretrained(other)
    with pytest.raises(ValueError, match="SHA-256"):
        MultiAspectRewardModel.load(tmp_path / "moved" / "vp")
    # a changed (fine-tuned) backbone cannot be saved by reference
    with torch.no_grad():
        model.backbone.text_projection.weight.add_(0.1)
    with pytest.raises(ValueError, match="differs"):
        model.save(tmp_path / "vp2", backbone_ref=tiny_clip_dir)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        model.save(tmp_path / "vp3", backbone_ref=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Whole runs


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_cli_end_to_end_rendered_pairs(tiny_clip_dir, tmp_path):
    out = tmp_path / "vp"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train_reward_model.py"),
        "--source",
        "rendered",
        "--num_pairs",
        "24",
        "--epochs",
        "2",
        "--batch_size",
        "8",
        "--backbone",
        str(tiny_clip_dir),
        "--output_dir",
        str(out),
        "--progress",
        "false",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| prompt_following |" in res.stdout and "held-out pair accuracy" in res.stdout
    for name in ("config.json", "heads.safetensors", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "backbone").exists()  # frozen: the checkpoint references the backbone directory
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["train"]["pairs"] + metrics["data"]["held_out"]["pairs"] == 24
    assert metrics["data"]["held_out_prompts_seen_in_train"] == 0
    held = metrics["held_out"]
    for predictor in ("model", "sandbox_clip", "judge_scores"):
        assert set(held[predictor]) == {*LABEL_KEYS, "pooled"}
    assert held["chance"] == 0.5 and len(metrics["history"]) == 2
    weights = json.loads((out / "config.json").read_text())["overall_weights"]
    assert set(weights) == set(LABEL_KEYS[:4]) and sum(weights.values()) == pytest.approx(1.0)
    assert weights == metrics["overall_weights"]
    # loads through a catalog manifest and through MultiAspectRewardModel.load
    from diffalign.rewards import load_reward

    manifest = tmp_path / "vp.yaml"
    manifest.write_text(
        "# test\nname: vp\nkind: multi_aspect\ndescription: d\npreprocessing: p\noutput_scale: o\nlicence: l\n"
        f"weights:\n  checkpoint: {{path: {out}, source: test}}\nparams: {{name: vp}}\n"
    )
    reward = load_reward(manifest)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "a blue square", "a green cross"]
    assert reward.score(images, prompts).shape == (3,)
    aspects = reward.score_aspects(images, prompts)
    assert set(aspects) == {*LABEL_KEYS} and all(v.shape == (3,) for v in aspects.values())
    assert MultiAspectRewardModel.load(out).config.aspects == LABEL_KEYS[:4]


def test_finetune_run_is_deterministic_and_copies_the_backbone(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file

    runs = []
    for name in ("a", "b"):
        cfg = RewardTrainConfig(
            source="rendered",
            num_pairs=16,
            epochs=1,
            batch_size=8,
            backbone=str(tiny_clip_dir),
            freeze_backbone=False,
            output_dir=str(tmp_path / name),
            progress=False,
        )
        runs.append(train_reward_model(cfg, log=str))
    assert (tmp_path / "a" / "backbone" / "model.safetensors").is_file()
    ha, hb = (
        load_file(str(tmp_path / "a" / "heads.safetensors")),
        load_file(str(tmp_path / "b" / "heads.safetensors")),
    )
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    assert runs[0]["held_out"]["model"] == runs[1]["held_out"]["model"]
    tuned = load_file(str(tmp_path / "a" / "backbone" / "model.safetensors"))
    original = load_file(str(tiny_clip_dir / "model.safetensors"))
    assert any(not torch.equal(tuned[k], original[k]) for k in original)  # the backbone was trained
    with pytest.raises(ValueError, match="backbone_storage='reference' needs freeze_backbone"):
        RewardTrainConfig(freeze_backbone=False, backbone_storage="reference")


def test_shipped_sandbox_vp_score_manifest():
    from diffalign.rewards.catalog import load_manifest

    m = load_manifest("sandbox-vp-score")
    assert m["kind"] == "multi_aspect" and m["weights"]["checkpoint"]["path"] == "sandbox-vp-score"
    ckpt = REPO / "reward_models" / "sandbox-vp-score"
    assert (ckpt / "config.json").is_file(), f"{ckpt} (shipped) missing from the checkout"
    assert (REPO / "reward_models" / "sandbox-clip").is_dir(), (
        "reward_models/sandbox-clip missing from the checkout"
    )
    from diffalign.rewards import load_reward

    reward = load_reward("sandbox-vp-score")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert reward.score(images, ["a red circle", "a blue square"]).shape == (2,)


def test_fit_overall_weights_recovers_a_known_mixture():
    """Overall labels generated by the noiseless rule 3·d_a + 1·d_b > 0 (aspect c ignored): the fitted weights rank
    pairs like the rule and put most weight on a, least on c; normalised to sum 1."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(400, 3, generator=g)
    label = ((3 * d[:, 0] + d[:, 1]) > 0).float()
    label[:5] = 0.5  # ties are ignored
    w = fit_overall_weights(d, label)
    assert sum(w) == pytest.approx(1.0) and all(x >= 0 for x in w)
    assert w[0] > w[1] > w[2]
    pred = (d @ torch.tensor(w) > 0).float()
    assert (pred[5:] == label[5:]).float().mean() > 0.95
    assert fit_overall_weights(d[:3], torch.full((3,), 0.5)) == [1 / 3] * 3
