"""ImageReward: a small random checkpoint in the ORIGINAL BLIP naming, scored by the transformers-based scorer and by a
float64 re-implementation of the original architecture (BLIP's ``vit.py`` and ``med.py``, ImageReward's ``score``)
written here directly on those names; strict conversion errors; the catalog's missing-weights errors.

The checkpoint is built from random tensors by name, never by saving transformers modules, so the name mapping of
``diffalign.rewards.imagereward`` is checked against the original layout rather than against itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_float_tensor
from diffalign.rewards.catalog import MissingWeightsError, load_reward
from diffalign.rewards.imagereward import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageRewardScorer,
    convert_imagereward_state_dict,
    load_blip_tokenizer,
    load_imagereward,
)

# Small sizes: ViT width 48 (3 heads) on 32 px images in 8 px patches; BERT width 32 (2 heads); MLP 32 -> ... -> 1.
VISION = {"width": 48, "heads": 3, "layers": 2, "patch": 8, "image": 32, "mlp": 96}
TEXT = {"width": 32, "heads": 2, "layers": 2, "ffn": 64, "positions": 40}
WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] a an the on of in and with red green blue big small circle square triangle "
    "dog cat photo painting ##s"
).split()
VOCAB = len(WORDS) + 2  # + BLIP's [DEC] and [ENC], as 30522 + 2 = 30524 for bert-base-uncased
# the last prompt is longer than 35 tokens: truncated
PROMPTS = ["a red circle on a blue square", "the big dogs", "a " * 40 + "cat"]


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint, in ImageReward.pt's naming, from random tensors
# ---------------------------------------------------------------------------------------------------------------


def original_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear(name, out_dim, in_dim):
        sd[f"{name}.weight"] = randn(out_dim, in_dim, scale=1 / math.sqrt(in_dim))
        sd[f"{name}.bias"] = randn(out_dim, scale=0.1)

    def layer_norm(name, dim):
        sd[f"{name}.weight"] = 1 + randn(dim, scale=0.1)
        sd[f"{name}.bias"] = randn(dim, scale=0.1)

    v, t = VISION, TEXT
    d, grid = v["width"], v["image"] // v["patch"]
    p = "blip.visual_encoder."
    sd[p + "cls_token"] = randn(1, 1, d, scale=0.5)
    sd[p + "pos_embed"] = randn(1, grid * grid + 1, d, scale=0.5)
    sd[p + "patch_embed.proj.weight"] = randn(
        d, 3, v["patch"], v["patch"], scale=1 / math.sqrt(3 * v["patch"] ** 2)
    )
    sd[p + "patch_embed.proj.bias"] = randn(d, scale=0.1)
    for i in range(v["layers"]):
        b = f"{p}blocks.{i}."
        layer_norm(b + "norm1", d)
        linear(b + "attn.qkv", 3 * d, d)
        linear(b + "attn.proj", d, d)
        layer_norm(b + "norm2", d)
        linear(b + "mlp.fc1", v["mlp"], d)
        linear(b + "mlp.fc2", d, v["mlp"])
    layer_norm(p + "norm", d)

    h = t["width"]
    p = "blip.text_encoder."
    sd[p + "embeddings.word_embeddings.weight"] = randn(VOCAB, h, scale=0.5)
    sd[p + "embeddings.position_embeddings.weight"] = randn(t["positions"], h, scale=0.5)
    # a persistent buffer in med.py, so ImageReward.pt has it
    sd[p + "embeddings.position_ids"] = torch.arange(t["positions"]).expand(1, -1)
    layer_norm(p + "embeddings.LayerNorm", h)
    for i in range(t["layers"]):
        b = f"{p}encoder.layer.{i}."
        for att, kv_width in (("attention", h), ("crossattention", d)):
            linear(f"{b}{att}.self.query", h, h)
            linear(f"{b}{att}.self.key", h, kv_width)
            linear(f"{b}{att}.self.value", h, kv_width)
            linear(f"{b}{att}.output.dense", h, h)
            layer_norm(f"{b}{att}.output.LayerNorm", h)
        linear(b + "intermediate.dense", t["ffn"], h)
        linear(b + "output.dense", h, t["ffn"])
        layer_norm(b + "output.LayerNorm", h)

    linear("blip.vision_proj", 16, d)  # in ImageReward.pt, unused by the score
    linear("blip.text_proj", 16, h)
    for i, (out_dim, in_dim) in zip((0, 2, 4, 6, 7), ((1024, h), (128, 1024), (64, 128), (16, 64), (1, 16))):
        linear(f"mlp.layers.{i}", out_dim, in_dim)
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``ImageReward.pt`` + ``med_config.json`` (beside it, as the manifest's download puts it) + a tokenizer
    folder holding only ``vocab.txt``."""
    d = tmp_path_factory.mktemp("imagereward")
    torch.save(original_checkpoint(), d / "ImageReward.pt")
    med = {
        "hidden_size": TEXT["width"],
        "num_attention_heads": TEXT["heads"],
        "num_hidden_layers": TEXT["layers"],
        "intermediate_size": TEXT["ffn"],
        "vocab_size": VOCAB,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 0,
        "add_cross_attention": True,
    }
    (d / "med_config.json").write_text(json.dumps(med))
    tok = d / "bert-tiny-uncased"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return {"checkpoint": d / "ImageReward.pt", "tokenizer": tok}


