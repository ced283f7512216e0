"""Benchmarks: prompt readers, DreamBench parsing and metrics (exact values), model variants, and one real run of
each benchmark script on tiny models built here (seconds, CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.errors import ConfigError
from diffalign.eval.benchmark_models import resolve_variant
from diffalign.eval.benchmark_pickapic import (
    compare_scores,
    per_prompt,
    primary_key,
    reward_applicability,
    supported_prompts,
)
from diffalign.eval.dreambench import (
    LIVE_CLASSES,
    ImageFeatureExtractor,
    load_dreambench,
    mean_cosine_to_references,
    paired_cosine,
    parse_prompts_and_classes,
    remove_token,
    subject_metrics,
    subject_prompts,
)
from diffalign.eval.html import png_data_uri, winner
from diffalign.eval.prompts import (
    load_prompt_set,
    read_hps_json,
    read_parti_tsv,
    read_pickapic_prompts,
    stratified_allocation,
    subset_prompts,
)

REPO = Path(__file__).resolve().parents[1]
SANDBOX_CAPTIONS = ["a red circle", "a blue square on a white background", "a large green triangle"]


# ---------------------------------------------------------------------------------------------------------------
# Prompt sets


def _write_parti(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    lines = ["Prompt\tCategory\tChallenge\tNote"] + [f"{p}\t{c}\t{ch}\t" for p, c, ch in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_parti_tsv_keeps_leading_quotes_and_counts_dropped_rows(tmp_path):
    f = _write_parti(
        tmp_path / "p.tsv",
        [
            ('"HELLO" painted on a wall', "Illustrations", "Writing & Symbols"),
            ("a cat", "Animals", "Basic"),
            ("   ", "Animals", "Basic"),  # empty prompt
            ("a cat", "Animals", "Basic"),  # duplicate
            ("a dog", "Animals", "Basic"),
        ],
    )
    ps = read_parti_tsv(f)
    assert ps.prompts == ['"HELLO" painted on a wall', "a cat", "a dog"]
    assert ps.categories == ["Illustrations", "Animals", "Animals"]
    assert ps.meta[0] == {"Challenge": "Writing & Symbols"}
    assert ps.dropped == {"empty": 1, "duplicate": 1}
    assert ps.category_counts() == {"Illustrations": 1, "Animals": 2}
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(ValueError, match="no 'Prompt' column"):
        read_parti_tsv(bad)


def test_real_partiprompts_file(shared_data):
    path = shared_data / "PartiPrompts.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ps = read_parti_tsv(path)
    assert len(ps) + ps.dropped["duplicate"] + ps.dropped["empty"] == 1632
    counts = ps.category_counts()
    assert len(counts) == 12 and "Animals" in counts and "World Knowledge" in counts
    assert ps.prompts[0] == "bond" and ps.categories[0] == "Abstract"
    assert any(p.startswith('"G I G G L E"') for p in ps.prompts)  # the leading quote is part of the prompt
    # two Parti prompts happen to be sandbox captions ('a circle', 'a red circle'): too few, the judge is skipped
    mask, _, reason = reward_applicability("sandbox-judge", ps.prompts)
    assert int(mask.sum()) == 2 and "only 2 of the 1632 prompts" in reason
    sub = subset_prompts(ps, 24, seed=0)
    assert len(sub) == 24 and len(sub.category_counts()) == 12  # every category represented


def test_hps_json_category_is_file_stem(tmp_path):
    (tmp_path / "anime.json").write_text(json.dumps(["a girl", "a robot"]))
    (tmp_path / "photo.json").write_text(json.dumps(["a street", "a robot"]))  # same prompt in two styles
    ps = read_hps_json(tmp_path)
    assert ps.prompts == ["a girl", "a robot", "a street"]
    assert ps.categories == ["anime", "anime", "photo"]
    assert ps.dropped["duplicate"] == 1
    assert load_prompt_set(str(tmp_path)).prompts == ps.prompts
    (tmp_path / "bad.json").write_text(json.dumps({"prompts": []}))
    with pytest.raises(ValueError, match="JSON list of prompt strings"):
        read_hps_json(tmp_path / "bad.json")
    # the online PSO / D3PO prompt lists: objects with a caption
    (tmp_path / "pso").mkdir()
    pso = tmp_path / "pso" / "4k_training_prompts.json"
    pso.write_text(
        json.dumps([{"caption": "a cat driving a nuke", "trainset_idx": 215221}, {"caption": "a fox"}])
    )
    assert read_hps_json(pso).prompts == ["a cat driving a nuke", "a fox"]


def test_pickapic_split_prompts_unique_in_order(tmp_path):
    from tests.tiny_models import write_tiny_pairs

    data = write_tiny_pairs(tmp_path / "pairs", n=12)
    ps = read_pickapic_prompts(str(data), "test_unique")
    assert ps.prompts == [f"a red circle number {i}" for i in range(5)]
    assert ps.dropped["duplicate"] == 7 and not ps.has_categories
    assert load_prompt_set(str(data), "test_unique").prompts == ps.prompts
    assert subset_prompts(ps, 2).prompts == ["a red circle number 0", "a red circle number 1"]  # first n


def test_stratified_allocation_exact():
    # quotas 3, 1.5, 0.5 -> floors 3, 1, 0 -> +1 to b (first largest remainder) -> c takes one from a
    assert stratified_allocation({"a": 6, "b": 3, "c": 1}, 5) == {"a": 2, "b": 2, "c": 1}
    assert stratified_allocation({"a": 6, "b": 3, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}  # n < #categories
    assert stratified_allocation({"a": 2, "b": 2}, 10) == {"a": 2, "b": 2}


# ---------------------------------------------------------------------------------------------------------------
# Pick-a-Pic statistics and reward compatibility


def test_per_prompt_and_compare_scores_exact():
    rows = np.array([1.0, 3.0, 0.0, np.nan, 5.0, 5.0])  # 3 prompts x 2 seeds, prompt-major
    assert per_prompt(rows, 2).tolist() == [2.0, 0.0, 5.0]
    base = np.array([1.0, 2.0, 3.0, 4.0])
    aligned = np.array([2.0, 2.0, 1.0, 5.0])  # win, tie, loss, win
    out = compare_scores(base, aligned, ["x", "x", "y", "y"], tie_tol=1e-6)
    assert out["win_rate"]["win_rate"] == pytest.approx(2.5 / 4)
    assert out["base"]["mean"] == pytest.approx(2.5) and out["aligned"]["mean"] == pytest.approx(2.5)
    assert out["categories"]["x"]["win_rate"]["win_rate"] == pytest.approx(0.75)
    assert out["categories"]["y"]["win_rate"]["win_rate"] == pytest.approx(0.5)
    assert out["categories"]["y"]["aligned_mean"] == pytest.approx(3.0)


def test_judge_cannot_score_parti_prompts_but_clip_can():
    mask, example = supported_prompts("sandbox-judge", ["a photo of a cat", *SANDBOX_CAPTIONS])
    assert mask.tolist() == [False, True, True, True] and example == "a photo of a cat"
    assert supported_prompts("combined-sandbox", ["a photo of a cat"])[0].tolist() == [False]
    assert supported_prompts("sandbox-clip", ["a photo of a cat"])[0].tolist() == [True]
    three_of_four = ["a photo of a cat", *SANDBOX_CAPTIONS]
    assert reward_applicability("sandbox-judge", three_of_four)[2] is None  # 75% >= 50%: scores those 3
    assert "only 3 of the 4" in reward_applicability("sandbox-judge", three_of_four, min_share=0.8)[2]
    assert primary_key("sandbox-clip", {"overall": np.zeros(1)}) == "overall"
    assert primary_key("combined-sandbox", {"sandbox-judge": 0, "combined-sandbox": 1}) == "combined-sandbox"


def test_html_helpers():
    assert winner(0.5, 0.6) == "aligned" and winner(0.6, 0.5) == "base" and winner(0.5, 0.5 + 1e-9) == "tie"
    uri = png_data_uri(np.zeros((32, 32, 3), dtype=np.uint8))
    import base64
    import io

    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert img.size == (128, 128)  # 32 px upscaled x4 (nearest) to >= 128


# ---------------------------------------------------------------------------------------------------------------
# DreamBench data


def test_real_prompts_and_classes(shared_data):
    path = shared_data / "dreambench-mini" / "dataset" / "prompts_and_classes.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    spec = parse_prompts_and_classes(path)
    assert len(spec.classes) == 30
    assert spec.classes["dog"] == "dog" and spec.classes["red_cartoon"] == "cartoon"
    assert spec.classes["bear_plushie"] == "stuffed animal"
    assert len(spec.object_templates) == 25 and len(spec.live_templates) == 25
    assert spec.object_templates[0] == "a {0} {1} in the jungle"
    assert spec.object_templates[-1] == spec.live_templates[-1] == "a cube shaped {0} {1}"
    assert spec.live_templates[10] == "a {0} {1} wearing a red hat"
    live = [s for s, c in spec.classes.items() if c in LIVE_CLASSES]
    assert len(live) == 9  # DreamBench: 9 live subjects (cats and dogs), 21 objects


def test_real_dreambench_mini(shared_data):
    root = shared_data / "dreambench-mini"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    data = load_dreambench(root)
    by_name = {s.name: s for s in data.subjects}
    assert by_name["dog"].live and not by_name["vase"].live and not by_name["red_cartoon"].live
    assert len(data.missing) == 30 - len(data.subjects)
    prompts = subject_prompts(by_name["dog"], data.prompts)
    assert len(prompts) == 25 and prompts[10] == "a sks dog wearing a red hat"
    assert subject_prompts(by_name["vase"], data.prompts, "zwx")[4] == "a zwx vase on top of pink fabric"


def _jpeg(path: Path, color: tuple[int, int, int], size: int = 40) -> None:
    rng = np.random.default_rng(sum(color))
    arr = np.clip(np.array(color) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def write_synthetic_dreambench(root: Path, n_templates: int = 3) -> Path:
    """Two subjects (a live 'cat' and an object 'mug'), an unknown folder, double-quoted templates."""
    d = root / "dataset"
    for name, color, n in (("kitty", (200, 120, 40), 2), ("mug", (30, 60, 200), 3), ("stray", (0, 0, 0), 1)):
        (d / name).mkdir(parents=True)
        for i in range(n):
            _jpeg(d / name / f"{i:02d}.jpg", color)
    obj = ["a {0} {1} in the snow", "a red {0} {1}", "a {0} {1} on the beach"][:n_templates]
    live = ["a {0} {1} wearing a hat", "a {0} {1} in the snow", "a purple {0} {1}"][:n_templates]
    text = (
        "Classes\n\nsubject_name,class\nkitty, cat\nmug,mug\nghost,ghost\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        + "".join(f'  "{t}".format(unique_token, class_token),\n' for t in obj)
        + "]\n\nLive Subject Prompts\n\nprompt_list = [\n"
        + "".join(f"'{t}'.format(unique_token, class_token),\n" for t in live)
        + "]\n"
    )
    (d / "prompts_and_classes.txt").write_text(text)
    return root


def test_synthetic_dreambench_two_subjects(tmp_path):
    data = load_dreambench(write_synthetic_dreambench(tmp_path))
    assert [(s.name, s.class_word, s.live, len(s.images)) for s in data.subjects] == [
        ("kitty", "cat", True, 2),
        ("mug", "mug", False, 3),
    ]
    assert data.unknown == ["stray"] and data.missing == ["ghost"]
    kitty, mug = data.subjects
    assert subject_prompts(kitty, data.prompts) == [
        "a sks cat wearing a hat",
        "a sks cat in the snow",
        "a purple sks cat",
    ]
    assert subject_prompts(mug, data.prompts)[1] == "a red sks mug"
    assert remove_token("a purple sks cat", "sks") == "a purple cat"
    assert [s.name for s in load_dreambench(tmp_path, subjects=["mug"]).subjects] == ["mug"]
    # a user's DreamBench copy that does not parse is a ConfigError: the scripts print it as one line
    with pytest.raises(ConfigError, match="available"):
        load_dreambench(tmp_path, subjects=["nope"])
    (tmp_path / "dataset" / "prompts_and_classes.txt").write_text("Classes\nsubject_name,class\nmug,mug\n")
    with pytest.raises(ConfigError, match="no object prompt templates"):
        load_dreambench(tmp_path)
    (tmp_path / "dataset" / "prompts_and_classes.txt").write_text("subject_name,class\nmug,mug\n")
    with pytest.raises(ConfigError, match="no 'subject_name,class' rows found after a 'Classes' line"):
        load_dreambench(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# DreamBench metrics: exact values on hand-made embeddings


def test_mean_cosine_to_references_exact():
    gen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ref = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # g1: cos 1 and 1/sqrt2; g2: cos 0 and 1/sqrt2
    expected = [(1 + 1 / math.sqrt(2)) / 2, (1 / math.sqrt(2)) / 2]
    assert mean_cosine_to_references(gen, ref).tolist() == pytest.approx(expected, abs=1e-7)
    assert paired_cosine(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])).item() == pytest.approx(0.96)


def test_subject_metrics_and_lambda_harmonic_exact():
    # CLIP-I of the image: cos to refs (1, 0) and (0.6, 0.8) with image (1, 0): mean(1, 0.6) = 0.8
    clip_gen = torch.tensor([[1.0, 0.0]])
    clip_ref = torch.tensor([[2.0, 0.0], [0.6, 0.8]])
    clip_txt = torch.tensor([[0.6, 0.8]])  # CLIP-T = 0.6
    dino_gen = torch.tensor([[0.0, 1.0]])
    dino_ref = torch.tensor([[0.0, 5.0], [1.0, 0.0]])  # DINO = mean(1, 0) = 0.5
    m = subject_metrics(dino_gen, dino_ref, clip_gen, clip_ref, clip_txt, lam=0.5)
    assert m["dino"].item() == pytest.approx(0.5)
    assert m["clip_i"].item() == pytest.approx(0.8)
    assert m["clip_t"].item() == pytest.approx(0.6)
    # s_img = 0.9, s_txt = 0.8; r = 1 / (0.5/0.9 + 0.5/0.8) = 0.847059
    assert m["harmonic"].item() == pytest.approx(1 / (0.5 / 0.9 + 0.5 / 0.8), abs=1e-6)
    m1 = subject_metrics(dino_gen, dino_ref, clip_gen, clip_ref, clip_txt, lam=1.0)
    assert m1["harmonic"].item() == pytest.approx(0.9)  # λ = 1: s_img only


# ---------------------------------------------------------------------------------------------------------------
# Tiny backbones


def _tiny_vit(path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    ViTModel(cfg).save_pretrained(path)
    return path


def _tiny_clip(path: Path, image_size: int = 16) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffalign.sandbox.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    text = dict(
        vocab_size=49408,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    ip = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=ip, tokenizer=build_clip_tokenizer(32)).save_pretrained(path)
    return path


def test_image_feature_extractor_vit_cls_token(tmp_path):
    from transformers import ViTModel

    path = _tiny_vit(tmp_path / "vit")
    ext = ImageFeatureExtractor.from_pretrained(path)
    assert ext.pooling == "cls"
    gray = np.full((2, 20, 20, 3), 128, dtype=np.uint8)
    feats = ext.embed(gray)
    assert feats.shape == (2, 8)
    # no preprocessor_config.json: resize to 16x16 and ImageNet normalisation, computed by hand
    px = ext.processor(images=[Image.fromarray(gray[0])], return_tensors="pt")["pixel_values"]
    expected_px = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert px.shape == (1, 3, 16, 16)
    assert torch.allclose(px[0, :, 5, 5], expected_px, atol=1e-5)
    model = ViTModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = model(pixel_values=px).last_hidden_state[:, 0]  # CLS after the final layer norm
    assert torch.allclose(feats[0], ref[0], atol=1e-5)


def test_image_feature_extractor_clip_vision_tower(tmp_path):
    from transformers import CLIPModel

    path = _tiny_clip(tmp_path / "clip")
    ext = ImageFeatureExtractor.from_pretrained(path, stand_in_for="dino-vits16")
    assert ext.pooling == "pooler" and ext.stand_in_for == "dino-vits16"
    clip_mean = [0.48145466, 0.4578275, 0.40821073]  # the CLIP processor's own, not the ImageNet fallback
    assert list(ext.processor.image_mean) == pytest.approx(clip_mean)
    img = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    feats = ext.embed(img)
    clip = CLIPModel.from_pretrained(path).eval()
    px = ext.processor(images=[Image.fromarray(img[0])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = clip.vision_model(pixel_values=px).pooler_output  # before visual_projection
    assert feats.shape == (1, 8) and torch.allclose(feats, ref, atol=1e-5)


def test_shipped_backbone_manifests_parse():
    from diffalign.rewards.catalog import load_manifest

    m = load_manifest("dino-vits16")
    assert m["kind"] == "image_features" and "facebook/dino-vits16" in m["weights"]["model"]["source"]
    s = load_manifest("sandbox-dino-standin")
    assert s["params"]["stand_in_for"] == "dino-vits16" and s["weights"]["model"]["path"] == "sandbox-clip"


# ---------------------------------------------------------------------------------------------------------------
# Model variants


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tiny SD pipeline, a LoRA with nonzero lora_B, a UNet dir, a tiny CLIP (+ manifest) and a tiny ViT."""
    from diffusers import UNet2DConditionModel

    from diffalign.models.lora import add_lora, save_lora
    from tests.tiny_models import build_tiny_sd

    root = tmp_path_factory.mktemp("bench")
    sd = build_tiny_sd(root / "sd")
    unet = UNet2DConditionModel.from_pretrained(sd / "unet")
    add_lora(unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lora = root / "run" / "lora"
    save_lora(lora, unet)
    full = UNet2DConditionModel.from_pretrained(sd / "unet")
    full.save_pretrained(root / "unet")
    clip = _tiny_clip(root / "clip", image_size=16)
    manifest = root / "tiny-clip.yaml"
    manifest.write_text(
        "# tiny CLIP for tests\nname: tiny-clip\nkind: hf_clip\ndescription: t\npreprocessing: p\noutput_scale: o\n"
        f"licence: l\nweights:\n  model: {{path: {clip}, source: test}}\nparams: {{name: tiny-clip, score: cosine}}\n"
    )
    return {
        "sd": sd,
        "lora": lora,
        "run": root / "run",
        "unet": root / "unet",
        "clip": clip,
        "manifest": manifest,
        "vit": _tiny_vit(root / "vit"),
    }


def test_resolve_variant_kinds(tiny_assets, tmp_path):
    assert resolve_variant(None).kind == "base" and resolve_variant("base").kind == "base"
    assert resolve_variant(tiny_assets["lora"]).kind == "lora"
    assert resolve_variant(tiny_assets["run"]).path == tiny_assets["lora"]  # run dir -> its lora/
    assert resolve_variant(tiny_assets["unet"]).kind == "unet"
    assert resolve_variant(tiny_assets["sd"]).kind == "pipeline"
    run = tmp_path / "run"
    for step in (3, 10):
        d = run / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert resolve_variant(run).path == run / "checkpoint-10"  # newest checkpoint, numerically
    with pytest.raises(ValueError, match="holds no model"):
        resolve_variant(tmp_path)
    with pytest.raises(FileNotFoundError, match="LoRA directory"):
        resolve_variant(tmp_path / "nope")


def test_lora_variant_changes_images_and_is_removed(tiny_assets):
    from diffalign.eval.benchmark_models import apply_variant, load_base_pipeline
    from diffalign.eval.compare import generate

    pipe = load_base_pipeline(str(tiny_assets["sd"]))
    kw = dict(steps=2, guidance=5.0)
    base = generate(pipe, ["a red circle"], [0], **kw)
    with apply_variant(pipe, tiny_assets["lora"]) as p:
        aligned = generate(p, ["a red circle"], [0], **kw)
    with apply_variant(pipe, tiny_assets["unet"]) as p:
        same_unet = generate(p, ["a red circle"], [0], **kw)
    again = generate(pipe, ["a red circle"], [0], **kw)
    assert not np.array_equal(base, aligned)  # the adapter acts
    assert np.array_equal(base, again)  # and is gone afterwards
    assert np.array_equal(base, same_unet)  # a UNet dir with the base weights gives the base images


# ---------------------------------------------------------------------------------------------------------------
# End-to-end: the scripts on tiny models


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_benchmark_pickapic_script_end_to_end(tiny_assets, tmp_path):
    prompts = _write_parti(
        tmp_path / "mixed.tsv",
        [
            ("a red circle", "Sandbox", "Basic"),
            ("a blue square on a white background", "Sandbox", "Basic"),
            ("a large green triangle", "Shapes", "Basic"),
            ("a photo of a cat", "Shapes", "Basic"),  # not sandbox grammar: the judge leaves it out
        ],
    )
    out = tmp_path / "out"
    proc = _run(
        "benchmark_pickapic.py",
        [
            "--prompts",
            str(prompts),
            "--base",
            str(tiny_assets["sd"]),
            "--aligned",
            str(tiny_assets["run"]),
            "--rewards",
            f"sandbox-judge,{tiny_assets['manifest']}",
            "--images-per-prompt",
            "2",
            "--steps",
            "2",
            "--height",
            "32",
            "--device",
            "cpu",
            "--output-dir",
            str(out),
        ],
    )
    res = json.loads((out / "results.json").read_text())
    judge, clip = res["rewards"]["sandbox-judge"], res["rewards"]["tiny-clip"]
    assert judge["status"] == "ok" and judge["num_prompts"] == 3 and judge["skipped_prompts"] == 1
    assert clip["status"] == "ok" and clip["num_prompts"] == 4 and clip["win_rate"]["n"] == 4
    assert set(clip["categories"]) == {"Sandbox", "Shapes"} and clip["categories"]["Shapes"]["n"] == 2
    assert res["seeds"] == [0, 1] and res["aligned_model"].startswith("lora from")
    assert "prompt_following" in judge["aspects"]
    md = (out / "results.md").read_text()
    assert "| reward |" in md and "per category" in md
    lines = (out / "scores.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])  # 'a photo of a cat', seed 1: the judge could not score it
    assert len(lines) == 8 and last["seed"] == 1 and last["sandbox-judge"] == {"base": None, "aligned": None}
    for png in ("win_rate.png", "win_rate_by_category.png"):
        assert Image.open(out / png).size[0] > 100
    html = (out / "index.html").read_text()
    assert html.count('class="pair"') == 4 and html.count("data:image/png;base64,") >= 8 + 2
    assert "Summary" in html and str(out) in proc.stdout


def test_benchmark_pickapic_skips_judge_on_parti(tiny_assets, tmp_path):
    prompts = _write_parti(
        tmp_path / "p.tsv", [("a photo of a cat", "Animals", "Basic"), ("a tree", "Plants", "Basic")]
    )
    out = tmp_path / "out"
    proc = _run(
        "benchmark_pickapic.py",
        [
            "--prompts",
            str(prompts),
            "--base",
            str(tiny_assets["sd"]),
            "--aligned",
            "base",
            "--rewards",
            f"sandbox-judge,{tiny_assets['manifest']}",
            "--images-per-prompt",
            "1",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--output-dir",
            str(out),
        ],
    )
    res = json.loads((out / "results.json").read_text())
    assert res["rewards"]["sandbox-judge"]["status"] == "skipped"
    assert (
        "sandbox-grammar" in res["rewards"]["sandbox-judge"]["reason"]
        and "[skip] reward sandbox-judge" in proc.stdout
    )
    clip = res["rewards"]["tiny-clip"]
    assert (
        clip["win_rate"]["ties"] == 2 and clip["win_rate"]["win_rate"] == 0.5
    )  # base vs base: identical images


def test_benchmark_dreambench_script_end_to_end(tiny_assets, tmp_path):
    data = write_synthetic_dreambench(tmp_path / "db")
    models = tmp_path / "subject-models"
    models.mkdir()
    (models / "mug").symlink_to(tiny_assets["lora"], target_is_directory=True)
    out = tmp_path / "out"
    _run(
        "benchmark_dreambench.py",
        [
            "--data",
            str(data),
            "--base",
            str(tiny_assets["sd"]),
            "--subject-models",
            str(models),
            "--dino",
            str(tiny_assets["vit"]),
            "--clip",
            str(tiny_assets["clip"]),
            "--images-per-prompt",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--lam",
            "0.3",
            "--output-dir",
            str(out),
        ],
    )
    res = json.loads((out / "results.json").read_text())
    assert list(res["subjects"]) == ["kitty", "mug"]
    kitty, mug = res["subjects"]["kitty"], res["subjects"]["mug"]
    assert kitty["live"] and kitty["model"] == "base" and mug["model"].startswith("lora from")
    assert kitty["num_generated"] == 6 and mug["num_real_images"] == 3
    assert kitty["prompts"][0] == "a sks cat wearing a hat"
    for s in (kitty, mug):
        assert (
            -1 <= s["dino"] <= 1
            and -1 <= s["clip_i"] <= 1
            and -1 <= s["clip_t"] <= 1
            and 0 <= s["harmonic"] <= 1
        )
    assert res["mean"]["dino"] == pytest.approx((kitty["dino"] + mug["dino"]) / 2)
    assert res["unknown_subjects"] == ["stray"] and res["backbones"]["dino"]["stand_in_for"] is None
    md = (out / "results.md").read_text()
    assert "| subject |" in md and "CLIP-I" in md and "λ-harmonic (λ=0.3)" in md
    grid = Image.open(out / "grids" / "mug.png")
    assert grid.size[0] > 4 * 64 and (out / "metrics.png").is_file()


def test_profile_step_shows_the_reference_forward_gone_when_its_errors_are_stored(tmp_path):
    common = ["--steps", "2", "--warmup", "1", "--train_batch_size", "4", "--max_train_samples", "32",
              "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    first = _run("profile_step.py", [*common, "--out", str(tmp_path / "a.json")])
    second = _run("profile_step.py", [*common, "--out", str(tmp_path / "b.json")])
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert set(a["parts_s"]) == {"data", "encode", "pair_randomness", "noising", "policy_forward",
                                 "reference_forward", "loss", "backward", "optimizer", "other"}  # fmt: skip
    assert a["parts_s"]["reference_forward"] > 0 and a["parts_s"]["encode"] > 0  # first run: computed
    assert b["parts_s"]["reference_forward"] == 0  # second run: read from the reference-error cache
    assert b["parts_s"]["encode"] < a["parts_s"]["encode"] / 5  # and latents read from the lazy cache
    assert "| policy_forward |" in first.stdout and "| part |" in second.stdout
    assert a["environment"]["torch"]["version"]  # where it was measured


def test_throughput_benchmark_times_every_setting_against_a_public_script(tmp_path):
    stand_in = tmp_path / "public.py"  # stands in for diffusers' research script: accepts its flags, exits
    stand_in.write_text(
        "import sys, time\nassert '--pretrained_model_name_or_path' in sys.argv\ntime.sleep(0.2)\n"
    )
    out = tmp_path / "bench.json"
    proc = _run("benchmark_throughput.py", ["--steps", "2", "--batch", "4", "--repeats", "1",
                                            "--reference_script", str(stand_in), "--out", str(out)])  # fmt: skip
    res = json.loads(out.read_text())
    names = {"no caches", "cold", "latent cache reused", "all caches reused", "all caches reused, channels-last",
             "public script"}  # fmt: skip
    assert set(res["settings"]) == names and res["pairs_per_run"] == 8
    s = res["settings"]["all caches reused"]
    assert s["median_wall_s"] > 0 and s["peak_rss_MiB"] > 100 and s["speedup_vs_public_wall"] > 0
    assert res["settings"]["public script"]["speedup_vs_public_wall"] == 1.0
    assert "| all caches reused |" in proc.stdout
    assert res["environment"]["cpu"]["logical_cores"] >= 1  # where it was measured
