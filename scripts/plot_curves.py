#!/usr/bin/env python
"""Win rate vs training steps of several methods, from the ``multi_seed.json`` files of runs trained with
``--eval_curve_steps`` (``scripts/multi_seed.py`` writes the curve over seeds), with training wall-clock on the
second axis; also says at which evaluated step each method first reaches the first one's final mean win rate.

    python scripts/plot_curves.py --runs DPO=outputs/curves/dpo/multi_seed.json InPO=outputs/curves/inpo/multi_seed.json \\
        --out docs/img/inpo_vs_dpo.png

With no ``--runs``: Diffusion-DPO against InPO from ``scripts/multi_seed.py``'s default folders
(``outputs/multi-seed/sandbox_dpo`` and ``.../sandbox_inpo``), which ``python scripts/multi_seed.py --config
configs/sandbox_{dpo,inpo}.yaml -- --eval_curve_steps [150,300,450]`` fills.

Solid lines: mean win rate over training seeds (band: min to max over seeds); dashed lines, right axis: mean
training wall-clock (evaluations excluded) at that step. A JSON summary goes next to the figure (``.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# With no --runs: Diffusion-DPO (the baseline) and InPO from multi_seed.py's default folders, with their commands.
DEFAULT_RUNS = {"Diffusion-DPO": "sandbox_dpo", "InPO": "sandbox_inpo"}
CURVE_FLAGS = "-- --eval_curve_steps [150,300,450]"


def default_runs() -> list[str]:
    """The default ``--runs``; a missing file is one line naming the command that writes it."""
    runs = []
    for label, name in DEFAULT_RUNS.items():
        path = ROOT / "outputs" / "multi-seed" / name / "multi_seed.json"
        if not path.is_file():
            raise SystemExit(
                f"{path} does not exist (make it: python scripts/multi_seed.py --config configs/{name}.yaml "
                f"{CURVE_FLAGS}; or give --runs LABEL=multi_seed.json ...)"
            )
        runs.append(f"{label}={path}")
    return runs


def parse_runs(items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--runs {item!r}: give LABEL=path/to/multi_seed.json")
        if not Path(path).is_file():
            raise SystemExit(f"--runs {label}: {path} does not exist")
        runs[label] = Path(path)
    return runs


def load_curve(path: Path) -> list[dict]:
    curve = json.loads(path.read_text()).get("curve")
    if not curve:
        raise SystemExit(
            f"{path} has no 'curve': train with --eval_curve_steps and rerun scripts/multi_seed.py"
        )
    return curve


def first_step_reaching(curve: list[dict], target: float) -> int | None:
    """The first evaluated step whose mean win rate is at least ``target`` (None if none)."""
    return next((c["step"] for c in curve if c["mean_win_rate"] >= target), None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help="LABEL=multi_seed.json, the first is the baseline (default: Diffusion-DPO and InPO, see above)",
    )
    p.add_argument("--out", default="outputs/curves.png", help="figure path (a .json summary goes beside it)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    runs = {label: load_curve(path) for label, path in parse_runs(args.runs or default_runs()).items()}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    clock = ax.twinx()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, curve), colour in zip(runs.items(), colours):
        steps = [0] + [c["step"] for c in curve]
        mean = [0.5] + [c["mean_win_rate"] for c in curve]  # step 0: the base against itself
        ax.plot(
            steps,
            mean,
            "-o",
            color=colour,
            label=f"{label} win rate (mean of {curve[-1]['num_seeds']} seeds)",
        )
        ax.fill_between(steps, [0.5] + [c["min_win_rate"] for c in curve],
                        [0.5] + [c["max_win_rate"] for c in curve], color=colour, alpha=0.15)  # fmt: skip
        clock.plot(steps, [0] + [c["mean_train_seconds"] for c in curve], "--", color=colour,
                   label=f"{label} training wall-clock")  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("judge win rate vs base")
    clock.set_ylabel("training wall-clock, s (dashed)")
    lines = ax.get_legend_handles_labels()
    more = clock.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower right")
    ax.set_title(args.title or " vs ".join(runs), fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)

    baseline, base_curve = next(iter(runs.items()))
    target = base_curve[-1]["mean_win_rate"]
    summary = {"baseline": baseline, "baseline_final_step": base_curve[-1]["step"],
               "baseline_final_mean_win_rate": target, "curves": runs, "first_step_reaching_baseline_final": {}}  # fmt: skip
    print(f"{baseline} final mean win rate {target:.3f} at step {base_curve[-1]['step']}")
    for label, curve in runs.items():
        step = first_step_reaching(curve, target)
        summary["first_step_reaching_baseline_final"][label] = step
        where = f"step {step}" if step is not None else "no evaluated step"
        print(
            f"  {label}: {where} reaches it (final mean {curve[-1]['mean_win_rate']:.3f} at step {curve[-1]['step']})"
        )
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"written: {out}, {out.with_suffix('.json')}")
    return summary


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
