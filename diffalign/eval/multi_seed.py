"""Summaries of one config trained with several seeds: each seed's evaluation, and mean / min / max across seeds.

A seed's evaluation is the ``eval.json`` its run wrote (:func:`diffalign.eval.protocol.evaluate_pipeline_pair`):
the same prompts and evaluation seeds for every training seed, so the spread across training seeds is the training
run's own variance, not the evaluation's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .report import markdown_table


def summarise_seeds(eval_files: dict[int, str | Path]) -> dict:
    """``{training seed: path to eval.json}`` -> per-seed win rates and CIs, plus mean, min and max over seeds.

    Seeds whose ``eval.json`` is missing are listed under ``missing_seeds`` (never silently averaged over).
    """
    per_seed: dict[str, dict] = {}
    missing: list[int] = []
    for seed, path in sorted(eval_files.items()):
        path = Path(path)
        if not path.is_file():
            missing.append(seed)
            continue
        ev = json.loads(path.read_text())
        wr = ev["win_rate"]
        per_seed[str(seed)] = {
            "win_rate": wr["win_rate"],
            "ci_low": wr["ci_low"],
            "ci_high": wr["ci_high"],
            "wins": wr["wins"],
            "ties": wr["ties"],
            "losses": wr["losses"],
            "aspects": {k: v["aligned"]["mean"] for k, v in ev.get("aspects", {}).items()},
            "base_aspects": {k: v["base"]["mean"] for k, v in ev.get("aspects", {}).items()},
            "eval_json": str(path),
        }
        env = run_environment(path.parent)
        if env is not None:
            per_seed[str(seed)]["environment"] = env
    out = _over_seeds(per_seed, missing)
    envs = [v["environment"] for v in per_seed.values() if "environment" in v]
    if len({json.dumps({k: e[k] for k in e if k != "commit"}, sort_keys=True) for e in envs}) > 1:
        out["environments_differ"] = True  # other machines or versions: each seed reproduces only on its own
    if len({e["commit"] for e in envs}) > 1:
        out["commits_differ"] = True  # the code may differ too (or only its docs: compare the commits)
    return out


def run_environment(run_dir: Path) -> dict | None:
    """Where a run trained, from its ``environment.json`` (:mod:`diffalign.training.environment`): the CPU, its
    vector unit, torch and diffusers versions and the commit of its last start; ``None`` for runs without one."""
    try:
        last = json.loads((Path(run_dir) / "environment.json").read_text())["starts"][-1]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return {"cpu": (last.get("cpu") or {}).get("model"),
            "cpu_capability": (last.get("cpu") or {}).get("torch_capability"),
            "torch": (last.get("torch") or {}).get("version"),
            "diffusers": (last.get("packages") or {}).get("diffusers"),
            "commit": (last.get("diffalign") or {}).get("commit")}  # fmt: skip


def _over_seeds(per_seed: dict[str, dict], missing: list[int]) -> dict:
    """The summary of per-seed entries (``win_rate``, ``ci_low``, …): mean, min, max, std and the lowest CI bound."""
    rates = np.array([v["win_rate"] for v in per_seed.values()], dtype=np.float64)
    lows = np.array([v["ci_low"] for v in per_seed.values()], dtype=np.float64)
    out = {"seeds": per_seed, "missing_seeds": missing, "num_seeds": len(per_seed)}
    if len(rates):
        out.update(
            {
                "mean_win_rate": float(rates.mean()),
                "min_win_rate": float(rates.min()),
                "max_win_rate": float(rates.max()),
                "std_win_rate": float(rates.std(ddof=1)) if len(rates) > 1 else 0.0,
                "min_ci_low": float(lows.min()),
            }
        )
    return out


def summarise_curves(curve_files: dict[int, str | Path]) -> list[dict]:
    """``{training seed: path to eval_curve.jsonl}`` -> one entry per evaluated step: the mean, min and max win rate
    over the seeds that reached it, each seed's value, and the mean training wall-clock (evaluations excluded).
    Seeds without a curve file are left out; a step is listed with the seeds that have it (``num_seeds``)."""
    by_step: dict[int, dict[str, dict]] = {}
    for seed, path in sorted(curve_files.items()):
        path = Path(path)
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                point = json.loads(line)
                by_step.setdefault(int(point["step"]), {})[str(seed)] = point
    return [_curve_point(step, seeds) for step, seeds in sorted(by_step.items())]


def _curve_point(step: int, seeds: dict[str, dict]) -> dict:
    """One step of a curve from its seeds' points (``win_rate``, ``ci95``, ``train_seconds``), in seed order."""
    seeds = dict(sorted(seeds.items(), key=lambda kv: int(kv[0])))
    rates = np.array([p["win_rate"] for p in seeds.values()], dtype=np.float64)
    return {
        "step": step,
        "num_seeds": len(seeds),
        "mean_win_rate": float(rates.mean()),
        "min_win_rate": float(rates.min()),
        "max_win_rate": float(rates.max()),
        "mean_train_seconds": float(np.mean([p["train_seconds"] for p in seeds.values()])),
        "min_ci_low": float(min(p["ci95"][0] for p in seeds.values())),
        "seeds": {
            k: {"win_rate": p["win_rate"], "ci95": p["ci95"], "train_seconds": p["train_seconds"]}
            for k, p in seeds.items()
        },  # fmt: skip
    }


