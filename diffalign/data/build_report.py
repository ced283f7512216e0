"""The report of a preference-data build (:mod:`diffalign.data.builder`): the numbers of every split and model,
their human-readable summary and the dataset card (``README.md``)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .pickapic_rows import SplitResult


def _share(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def summarize(results: Mapping[str, SplitResult], generator_names: Sequence[str]) -> dict[str, Any]:
    """Numbers of a build: per split (pairs, prompts, ties, label balance, score agreement, users) and per model
    (images, mean score, win rate against *other* models over decisive pairs)."""
    splits: dict[str, Any] = {}
    model_images: Counter[str] = Counter()
    model_score_sum: defaultdict[str, float] = defaultdict(float)
    wins: Counter[str] = Counter()
    decisive: Counter[str] = Counter()
    ties_with: Counter[str] = Counter()
    users_all: Counter[int] = Counter()
    for split, res in results.items():
        rows = res.rows
        n = len(rows)
        ties = sum(r["label_0"] == 0.5 for r in rows)
        zero_wins = sum(r["label_0"] == 1.0 for r in rows)
        agree = sum(
            (r["label_0"] == 1.0 and a > b) or (r["label_1"] == 1.0 and b > a)
            for r, a, b in zip(rows, res.score_0, res.score_1, strict=True)
        )
        users = Counter(int(r["user_id"]) for r in rows)
        users_all.update(users)
        for r, a, b in zip(rows, res.score_0, res.score_1, strict=True):
            for side, score in ((0, a), (1, b)):
                model_images[r[f"model_{side}"]] += 1
                model_score_sum[r[f"model_{side}"]] += score
            m0, m1 = r["model_0"], r["model_1"]
            if m0 == m1:
                continue
            if r["label_0"] == 0.5:
                ties_with[m0] += 1
                ties_with[m1] += 1
                continue
            decisive[m0] += 1
            decisive[m1] += 1
            wins[m0 if r["label_0"] == 1.0 else m1] += 1
        splits[split] = {
            "pairs": n,
            "prompts": len({r["caption"] for r in rows}),
            "ties": ties,
            "tie_share": _share(ties, n),
            "image_0_win_share": _share(zero_wins, n - ties),  # label balance over decisive pairs
            "score_agreement": _share(agree, n - ties),  # decisive pairs won by the higher-scored image
            "mean_abs_score_gap": round(float(np.mean(np.abs(np.subtract(res.score_0, res.score_1)))), 4)
            if n
            else None,
            "are_different_share": _share(sum(r["are_different"] for r in rows), n),
            "same_model_pairs": sum(r["model_0"] == r["model_1"] for r in rows),
            "users": {str(u): users[u] for u in sorted(users)},
        }
    total = sum(s["pairs"] for s in splits.values())
    total_ties = sum(s["ties"] for s in splits.values())
    models = {
        m: {
            "images": model_images[m],
            "mean_score": round(model_score_sum[m] / model_images[m], 4) if model_images[m] else None,
            "cross_model_decisive": decisive[m],
            "cross_model_ties": ties_with[m],
            "win_rate_vs_others": _share(wins[m], decisive[m]),
        }
        for m in generator_names
    }
    return {
        "pairs": total,
        "tie_share": _share(total_ties, total),
        "splits": splits,
        "models": models,
        "users": {str(u): users_all[u] for u in sorted(users_all)},
    }


def format_summary(report: Mapping[str, Any]) -> str:
    """Human-readable summary of :func:`build_preference_data`'s report."""
    lines = [f"{'split':<18} {'pairs':>6} {'prompts':>7} {'ties':>6} {'img0 wins':>9} {'agree':>6}  users"]
    for split, s in report["splits"].items():
        users = " ".join(f"{u}:{c}" for u, c in s["users"].items())
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        lines.append(
            f"{split:<18} {s['pairs']:>6} {s['prompts']:>7} {pct(s['tie_share']):>6} "
            f"{pct(s['image_0_win_share']):>9} {pct(s['score_agreement']):>6}  {users}"
        )
    lines.append(f"total {report['pairs']} pairs, tie share {100 * (report['tie_share'] or 0):.1f}%")
    lines.append(f"{'model':<22} {'images':>7} {'mean score':>10} {'win rate vs others':>19}")
    for m, s in report["models"].items():
        wr = "-" if s["win_rate_vs_others"] is None else f"{100 * s['win_rate_vs_others']:.1f}%"
        ms = "-" if s["mean_score"] is None else f"{s['mean_score']:.4f}"
        lines.append(f"{m:<22} {s['images']:>7} {ms:>10} {wr:>10} of {s['cross_model_decisive']}")
    lines.append("pairs per user: " + ", ".join(f"user {u}: {c}" for u, c in report["users"].items()))
    if "bytes_on_disk" in report:
        lines.append(f"written to {report['output_dir']} ({report['bytes_on_disk'] / 1e6:.2f} MB)")
    return "\n".join(lines)


DATASET_CARD = """---
pretty_name: Preference pairs in the Pick-a-Pic v2 schema (diffalign)
---
# Preference pairs in the Pick-a-Pic v2 schema (diffalign)

Image pairs sampled from {generators} and labelled by {labeller}, built by
`{command}`. Load with `datasets.load_dataset("<this folder>")`.

Splits: {splits} pairs; {tie_pct:.1f}% ties (labels 0.5/0.5, `best_image_uid` ""). Bradley-Terry labels:
P(image 0 preferred) = sigmoid((s0 - s1) / {temperature}), ties when |s0 - s1| < {tie_margin}; seed {seed}.
Every number of the build and its full configuration: `build_report.json`. How it is built:
`diffalign/data/builder.py`.
"""

LABELLER_DESCRIPTIONS = {
    "users": "the simulated users of `diffalign/sandbox/users.py` (each pair by the user in `user_id`)",
    "judge/overall": "the sandbox judge's overall score (`user_id` only records an assigned rater)",
}


def write_dataset_card(out_dir: str | Path, report: Mapping[str, Any]) -> Path:
    """Write ``<out_dir>/README.md`` from a build report: a short dataset card whose YAML header holds only
    ``pretty_name`` (no ``configs``, so ``datasets`` still finds the splits by their file names; without any header
    it logs "Repo card metadata block was not found")."""
    cfg = report["config"]
    path = Path(out_dir) / "README.md"
    path.write_text(
        DATASET_CARD.format(
            generators=", ".join(report["generators"]),
            labeller=LABELLER_DESCRIPTIONS.get(report["labeller"], report["labeller"]),
            command=report.get("command", "diffalign.data.builder.build_preference_data"),
            splits=", ".join(f"{s} {report['splits'][s]['pairs']:,}" for s in report["splits"]),
            tie_pct=100 * (report["tie_share"] or 0.0),
            temperature=cfg["temperature"],
            tie_margin=cfg["tie_margin"],
            seed=cfg["seed"],
        ),
        encoding="utf-8",
    )
    return path
