"""The null control for offline preference methods: the same pairs with their labels replaced by coin flips.

Each decided pair of the chosen splits has its two labels (and ``best_image_uid``) swapped with probability ½, by a
seeded draw per row; ties stay ties. Every image, caption and user is unchanged, so a method trained on the copy sees
the data it would see, with the preference taken out. Its expected gradient at the start is then zero (each pair
pulls both ways with equal weight) and whatever a run on the copy gains over the base is what the loop's noise and
drift alone produce: the level a run on the real labels must beat.

Splits not named are copied byte for byte (evaluation reads their captions only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

__all__ = ["shuffle_labels"]


def _swap_table(table, rng: np.random.Generator):
    import pyarrow as pa

    label_0 = np.asarray(table.column("label_0").to_numpy(zero_copy_only=False), dtype=np.float64)
    label_1 = np.asarray(table.column("label_1").to_numpy(zero_copy_only=False), dtype=np.float64)
    # drawn for every row (ties included), so a row's coin does not depend on the others' labels
    coin = rng.random(len(label_0)) < 0.5
    decided = np.isfinite(label_0) & np.isfinite(label_1) & (label_0 != label_1)
    swap = coin & decided
    new_0 = np.where(swap, label_1, label_0)
    new_1 = np.where(swap, label_0, label_1)
    uid_0 = table.column("image_0_uid").to_pylist()
    uid_1 = table.column("image_1_uid").to_pylist()
    best = table.column("best_image_uid").to_pylist()
    best = [
        (a if l0 > l1 else b if l1 > l0 else "") if s else old
        for a, b, l0, l1, s, old in zip(uid_0, uid_1, new_0, new_1, swap, best, strict=True)
    ]
    for name, values, kind in (
        ("label_0", new_0, pa.float64()),
        ("label_1", new_1, pa.float64()),
        ("best_image_uid", best, pa.string()),
    ):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, type=kind))
    return table, {"rows": len(label_0), "decided": int(decided.sum()), "swapped": int(swap.sum())}


def shuffle_labels(source_dir: str | Path, output_dir: str | Path, splits=("train",), seed: int = 0) -> dict:
    """Write ``output_dir`` (new or empty): ``source_dir``'s Parquet splits, the named ones with coin-flipped labels.

    Returns (and writes as ``label_control.json``) per split: rows, decided pairs and how many were swapped.
    Raises ``FileNotFoundError`` naming the folder when a split has no ``data/<split>-*.parquet`` file.
    """
    import pyarrow.parquet as pq

    source, out = Path(source_dir), Path(output_dir)
    files = sorted((source / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{source}: no data/*.parquet files; give a Pick-a-Pic-schema dataset folder")
    split_of = {f: f.name.split("-")[0] for f in files}
    missing = sorted(set(splits) - set(split_of.values()))
    if missing:
        raise FileNotFoundError(
            f"{source}/data has no parquet file for split(s) {missing}; it has {sorted(set(split_of.values()))}"
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: give a new or empty folder")
    (out / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    report = {"source": str(source), "seed": seed, "splits": {}}
    for f in files:
        split = split_of[f]
        if split in splits:
            table, counts = _swap_table(pq.read_table(f), rng)
            pq.write_table(table, out / "data" / f.name)
            report["splits"][split] = counts
        else:
            shutil.copyfile(f, out / "data" / f.name)
    (out / "label_control.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"- {s}: {c['swapped']:,} of {c['decided']:,} decided pairs swapped"
        for s, c in report["splits"].items()
    ]
    (out / "README.md").write_text(
        "# Null control: coin-flipped labels\n\n"
        f"The pairs of `{source}` with each decided pair's labels swapped with probability 1/2 (seed {seed}; "
        "`diffalign/data/label_control.py`). Ties and the other splits are unchanged.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    return report
