"""The null-control dataset: coin-flipped labels (diffalign/data/label_control.py, scripts/shuffle_labels.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffalign.data.label_control import shuffle_labels
from diffalign.sandbox import SANDBOX_DATA

REPO = Path(__file__).resolve().parents[1]


def _table(folder: Path, split: str):
    return pq.read_table(next((folder / "data").glob(f"{split}-*.parquet"))).to_pandas()


def test_each_decided_pair_is_swapped_or_kept_whole_and_ties_and_other_splits_are_untouched(tmp_path):
    report = shuffle_labels(SANDBOX_DATA, tmp_path / "a", splits=("train",), seed=0)
    src, out = _table(SANDBOX_DATA, "train"), _table(tmp_path / "a", "train")
    assert list(src.columns) == list(out.columns) and len(src) == len(out)
    for col in ("caption", "jpg_0", "jpg_1", "image_0_uid", "image_1_uid", "user_id", "model_0", "model_1"):
        assert src[col].equals(out[col]), col
    tie = src.label_0 == src.label_1
    swapped = (out.label_0 != src.label_0).to_numpy()
    assert not swapped[tie].any()
    assert np.array_equal(out.label_0[swapped], src.label_1[swapped])
    assert np.array_equal(out.label_1[swapped], src.label_0[swapped])
    winner = np.where(
        out.label_0 > out.label_1, out.image_0_uid, np.where(out.label_1 > out.label_0, out.image_1_uid, "")
    )
    assert np.array_equal(out.best_image_uid.to_numpy(), winner)  # the winner's uid follows its label
    counts = report["splits"]["train"]
    assert counts == {"rows": len(src), "decided": int((~tie).sum()), "swapped": int(swapped.sum())}
    # a fair coin: within 4 binomial SDs of half the decided pairs
    assert abs(counts["swapped"] - counts["decided"] / 2) < 4 * (counts["decided"] / 4) ** 0.5
    for split in ("validation", "test_unique"):  # evaluation splits are copied byte for byte
        name = next((SANDBOX_DATA / "data").glob(f"{split}-*.parquet")).name
        assert (tmp_path / "a" / "data" / name).read_bytes() == (SANDBOX_DATA / "data" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "label_control.json").read_text())["splits"] == report["splits"]
    # the same seed gives the same copy, another seed another one
    shuffle_labels(SANDBOX_DATA, tmp_path / "b", seed=0)
    shuffle_labels(SANDBOX_DATA, tmp_path / "c", seed=1)
    assert _table(tmp_path / "b", "train").label_0.equals(out.label_0)
    assert not _table(tmp_path / "c", "train").label_0.equals(out.label_0)


def test_script_errors_are_one_line_and_name_the_folder(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv, needle in (
        (["--output-dir", str(tmp_path / "full")], "is not empty"),
        (
            ["--output-dir", str(tmp_path / "o"), "--splits", "nosuch"],
            "no parquet file for split(s) ['nosuch']",
        ),
        (["--output-dir", str(tmp_path / "o"), "--dataset", str(tmp_path)], "no data/*.parquet files"),
    ):
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "shuffle_labels.py"), *argv],
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_dpo_on_coin_flipped_labels_learns_no_preference(tmp_path):
    """The control removes the signal: the recipe that learns the held-out preferences from the real labels in 120
    steps (tests/test_sandbox_e2e.py) moves the model as much on the coin-flipped copy but stays at chance on them."""
    from cli_helpers import heldout_before_and_after

    shuffle_labels(SANDBOX_DATA, tmp_path / "coin", seed=0)
    _, after = heldout_before_and_after(
        "sandbox_dpo.yaml", tmp_path, 120, "--dataset", str(tmp_path / "coin")
    )
    assert after["n"] > 500  # the held-out splits are the real, unflipped ones
    # measured: accuracy 0.515, mean |margin| 1.20; on the real labels (same steps, draws=4) 0.650 and 1.04
    assert after["accuracy"] < after["chance_bound_3sd"], after
    assert after["mean_abs_margin"] > 0.5, after  # it moved about as far as on the real labels
