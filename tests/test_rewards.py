"""Rewards: preprocessing against hand-derived values, scores against float64 re-computations on tiny random models
built here, the Bradley–Terry loss, combination, and the catalog."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffalign.rewards import base  # noqa: E402
from diffalign.rewards.base import (  # noqa: E402
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_pad_amounts,
    longest_side_size,
    pil_resize_longest_pad,
    shortest_side_size,
    tensor_resize_longest_pad,
    to_float_tensor,
    to_pil_list,
)
from diffalign.rewards.catalog import MissingWeightsError, list_rewards, load_manifest, load_reward  # noqa: E402
from diffalign.rewards.combine import CombinedReward, RunningStats, lambda_harmonic  # noqa: E402
from diffalign.rewards.multi_aspect import (  # noqa: E402
    MultiAspectConfig,
    MultiAspectReward,
    MultiAspectRewardModel,
    bt_loss,
    soft_bt_loss,
)

# ---------------------------------------------------------------------------------------------------------------
# Image conversion and preprocessing primitives
# ---------------------------------------------------------------------------------------------------------------


def _rand_uint8(b=2, h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)


def test_conversion_round_trips_between_pil_numpy_and_tensor():
    arr = _rand_uint8()
    pil = [Image.fromarray(a) for a in arr]
    t = to_float_tensor(arr)
    assert t.shape == (2, 3, 5, 7) and t.dtype == torch.float32
    assert torch.equal(t, to_float_tensor(pil))
    assert torch.allclose(t[1, 2, 3, 4], torch.tensor(arr[1, 3, 4, 2] / 255.0, dtype=torch.float32))
    back = to_pil_list(t)  # float -> round(255 x)
    assert all(np.array_equal(np.asarray(p), a) for p, a in zip(back, arr, strict=True))
    with pytest.raises(ValueError, match="channels first"):
        to_float_tensor(torch.zeros(2, 5, 7, 3))
    with pytest.raises(ValueError, match="uint8"):
        to_float_tensor(arr.astype(np.float32))


def test_clip_normalisation_constants():
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    x = torch.full((1, 3, 1, 1), 0.5)
    y = base.normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).flatten()
    expected = [(0.5 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, strict=True)]
    assert torch.allclose(y, torch.tensor(expected), atol=1e-6)


def test_resize_rules_by_hand():
    # HPS ResizeMaxSize: 3 x 5 (h x w) -> scale 224/5 = 44.8 -> (round(134.4), 224) = (134, 224); pad 90 -> 45 / 45
    assert longest_side_size(3, 5, 224) == (134, 224)
    assert center_pad_amounts(134, 224, 224) == (0, 45, 0, 45)
    # odd difference: the extra pixel goes right/bottom
    assert center_pad_amounts(7, 8, 10) == (1, 1, 1, 2)
    # Python's round is half-to-even, as in the original: 1 x 4 -> scale 2.5 -> round(2.5) = 2
    assert longest_side_size(1, 4, 10) == (2, 10)
    # torchvision Resize(int): longer side = int(size * long / short) (truncated): 3 x 5 -> (224, int(373.33)) = 373
    assert shortest_side_size(3, 5, 224) == (224, 373)
    assert shortest_side_size(5, 3, 224) == (373, 224)


def test_hps_resize_and_pad_on_a_3x5_image():
    colour = (200, 40, 90)
    img = Image.new("RGB", (5, 3), colour)  # PIL size is (w, h)
    out = np.asarray(pil_resize_longest_pad(img, 224))
    assert out.shape == (224, 224, 3)
    # rows 45 .. 178 hold the (constant) resized image, the 45 rows above and below are black
    assert (out[:45] == 0).all() and (out[179:] == 0).all()
    assert (out[45:179] == np.array(colour, dtype=np.uint8)).all()
    # tensor path: same geometry and values (a constant image stays constant under bicubic resampling)
    x = to_float_tensor(np.asarray(img)[None])
    y = tensor_resize_longest_pad(x, 224)
    assert y.shape == (1, 3, 224, 224)
    assert torch.all(y[..., :45, :] == 0) and torch.all(y[..., 179:, :] == 0)
    expected = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
    assert torch.allclose(y[0, :, 45:179, :], expected.expand(3, 134, 224), atol=1e-5)


def test_tensor_resize_matches_pil_bicubic_closely():
    arr = _rand_uint8(1, 40, 60, seed=1)
    arr = np.asarray(Image.fromarray(arr[0]).resize((60, 40), Image.Resampling.BOX))[None]  # smoother content
    pil = (
        np.asarray(Image.fromarray(arr[0]).resize((30, 20), Image.Resampling.BICUBIC)).astype(np.float64)
        / 255
    )
    t = base.resize_tensor(to_float_tensor(arr), (20, 30))[0].permute(1, 2, 0).numpy()
    assert (
        np.abs(t - pil).mean() < 2.0 / 255
    )  # same filter; differences from PIL's fixed-point arithmetic only


# ---------------------------------------------------------------------------------------------------------------
# open_clip path: a tiny custom architecture registered with add_model_config, saved and loaded back
# ---------------------------------------------------------------------------------------------------------------

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_open_clip_files(tmp_path_factory):
    """A tiny open_clip config (JSON) and a random-init checkpoint saved as {"state_dict": ...} (like HPS)."""
    import open_clip

    d = tmp_path_factory.mktemp("openclip")
    cfg = d / "diffalign-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model("diffalign-tiny-clip", pretrained=None)
    ckpt = d / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return cfg, ckpt


def _float64_open_clip_cos(reward, pixels, prompts):
    import copy

    m = copy.deepcopy(reward.model).double()
    u = m.encode_image(pixels.double())
    v = m.encode_text(reward.tokenizer(prompts))
    return torch.nn.functional.cosine_similarity(u, v, dim=-1)


def test_open_clip_score_matches_float64_recomputation(tiny_open_clip_files):
    from diffalign.rewards.clip import OpenClipReward

    cfg, ckpt = tiny_open_clip_files
    r = OpenClipReward.from_pretrained(
        "diffalign-tiny-clip", ckpt, model_config=cfg, scale=100.0, batch_size=2
    )
    imgs = _rand_uint8(3, 40, 48, seed=2)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    s = r.score(imgs, prompts)
    assert s.shape == (3,) and s.dtype == torch.float32 and not s.requires_grad
    pixels = r.preprocess_pil(to_pil_list(imgs))
    assert pixels.shape == (3, 3, 32, 32)
    expected = 100.0 * _float64_open_clip_cos(r, pixels, prompts)
    assert torch.allclose(s.double(), expected, atol=1e-4)
    # clamp at 0 (torchmetrics CLIPScore convention)
    r.clamp_min = 0.0
    assert torch.allclose(r.score(imgs, prompts).double(), expected.clamp_min(0), atol=1e-4)


def test_open_clip_refuses_missing_checkpoint_and_tags(tmp_path):
    from diffalign.rewards.clip import OpenClipReward

    with pytest.raises(FileNotFoundError, match="never downloads"):
        OpenClipReward.from_pretrained("ViT-L-14", "openai")
    with pytest.raises(FileNotFoundError, match="not found"):
        OpenClipReward.from_pretrained("ViT-L-14", tmp_path / "missing.pt")


def test_hps_uses_resize_longest_and_pad_and_cosine(tiny_open_clip_files):
    from diffalign.rewards.hps import load_hps

    cfg, ckpt = tiny_open_clip_files
    r = load_hps(ckpt, version="v2.0", arch="diffalign-tiny-clip", model_config=cfg)
    assert r.name == "hpsv2" and r.resize == "longest_pad"
    img = Image.fromarray(_rand_uint8(1, 12, 20, seed=3)[0])
    pixels = r.preprocess_pil([img])
    # 12 x 20 -> scale 32/20 -> (round(19.2), 32) = (19, 32); pad 13 -> top 6, bottom 7, black before normalisation
    black = base.normalize(torch.zeros(1, 3, 1, 1), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).flatten()
    assert torch.allclose(pixels[0, :, :6, :].mean(dim=(1, 2)), black, atol=1e-6)
    assert torch.allclose(pixels[0, :, 25:, :].mean(dim=(1, 2)), black, atol=1e-6)
    assert not torch.allclose(pixels[0, :, 6, :].mean(dim=-1), black, atol=1e-3)
    s = r.score([img], ["a cat"])
    assert torch.allclose(s.double(), _float64_open_clip_cos(r, pixels, ["a cat"]), atol=1e-5)


def test_differentiable_mode_keeps_the_graph_and_agrees_with_exact(tiny_open_clip_files):
    from diffalign.rewards.clip import OpenClipReward

    cfg, ckpt = tiny_open_clip_files
    r = OpenClipReward.from_pretrained("diffalign-tiny-clip", ckpt, model_config=cfg)
    x = to_float_tensor(_rand_uint8(2, 64, 64, seed=4)).requires_grad_(True)
    with r.differentiable_mode():
        s = r.score(x, ["a dog", "a cat"])
    assert s.requires_grad
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in r.parameters())  # the model stays frozen
    exact = r.score(x.detach(), ["a dog", "a cat"])
    assert torch.allclose(exact, s.detach(), atol=0.05)  # same preprocessing up to resize rounding
    with pytest.raises(TypeError, match="float tensor"), r.differentiable_mode():
        r.score(_rand_uint8(2, 64, 64), ["a", "b"])


def test_dtype_and_single_prompt(tiny_open_clip_files):
    from diffalign.rewards.clip import OpenClipReward

    cfg, ckpt = tiny_open_clip_files
    r = OpenClipReward.from_pretrained("diffalign-tiny-clip", ckpt, model_config=cfg)
    imgs = _rand_uint8(2, 32, 32, seed=9)
    ref = r.score(imgs, "a cat")  # one prompt string is used for every image
    assert torch.allclose(ref, r.score(imgs, ["a cat", "a cat"]))
    r.to("cpu", torch.bfloat16)
    low = r.score(imgs, "a cat")
    assert low.dtype == torch.float32 and torch.allclose(low, ref, atol=0.05)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        r.score(imgs, ["a", "b", "c"])


def test_lambda_harmonic_reward_with_references(tiny_open_clip_files):
    from diffalign.rewards.clip import OpenClipReward
    from diffalign.rewards.combine import LambdaHarmonicReward

    cfg, ckpt = tiny_open_clip_files
    clip = OpenClipReward.from_pretrained("diffalign-tiny-clip", ckpt, model_config=cfg)
    refs = _rand_uint8(2, 32, 32, seed=10)
    r = LambdaHarmonicReward(clip, refs, lam=0.5)
    out = r.score_aspects(refs[:1], ["a dog"])
    u = clip.image_features(clip.preprocess_pil(to_pil_list(refs)))
    cos_img = (u[:1] @ u.T).mean()  # mean of cos(ref0, ref0) = 1 and cos(ref0, ref1)
    cos_txt = (u[:1] * clip.text_features(["a dog"])).sum()
    assert out["s_img"].item() == pytest.approx(float(cos_img + 1) / 2, abs=1e-5)
    assert out["lambda-harmonic"].item() == pytest.approx(
        float(lambda_harmonic(cos_img.view(1), cos_txt.view(1), 0.5)), abs=1e-5
    )


def test_aesthetic_head_layout_and_score(tiny_open_clip_files, tmp_path):
    from diffalign.rewards.aesthetic import AestheticHead, AestheticReward

    cfg, ckpt = tiny_open_clip_files
    head = AestheticHead(768)
    assert sorted(head.state_dict()) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    )  # the released sac+logos+ava1-l14-linearMSE.pth keys
    torch.manual_seed(1)
    torch.save(AestheticHead(16).state_dict(), tmp_path / "head.pth")
    r = AestheticReward.from_pretrained(
        ckpt, tmp_path / "head.pth", arch="diffalign-tiny-clip", model_config=cfg
    )
    imgs = _rand_uint8(2, 32, 32, seed=5)
    s = r.score(imgs, ["ignored", "ignored"])
    pixels = r.preprocess_pil(to_pil_list(imgs)).double()
    import copy

    clip64 = copy.deepcopy(r.clip.model).double()
    head64 = copy.deepcopy(r.head).double()
    e = clip64.encode_image(pixels)
    expected = head64(e / e.norm(dim=-1, keepdim=True))
    assert torch.allclose(s.double(), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# transformers CLIP path: PickScore on a tiny random CLIPModel + CLIPProcessor saved to a directory
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_clip_dir(tmp_path_factory):
    from tiny_models import build_tiny_hf_clip

    return build_tiny_hf_clip(tmp_path_factory.mktemp("hfclip"), logit_scale=100.0)


def test_pickscore_formula_in_float64(tiny_hf_clip_dir):
    from diffalign.rewards.hf_clip import HFClipReward

    r = HFClipReward.from_pretrained(tiny_hf_clip_dir, score="pickscore")
    imgs = _rand_uint8(3, 36, 48, seed=6)
    prompts = ["a red circle on blue", "two squares", "a triangle"]
    s = r.score(imgs, prompts)
    m = r.model.double()
    px = r.processor(images=to_pil_list(imgs), return_tensors="pt")["pixel_values"].double()
    tok = r.processor(text=prompts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    u = m.visual_projection(m.vision_model(pixel_values=px).pooler_output)
    v = m.text_projection(
        m.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    )
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
    expected = m.logit_scale.exp() * cos  # exp(ln 100) = 100
    r.model.float()
    assert torch.allclose(s.double(), expected, atol=1e-4)
    assert math.isclose(float(m.logit_scale.exp()), 100.0, rel_tol=1e-6)


def test_hf_clip_tensor_path_matches_processor(tiny_hf_clip_dir):
    from diffalign.rewards.hf_clip import HFClipReward

    r = HFClipReward.from_pretrained(tiny_hf_clip_dir, score="cosine")
    imgs = _rand_uint8(2, 32, 32, seed=7)  # no resize: the two paths must agree exactly up to float error
    a = r.preprocess_pil(to_pil_list(imgs))
    b = r.preprocess_tensor(to_float_tensor(imgs))
    assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Multi-aspect reward model and Bradley–Terry loss
# ---------------------------------------------------------------------------------------------------------------


def test_bt_loss_by_hand():
    w = torch.tensor([0.0, 2.0, -1.0])
    lo = torch.tensor([0.0, 1.0, 1.0])
    expected = torch.tensor([math.log(2.0), math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(2.0))])
    assert torch.allclose(bt_loss(w, lo), expected, atol=1e-6)
    # soft labels: p = 1 is the hard loss; p = 0.5 is symmetric in (a, b)
    assert torch.allclose(soft_bt_loss(w, lo, 1.0), expected, atol=1e-6)
    assert torch.allclose(soft_bt_loss(w, lo, 0.5), soft_bt_loss(lo, w, 0.5), atol=1e-7)
    d = 1.0  # p = 0.5, d = 1: -(0.5 log σ(1) + 0.5 log σ(-1))
    half = -(0.5 * math.log(1 / (1 + math.exp(-d))) + 0.5 * math.log(1 / (1 + math.exp(d))))
    assert soft_bt_loss(torch.tensor([2.0]), torch.tensor([1.0]), 0.5).item() == pytest.approx(half, abs=1e-6)
    # gradient of -log σ(d) wrt s_w is -σ(-d)
    sw = torch.tensor([2.0], requires_grad=True)
    bt_loss(sw, torch.tensor([1.0])).sum().backward()
    assert sw.grad.item() == pytest.approx(-1 / (1 + math.exp(1.0)), abs=1e-6)


def test_multi_aspect_model_forward_save_load(tiny_hf_clip_dir, tmp_path):
    from diffalign.rewards.hf_clip import load_clip_dir

    backbone, processor = load_clip_dir(tiny_hf_clip_dir)
    cfg = MultiAspectConfig(head_hidden=4, overall_weights={"prompt_following": 3.0, "aesthetic": 1.0})
    torch.manual_seed(2)
    model = MultiAspectRewardModel(backbone, processor, cfg).eval()
    imgs = _rand_uint8(2, 32, 32, seed=8)
    prompts = ["a red circle", "a blue square"]
    px = processor(images=to_pil_list(imgs), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(px, prompts)
    assert set(out) == {"prompt_following", "aesthetic", "fidelity", "harmlessness", "overall"}
    # overall = (3 pf + 1 aes + 0 fid + 0 harm) / 4 (aspects not named in overall_weights weigh 0)
    assert torch.allclose(out["overall"], (3 * out["prompt_following"] + out["aesthetic"]) / 4, atol=1e-6)
    model.save(tmp_path / "vp")
    assert json.loads((tmp_path / "vp" / "config.json").read_text())["head_hidden"] == 4
    reward = MultiAspectReward.from_pretrained(tmp_path / "vp")
    scores = reward.score_aspects(imgs, prompts)
    for k, v in out.items():
        assert torch.allclose(scores[k], v, atol=1e-5), k
    assert torch.allclose(reward.score(imgs, prompts), out["overall"], atol=1e-5)
    assert (
        MultiAspectReward(reward.model, aspect="fidelity")
        .score(imgs, prompts)
        .allclose(out["fidelity"], atol=1e-5)
    )
    with pytest.raises(ValueError, match="aspect must be one of"):
        MultiAspectReward(reward.model, aspect="colour")


def test_multi_aspect_heads_are_trainable_with_bt_loss(tiny_hf_clip_dir):
    from diffalign.rewards.hf_clip import load_clip_dir

    backbone, processor = load_clip_dir(tiny_hf_clip_dir)
    torch.manual_seed(3)
    model = MultiAspectRewardModel(backbone, processor, MultiAspectConfig(aspects=("a", "b")))
    px = torch.randn(2, 3, 32, 32)
    out = model(px, ["x", "y"])
    loss = bt_loss(out["a"][:1], out["a"][1:]).mean()
    loss.backward()
    assert model.heads["a"].weight.grad.abs().sum() > 0 and model.heads["b"].weight.grad is None


# ---------------------------------------------------------------------------------------------------------------
# Combination
# ---------------------------------------------------------------------------------------------------------------


class _Const:
    """A fake reward returning fixed scores (one value per call, cycling)."""

    aspects = ()

    def __init__(self, name, batches):
        self.name = name
        self.batches = [torch.tensor(b, dtype=torch.float32) for b in batches]
        self.calls = 0

    def score(self, images, prompts):
        out = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return out

    def score_aspects(self, images, prompts):
        return {self.name: self.score(images, prompts)}


def test_combined_reward_fixed_zscore_by_hand():
    a = _Const("a", [[1.0, 3.0]])
    b = _Const("b", [[10.0, 20.0]])
    r = CombinedReward(
        [(a, 2.0), (b, 0.5)],
        normalize="zscore",
        stats={"a": {"mean": 2.0, "std": 1.0}, "b": {"mean": 10, "std": 5}},
    )
    out = r.score_aspects(np.zeros((2, 4, 4, 3), np.uint8), ["p", "q"])
    # 2·(1−2)/1 + 0.5·(10−10)/5 = −2 ;  2·(3−2)/1 + 0.5·(20−10)/5 = 3
    assert torch.allclose(out["combined"], torch.tensor([-2.0, 3.0]))
    assert torch.equal(out["a"], torch.tensor([1.0, 3.0]))


def test_combined_reward_running_stats_and_minmax():
    a = _Const("a", [[1.0, 3.0], [5.0, 7.0]])
    r = CombinedReward([(a, 1.0)], normalize="zscore")
    imgs = np.zeros((2, 4, 4, 3), np.uint8)
    first = r.score(imgs, ["p", "q"])  # stats of {1, 3}: mean 2, population std 1
    assert torch.allclose(first, torch.tensor([-1.0, 1.0]))
    second = r.score(imgs, ["p", "q"])  # stats of {1, 3, 5, 7}: mean 4, std sqrt(5)
    assert torch.allclose(second, torch.tensor([1.0, 3.0]) / math.sqrt(5.0))
    assert r.stats()["a"]["n"] == 4
    m = CombinedReward(
        [(_Const("a", [[2.0, 4.0]]), 1.0)], normalize="minmax", stats={"a": {"min": 0.0, "max": 8.0}}
    )
    assert torch.allclose(m.score(imgs, ["p", "q"]), torch.tensor([0.25, 0.5]))
    with pytest.raises(ValueError, match="lacks"):
        CombinedReward([(a, 1.0)], normalize="zscore", stats={"a": {"mean": 0.0}})
    with pytest.raises(ValueError, match="normalize must be"):
        CombinedReward([(a, 1.0)], normalize="rank")


def test_running_stats_match_numpy():
    rs = RunningStats()
    x = np.random.default_rng(0).normal(size=23)
    for chunk in np.array_split(x, 4):
        rs.update(torch.tensor(chunk))
    assert rs.mean == pytest.approx(x.mean(), abs=1e-12)
    assert rs.std == pytest.approx(x.std(), abs=1e-12)
    assert (rs.min, rs.max) == (x.min(), x.max())


def test_lambda_harmonic_by_hand():
    r = lambda_harmonic(torch.tensor([0.6]), torch.tensor([0.2]), 0.5)
    assert r.item() == pytest.approx(1 / (0.5 / 0.8 + 0.5 / 0.6), abs=1e-6)  # 0.685714
    assert lambda_harmonic(torch.tensor([0.6]), torch.tensor([0.2]), 1.0).item() == pytest.approx(0.8)
    assert lambda_harmonic(torch.tensor([0.6]), torch.tensor([0.2]), 0.0).item() == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------------------------
# Catalog
# ---------------------------------------------------------------------------------------------------------------

EXPECTED = {
    "clip-vit-l14",
    "pickscore",
    "hpsv2",
    "hpsv2.1",
    "aesthetic",
    "imagereward",
    "vp-score",
    "sandbox-judge",
    "sandbox-clip",
    "combined-prdp",
    "combined-sandbox",
    "sandbox-random-control",
}


def test_every_shipped_manifest_parses():
    names = list_rewards()
    assert EXPECTED <= set(names)
    for name in names:
        m = load_manifest(name)
        assert m["name"] == name, f"{name}.yaml: name field {m['name']!r} differs from the file name"
        first_line = m["_path"].read_text().splitlines()[0]
        assert first_line.startswith("#"), f"{name}.yaml must start with a comment"
        if m["kind"] == "combined":
            for c in m["params"]["components"]:
                load_manifest(c["reward"])  # components exist in the catalog


def test_missing_weights_error_names_file_source_and_destination(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFALIGN_REWARD_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError) as err:
        load_reward("pickscore", weights_dir=tmp_path)
    msg = str(err.value)
    assert "weights/pickscore" in msg and "yuvalkirstain/PickScore_v1" in msg
    assert str(tmp_path / "weights" / "pickscore") in msg and "Put it at" in msg
    with pytest.raises(ValueError, match="valid names"):
        load_reward("no-such-reward")


def test_user_weights_dir_is_used(tiny_open_clip_files, tmp_path):
    cfg, ckpt = tiny_open_clip_files
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(
        "# test manifest\nname: tiny\nkind: open_clip\ndescription: t\npreprocessing: p\noutput_scale: o\nlicence: l\n"
        f"weights:\n  checkpoint: {{path: {ckpt.name}, source: test}}\n  model_config: {{path: {cfg}, source: test}}\n"
        "params: {arch: diffalign-tiny-clip, name: tiny}\n"
    )
    r = load_reward(manifest, weights_dir=ckpt.parent)
    assert r.name == "tiny" and r.score(_rand_uint8(1, 32, 32), ["x"]).shape == (1,)


def _sandbox_batch(n=4):
    from diffalign.sandbox.captions import sample_example
    from diffalign.sandbox.scene import render

    rng = np.random.default_rng(0)
    scenes, prompts = zip(*(sample_example(rng) for _ in range(n)), strict=True)
    return np.stack([render(s) for s in scenes]), list(prompts)


def test_sandbox_judge_loads_and_scores():
    from diffalign.sandbox.judge import Judge

    imgs, prompts = _sandbox_batch()
    r = load_reward("sandbox-judge")
    s = r.score(imgs, prompts)
    ref = Judge().score(imgs, prompts)
    assert s.shape == (4,) and s.dtype == torch.float32
    assert np.allclose(s.numpy(), ref["overall"], atol=1e-6)
    aspects = r.score_aspects(to_float_tensor(imgs), prompts)  # float tensors are quantised back exactly
    assert np.allclose(aspects["aesthetic"].numpy(), ref["aesthetic"], atol=1e-6)
    assert load_reward("sandbox-judge", aspect="fidelity").score(imgs, prompts).numpy() == pytest.approx(
        ref["fidelity"], abs=1e-6
    )


def test_shipped_sandbox_clip_loads_and_scores():
    from diffalign.sandbox import SANDBOX_CLIP

    assert (SANDBOX_CLIP / "config.json").is_file(), f"{SANDBOX_CLIP} (shipped) missing from the checkout"
    imgs, prompts = _sandbox_batch()
    r = load_reward("sandbox-clip")
    s = r.score(imgs, prompts)
    assert s.shape == (4,) and torch.all(s.abs() <= 1.0 + 1e-5)


def test_random_control_ignores_content_and_is_a_pure_function():
    imgs, prompts = _sandbox_batch(4)
    r = load_reward("sandbox-random-control")
    s = r.score(imgs, prompts)
    assert s.shape == (4,) and s.dtype == torch.float32
    assert torch.equal(s, load_reward("sandbox-random-control").score(imgs, prompts))  # resumed runs agree
    # float input is quantised to the same bytes
    assert torch.equal(s, r.score(to_float_tensor(imgs), prompts))
    # One pixel's lowest bit, or another prompt, gives an unrelated score; another salt an independent draw.
    nudged = imgs.copy()
    nudged[0, 0, 0, 0] ^= 1
    assert r.score(nudged, prompts)[0] != s[0] and torch.equal(r.score(nudged, prompts)[1:], s[1:])
    assert r.score(imgs, ["x"] * 4).ne(s).all()
    assert load_reward("sandbox-random-control", salt="1").score(imgs, prompts).ne(s).all()
    # Uniform on [0, 1): 2,000 distinct inputs, every decile within 4 SE of 200 (SE = sqrt(2000 * 0.1 * 0.9) = 13.4).
    rng = np.random.default_rng(0)
    many = rng.integers(0, 256, size=(2000, 2, 2, 3), dtype=np.uint8)
    v = r.score(many, ["p"] * 2000).numpy()
    assert v.min() >= 0.0 and v.max() < 1.0
    counts = np.histogram(v, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - 200) < 4 * 13.4), counts
    # Nothing in it tracks the judge: the rank correlation on sandbox images is small.
    imgs, prompts = _sandbox_batch(200)
    judge = load_reward("sandbox-judge").score(imgs, prompts).numpy()
    rc = r.score(imgs, prompts).numpy()
    rho = np.corrcoef(np.argsort(np.argsort(judge)), np.argsort(np.argsort(rc)))[0, 1]
    assert abs(rho) < 4 / np.sqrt(199), rho


def test_permute_within_groups_by_hand():
    from diffalign.rewards.control import permute_within_groups

    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 40.0])
    g = torch.tensor([5, 5, 5, 9, 9, 9, 9])
    out = permute_within_groups(r, g, [0, 1])
    for gid, seed in ((5, 0), (9, 1)):
        rows = (g == gid).nonzero().flatten()
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out[rows], r[rows][perm])  # each group shuffled by its own seed, nothing crosses
    # a group's result does not depend on the other groups
    alone = permute_within_groups(r[3:], g[3:], [1])
    assert torch.equal(alone, out[3:])
    with pytest.raises(ValueError, match="2 seeds for 1 groups"):
        permute_within_groups(r[:3], g[:3], [0, 1])
