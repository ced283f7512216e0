"""Pick-a-Pic schema, pair filtering, tie policy, winner-first order, pair-consistent augmentation and resumption."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffalign.data import (
    PICKAPIC_COLUMN_NAMES,
    PICKAPIC_SPLITS,
    EpochShuffleSampler,
    PairStats,
    PairTransform,
    PickAPicPairs,
    PickAPicPairStream,
    SchemaError,
    classify_row,
    collate_pairs,
    decode_rgb,
    load_pickapic_split,
    validate_table,
    write_pickapic_dataset,
    write_pickapic_split,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def image_bytes(color=(200, 30, 30), size=(48, 40), mode="RGB", fmt="PNG", marker=False) -> bytes:
    """An image of ``size`` (w, h) in ``color``; ``marker`` paints a white 4x4 square at the top-left corner."""
    img = Image.new("RGB", size, color)
    if marker:
        img.paste((255, 255, 255), (0, 0, 4, 4))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_png(seed: int, size=(48, 40)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_row(i: int, caption="a red cube", label_0=1.0, label_1=0.0, jpg_0=None, jpg_1=None, has_label=True):
    return {
        "are_different": True,
        "best_image_uid": f"u{i}_0",
        "caption": caption,
        "created_at": None,
        "has_label": has_label,
        "image_0_uid": f"u{i}_0",
        "image_0_url": "",
        "image_1_uid": f"u{i}_1",
        "image_1_url": "",
        "jpg_0": image_bytes((10, 20, 200)) if jpg_0 is None else jpg_0,
        "jpg_1": image_bytes((200, 30, 30)) if jpg_1 is None else jpg_1,
        "label_0": label_0,
        "label_1": label_1,
        "model_0": "m0",
        "model_1": "m1",
        "ranking_id": 1000 + i,
        "user_id": 7,
        "num_example_per_prompt": 1,
    }


def pairs(tmp_path, rows, **kw) -> PickAPicPairs:
    write_pickapic_split(rows, tmp_path / "ds", "train")
    kw.setdefault("resolution", 16)
    return PickAPicPairs(tmp_path / "ds", "train", cache_dir=str(tmp_path / "hf"), show_progress=False, **kw)


# ---- schema ------------------------------------------------------------------------------------------------------


def test_written_directory_loads_five_splits_by_name(tmp_path):
    import datasets

    sizes = {split: k + 1 for k, split in enumerate(PICKAPIC_SPLITS)}
    write_pickapic_dataset({s: [make_row(i) for i in range(n)] for s, n in sizes.items()}, tmp_path / "ds")
    loaded = datasets.load_dataset(str(tmp_path / "ds"), cache_dir=str(tmp_path / "hf"))
    assert set(loaded) == set(PICKAPIC_SPLITS)
    assert {s: loaded[s].num_rows for s in loaded} == sizes  # *_unique not merged into validation/test
    assert loaded["train"].column_names == list(PICKAPIC_COLUMN_NAMES)
    schema = pq.read_schema(tmp_path / "ds" / "data" / "validation_unique-00000-of-00001.parquet")
    assert str(schema.field("created_at").type) == "timestamp[ns]"
    assert str(schema.field("jpg_0").type) == "binary" and str(schema.field("label_0").type) == "double"


def test_an_empty_split_loads_empty_and_leaves_the_other_splits_loadable(tmp_path):
    import datasets

    write_pickapic_dataset({"train": [make_row(0), make_row(1)], "validation": []}, tmp_path / "ds")
    train = pairs(tmp_path, [make_row(0), make_row(1)])  # rewrites train only: the empty validation stays
    assert len(train) == 2
    empty = PickAPicPairs(tmp_path / "ds", "validation", cache_dir=str(tmp_path / "hf"), show_progress=False)
    assert len(empty) == 0 and empty.stats.rows_seen == 0
    assert load_pickapic_split(tmp_path / "ds", "validation", streaming=True).features is not None
    # datasets itself reads the other splits of the directory (the empty file has no row group to choke on)
    assert (
        datasets.load_dataset(str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "hf2")).num_rows
        == 2
    )
    # an empty file as older writers made it (one row group of 0 rows) is skipped too, also inside a glob
    old_style = tmp_path / "ds" / "data" / "validation-00000-of-00001.parquet"
    pq.write_table(pq.read_table(old_style), old_style)
    assert pq.ParquetFile(old_style).metadata.num_row_groups == 1
    assert (
        len(
            PickAPicPairs(tmp_path / "ds", "validation", cache_dir=str(tmp_path / "hf3"), show_progress=False)
        )
        == 0
    )
    glob = str(tmp_path / "ds" / "data" / "*.parquet")
    assert len(PickAPicPairs(glob, cache_dir=str(tmp_path / "hf4"), show_progress=False)) == 2
    with pytest.raises(ValueError, match=r"split 'test' not found \(splits found: train, validation\)"):
        load_pickapic_split(tmp_path / "ds", "test")


def test_validate_table_names_missing_column_and_source():
    table = pa.table({"caption": ["x"], "jpg_0": [b"a"], "jpg_1": [b"b"], "label_0": [1.0]})
    with pytest.raises(SchemaError, match=r"shard-7\.parquet: missing column 'label_1'"):
        validate_table(table, "shard-7.parquet", ("caption", "jpg_0", "jpg_1", "label_0", "label_1"))
    bad = pa.table({"caption": [1], "jpg_0": [b"a"], "jpg_1": [b"b"], "label_0": [1.0], "label_1": [0.0]})
    with pytest.raises(SchemaError, match=r"column 'caption' has type int64"):
        validate_table(bad, "x", ("caption",))


def test_dataset_on_parquet_without_a_column_names_it_and_the_file(tmp_path):
    path = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"a"], "label_0": [1.0], "label_1": [0.0]}), path)
    with pytest.raises(SchemaError, match=r"mine\.parquet.*missing column 'jpg_1'"):
        PickAPicPairs(str(path), cache_dir=str(tmp_path / "hf"), show_progress=False)


def test_rows_missing_a_key_are_refused(tmp_path):
    row = make_row(0)
    del row["user_id"]
    with pytest.raises(SchemaError, match=r"row 0 has missing key\(s\) 'user_id'"):
        write_pickapic_split([row], tmp_path, "train")


# ---- filtering ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("c", 1.0, 0.0), (None, 0)),
        (("c", 0.0, 1.0), (None, 1)),
        (("c", 0.5, 0.5), ("tie", 0)),
        (("c", 0.0, 0.0), ("both_zero", 0)),
        (("c", 1.0, 1.0), ("invalid_label", 0)),
        (("c", None, 1.0), ("missing_label", 0)),
        (("c", 1.0, math.nan), ("missing_label", 0)),
        (("c", 1.0, 0.0, False), ("no_label", 0)),
        (("  \n", 1.0, 0.0), ("empty_caption", 0)),
        ((None, 0.0, 1.0), ("empty_caption", 0)),
    ],
)
def test_classify_row(args, expected):
    assert classify_row(*args) == expected


def test_classify_row_keep_ties():
    assert classify_row("c", 0.5, 0.5, True, "keep") == (None, -1)
    with pytest.raises(ValueError, match="tie_policy"):
        classify_row("c", 1.0, 0.0, True, "image0")


def test_ties_dropped_by_default_and_counted(tmp_path):
    rows = [make_row(0), make_row(1, label_0=0.5, label_1=0.5), make_row(2, label_0=0.0, label_1=1.0)]
    rows.append(make_row(3, label_0=0.5, label_1=0.5))
    ds = pairs(tmp_path, rows)
    assert len(ds) == 2 and ds.rows.tolist() == [0, 2]
    assert ds.stats.skipped == {"tie": 2} and ds.stats.rows_seen == 4 and ds.stats.pairs_indexed == 2

    kept = PickAPicPairs(
        tmp_path / "ds", resolution=16, tie_policy="keep", cache_dir=str(tmp_path / "hf"), show_progress=False
    )
    assert len(kept) == 4 and kept.stats.ties_kept == 2 and not kept.stats.skipped
    tie = kept[1]
    assert tie["is_tie"] and tie["pref_prob"] == 0.5 and tie["winner"] == -1
    batch = collate_pairs([kept[i] for i in range(4)])  # what the loss reads: P(slot 0 preferred)
    assert batch["label_w"].dtype == torch.float32 and batch["label_w"].tolist() == [1.0, 0.5, 1.0, 0.5]
    # a kept tie stays in source order: image 0 (blue) first
    assert tie["pixel_values"][0, 2].mean() > 0 > tie["pixel_values"][1, 2].mean()


def test_winner_first(tmp_path):
    blue, red = image_bytes((0, 0, 255)), image_bytes((255, 0, 0))
    ds = pairs(
        tmp_path, [make_row(0, label_0=0.0, label_1=1.0, jpg_0=blue, jpg_1=red), make_row(1, jpg_0=blue)]
    )
    first = ds[0]["pixel_values"]  # label_1 == 1: red (image 1) must come first
    assert first.shape == (2, 3, 16, 16)
    assert torch.equal(first[0, 0], torch.ones(16, 16)) and torch.equal(first[0, 2], -torch.ones(16, 16))
    assert torch.equal(first[1, 2], torch.ones(16, 16))
    assert ds[0]["winner"] == 1 and ds[0]["pref_prob"] == 1.0 and ds[0]["label_1"] == 1.0
    assert torch.equal(ds[1]["pixel_values"][0, 2], torch.ones(16, 16))  # label_0 == 1: blue first


# ---- augmentation ------------------------------------------------------------------------------------------------


def test_identical_images_stay_identical_under_random_crop_and_flip(tmp_path):
    img = noise_png(3, size=(48, 40))
    ds = pairs(tmp_path, [make_row(0, jpg_0=img, jpg_1=img)], resolution=24, crop="random", random_flip=True)
    crops, flips = set(), set()
    for epoch in range(12):
        ex = ds[epoch * len(ds)]
        assert torch.equal(ex["pixel_values"][0], ex["pixel_values"][1])
        assert torch.equal(ex["crop_top_lefts"][0], ex["crop_top_lefts"][1])
        crops.add(tuple(ex["crop_top_lefts"][0].tolist()))
        flips.add(ex["flipped"])
    assert len(crops) > 1 and flips == {True, False}  # augmentation really varies, yet the pair agrees
    assert ds[5]["original_sizes"].tolist() == [[40, 48], [40, 48]]


def test_flip_is_the_same_for_winner_and_loser(tmp_path):
    a = image_bytes((0, 0, 255), size=(16, 16), marker=True)
    b = image_bytes((0, 255, 0), size=(16, 16), marker=True)
    ds = pairs(tmp_path, [make_row(0, jpg_0=a, jpg_1=b)], resolution=16, random_flip=True)
    seen = set()
    for epoch in range(8):
        ex = ds[epoch]
        px = ex["pixel_values"]
        for k in range(2):
            left, right = px[k, :, 0, 0], px[k, :, 0, 15]
            marker_col = right if ex["flipped"] else left
            other_col = left if ex["flipped"] else right
            assert torch.equal(marker_col, torch.ones(3)) and not torch.equal(other_col, torch.ones(3))
        seen.add(ex["flipped"])
    assert seen == {True, False}


def test_center_crop_coordinates_hand_computed():
    # 70x48 (w x h) -> shortest side 24: resized (h, w) = (24, 35); centre left = (35 - 24) // 2 = 5
    t = PairTransform(resolution=24, crop="center", random_flip=False)
    img = decode_rgb(image_bytes(size=(70, 48)))
    _, original, crop = t.apply(img, 0.9, 0.9, flip=False)
    assert original == (48, 70) and crop == (0, 5)
    _, _, crop_f = t.apply(img, 0.9, 0.9, flip=True)
    assert crop_f == (0, 35 - 5 - 24)
    # random crop: left = min(floor(u * (11 + 1)), 11)
    tr = PairTransform(resolution=24, crop="random", random_flip=False)
    assert tr.apply(img, 0.0, 0.999, flip=False)[2] == (0, 11) and tr.apply(img, 0.0, 0.5, flip=False)[2] == (
        0,
        6,
    )


# ---- robustness --------------------------------------------------------------------------------------------------


def bad_rows():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red: must become white
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    i16 = io.BytesIO()
    Image.fromarray(np.full((16, 16), 4000, dtype=np.uint16)).save(i16, format="PNG")
    good = image_bytes()
    return [
        make_row(0),  # good
        make_row(1, jpg_0=b"\xff\xd8 this is not a jpeg"),  # corrupt_image
        make_row(2, jpg_1=image_bytes(mode="CMYK", fmt="JPEG")),  # converted
        make_row(3, jpg_0=image_bytes(mode="L", fmt="JPEG")),  # converted
        make_row(4, jpg_1=buf.getvalue(), label_0=0.0, label_1=1.0),  # RGBA converted over white
        make_row(5, jpg_0=image_bytes(mode="P")),  # converted
        make_row(6, jpg_0=i16.getvalue()),  # unsupported_mode
        make_row(7, caption="   "),  # empty_caption
        make_row(8, label_0=None),  # missing_label
        make_row(9, label_1=math.nan),  # missing_label
        make_row(10, has_label=False),  # no_label
        make_row(11, label_0=0.0, label_1=0.0),  # both_zero
        make_row(12, jpg_1=b""),  # missing_image
        make_row(13, jpg_0=good[: len(good) // 2]),  # truncated: corrupt_image
    ]


BAD_ROW_SKIPS = {
    "corrupt_image": 2,
    "unsupported_mode": 1,
    "empty_caption": 1,
    "missing_label": 2,
    "no_label": 1,
    "both_zero": 1,
    "missing_image": 1,
}


def test_bad_rows_counted_per_reason_with_verify(tmp_path):
    ds = pairs(tmp_path, bad_rows(), verify_images=True)
    assert ds.rows.tolist() == [0, 2, 3, 4, 5]
    assert dict(ds.stats.skipped) == BAD_ROW_SKIPS
    rgba_first = ds[3]["pixel_values"][0]  # row 4: label_1 == 1, the transparent image is the winner
    assert torch.equal(rgba_first, torch.ones_like(rgba_first))
    assert ds[2]["pixel_values"].shape == (2, 3, 16, 16)  # grayscale became 3 channels


def test_lazy_image_skips_travel_through_batches(tmp_path):
    ds = pairs(tmp_path, bad_rows())  # verify_images=False: bad images found while loading
    assert dict(ds.stats.skipped) == {
        "empty_caption": 1,
        "missing_label": 2,
        "no_label": 1,
        "both_zero": 1,
    }
    assert len(ds) == 9
    stats = ds.stats
    sampler = EpochShuffleSampler(len(ds), seed=0, shuffle=False)
    for batch in DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_pairs):
        stats.add_batch(batch)
        assert batch["pixel_values"].shape[1:] == (2, 3, 16, 16)
    assert stats.used == 9
    assert stats.skipped["corrupt_image"] == 2 and stats.skipped["unsupported_mode"] == 1
    assert stats.skipped["missing_image"] == 1
    report = stats.report()
    assert "9 pairs indexed" in report and "9 examples used" in report and "corrupt_image 2" in report


# ---- resumption --------------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_resumes_exactly(tmp_path):
    rows = [make_row(i, jpg_0=noise_png(i), jpg_1=noise_png(100 + i)) for i in range(10)]
    ds = pairs(tmp_path, rows, resolution=24)
    sampler = EpochShuffleSampler(len(ds), seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    assert sorted(i - 30 for i in full) == list(range(10))
    other = EpochShuffleSampler(len(ds), seed=5)
    other.set_epoch(4)
    assert [i - 40 for i in other] != [i - 30 for i in full]

    def run(start):
        s = EpochShuffleSampler(len(ds), seed=5)
        s.set_epoch(3)
        s.set_start(start)
        loader = DataLoader(ds, batch_size=2, sampler=s, collate_fn=collate_pairs)
        return [(b["row_indices"].tolist(), b["pixel_values"], b["crop_top_lefts"]) for b in loader]

    whole, resumed = run(0), run(4)  # resume after 2 batches of 2
    assert len(resumed) == 3
    for (ra, pa_, ca), (rb, pb, cb) in zip(whole[2:], resumed, strict=True):
        assert ra == rb and torch.equal(pa_, pb) and torch.equal(ca, cb)

    restored = EpochShuffleSampler(len(ds), seed=0)
    restored.load_state_dict({"epoch": 3, "start": 4, "seed": 5, "n": 10})
    assert list(restored) == full[4:]
    with pytest.raises(ValueError, match="10 pairs"):
        EpochShuffleSampler(11).load_state_dict({"epoch": 0, "start": 0, "n": 10})


def test_stream_filters_counts_and_resumes():
    rows = bad_rows()
    stream = PickAPicPairStream(rows, resolution=16, random_flip=False)
    examples = list(stream)
    assert [ex["source_row"] for ex in examples] == [0, 2, 3, 4, 5]
    stats = PairStats()
    stats.add_batch(collate_pairs(examples))
    # every skipped row is counted, those after the last example too (they ride on it)
    assert stats.used == 5 and dict(stats.skipped) == BAD_ROW_SKIPS
    resumed = list(PickAPicPairStream(rows, resolution=16, random_flip=False, skip_rows=3))
    assert [ex["source_row"] for ex in resumed] == [3, 4, 5]
    assert torch.equal(resumed[0]["pixel_values"], examples[2]["pixel_values"])
    with pytest.raises(SchemaError, match="'jpg_1'"):
        list(PickAPicPairStream([{k: v for k, v in make_row(0).items() if k != "jpg_1"}]))
    with pytest.warns(UserWarning, match=r"2 rows skipped \(\{'tie': 2\}\) and no usable pair"):
        assert list(PickAPicPairStream([make_row(i, label_0=0.5, label_1=0.5) for i in range(2)])) == []


def test_stream_of_a_local_parquet_directory(tmp_path):
    rows = [make_row(i, jpg_0=noise_png(i), jpg_1=noise_png(50 + i)) for i in range(6)]
    rows[2] = make_row(2, label_0=0.5, label_1=0.5, jpg_0=noise_png(2), jpg_1=noise_png(52))
    rows[4] = make_row(4, caption="")
    write_pickapic_dataset({"train": rows, "validation": []}, tmp_path / "ds")
    stream = PickAPicPairStream(tmp_path / "ds", "train", resolution=24, tie_policy="keep")
    batches = list(DataLoader(stream, batch_size=2, collate_fn=collate_pairs))
    assert [b["row_indices"].tolist() for b in batches] == [[0, 1], [2, 3], [5]]
    assert [b["label_w"].tolist() for b in batches] == [[1.0, 1.0], [0.5, 1.0], [1.0]]
    stats = PairStats()
    for b in batches:
        stats.add_batch(b)
    assert stats.used == 5 and dict(stats.skipped) == {"empty_caption": 1}
    # the epoch keys the augmentation (random crop and flip), the same (seed, epoch, row) gives the same pixels
    stream.set_epoch(1)
    again = next(iter(stream))["pixel_values"]
    assert not torch.equal(again, batches[0]["pixel_values"][0])
    assert torch.equal(again, next(iter(stream))["pixel_values"])
    stream.limit(3)  # the first 3 rows that pass the label/caption checks
    assert [ex["source_row"] for ex in stream] == [0, 1, 2]
    empty = PickAPicPairStream(tmp_path / "ds", "validation", resolution=24)
    assert list(empty) == [] and empty.first_examples(1).rows_seen == 0


def test_parquet_glob_source(tmp_path):
    for k in range(2):
        write_pickapic_split([make_row(3 * k + i) for i in range(3)], tmp_path / f"part{k}", "train")
        os.replace(
            tmp_path / f"part{k}" / "data" / "train-00000-of-00001.parquet", tmp_path / f"p{k}.parquet"
        )
    ds = PickAPicPairs(
        str(tmp_path / "p*.parquet"), resolution=16, cache_dir=str(tmp_path / "hf"), show_progress=False
    )
    assert len(ds) == 6 and [ds[i]["ranking_id"] for i in range(6)] == [1000, 1001, 1002, 1003, 1004, 1005]
    digest = ds.fingerprint()["pairs_sha256"]
    ds.limit(2)
    assert len(ds) == 2 and ds.stats.pairs_indexed == 2 and ds.fingerprint()["pairs_sha256"] != digest
