#!/usr/bin/env python
"""Plot online runs side by side: training reward per epoch and the held-out judge score (``track_every``).

python scripts/plot_online.py                # the two sandbox defaults: outputs/prdp-sandbox and outputs/ddpo-sandbox
python scripts/plot_online.py prdp=outputs/prdp-sandbox ddpo=outputs/ddpo-sandbox --output docs/img/online.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffalign.cli import at_least  # noqa: E402

# With no runs named: the output directories of the two sandbox configs, each with the command that fills it.
DEFAULT_RUNS = {
    "prdp": ("outputs/prdp-sandbox", "configs/sandbox_prdp.yaml"),
    "ddpo": ("outputs/ddpo-sandbox", "configs/sandbox_ddpo.yaml"),
}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "runs",
        nargs="*",
        help="label=output_dir (each with a train_log.jsonl); default: the PRDP and DDPO sandbox runs' directories",
    )
    p.add_argument("--output", default="online_curves.png")
    p.add_argument(
        "--smooth",
        type=at_least(1),
        default=10,
        help="moving-average window of the training reward, in epochs",
    )
    args = p.parse_args(argv)
    from diffalign.eval.plots import plot_online_curves

    runs = {}
    specs = args.runs or [f"{label}={ROOT / d}" for label, (d, _) in DEFAULT_RUNS.items()]
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        log = Path(path) / "train_log.jsonl"
        if not log.is_file():
            hint = "give label=<output_dir of an online run>"
            if not args.runs:
                hint = f"train it first: accelerate launch scripts/train_online.py --config {DEFAULT_RUNS[label][1]}"
            raise SystemExit(f"{log}: no train_log.jsonl ({hint})")
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if not any("train/reward_mean" in r or "heldout/overall" in r for r in rows):
            raise SystemExit(
                f"{log}: no 'train/reward_mean' or 'heldout/overall' in any row (is it an online run? "
                "scripts/plot_curves.py plots offline runs)"
            )
        runs[label] = rows
    out = plot_online_curves(runs, args.output, smooth=args.smooth)
    print(f"written: {out}")
    return out


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