@pytest.fixture(scope="module")
def scorer(files):
    return load_imagereward(files, vision_num_heads=VISION["heads"], batch_size=2)


def smooth_images():
    """Two PIL images of different non-square sizes (so the resize and the crop both matter), smooth content."""
    rng = np.random.default_rng(3)
    out = []
    for w, h in ((45, 37), (30, 52)):
        small = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The float64 reference: original architecture on original names
# ---------------------------------------------------------------------------------------------------------------


def authors_pixels(images):
    """ImageReward's ``_transform(n_px)`` with torchvision, as in ``ImageReward/ImageReward.py``."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    n = VISION["image"]
    tf = Compose(
        [
            Resize(n, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(n),
            lambda im: im.convert("RGB"),
            ToTensor(),
            Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )
    return torch.stack([tf(im) for im in images])


def ref_vit(sd, x, heads):
    """BLIP's ``VisionTransformer.forward``: patches + cls + pos; pre-norm blocks; final norm (eps 1e-6)."""
    w = {k[len("blip.visual_encoder.") :]: v for k, v in sd.items() if k.startswith("blip.visual_encoder.")}
    patch = w["patch_embed.proj.weight"].shape[-1]
    x = (
        F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch)
        .flatten(2)
        .transpose(1, 2)
    )
    b, d = x.shape[0], x.shape[-1]
    x = torch.cat([w["cls_token"].expand(b, -1, -1), x], dim=1) + w["pos_embed"]
    n = x.shape[1]

    def ln(t, name):
        return F.layer_norm(t, (d,), w[name + ".weight"], w[name + ".bias"], eps=1e-6)

    i = 0
    while f"blocks.{i}.norm1.weight" in w:
        blk = f"blocks.{i}."
        qkv = F.linear(ln(x, blk + "norm1"), w[blk + "attn.qkv.weight"], w[blk + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(y, w[blk + "attn.proj.weight"], w[blk + "attn.proj.bias"])
        y = F.gelu(F.linear(ln(x, blk + "norm2"), w[blk + "mlp.fc1.weight"], w[blk + "mlp.fc1.bias"]))
        x = x + F.linear(y, w[blk + "mlp.fc2.weight"], w[blk + "mlp.fc2.bias"])
        i += 1
    return ln(x, "norm")


def ref_bert(sd, ids, mask, image_embeds, heads):
    """BLIP's ``med.py`` ``BertModel`` in ``mode='multimodal'``: post-norm layers of self-attention (padding keys
    −10000), cross-attention to every image token, GELU FFN; embeddings = word + absolute position, LayerNorm."""
    w = {k[len("blip.text_encoder.") :]: v for k, v in sd.items() if k.startswith("blip.text_encoder.")}
    h = w["embeddings.word_embeddings.weight"].shape[1]

    def ln(t, name):
        return F.layer_norm(t, (h,), w[name + ".weight"], w[name + ".bias"], eps=1e-12)

    def lin(t, name):
        return F.linear(t, w[name + ".weight"], w[name + ".bias"])

    def attention(x, context, name, additive_mask):
        b, hd = x.shape[0], h // heads

        def split(t):
            return t.view(b, -1, heads, hd).transpose(1, 2)

        q, k, v = split(lin(x, name + ".self.query")), split(lin(context, name + ".self.key")), None
        v = split(lin(context, name + ".self.value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + additive_mask
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, -1, h)
        return ln(lin(y, name + ".output.dense") + x, name + ".output.LayerNorm")

    length = ids.shape[1]
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
    x = ln(x, "embeddings.LayerNorm")
    pad = (1.0 - mask[:, None, None, :].double()) * -10000.0
    i = 0
    while f"encoder.layer.{i}.intermediate.dense.weight" in w:
        layer = f"encoder.layer.{i}."
        x = attention(x, x, layer + "attention", pad)
        x = attention(x, image_embeds, layer + "crossattention", 0.0)  # image_atts = ones: nothing masked
        y = F.gelu(lin(x, layer + "intermediate.dense"))
        x = ln(lin(y, layer + "output.dense") + x, layer + "output.LayerNorm")
        i += 1
    return x


def ref_scores(sd, pixels, prompts, tokenizer):
    """ImageReward.score in float64: first-token state -> MLP (no activations) -> standardise."""
    sd = {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}
    tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    image_embeds = ref_vit(sd, pixels.double(), VISION["heads"])
    x = ref_bert(sd, tok["input_ids"], tok["attention_mask"], image_embeds, TEXT["heads"])[:, 0, :]
    for i in (0, 2, 4, 6, 7):
        x = F.linear(x, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return ((x.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD), tok


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_exact_scores_match_float64_original_architecture(scorer, files):
    images = smooth_images()
    s = scorer.score(images, PROMPTS[:2])
    assert s.shape == (2,) and s.dtype == torch.float32 and not s.requires_grad
    pixels = authors_pixels(images)
    # the authors' torchvision transform
    assert torch.allclose(scorer.preprocess_pil(images), pixels, atol=1e-6)
    tokenizer = load_blip_tokenizer(files["tokenizer"])
    expected, tok = ref_scores(original_checkpoint(), pixels, PROMPTS[:2], tokenizer)
    assert tok["attention_mask"].sum(1).tolist() == [9, 6]  # padding to 35 is exercised
    assert torch.allclose(s.double(), expected, atol=1e-4), (s, expected)
    assert expected.std() > 0.05  # the two scores differ: the test can tell images/prompts apart


def test_batches_truncation_and_first_token(scorer, files):
    images = smooth_images()
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    batch = [images[1], images[0], images[1]]
    s = scorer.score(batch, prompts)  # batch_size=2: two chunks
    tokenizer = load_blip_tokenizer(files["tokenizer"])
    expected, tok = ref_scores(original_checkpoint(), authors_pixels(batch), prompts, tokenizer)
    assert tok["input_ids"].shape == (3, 35) and int(tok["attention_mask"][0].sum()) == 35  # truncated
    # [CLS] first: ImageReward does not replace it with [ENC]
    assert (tok["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert torch.allclose(s.double(), expected, atol=1e-4)
    assert len(tokenizer) == VOCAB
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [VOCAB - 2, VOCAB - 1]


def test_differentiable_mode_gives_pixel_gradients_and_agrees_with_exact(scorer):
    x = torch.stack([to_float_tensor(im)[0] for im in smooth_images()[:1]] * 2)  # [2, 3, 37, 45]
    x = (x * torch.tensor([1.0, 0.9]).view(2, 1, 1, 1)).requires_grad_(True)
    prompts = PROMPTS[:2]
    with scorer.differentiable_mode():
        s = scorer.score(x, prompts)
    assert s.requires_grad and s.dtype == torch.float32
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in scorer.parameters())  # the model stays frozen
    exact = scorer.score(x.detach(), prompts)
    # The two resizes (PIL's fixed-point bicubic vs F.interpolate) differ by up to one grey level per pixel; this
    # small random model turns that into score differences of about 0.01 (scores of different images differ by ~1).
    assert torch.allclose(exact, s.detach(), atol=2e-2), (exact, s)
    # Without a resize, and on the 8-bit grid, the two modes see the same pixels: the same scores.
    y = to_float_tensor(np.stack([np.asarray(im.resize((32, 32))) for im in smooth_images()]))
    with scorer.differentiable_mode():
        same = scorer.score(y, prompts)
    assert torch.allclose(scorer.score(y, prompts), same, atol=1e-5)


def test_bfloat16_scores_are_float32_and_close(files, scorer):
    low = load_imagereward(files, vision_num_heads=VISION["heads"], dtype=torch.bfloat16)
    images = smooth_images()
    s = low.score(images, PROMPTS[:2])
    assert s.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert torch.allclose(s, scorer.score(images, PROMPTS[:2]), atol=0.15)


def test_conversion_names_every_key_and_is_strict(files):
    sd = original_checkpoint()
    vision, text, mlp = convert_imagereward_state_dict(sd)
    assert "encoder.layers.1.self_attn.projection.weight" in vision
    assert "post_layernorm.bias" in vision and "embeddings.class_embedding" in vision
    assert "encoder.layer.0.crossattention.self.key.weight" in text and "embeddings.position_ids" not in text
    assert sorted(mlp) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    used = len(vision) + len(text) + len(mlp)
    assert used == len(sd) - 5  # position_ids and vision_proj/text_proj weight+bias are the only keys skipped

    tokenizer = load_blip_tokenizer(files["tokenizer"])
    bad = dict(sd, **{"blip.visual_encoder.blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"blip\.visual_encoder\.blocks\.0\.attn\.extra\.weight"):
        ImageRewardScorer.from_state_dict(bad, tokenizer, vision_num_heads=3)
    with pytest.raises(ValueError, match=r"unexpected key.*something\.else"):
        convert_imagereward_state_dict(dict(sd, **{"something.else": torch.zeros(1)}))

    missing = dict(sd)
    del missing["blip.text_encoder.encoder.layer.1.crossattention.output.dense.bias"]
    with pytest.raises(
        ValueError, match=r"missing 1 key.*blip\.text_encoder\.encoder\.layer\.1\.crossattention"
    ):
        ImageRewardScorer.from_state_dict(missing, tokenizer, vision_num_heads=3, text_num_heads=2)
    missing = dict(sd)
    del missing["blip.visual_encoder.blocks.1.norm2.weight"]
    with pytest.raises(ValueError, match=r"blip\.visual_encoder\.blocks\.1\.norm2\.weight"):
        ImageRewardScorer.from_state_dict(missing, tokenizer, vision_num_heads=3, text_num_heads=2)
    missing = dict(sd)
    del missing["mlp.layers.6.bias"]
    with pytest.raises(ValueError, match=r"mlp\.layers\.6\.bias"):
        ImageRewardScorer.from_state_dict(missing, tokenizer, vision_num_heads=3, text_num_heads=2)
    with pytest.raises(ValueError, match="vision_num_heads"):  # 48 / 64 heads: the default cannot apply
        ImageRewardScorer.from_state_dict(sd, tokenizer)


def test_med_config_must_agree_with_the_checkpoint(files):
    tokenizer = load_blip_tokenizer(files["tokenizer"])
    with pytest.raises(ValueError, match="hidden_size=768 vs 32"):
        ImageRewardScorer.from_state_dict(
            original_checkpoint(), tokenizer, med_config={"hidden_size": 768}, vision_num_heads=3
        )


def _manifest(tmp_path, weights: str, params: str = "{}"):
    path = tmp_path / "ir.yaml"
    path.write_text(
        "# test manifest\nname: ir\nkind: imagereward\ndescription: t\npreprocessing: p\noutput_scale: o\n"
        f"licence: l\nweights:\n{weights}params: {params}\n"
    )
    return path


def test_catalog_loads_a_manifest_and_scores(files, scorer, tmp_path):
    manifest = _manifest(
        tmp_path,
        f"  checkpoint: {{path: {files['checkpoint']}, source: test}}\n"
        f"  tokenizer: {{path: {files['tokenizer']}, source: test}}\n",
        "{vision_num_heads: 3, name: ir}",
    )
    r = load_reward(manifest)
    assert isinstance(r, ImageRewardScorer) and r.name == "ir"
    images = smooth_images()
    assert torch.allclose(r.score(images, PROMPTS[:2]), scorer.score(images, PROMPTS[:2]), atol=1e-6)


def test_missing_files_give_the_catalog_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFALIGN_REWARD_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError) as err:
        load_reward("imagereward", weights_dir=tmp_path)
    msg = str(err.value)
    assert "ImageReward.pt" in msg and "THUDM/ImageReward" in msg and "Put it at" in msg
    assert str(tmp_path / "weights" / "imagereward" / "ImageReward.pt") in msg

    folder = tmp_path / "weights" / "imagereward"
    folder.mkdir(parents=True)
    (folder / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(MissingWeightsError) as err:
        load_reward("imagereward", weights_dir=tmp_path)
    msg = str(err.value)
    assert "bert-base-uncased" in msg and "google-bert/bert-base-uncased" in msg and "Put it at" in msg

    (folder / "bert-base-uncased").mkdir()  # the folder exists but holds no tokenizer files
    with pytest.raises(MissingWeightsError, match="vocab.txt"):
        load_reward("imagereward", weights_dir=tmp_path)

    with pytest.raises(MissingWeightsError, match="THUDM/ImageReward"):
        load_imagereward({"checkpoint": tmp_path / "nope.pt", "tokenizer": folder / "bert-base-uncased"})
