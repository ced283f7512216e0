#!/usr/bin/env python
"""Write a null-control copy of a preference dataset: every decided pair's labels swapped by a fair coin.

    python scripts/shuffle_labels.py                 # the shipped sandbox pairs, into outputs/sandbox-coin
    python scripts/train_diffusion_dpo.py --dataset outputs/sandbox-coin           # DPO with no preference

A run on the copy gains over its base only what the loop's noise and drift give; a method's gain on the real labels
means something only above that level. Rules: ``diffalign/data/label_control.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from diffalign.data.label_control import shuffle_labels  # noqa: E402
from diffalign.data.sources import resolve_built_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--output-dir",
        default=str(REPO / "outputs" / "sandbox-coin"),
        help="a new or empty folder for the copy (default: outputs/sandbox-coin)",
    )
    p.add_argument("--dataset", default="sandbox", help="a Pick-a-Pic-schema folder, or 'sandbox' (default)")
    p.add_argument(
        "--splits", nargs="+", default=["train"], help="splits whose labels are flipped (default: train)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the coins")
    args = p.parse_args(argv)
    try:
        report = shuffle_labels(resolve_built_dataset(args.dataset), args.output_dir, args.splits, args.seed)
    except (FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(report["splits"], indent=1))
    print(f"wrote {args.output_dir}")
    return report


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
