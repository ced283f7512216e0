#!/usr/bin/env python
"""Build the multi-user preference data for personalised preference tuning (PPD) by relabelling the shipped
sandbox pairs with the simulated user population (no image is sampled; about a minute on a CPU).

    # the dataset that `--dataset sandbox-ppd` builds on first use, into outputs/sandbox-ppd (or --output-dir)
    python scripts/build_ppd_data.py

    # three train users per pair, another seed, a small build in seconds
    python scripts/build_ppd_data.py --output-dir /tmp/ppd --users-per-pair 3 --seed 1 --max-source-pairs 200

Writes ``<output-dir>/data/{train,context,validation_unique,test_unique}-00000-of-00001.parquet`` (Pick-a-Pic v2
columns), ``test_users.json``, ``users.json``, ``build_report.json`` and a short ``README.md``; prints the report.
Layout and rules: ``diffalign/data/ppd.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from diffalign.cli import at_least  # noqa: E402
from diffalign.data.ppd import build_ppd_data  # noqa: E402
from diffalign.sandbox import SANDBOX_DATA  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--output-dir",
        default=str(REPO / "outputs" / "sandbox-ppd"),
        help="a new or empty folder for the dataset (default: outputs/sandbox-ppd)",
    )
    p.add_argument(
        "--source-dir",
        default=str(SANDBOX_DATA),
        help="Pick-a-Pic-schema pairs to relabel (default: shipped)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of user assignment, label draws, context and prompts"
    )
    p.add_argument(
        "--users-per-pair",
        type=at_least(1),
        default=2,
        help="train users labelling each train pair (default 2)",
    )
    p.add_argument(
        "--context-pairs", type=at_least(1), default=8, help="context pairs per unseen user (default 8)"
    )
    p.add_argument(
        "--test-prompts", type=at_least(1), default=8, help="test captions per unseen user (default 8)"
    )
    p.add_argument(
        "--max-source-pairs",
        type=at_least(1),
        default=None,
        help="read only the first N rows of each source split",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = build_ppd_data(
        args.output_dir,
        source_dir=args.source_dir,
        seed=args.seed,
        users_per_pair=args.users_per_pair,
        context_pairs_per_unseen_user=args.context_pairs,
        test_prompts_per_unseen_user=args.test_prompts,
        max_source_pairs=args.max_source_pairs,
        progress=not args.no_progress,
    )
    print(json.dumps(report, indent=2))
    print(f"wall time {report['wall_seconds']:.1f} s; dataset: {args.output_dir}")
    return report


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
