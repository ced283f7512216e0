"""Latent / text-embedding cache: build, reuse, invalidation, exactness against direct encoding, lazy reads."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import diffalign.data.cache as cache_mod
from diffalign.data import (
    CachedPairs,
    EpochShuffleSampler,
    PairTransform,
    PickAPicPairs,
    build_latent_cache,
    collate_cached,
    example_rng,
    model_fingerprint,
    write_pickapic_split,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def noise_png(seed: int, size=(40, 32)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_row(i: int, caption: str, label_0=1.0, label_1=0.0, jpg_0=None):
    return {
        "are_different": True,
        "best_image_uid": "",
        "caption": caption,
        "created_at": None,
        "has_label": True,
        "image_0_uid": "",
        "image_0_url": "",
        "image_1_uid": "",
        "image_1_url": "",
        "jpg_0": noise_png(i) if jpg_0 is None else jpg_0,
        "jpg_1": noise_png(500 + i),
        "label_0": label_0,
        "label_1": label_1,
        "model_0": "",
        "model_1": "",
        "ranking_id": i,
        "user_id": 3,
        "num_example_per_prompt": 1,
    }


class FakeVAE:
    """avg-pool by 4 as the "VAE": [N, 3, R, R] -> [N, 4, R/4, R/4] (RGB pooled + their mean), times 0.5."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        p = F.avg_pool2d(x, 4)
        return 0.5 * torch.cat([p, p.mean(1, keepdim=True)], dim=1)


class FakeText:
    """Hash-based embedding: prompt_embeds [N, 3, 8] and pooled_prompt_embeds [N, 5] from sha256(caption)."""

    def __init__(self):
        self.calls = 0
        self.captions: list[str] = []

    @staticmethod
    def one(caption: str) -> dict[str, torch.Tensor]:
        v = torch.tensor(list(hashlib.sha256(caption.encode()).digest()), dtype=torch.float32) / 255.0
        return {"prompt_embeds": v[:24].reshape(3, 8), "pooled_prompt_embeds": v[24:29]}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.captions += captions
        outs = [self.one(c) for c in captions]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


CAPTIONS = [
    "a red cube",
    "a blue ball",
    "a red cube",
    "a tree",
    "a blue ball",
    "a red cube",
    "a cat",
    "a dog",
]


@pytest.fixture()
def data_dir(tmp_path):
    rows = [make_row(i, c, *((0.0, 1.0) if i % 3 == 1 else (1.0, 0.0))) for i, c in enumerate(CAPTIONS)]
    rows.insert(3, make_row(99, "a tie", 0.5, 0.5))
    rows.insert(5, make_row(98, "broken", jpg_0=b"not an image"))
    write_pickapic_split(rows, tmp_path / "ds", "train")
    return tmp_path


def open_pairs(tmp_path, **kw) -> PickAPicPairs:
    kw.setdefault("resolution", 16)
    return PickAPicPairs(tmp_path / "ds", cache_dir=str(tmp_path / "hf"), show_progress=False, **kw)


def build(tmp_path, pairs, vae, text, **kw):
    kw.setdefault("model_id", "fake-v1")
    kw.setdefault("storage_dtype", torch.float32)
    kw.setdefault("shard_size", 4)
    kw.setdefault("batch_size", 3)
    return build_latent_cache(
        pairs, vae, text, cache_root=tmp_path / "cache", show_progress=False, log=lambda m: None, **kw
    )


def test_build_reuse_and_invalidate(data_dir):
    pairs = open_pairs(data_dir)
    assert len(pairs) == 9 and pairs.stats.skipped == {"tie": 1}  # the broken row is found while encoding
    vae, text = FakeVAE(), FakeText()
    first = build(data_dir, pairs, vae, text)
    # shards of 4 positions: [0,4) -> 2 batches, [4,8) -> 2 batches (1 broken), [8,9) -> 1 batch
    assert first.reused is False and len(first) == 8 and vae.calls == 5
    assert first.manifest["skipped_while_encoding"] == {"corrupt_image": 1}
    assert first.stats.skipped == {"tie": 1, "corrupt_image": 1}
    # per-shard caption de-duplication: shard 0 has positions 0-3 = red cube, blue ball, red cube, tree
    assert text.captions[:3] == ["a red cube", "a blue ball", "a tree"]

    again = build(data_dir, pairs, vae, text)
    assert again.reused is True and again.directory == first.directory and vae.calls == 5 and text.calls == 5

    changes = [
        dict(model_id="fake-v2"),
        dict(storage_dtype=torch.float16),
    ]
    dirs = {first.directory}
    for change in changes:
        calls = vae.calls
        rebuilt = build(data_dir, pairs, vae, text, **change)
        assert rebuilt.reused is False and vae.calls > calls and rebuilt.directory not in dirs
        dirs.add(rebuilt.directory)
    for other in (open_pairs(data_dir, resolution=32), open_pairs(data_dir, tie_policy="keep")):
        calls = vae.calls
        rebuilt = build(data_dir, other, vae, text)
        assert rebuilt.reused is False and vae.calls > calls and rebuilt.directory not in dirs
        dirs.add(rebuilt.directory)


def test_preprocessing_version_invalidates(data_dir, monkeypatch):
    pairs = open_pairs(data_dir)
    vae, text = FakeVAE(), FakeText()
    first = build(data_dir, pairs, vae, text)
    monkeypatch.setattr(cache_mod, "PREPROCESS_VERSION", cache_mod.PREPROCESS_VERSION + 1)
    second = build(data_dir, pairs, vae, text)
    assert second.reused is False and second.directory != first.directory and vae.calls == 10
    with pytest.raises(FileNotFoundError, match="no complete latent cache"):
        build(data_dir, pairs, vae, text, model_id="never-built", require_existing=True)


