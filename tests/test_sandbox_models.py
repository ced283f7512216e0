"""The sandbox's tiny models: tokenizer, build helpers, the shipped assets, and a real ``--quick`` build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded

import numpy as np
import pytest
import torch

from diffalign.sandbox import REPO_ROOT, SANDBOX_CLIP, SANDBOX_PIPELINE, SANDBOX_UNET_EARLY
from diffalign.sandbox.captions import WorldConfig, sample_example
from diffalign.sandbox.recipes import (
    CLIP_MEAN,
    CLIP_STD,
    BuildConfig,
    images_to_clip,
    lr_lambda,
    make_clip_processor,
    sample_world_example,
)
from diffalign.sandbox.scene import render
from diffalign.sandbox.tokenizer import build_clip_tokenizer, save_clip_tokenizer

CAPTIONS = [
    "a large red circle on the left on a white background",
    "an icon of a small purple cross with an outline at the top",
    "a drawing of an orange diamond in the center on a sand background",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


def open_clip_ids(text: str) -> list[int]:
    """open_clip's SimpleTokenizer ids with start/end tokens, before padding."""
    from open_clip.tokenizer import SimpleTokenizer

    st = SimpleTokenizer()
    return [st.sot_token_id, *st.encode(text), st.eot_token_id]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_ids_equal_open_clip(tokenizer):
    for text in CAPTIONS:
        assert tokenizer(text)["input_ids"] == open_clip_ids(text), text
    # Hand-checked: "a red circle" -> <sot> a</w> red</w> circle</w> <eot> in OpenAI CLIP's vocabulary.
    assert tokenizer("a red circle")["input_ids"] == [49406, 320, 736, 7117, 49407]
    assert tokenizer.model_max_length == 32
    assert len(tokenizer) == 49408


def test_saved_tokenizer_files_reload_identically(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    save_clip_tokenizer(tokenizer, tmp_path)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "vocab.json").read_text())["<|endoftext|>"] == 49407
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for text in CAPTIONS:
        a = reloaded(text, padding="max_length")["input_ids"]
        assert a == tokenizer(text, padding="max_length")["input_ids"]
        assert len(a) == 32 and a[-1] == 49407  # padded with <|endoftext|>


# ---------------------------------------------------------------------------------------------------------------
# Build helpers


def test_world_example_matches_sample_example():
    world = WorldConfig()
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    noisy = 0
    for _ in range(200):
        scene_a, caption_a = sample_example(rng_a, world)
        scene_b, spec, shown, true = sample_world_example(rng_b, world)
        assert scene_a == scene_b and caption_a == shown
        assert spec.matches(scene_b)  # the true caption always describes the scene
        noisy += shown != true
    assert 25 <= noisy <= 75  # p_caption_noise = 0.25 of 200 = 50 expected


def test_clip_pixels_equal_processor(tokenizer):
    processor = make_clip_processor(tokenizer)
    rng = np.random.default_rng(0)
    images = np.stack([render(sample_example(rng)[0]) for _ in range(3)])
    ours = images_to_clip(images)
    theirs = processor(images=list(images), return_tensors="pt")["pixel_values"]
    assert theirs.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # Exact value of one pixel: (x/255 - mean)/std.
    expected = (images[0, 0, 0, 0] / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert abs(float(ours[0, 0, 0, 0]) - expected) < 1e-6


def test_lr_lambda_warmup_then_cosine():
    f = lr_lambda(warmup=4, total=14, floor=0.1)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(pi/2) = 0
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_build_config_checks_and_early_step():
    assert BuildConfig(unet_steps=2400, early_fraction=0.3).early_step == 720
    with pytest.raises(ValueError, match="early_fraction"):
        BuildConfig(early_fraction=1.0)
    with pytest.raises(ValueError, match="vae_channels"):
        BuildConfig(vae_channels=(16, 32))


# ---------------------------------------------------------------------------------------------------------------
# Loading and using built assets (the shipped ones, and those of the --quick build)


def check_pipeline_dir(path: Path) -> None:
    """Loads through the stock diffusers class and samples 32x32 deterministically with a seeded generator."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    assert pipe.safety_checker is None
    # The pipeline's default size (unet.config.sample_size * vae_scale_factor) is 32 = 8 * 4.
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size

    def sample() -> np.ndarray:
        gen = torch.Generator().manual_seed(3)
        return pipe("a red circle", num_inference_steps=3, generator=gen, output_type="np").images

    a, b = sample(), sample()
    assert a.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(a, b)


def check_unet_early_dir(path: Path, pipeline: Path) -> None:
    from diffusers import UNet2DConditionModel

    early = UNet2DConditionModel.from_pretrained(path)
    final = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    drop = {"_name_or_path"}
    assert {k: v for k, v in early.config.items() if k not in drop} == {
        k: v for k, v in final.config.items() if k not in drop
    }
    differs = any(not torch.equal(a, b) for a, b in zip(early.parameters(), final.parameters(), strict=True))
    assert differs, "the early UNet must be an earlier checkpoint, not the final one"


def check_clip_dir(path: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path)
    processor = CLIPProcessor.from_pretrained(path)
    rng = np.random.default_rng(0)
    images = [render(sample_example(rng)[0]) for _ in range(2)]
    inputs = processor(
        text=["a red circle", "a blue square"], images=images, return_tensors="pt", padding=True
    )
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_text.shape == (2, 2)
    assert model.config.text_config.vocab_size == 49408
    assert model.config.text_config.max_position_embeddings == 32


def _require(path: Path) -> None:
    # shipped with the repository: absent means a broken checkout, which must fail rather than skip
    assert (path / "model_index.json").exists() or (path / "config.json").exists(), (
        f"{path} missing from the checkout (rebuild: python scripts/build_sandbox.py)"
    )


def test_shipped_pipeline_loads_and_samples():
    _require(SANDBOX_PIPELINE)
    check_pipeline_dir(SANDBOX_PIPELINE)


def test_shipped_unet_early_loads():
    _require(SANDBOX_UNET_EARLY)
    check_unet_early_dir(SANDBOX_UNET_EARLY, SANDBOX_PIPELINE)


def test_shipped_clip_loads():
    _require(SANDBOX_CLIP)
    check_clip_dir(SANDBOX_CLIP)


def test_quick_build_end_to_end(tmp_path):
    """The CI proof that the build works: ``scripts/build_sandbox.py --quick`` writes loadable outputs."""
    out = tmp_path / "quick"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "build_sandbox.py"),
            "--quick",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[build] outputs:" in proc.stdout
    report = json.loads((out / "build_report.json").read_text())
    assert report["config"]["unet_steps"] == BuildConfig.quick().unet_steps
    assert 0.0 <= report["metrics"]["clip/retrieval_top1@16"] <= 1.0
    assert report["metrics"]["vae/psnr_db"] > 0
    assert report["sizes_bytes"]["total"] == sum(v for k, v in report["sizes_bytes"].items() if k != "total")
    assert not (out / ".staging-build_report").exists()
    check_pipeline_dir(out / "pipeline")
    check_unet_early_dir(out / "unet-early", out / "pipeline")
    check_clip_dir(out / "sandbox-clip")
