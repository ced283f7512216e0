"""The training loop's batches (diffalign.training.data / .cached) on a tiny SD1.x pipeline and tiny Parquet data.

What is checked: every path (latent cache, on the fly, streamed) carries ``label_w`` (0.5 exactly for kept ties,
1.0 otherwise); an empty or all-dropped split fails before training with one line naming the dataset, the split
and why; a float32 cache equals on-the-fly encoding exactly and a float16 one is within float16 rounding;
``cache_dtype`` is part of the cache key; on the sandbox, the measured float16 error stays what the docs say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch
from test_data_pickapic import make_row, noise_png
from tiny_models import build_tiny_sd

from diffalign.config import DPOConfig
from diffalign.data import PickAPicPairStream, write_pickapic_dataset
from diffalign.models import pipeline as mp
from diffalign.training.data import build_train_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIES = {1002, 1005}  # ranking ids of the kept ties


class OneProcess:
    """What build_train_data needs from an accelerate.Accelerator, for one process."""

    is_local_main_process = False  # no progress bars
    process_index = 0

    def main_process_first(self):
        return contextlib.nullcontext()

    def print(self, *args, **kwargs):
        pass


def rows(n: int = 8, ties=(2, 5)):
    out = []
    for i in range(n):
        labels = (0.5, 0.5) if i in ties else ((0.0, 1.0) if i % 3 == 1 else (1.0, 0.0))
        out.append(
            make_row(
                i,
                f"caption {i % 3}",
                *labels,
                jpg_0=noise_png(i, (24, 20)),
                jpg_1=noise_png(50 + i, (24, 20)),
            )
        )
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    all_ties = [make_row(i, "c", 0.5, 0.5) for i in range(3)]
    bad = rows(6, ties=(2,))
    bad[1]["jpg_0"] = b"not an image"
    bad[3]["label_0"] = None
    write_pickapic_dataset(
        {"train": rows(), "validation": [], "test": all_ties, "few": rows(2, ties=()), "bad": bad},
        root / "data",
    )
    return {"root": root, "data": root / "data", "comps": mp.load_components(str(build_tiny_sd(root / "sd")))}


def cfg(tiny, **kw) -> DPOConfig:
    base = dict(
        pretrained_model="unused",
        dataset=str(tiny["data"]),
        tie_policy="keep",
        resolution=16,
        train_batch_size=2,
        cache_dir=str(tiny["root"] / "cache"),
        output_dir=str(tiny["root"] / "out"),
    )
    return DPOConfig(**{**base, **kw})


def build(tiny, **kw):
    return build_train_data(cfg(tiny, **kw), tiny["comps"], OneProcess())


MODES = {
    "cache": dict(use_cache=True, cache_mode="upfront"),
    "lazy": dict(use_cache=True, cache_mode="lazy"),
    "on_the_fly": dict(use_cache=False),
    "streaming": dict(use_cache=False, streaming=True),
}


# ---- label_w: what the loss reads -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_batches_carry_label_w_half_for_kept_ties(tiny, mode):
    data = build(tiny, **MODES[mode])
    seen = []
    for batch in data.dataloader:
        ties = torch.tensor([rid in TIES for rid in batch["ranking_ids"].tolist()])
        assert batch["label_w"].dtype == torch.float32 and batch["label_w"].shape == ties.shape
        assert torch.equal(batch["label_w"], torch.where(ties, 0.5, 1.0))
        seen += batch["ranking_ids"].tolist()
    assert sorted(seen) == list(range(1000, 1008))  # every pair, both ties included, in one epoch


def test_streaming_reads_the_split_as_a_stream_and_resumes_exactly(tiny):
    from accelerate import Accelerator

    data = build(tiny, use_cache=False, streaming=True, train_batch_size=3, random_crop=True)
    assert isinstance(data.pairs, PickAPicPairStream) and data.sampler is None and data.num_pairs == 0
    acc = Accelerator(cpu=True)
    loader = acc.prepare(data.dataloader)

    def epoch(e, skip=0):
        data.set_epoch(e)
        it = acc.skip_first_batches(loader, skip) if skip else loader
        it.set_epoch(e)
        return [(b["index"].tolist(), b["pixel_values"]) for b in it]

    first = epoch(0)
    assert [i for i, _ in first] == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7],
    ]  # source order, a short last batch, nothing dropped
    second = epoch(1)
    assert [i for i, _ in second] == [i for i, _ in first]
    assert not torch.equal(second[0][1], first[0][1])  # the epoch keys the random crop and flip
    resumed = epoch(1, skip=1)  # what the trainer does after a restart in the middle of epoch 1
    assert len(resumed) == 2
    for (ia, pa), (ib, pb) in zip(second[1:], resumed, strict=True):
        assert ia == ib and torch.equal(pa, pb)


# ---- empty or unusable splits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_split_without_usable_pairs_fails_early_in_one_line(tiny, mode):
    dataset = str(tiny["data"])
    cases = {
        ("validation", "keep"): "split 'validation' has 0 usable pairs (0 rows read, skipped 0 rows)",
        ("test", "drop"): (
            "split 'test' has 0 usable pairs (3 rows read, skipped 3 rows: tie 3; tie_policy drop drops ties, "
            "tie_policy keep trains on them)"
        ),
    }
    if mode != "streaming":  # a stream is only checked for a first pair (it may end with a short batch)
        cases["few", "keep"] = (
            "split 'few' has only 2 usable pairs, fewer than train_batch_size=3 (2 rows read"
        )
    for (split, policy), expected in cases.items():
        with pytest.raises(ValueError) as err:
            build(tiny, split=split, tie_policy=policy, train_batch_size=3, **MODES[mode])
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"dataset {dataset!r} {expected}"), message


def test_the_other_splits_train_while_one_split_is_empty(tiny):
    assert build(tiny, use_cache=False).num_pairs == 8  # 'validation' of the same directory has 0 rows


# ---- nothing dropped silently ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_every_skipped_row_reaches_the_run_report(tiny, mode):
    """Split 'bad': a corrupt image, a tie (tie_policy drop) and a missing label among 6 rows."""
    data = build(tiny, split="bad", tie_policy="drop", **MODES[mode])
    for batch in data.dataloader:
        data.count(batch)
    reported = dict(data.describe().get("filtering", {}).get("skipped", {}))
    for reason, n in data._skipped.items():  # what batches carried (summed over processes by report())
        reported[reason] = reported.get(reason, 0) + n
    assert reported == {"tie": 1, "missing_label": 1, "corrupt_image": 1}
    # cache: 3 pairs, full batches of 2 (the odd one is a different pair each epoch); on the fly (and through the lazy
    # cache, which reads as on the fly) the bad row's place goes to the next good one; a stream yields its 3 pairs,
    # the last batch short
    assert data.used == {"cache": 2, "lazy": 4, "on_the_fly": 4, "streaming": 3}[mode]


# ---- cache storage dtype ----------------------------------------------------------------------------------------


def cache_vs_on_the_fly(comps, config: DPOConfig, epochs: int = 2):
    """(cached batch, on-the-fly latents, on-the-fly text) for the same pairs in training order, ``epochs`` epochs:
    the cached batches of ``config`` against what compute_loss encodes from the on-the-fly batches."""
    cached = build_train_data(config, comps, OneProcess())
    fly = build_train_data(dataclasses.replace(config, use_cache=False), comps, OneProcess())
    out = []
    for epoch in range(epochs):
        cached.set_epoch(epoch)
        fly.set_epoch(epoch)
        for cb, fb in zip(cached.dataloader, fly.dataloader, strict=True):
            assert torch.equal(cb["index"], fb["index"]) and torch.equal(cb["flipped"], fb["flipped"])
            with torch.no_grad():  # what compute_loss does with an on-the-fly batch
                z = mp.encode_images(comps, fb["pixel_values"].flatten(0, 1)).unflatten(
                    0, (len(fb["index"]), 2)
                )
                text = mp.encode_prompts(comps, list(fb["captions"]))
            out.append((cb, z, text))
    assert {bool(f) for cb, _, _ in out for f in cb["flipped"]} == {True, False}
    return cached, out


@pytest.fixture()
def per_image_encoder(monkeypatch):
    """Encode one image per VAE call. The VAE's CPU kernels are not batch-invariant (its first convolution gives
    ~4e-7 different results for an image encoded alone or among 16), and the cache encodes 4 images per pair
    while training encodes 2 per pair: with one image per call, any remaining difference is the cache's own."""
    encode = mp.encode_images
    monkeypatch.setattr(mp, "encode_images", lambda c, px: torch.cat([encode(c, x[None]) for x in px]))