def test_cached_items_equal_direct_encoding(data_dir):
    pairs = open_pairs(data_dir, crop="random")  # the cache always uses the centre crop
    vae, text = FakeVAE(), FakeText()
    cached = build(data_dir, pairs, vae, text, seed=11)
    centre = PairTransform(16, "center", random_flip=False)
    flips = set()
    for epoch in range(2):
        for pos in range(len(cached)):
            item = cached[epoch * len(cached) + pos]
            src = [p for p in range(len(pairs)) if int(pairs.rows[p]) == item["row_index"]][0]
            direct = pairs.load_pair(src, transform=centre, flip=False)
            px = direct["pixel_values"]
            flip = bool(example_rng(11, epoch, pos).random(3)[2] < 0.5)
            assert item["flipped"] == flip
            flips.add(flip)
            expected = vae(px.flip(-1) if flip else px)
            assert torch.equal(item["latents"], expected)
            assert item["caption"] == direct["caption"]
            for k, v in FakeText.one(direct["caption"]).items():
                assert torch.equal(item["text"][k], v)
            assert torch.equal(item["original_sizes"], direct["original_sizes"])
            # 40x32 -> (16, 20): centre left = 2; flipped left = 20 - 2 - 16 = 2
            assert item["crop_top_lefts"].tolist() == [[0, 2], [0, 2]]
            assert item["ranking_id"] == direct["ranking_id"]
    assert flips == {True, False}
    # winner first survives caching: rows with label_1 == 1 have image 1 first
    row4 = cached[[cached[i]["ranking_id"] for i in range(len(cached))].index(4)]
    direct_image1 = PairTransform(16, "center", False).apply(
        Image.open(io.BytesIO(noise_png(504))).convert("RGB"), 0, 0, False
    )[0]
    unflipped = CachedPairs(cached.directory, random_flip=False)
    assert torch.equal(unflipped[row4["position"]]["latents"][0], vae(direct_image1[None])[0])


def test_float16_storage_and_collate(data_dir):
    pairs = open_pairs(data_dir)
    vae, text = FakeVAE(), FakeText()
    cached = build(data_dir, pairs, vae, text, storage_dtype=torch.float16)
    sampler = EpochShuffleSampler(len(cached), seed=1)
    batch = next(iter(DataLoader(cached, batch_size=3, sampler=sampler, collate_fn=collate_cached)))
    assert batch["latents"].shape == (3, 2, 4, 4, 4) and batch["latents"].dtype == torch.float32
    assert batch["text"]["prompt_embeds"].shape == (3, 3, 8)
    assert batch["text"]["pooled_prompt_embeds"].shape == (3, 5)
    assert batch["crop_top_lefts"].shape == (3, 2, 2) and len(batch["captions"]) == 3
    exact = build(data_dir, pairs, vae, text)
    pos = int(sampler.order()[0])
    assert torch.allclose(batch["latents"][0], exact[pos]["latents"], atol=1e-3)


def test_items_are_read_lazily_from_disk(data_dir, monkeypatch):
    pairs = open_pairs(data_dir)
    cached = build(data_dir, pairs, FakeVAE(), FakeText())
    tensors = [v for v in vars(cached).values() if isinstance(v, (torch.Tensor, np.ndarray))]
    assert tensors == []  # nothing preloaded
    assert len(pickle.dumps(cached)) < 8_000  # what a DataLoader worker receives: paths and offsets only
    sliced = []
    real_open = cache_mod.safe_open

    def counting_open(path, framework):
        handle = real_open(path, framework=framework)

        class Wrapped:
            def get_slice(self, name):
                sliced.append(name)
                return handle.get_slice(name)

            def metadata(self):
                return handle.metadata()

        return Wrapped()

    monkeypatch.setattr(cache_mod, "safe_open", counting_open)
    fresh = CachedPairs(cached.directory, random_flip=False)
    fresh[5]
    assert "latents" in sliced and "text.prompt_embeds" in sliced  # read by slice, per item
    assert fresh.locate(5) == (1, 1)  # shard 1 holds 3 pairs (the broken row was dropped)


def test_interrupted_build_completes_missing_shards(data_dir):
    pairs = open_pairs(data_dir)
    vae, text = FakeVAE(), FakeText()
    first = build(data_dir, pairs, vae, text)
    (first.directory / "manifest.json").unlink()
    (first.directory / "shard-00002.json").unlink()
    calls = vae.calls
    again = build(data_dir, pairs, vae, text)
    assert again.reused is False and vae.calls == calls + 1  # only shard 2 (one batch) re-encoded
    assert json.loads((again.directory / "manifest.json").read_text())["num_pairs"] == 8


def test_model_fingerprint(tmp_path):
    a, b = torch.nn.Linear(2, 3), torch.nn.Linear(2, 4)
    assert model_fingerprint(a) != model_fingerprint(b)
    c = torch.nn.Linear(2, 3)
    assert model_fingerprint(a) == model_fingerprint(c)
    assert model_fingerprint(a, hash_weights=True) != model_fingerprint(c, hash_weights=True)
    f = tmp_path / "vae.safetensors"
    f.write_bytes(b"123")
    before = model_fingerprint(f)
    f.write_bytes(b"1234")
    assert model_fingerprint(f) != before
