"""The PPD user encoder: frozen pair featurisers, the projector, files, and the precomputed feature table.

The CLIP featuriser runs on the sandbox's tiny CLIP (F = 3 · 64). The VLM featuriser cannot load real weights
offline: it runs on a tiny random ``LlavaForConditionalGeneration`` (CLIP vision + Llama text configs, a word-level
tokenizer built here), saved and reloaded by path, and its pooling and layer choice are checked against a direct
forward of the same model.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.data.pickapic_rows import encode_jpeg
from diffalign.errors import ConfigError
from diffalign.models.user_encoder import (
    DEFAULT_VLM_PROMPT,
    SANDBOX_NUM_TOKENS,
    SANDBOX_TOKEN_DIM,
    ClipPairFeaturizer,
    PairFeaturizer,
    UserEncoder,
    UserProjector,
    VLMHiddenStateFeaturizer,
    interpolate,
    load_embedding,
    pair_features_table,
    save_embedding,
)
from diffalign.sandbox import SANDBOX_CLIP, SANDBOX_PIPELINE

CAPTIONS = ["a red circle", "a blue square on a light background", "a small green triangle"]


def images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clip() -> ClipPairFeaturizer:
    return ClipPairFeaturizer()  # the default: catalog "sandbox-clip"


def assert_one_line(err: pytest.ExceptionInfo, *names: object) -> None:
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg


# -- CLIP featuriser ---------------------------------------------------------------------------------------------


def test_sandbox_defaults_match_the_sandbox_unet(clip):
    unet = json.loads((SANDBOX_PIPELINE / "unet" / "config.json").read_text())
    assert SANDBOX_TOKEN_DIM == unet["cross_attention_dim"] == 32 and SANDBOX_NUM_TOKENS == 4
    assert clip.embed_dim == 64 and clip.dim == 192 and isinstance(clip, PairFeaturizer)
    assert clip.describe() == {"kind": "clip", "model_path": "sandbox-clip"}


def test_clip_features_shape_finite_deterministic_and_frozen(clip):
    pref, rej = images(3, 0), images(3, 1)
    a = clip.features(CAPTIONS, pref, rej)
    assert a.shape == (3, 192) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert not a.requires_grad and a.grad_fn is None
    assert torch.equal(a, clip.features(CAPTIONS, pref, rej))
    # PIL input is the same images; the caption block is a unit vector, the text embedding of the caption
    pil = clip.features(CAPTIONS, [Image.fromarray(x) for x in pref], [Image.fromarray(x) for x in rej])
    assert torch.equal(a, pil)
    torch.testing.assert_close(a[:, 128:].norm(dim=1), torch.ones(3))
    assert not torch.allclose(a[0, 128:], a[1, 128:])
    assert clip.features([], images(0, 0), images(0, 0)).shape == (0, 192)


def test_clip_swap_negates_the_difference_block_exactly(clip):
    pref, rej = images(3, 2), images(3, 3)
    a, b = clip.features(CAPTIONS, pref, rej), clip.features(CAPTIONS, rej, pref)
    assert torch.equal(a[:, :64], -b[:, :64]) and a[:, :64].abs().max() > 0
    assert torch.equal(a[:, 64:], b[:, 64:])  # sum and caption: symmetric


def test_clip_featurizer_from_the_directory_and_errors(clip):
    by_dir = ClipPairFeaturizer(SANDBOX_CLIP)
    pref, rej = images(2, 4), images(2, 5)
    torch.testing.assert_close(
        by_dir.features(CAPTIONS[:2], pref, rej), clip.features(CAPTIONS[:2], pref, rej)
    )
    with pytest.raises(ValueError, match="captions"):
        clip.features(CAPTIONS, pref, rej)
    with pytest.raises(ValueError, match="not a CLIP"):
        ClipPairFeaturizer("sandbox-judge")


# -- projector ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_projector_shapes_permutation_and_mask(pool):
    proj = UserProjector(12, num_tokens=3, token_dim=8, hidden=16, pool=pool, seed=1)
    feats = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    out = proj(feats)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)  # LayerNorm per token
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(proj(feats[:, perm]), out, atol=1e-6, rtol=1e-5)
    # a masked pair changes nothing, whatever its features (NaN included): same as leaving it out
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 2] = False
    garbage = feats.clone()
    garbage[0, 2] = float("nan")
    masked = proj(garbage, mask)
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked[0], proj(feats[:1, [0, 1, 3, 4]])[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(masked[1], out[1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(masked[0], out[0])
    with pytest.raises(ValueError, match="at least one"):
        proj(feats, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, k, 12\]"):
        proj(feats[..., :11])


def test_projector_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = UserProjector(12, 2, 8, 16, "attention", seed=3), UserProjector(12, 2, 8, 16, "attention", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    c = UserProjector(12, 2, 8, 16, "attention", seed=4)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if not name.startswith("norm."):
            assert not torch.equal(pa, pc), name
    with pytest.raises(ValueError, match="pool"):
        UserProjector(12, pool="max")


def test_gradients_reach_the_projector_only(clip):
    enc = UserEncoder.build(clip, hidden=32, seed=0)
    pairs = [(c, p, r) for c, p, r in zip(CAPTIONS, images(3, 6), images(3, 7))]
    tokens = enc.embed(pairs)
    assert tokens.shape == (SANDBOX_NUM_TOKENS, SANDBOX_TOKEN_DIM)
    (tokens * torch.linspace(-1, 1, tokens.numel()).view_as(tokens)).sum().backward()
    for name, p in enc.projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in clip.clip.parameters())
    feats = clip.features(CAPTIONS, images(3, 6), images(3, 7)).unsqueeze(0)
    torch.testing.assert_close(enc.embed_features(feats)[0], tokens.detach())


# -- files -------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(clip, tmp_path):
    enc = UserEncoder.build(clip, num_tokens=2, token_dim=16, hidden=32, pool="attention", seed=5)
    feats = torch.randn(3, 4, 192, generator=torch.Generator().manual_seed(1))
    folder = enc.save(tmp_path / "enc")
    cfg = json.loads((folder / "user_encoder.json").read_text())
    assert cfg["featurizer"] == {"kind": "clip", "model_path": "sandbox-clip"}
    assert (cfg["feature_dim"], cfg["num_tokens"], cfg["token_dim"], cfg["pool"]) == (192, 2, 16, "attention")
    assert cfg["digest"] == enc.digest()
    back = UserEncoder.load(folder, featurizer=clip)
    assert (
        torch.equal(back.embed_features(feats), enc.embed_features(feats)) and back.digest() == enc.digest()
    )
    rebuilt = UserEncoder.load(folder)  # featuriser rebuilt from the config: the sandbox CLIP by catalog name
    pairs = [(CAPTIONS[0], images(1, 8)[0], images(1, 9)[0])]
    torch.testing.assert_close(rebuilt.embed(pairs), enc.embed(pairs))
    bare = UserEncoder.load(folder, load_featurizer=False)
    assert bare.featurizer is None and bare.digest() == enc.digest()
    with pytest.raises(ValueError, match="embed_features"):
        bare.embed(pairs)


class _Stub:
    kind, dim = "clip", 7

    def features(self, captions, preferred, rejected):
        return torch.zeros(len(captions), 7)

    def describe(self):
        return {"kind": "clip", "model_path": None}


def test_load_errors_are_one_line_and_name_the_file(tmp_path):
    enc = UserEncoder(UserProjector(7, 2, 4, hidden=8), _Stub())
    folder = enc.save(tmp_path / "enc")
    cfg_path, weights = folder / "user_encoder.json", folder / "user_projector.safetensors"
    cfg = json.loads(cfg_path.read_text())

    with pytest.raises(ConfigError) as err:
        UserEncoder.load(tmp_path / "nowhere")
    assert_one_line(err, tmp_path / "nowhere" / "user_encoder.json")
    with pytest.raises(ConfigError) as err:
        UserEncoder.load(folder, featurizer=type("Wide", (_Stub,), {"dim": 9})())
    assert_one_line(err, cfg_path, "9")
    with pytest.raises(ValueError, match="built from objects"):
        UserEncoder.load(folder)  # no model path to rebuild the featuriser from

    for text, needle in (
        ("{not json", "JSON"),
        (json.dumps({**cfg, "format": "other"}), "format"),
        (json.dumps({**cfg, "pool": "max"}), "pool"),
        (json.dumps({**cfg, "num_tokens": 0}), "num_tokens"),
        (json.dumps({**cfg, "featurizer": {"kind": "sift"}}), "featurizer"),
    ):
        cfg_path.write_text(text)
        with pytest.raises(ConfigError) as err:
            UserEncoder.load(folder, featurizer=_Stub())
        assert_one_line(err, cfg_path, needle)

    cfg_path.write_text(json.dumps({**cfg, "num_tokens": 3}))  # the weights hold 2 tokens
    with pytest.raises(ConfigError) as err:
        UserEncoder.load(folder, featurizer=_Stub())
    assert_one_line(err, weights, "shape mismatch", "out.weight")
    cfg_path.write_text(json.dumps({**cfg, "pool": "attention"}))  # weights lack the attention pool's keys
    with pytest.raises(ConfigError) as err:
        UserEncoder.load(folder, featurizer=_Stub())
    assert_one_line(err, weights, "query")
    cfg_path.write_text(json.dumps(cfg))
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError) as err:
        UserEncoder.load(folder, featurizer=_Stub())
    assert_one_line(err, weights)
    weights.unlink()
    with pytest.raises(ConfigError) as err:
        UserEncoder.load(folder, featurizer=_Stub())
    assert_one_line(err, weights, "not found")


def test_embedding_save_load_with_metadata(tmp_path):
    enc = UserEncoder(UserProjector(7, 2, 4, hidden=8), _Stub())
    tokens = enc.embed([("a caption", images(1, 0)[0], images(1, 1)[0])])
    path = enc.save_embedding(tmp_path / "u" / "user-1001.safetensors", tokens, {"user_id": 1001, "k": 1})
    back, meta = enc.load_embedding(path)
    assert torch.equal(back, tokens.detach())
    assert meta == {"user_id": 1001, "k": 1, "encoder_digest": enc.digest(), "shape": [2, 4]}
    assert load_embedding(path)[1] == meta
    other = UserEncoder(UserProjector(7, 2, 4, hidden=8, seed=1), _Stub())
    with pytest.raises(ConfigError) as err:
        other.load_embedding(path)
    assert_one_line(err, path, enc.digest())
    with pytest.raises(ValueError, match="encoder_digest"):
        save_embedding(tmp_path / "x.safetensors", tokens, {"user_id": 1, "k": 1})
    for bad in (tmp_path / "missing.safetensors", enc.save(tmp_path / "enc") / "user_projector.safetensors"):
        with pytest.raises(ConfigError) as err:
            load_embedding(bad)
        assert_one_line(err, bad)


def test_interpolation_endpoints_and_midpoint():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    assert torch.equal(interpolate(a, b, 0.0), a) and torch.equal(interpolate(a, b, 1), b)
    torch.testing.assert_close(interpolate(a, b, 0.25), 0.75 * a + 0.25 * b)
    assert torch.equal(UserEncoder.interpolate(a, b, 0.5), interpolate(a, b, 0.5))
    with pytest.raises(ValueError, match="shapes"):
        interpolate(a, b[:3], 0.5)


# -- precomputed table -------------------------------------------------------------------------------------------


def test_pair_features_table_orients_by_label(clip):
    arr0, arr1 = images(5, 10), images(5, 11)
    jpg0, jpg1 = [encode_jpeg(x) for x in arr0], [encode_jpeg(x) for x in arr1]
    captions = [CAPTIONS[i % 3] for i in range(5)]
    labels = [1.0, 0.0, 0.5, 0.0, 1.0]  # ≥ 0.5: image 0 preferred
    table = pair_features_table(clip, captions, jpg0, jpg1, labels, batch_size=2)
    assert table.shape == (5, 192) and table.device.type == "cpu"
    dec0 = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpg0]
    dec1 = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpg1]
    pref = [d0 if lab >= 0.5 else d1 for d0, d1, lab in zip(dec0, dec1, labels)]
    rej = [d1 if lab >= 0.5 else d0 for d0, d1, lab in zip(dec0, dec1, labels)]
    torch.testing.assert_close(table, clip.features(captions, pref, rej))
    flipped = pair_features_table(clip, captions, jpg0, jpg1, torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(flipped[[0, 1, 3, 4], :64], -table[[0, 1, 3, 4], :64])
    torch.testing.assert_close(flipped[:, 64:], table[:, 64:])
    with pytest.raises(ValueError, match="label_0"):
        pair_features_table(clip, captions, jpg0, jpg1, labels[:4])
    with pytest.raises(ValueError, match="NaN"):
        pair_features_table(clip, captions, jpg0, jpg1, [1.0, float("nan"), 0, 0, 0])


# -- VLM featuriser (tiny random LLaVA, offline) -----------------------------------------------------------------

WORDS = "which image does the user prefer for ? : . a b prefers red circle blue square on light background small green"


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A random ``LlavaForConditionalGeneration`` (vision 16 px, 2 × 2 patches → 4 image tokens; text width 32) and
    its ``LlavaProcessor``, saved to a folder: the offline stand-in for LLaVA(-OneVision) weights."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {"[PAD]": 0, "[UNK]": 1, "<image>": 2, "'": 3}
    for w in WORDS.split() + ["user", ":", "\n"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        extra_special_tokens={"image_token": "<image>"},
    )
    chat = (
        "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
        ),
        image_token_index=2,
        image_seq_length=4,
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def test_vlm_featurizer_from_path(tiny_llava):
    folder, _, _ = tiny_llava
    fz = VLMHiddenStateFeaturizer(folder)
    assert fz.dim == 32 and isinstance(fz, PairFeaturizer) and fz.describe()["layer"] == -1
    pref, rej = images(3, 20, size=20), images(3, 21, size=24)
    a = fz.features(CAPTIONS, pref, rej)
    assert a.shape == (3, 32) and a.dtype == torch.float32 and torch.isfinite(a).all() and not a.requires_grad
    assert torch.equal(a, fz.features(CAPTIONS, pref, rej))
    assert not torch.allclose(a, fz.features(CAPTIONS, rej, pref))  # which image is A matters
    with pytest.raises(FileNotFoundError, match="never downloads"):
        VLMHiddenStateFeaturizer(folder / "absent")


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_vlm_pooling_and_layer_match_a_direct_forward(tiny_llava, layer):
    _, model, processor = tiny_llava
    fz = VLMHiddenStateFeaturizer(model=model, processor=processor, layer=layer)
    pref, rej = images(1, 22), images(1, 23)
    text = "Which image does the user prefer for 'a red circle'? Image A: <image> Image B: <image>. The user prefers A."
    assert (
        fz.prompt("a red circle")
        == text
        == DEFAULT_VLM_PROMPT.format(caption="a red circle", image="<image>")
    )
    enc = processor(
        text=[text], images=[Image.fromarray(pref[0]), Image.fromarray(rej[0])], return_tensors="pt"
    )
    with torch.no_grad():
        states = model(**enc, output_hidden_states=True).hidden_states
    assert len(states) == 3  # embeddings + 2 layers
    torch.testing.assert_close(fz.features(["a red circle"], pref, rej)[0], states[layer][0].mean(0))


def test_vlm_features_do_not_depend_on_the_batch(tiny_llava):
    _, model, processor = tiny_llava
    fz = VLMHiddenStateFeaturizer(model=model, processor=processor)
    pref, rej = images(2, 24), images(2, 25)
    caps = ["a red circle", "a small green square on a light blue background"]  # different lengths: padding
    both = fz.features(caps, pref, rej)
    for i in range(2):
        torch.testing.assert_close(both[i], fz.features(caps[i : i + 1], pref[i : i + 1], rej[i : i + 1])[0])


def test_vlm_chat_template_layer_errors_and_caption_sanitising(tiny_llava, tmp_path):
    folder, model, processor = tiny_llava
    chat = VLMHiddenStateFeaturizer(model=model, processor=processor, chat_template=True)
    assert chat.prompt("a red circle").startswith("user : Which image")
    assert chat.prompt("a <image> circle").count("<image>") == 2  # a caption cannot add images
    pref, rej = images(1, 26), images(1, 27)
    raw = VLMHiddenStateFeaturizer(model=model, processor=processor).features(["a"], pref, rej)
    assert not torch.allclose(chat.features(["a"], pref, rej), raw)
    with pytest.raises(ValueError, match="out of range"):
        VLMHiddenStateFeaturizer(model=model, processor=processor, layer=3).features(["a"], pref, rej)
    with pytest.raises(ValueError, match="two"):
        VLMHiddenStateFeaturizer(model=model, processor=processor, prompt_template="{caption} {image}")
    # an encoder on the VLM rebuilds it from its saved config
    fz = VLMHiddenStateFeaturizer(folder, layer=1)
    enc = UserEncoder.build(fz, num_tokens=2, token_dim=8, hidden=16)
    saved = enc.save(tmp_path / "enc")
    back = UserEncoder.load(saved)
    assert isinstance(back.featurizer, VLMHiddenStateFeaturizer) and back.featurizer.layer == 1
    pairs = [("a red circle", pref[0], rej[0])]
    torch.testing.assert_close(back.embed(pairs), enc.embed(pairs))
    # a given featuriser may sit elsewhere (the digest ignores the path) but must read the same layer and prompt
    moved = UserEncoder.load(
        saved, featurizer=VLMHiddenStateFeaturizer(model=model, processor=processor, layer=1)
    )
    assert moved.digest() == enc.digest()
    with pytest.raises(ConfigError) as err:
        UserEncoder.load(
            saved, featurizer=VLMHiddenStateFeaturizer(model=model, processor=processor, layer=-1)
        )
    assert_one_line(err, saved / "user_encoder.json", "'layer': -1")


def test_odd_projector_negates_the_tokens_when_every_choice_is_reversed():
    from diffalign.models.odd_projector import OddUserProjector
    from diffalign.models.user_encoder import make_projector

    proj = make_projector(12, 2, 8, 16, "mean", odd_dims=4, seed=3)
    assert isinstance(proj, OddUserProjector)
    f = torch.randn(3, 4, 12)
    reversed_ = torch.cat([-f[..., :4], f[..., 4:]], dim=-1)
    torch.testing.assert_close(proj(reversed_), -proj(f), rtol=0, atol=1e-6)
    same_images = torch.cat([torch.zeros(3, 4, 4), f[..., 4:]], dim=-1)  # no difference: nothing chosen
    assert proj(same_images).abs().max() < 1e-5
    out = proj(f)
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    enc = UserEncoder(proj, featurizer_config={"kind": "clip", "model_path": "sandbox-clip"})
    assert enc.config()["odd_dims"] == 4
    assert not isinstance(make_projector(12, 2, 8, 16, "mean"), OddUserProjector)


def test_sandbox_attribute_featurizer_reads_what_differs_on_open_attributes():
    from diffalign.models.user_encoder import featurizer_from_config
    from diffalign.sandbox.pair_perception import AttributePairFeaturizer
    from diffalign.sandbox.scene import Scene, render
    from diffalign.sandbox.user_population import COMPONENT_NAMES

    fz = AttributePairFeaturizer()
    big = render(Scene(shape="circle", color="red", size="large", position="center", background="white"))
    small = render(Scene(shape="circle", color="red", size="small", position="center", background="white"))
    f = fz.features(["a red circle", "a large red circle"], [big, big], [small, small])
    assert f.shape == (2, 27) and fz.odd_dims == 9
    i_large = COMPONENT_NAMES.index("large")
    assert f[0, i_large] > 0.5  # size open: "bigger was chosen" is read
    assert f[1, i_large] == 0 and f[1, 18 + i_large] == 0  # size named by the caption: not a taste signal
    back = fz.features(["a red circle", "a large red circle"], [small, small], [big, big])
    assert torch.equal(back[:, :9], -f[:, :9]) and torch.equal(back[:, 9:], f[:, 9:])
    assert isinstance(featurizer_from_config(fz.describe()), AttributePairFeaturizer)


def test_an_encoder_with_the_attribute_featurizer_saves_and_loads(tmp_path):
    from diffalign.sandbox.pair_perception import AttributePairFeaturizer

    enc = UserEncoder.build(AttributePairFeaturizer(), hidden=16, seed=1)
    back = UserEncoder.load(enc.save(tmp_path / "enc"))
    assert isinstance(back.featurizer, AttributePairFeaturizer) and back.config() == enc.config()
    f = torch.randn(2, 4, 27)
    torch.testing.assert_close(back.embed_features(f), enc.embed_features(f), rtol=0, atol=0)
