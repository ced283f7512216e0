#!/usr/bin/env python
"""Plot online runs side by side: training reward per epoch and the held-out judge score (``track_every``).

python scripts/plot_online.py prdp=outputs/prdp-sandbox ddpo=outputs/ddpo-sandbox --output docs/img/online.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="label=output_dir (each with a train_log.jsonl)")
    p.add_argument("--output", default="online_curves.png")
    p.add_argument(
        "--smooth", type=int, default=10, help="moving-average window of the training reward, in epochs"
    )
    args = p.parse_args(argv)
    from diffalign.eval.plots import plot_online_curves

    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        log = Path(path) / "train_log.jsonl"
        if not log.is_file():
            raise SystemExit(f"{log}: no train_log.jsonl (give label=<output_dir of an online run>)")
        runs[label] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    out = plot_online_curves(runs, args.output, smooth=args.smooth)
    print(f"written: {out}")
    return out


if __name__ == "__main__":
    main()
