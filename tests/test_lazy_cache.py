"""The lazily filled latent cache (``cache_mode: lazy``): it records exactly what training encoded, in the
orientation drawn, a reading run gets the same numbers back, stored chunks survive a restart, and a torn or foreign
file is ignored."""

from __future__ import annotations

import pickle

import pytest
import torch
from cli_helpers import losses, make_tiny, run_script, tiny_args

from diffalign.data.lazy_cache import LatentStore, collate_lazy


def _example(row: int, flipped: bool, caption: str) -> dict:
    return {
        "row_index": row, "flipped": flipped, "caption": caption, "pixel_values": torch.rand(2, 3, 4, 4) * 2 - 1,
        "original_sizes": torch.tensor([[4, 4], [4, 4]]), "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long),
        "ranking_id": row, "user_id": 7, "pref_prob": 1.0, "is_tie": False, "skipped": {},
    }  # fmt: skip


def _encoders(calls: dict):
    def images(pix):  # [N, 3, 4, 4] -> [N, 1, 2, 2]: a fixed pooling, values not representable in float16
        calls["images"] += pix.shape[0]
        return torch.nn.functional.avg_pool2d(pix, 2)[:, :1] / 3

    def text(captions):
        calls["texts"] += len(captions)
        return {"prompt_embeds": torch.stack([torch.full((3, 2), float(len(c)) / 7) for c in captions])}

    return images, text


def test_a_store_records_what_it_encoded_and_gives_it_back_after_a_restart(tmp_path):
    calls = {"images": 0, "texts": 0}
    enc_img, enc_txt = _encoders(calls)
    store = LatentStore(tmp_path / "s", {"k": 1}, storage_dtype=torch.float16)
    exs = [_example(3, False, "a red cat"), _example(5, True, "a red cat"), _example(9, False, "blue")]
    lat, text = store.complete(collate_lazy(exs), enc_img, enc_txt)
    assert lat.shape == (3, 2, 1, 2, 2) and text["prompt_embeds"].shape == (3, 3, 2)
    assert calls == {"images": 6, "texts": 2}  # 3 pairs x 2 images; "a red cat" encoded once
    # training uses the float16-rounded values: exactly what a later run reads
    want = torch.nn.functional.avg_pool2d(exs[1]["pixel_values"], 2)[:, :1] / 3
    assert torch.equal(lat[1], want.half().float()) and not torch.equal(lat[1], want)
    assert store.get(5, False) is None  # the other orientation was never encoded
    again = store.complete(collate_lazy([exs[2], exs[0]]), enc_img, enc_txt)
    assert calls == {"images": 6, "texts": 2} and torch.equal(again[0], lat[[2, 0]])  # this run's records
    assert store.describe().startswith("latent cache (lazy): 2 of 5 examples read, 3 encoded")

    path = store.flush()
    assert path.name.startswith("chunk-r0-") and store.flush() is None
    (tmp_path / "s" / "chunk-r1-0.safetensors").write_bytes(b"torn")
    reopened = LatentStore(tmp_path / "s", {"k": 1}, storage_dtype=torch.float16)
    assert len(reopened) == 3 and reopened.unreadable == 1
    got = reopened.get(5, True)
    assert torch.equal(got["latents"], lat[1]) and torch.equal(
        got["text"]["prompt_embeds"], text["prompt_embeds"][1]
    )
    assert (got["caption"], got["ranking_id"], got["user_id"], got["pref_prob"]) == ("a red cat", 5, 7, 1.0)
    # DataLoader workers get a copy without this process's unflushed records or file handles
    reopened.complete(collate_lazy([_example(11, False, "new")]), enc_img, enc_txt)
    clone = pickle.loads(pickle.dumps(reopened))
    assert clone.get(11, False) is None and clone.get(5, True) is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("lazy"))


def test_float32_lazy_cache_trains_exactly_like_encoding_on_the_fly(tiny, tmp_path):
    """Flips on, two epochs (16 pairs, 8 steps of 4): the filling run encodes each (pair, orientation) it meets once;
    stored in float32, it is the on-the-fly run bit for bit, and a reading run encodes nothing it has seen."""
    common = ("--checkpointing_steps", "0", "--max_train_steps", "8", "--random_flip", "true",
              "--cache_dir", str(tmp_path / "cache"), "--reference_cache", "false")  # fmt: skip
    lazy = ("--use_cache", "true", "--cache_mode", "lazy", "--cache_dtype", "float32")
    run_script(tiny_args(tiny["sd"], tiny["data"], tmp_path / "fly", *common))
    first = run_script(tiny_args(tiny["sd"], tiny["data"], tmp_path / "c1", *common, *lazy))
    second = run_script(tiny_args(tiny["sd"], tiny["data"], tmp_path / "c2", *common, *lazy))
    assert losses(tmp_path / "c1") == losses(tmp_path / "fly")
    assert losses(tmp_path / "c2") == losses(tmp_path / "c1")
    line = next(x for x in first.stdout.splitlines() if x.startswith("latent cache (lazy): ") and " of " in x)
    read, encoded = int(line.split()[3]), int(line.split(", ")[1].split()[0])
    assert read + encoded == 32 and 16 <= encoded < 32  # epoch 2 reuses the orientations epoch 1 drew
    assert "latent cache (lazy): 32 of 32 examples read, 0 encoded" in second.stdout


def test_sdxl_run_reading_both_caches_trains_like_the_run_that_filled_them(tiny, tmp_path):
    """SDXL: two text encoders (pooled embeddings), per-image sizes and crops in the added conditions, flips on."""
    common = ("--checkpointing_steps", "0", "--max_train_steps", "4", "--random_flip", "true", "--use_cache", "true",
              "--cache_dir", str(tmp_path / "cache"))  # fmt: skip
    first = run_script(tiny_args(tiny["sdxl"], tiny["data"], tmp_path / "a", *common))
    second = run_script(tiny_args(tiny["sdxl"], tiny["data"], tmp_path / "b", *common))
    assert "latent cache (lazy): 0 of 16 examples read, 16 encoded" in first.stdout
    assert "latent cache (lazy): 16 of 16 examples read, 0 encoded" in second.stdout
    assert "reference errors: 16 of 16 pairs read from the cache (100%" in second.stdout
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