def per_image_cache(tiny, tmp_path, dtype: str) -> DPOConfig:
    """A config whose cache is built here, by the per-image encoder (not reused from another test)."""
    return cfg(
        tiny, use_cache=True, cache_mode="upfront", cache_dtype=dtype, cache_dir=str(tmp_path / "cache")
    )


def test_float32_cache_equals_on_the_fly_encoding_exactly(tiny, tmp_path, per_image_encoder):
    cached, batches = cache_vs_on_the_fly(tiny["comps"], per_image_cache(tiny, tmp_path, "float32"))
    assert not cached.info["cache_reused"]
    assert cached.info["cache_dtype"] == "float32"
    for cb, z, text in batches:
        assert torch.equal(cb["latents"], z)
        for k, v in text.items():
            assert torch.equal(cb["text"][k], v)


def test_float16_cache_is_float16_rounding_of_on_the_fly_encoding(tiny, tmp_path, per_image_encoder):
    _, batches = cache_vs_on_the_fly(tiny["comps"], per_image_cache(tiny, tmp_path, "float16"))
    for cb, z, text in batches:
        for cached, exact in [(cb["latents"], z), *((cb["text"][k], v) for k, v in text.items())]:
            assert torch.equal(cached, exact.half().float())


def test_float16_cache_error_on_the_sandbox(tmp_path):
    """The figures in diffalign/data/cache.py's docstring: the sandbox VAE and text encoder, the first 256 train
    pairs at 32 px (SANDBOX_CACHE_PAIRS=3185: all of them), 2 epochs, the encoder as training calls it (so the
    float32 figure includes any batch effect of the VAE's kernels). ``pytest -s`` prints the figures."""
    comps = mp.load_components("sandbox")
    num_pairs = int(os.environ.get("SANDBOX_CACHE_PAIRS", "256"))
    errors = {}
    for dtype in ("float32", "float16"):
        config = DPOConfig(
            resolution=32,
            max_train_samples=num_pairs,
            train_batch_size=8,
            cache_dtype=dtype,
            cache_mode="upfront",
            cache_dir=str(tmp_path / "cache"),
            output_dir=str(tmp_path / "out"),
        )
        _, batches = cache_vs_on_the_fly(comps, config)
        for what in ("latents", "text"):
            pairs = [(cb["latents"], z) if what == "latents" else (cb["text"][k], t[k]) for cb, z, t in batches
                     for k in (cb["text"] if what == "text" else [None])]  # fmt: skip
            diff = torch.cat([(c - x).abs().flatten() for c, x in pairs])
            value = torch.cat([x.abs().flatten() for _, x in pairs])
            big = value > 1e-2
            errors[dtype, what] = (diff.max().item(), (diff[big] / value[big]).max().item())
    print({f"{d} {w}": f"max abs {a:.3g}, max rel {r:.3g}" for (d, w), (a, r) in errors.items()}, flush=True)
    # float16 rounds to nearest: relative error <= 2^-11 = 4.88e-4; latents |x| < 16 -> absolute error <= 2^-8.
    # float32 measured: 0 for 256 pairs, 7.2e-7 for all (the VAE kernels' batch-size effect, not the cache's).
    for what in ("latents", "text"):
        assert errors["float16", what][0] <= 2**-8 and errors["float16", what][1] <= 2**-11
        assert errors["float32", what][0] < 1e-5


def test_cache_dtype_is_part_of_the_cache_key(tiny):
    up = dict(use_cache=True, cache_mode="upfront", split="few", train_batch_size=1)
    half, full, again = (build(tiny, cache_dtype=d, **up) for d in ("float16", "float32", "float32"))
    assert half.info["cache"] != full.info["cache"] and not full.info["cache_reused"]
    assert again.info["cache"] == full.info["cache"] and again.info["cache_reused"]
    with pytest.raises(ValueError, match="cache_dtype='bfloat16' is not valid"):
        cfg(tiny, cache_dtype="bfloat16")
