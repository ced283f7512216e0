"""Benchmark plots (matplotlib, Agg backend: no display needed): win rates with their confidence intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """Write ``fig`` to ``path`` (parent folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **savefig_kwargs)
    _pyplot().close(fig)
    return path


def plot_lines(
    x: Sequence[float], lines: Mapping[str, Sequence[float]], path: str | Path, xlabel: str, ylabel: str,
    zero_line: bool = False,
) -> Path:  # fmt: skip
    """One small figure of labelled lines against ``x`` (markers at the points)."""
    fig, ax = _pyplot().subplots(figsize=(5, 3.5))
    for label, y in lines.items():
        ax.plot(x, y, marker="o", label=label)
    if zero_line:
        ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _errors(rates: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """Win rates and asymmetric error bars ``[2, n]`` (rate − low, high − rate) from ``paired_win_rate`` dicts."""
    w = np.array([r["win_rate"] for r in rates], dtype=float)
    err = np.array(
        [[r["win_rate"] - r["ci_low"] for r in rates], [r["ci_high"] - r["win_rate"] for r in rates]]
    )
    return w, np.clip(err, 0.0, None)


def plot_win_rates(win_rates: Mapping[str, Mapping], path: str | Path, title: str = "") -> Path:
    """One bar per reward: win rate of aligned over base with its 95% interval; a dashed line at 0.5 (no change).

    Args:
        win_rates: ``{reward name: paired_win_rate(...) dict}``.
    """
    plt = _pyplot()
    names = list(win_rates)
    w, err = _errors([win_rates[n] for n in names])
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 3.2), dpi=100)
    colors = ["#2a9d8f" if x >= 0.5 else "#e76f51" for x in w]
    ax.bar(range(len(names)), w, yerr=err, capsize=6, color=colors, width=0.6)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1)
    for i, (x, r) in enumerate(zip(w, (win_rates[n] for n in names))):
        ax.text(
            i,
            min(0.98, r["ci_high"] + 0.03),
            f"{x:.2f}\nn={r['n']}",
            ha="center",
            va="bottom",
            fontsize=8,
            bbox=dict(facecolor="white", edgecolor="none", pad=1),  # readable over the 0.5 line
        )
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("win rate (aligned vs base)")
    ax.set_title(title or "Win rate with 95% Wilson interval", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_category_win_rates(
    by_category: Mapping[str, Mapping[str, Mapping]], path: str | Path, title: str = ""
) -> Path:
    """Horizontal bars per category (one colour per reward) with 95% intervals; a dashed line at 0.5.

    Args:
        by_category: ``{reward: {category: paired_win_rate(...) dict}}``.
    """
    plt = _pyplot()
    rewards = list(by_category)
    cats = list(dict.fromkeys(c for r in rewards for c in by_category[r]))
    k = len(rewards)
    h = 0.8 / max(1, k)
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.35 * len(cats) * max(1, k)), dpi=100)
    palette = ["#264653", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#8ab17d"]
    for j, reward in enumerate(rewards):
        rows = [by_category[reward].get(c) for c in cats]
        ys = np.arange(len(cats)) + (j - (k - 1) / 2) * h
        present = [i for i, r in enumerate(rows) if r is not None]
        w, err = _errors([rows[i] for i in present])
        ax.errorbar(
            w,
            ys[present],
            xerr=err,
            fmt="o",
            capsize=3,
            color=palette[j % len(palette)],
            label=reward,
            markersize=5,
        )
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1)
    labels = [
        f"{c} (n={next((by_category[r][c]['n'] for r in rewards if c in by_category[r]), 0)})" for c in cats
    ]
    ax.set_yticks(range(len(cats)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("win rate (aligned vs base)")
    ax.set_title(title or "Win rate per category (dot: win rate, bar: 95% Wilson interval)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if k > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_dreambench(
    subjects: Mapping[str, Mapping[str, float]], metrics: Sequence[str], path: str | Path
) -> Path:
    """Grouped bars: one group per subject, one bar per metric (``{subject: {metric: value}}``)."""
    plt = _pyplot()
    names = list(subjects)
    k = len(metrics)
    w = 0.8 / max(1, k)
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(names) * max(1, k) / 2, 3.2), dpi=100)
    for j, m in enumerate(metrics):
        xs = np.arange(len(names)) + (j - (k - 1) / 2) * w
        ax.bar(xs, [subjects[n][m] for n in names], width=w, label=m)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("cosine similarity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_online_curves(runs: Mapping[str, Sequence[Mapping]], path: str | Path, smooth: int = 10) -> Path:
    """Online training curves, one line per run: the training reward per epoch (moving average over ``smooth``
    epochs, raw values faint) on the left, the held-out evaluation score (``heldout/overall``, logged every
    ``track_every`` epochs) on the right. ``runs``: ``{label: rows of train_log.jsonl}``."""
    plt = _pyplot()
    fig, (ax_r, ax_h) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["epoch"], r["train/reward_mean"]) for r in rows if "train/reward_mean" in r]
        if train:
            e, v = (np.asarray(x, dtype=float) for x in zip(*train))
            ax_r.plot(e, v, color=color, alpha=0.2, linewidth=0.8)
            k = max(1, min(smooth, len(v)))
            avg = np.convolve(v, np.ones(k) / k, mode="valid")
            ax_r.plot(e[k - 1 :], avg, color=color, label=label)
        held = [(r["epoch"], r["heldout/overall"]) for r in rows if "heldout/overall" in r]
        if held:
            e, v = zip(*held)
            ax_h.plot(e, v, "o-", color=color, label=label)
    ax_r.set(xlabel="epoch", ylabel="training reward (mean of the epoch's samples)", title="training reward")
    ax_h.set(xlabel="epoch", ylabel="held-out judge overall (mean)", title="held-out prompts, fixed seeds")
    for ax in (ax_r, ax_h):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