def merge_summaries(summaries: list[dict], sources: list[str] | None = None) -> dict:
    """One summary over the seeds of several (``multi_seed.json`` contents of the same config run in batches, e.g.
    seeds 0-2 first and 3-4 later): the per-seed entries joined, mean / min / max / lowest CI bound and the curve
    recomputed over all of them exactly as :func:`summarise_seeds` and :func:`summarise_curves` do. A seed in two
    summaries is an error (which run counts would be a guess). ``sources`` (e.g. the files read) are recorded."""
    per_seed: dict[str, dict] = {}
    missing: list[int] = []
    by_step: dict[int, dict[str, dict]] = {}
    for i, summary in enumerate(summaries):
        for seed, entry in summary.get("seeds", {}).items():
            if seed in per_seed:
                where = f" ({sources[i]})" if sources else ""
                raise ValueError(
                    f"seed {seed} is in two of the summaries to merge{where}: keep one run per seed"
                )
            per_seed[seed] = entry
        missing += summary.get("missing_seeds", [])
        for point in summary.get("curve", []):
            by_step.setdefault(int(point["step"]), {}).update(point["seeds"])
    per_seed = dict(sorted(per_seed.items(), key=lambda kv: int(kv[0])))
    out = _over_seeds(per_seed, sorted(set(missing) - {int(k) for k in per_seed}))
    if by_step:
        out["curve"] = [_curve_point(step, seeds) for step, seeds in sorted(by_step.items())]
    if sources:
        out["merged_from"] = list(sources)
    return out


def format_curve(curve: list[dict]) -> str:
    rows = [
        [c["step"], f"{c['mean_win_rate']:.3f}", f"{c['min_win_rate']:.3f}", f"{c['max_win_rate']:.3f}",
         f"{c['min_ci_low']:.3f}", f"{c['mean_train_seconds']:.0f}", c["num_seeds"]]
        for c in curve
    ]  # fmt: skip
    return markdown_table(
        ["step", "mean win rate", "min", "max", "lowest CI bound", "train s (mean)", "seeds"], rows
    )


def meets_bar(summary: dict, mean_at_least: float, every_ci_low_above: float, min_seeds: int = 3) -> bool:
    """The multi-seed bar: ≥ ``min_seeds`` seeds, mean win rate ≥ ``mean_at_least``, every seed's CI low above
    ``every_ci_low_above``."""
    return (
        summary.get("num_seeds", 0) >= min_seeds
        and summary["mean_win_rate"] >= mean_at_least
        and summary["min_ci_low"] > every_ci_low_above
    )


def format_summary(summary: dict) -> str:
    rows = [
        [
            seed,
            v["win_rate"],
            f"[{v['ci_low']:.3f}, {v['ci_high']:.3f}]",
            f"{v['wins']}/{v['ties']}/{v['losses']}",
        ]
        for seed, v in summary["seeds"].items()
    ]
    table = markdown_table(["training seed", "win rate", "95% CI", "W/T/L"], rows)
    if not summary["seeds"]:
        return table + "\nno seed finished"
    tail = (
        f"mean {summary['mean_win_rate']:.3f} over {summary['num_seeds']} seeds "
        f"(min {summary['min_win_rate']:.3f}, max {summary['max_win_rate']:.3f}; lowest CI bound "
        f"{summary['min_ci_low']:.3f})"
    )
    if summary.get("missing_seeds"):
        tail += f"; no eval.json for seeds {summary['missing_seeds']}"
    if summary.get("environments_differ"):
        tail += "; the seeds trained on different machines or library versions (each seed's `environment`)"
    if summary.get("commits_differ"):
        tail += "; the seeds ran different commits (each seed's `environment`)"
    return table + "\n" + tail
