#!/usr/bin/env python
"""Build the sandbox's DreamBench: two-tone subjects for subject-driven tuning (DreamBooth, RPO).

Writes the original DreamBench layout (``dataset/<subject>/00.jpg ...``, ``dataset/prompts_and_classes.txt``) plus
``dataset/training_prompts.txt``, ``dataset/validation_prompts.txt`` and a ``README.md``; deterministic (the same
bytes every run), under a second on one CPU core, about 50 KB::

    python scripts/build_sandbox_subjects.py                       # -> diffalign/sandbox/assets/dreambench
    python scripts/build_sandbox_subjects.py --output_dir /tmp/db  # the same files elsewhere

An earlier build in the output folder is replaced (its dataset/ removed first).

The subjects, prompts and reference scenes are defined in ``diffalign/sandbox/subjects.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffalign.sandbox.subjects import SANDBOX_DREAMBENCH, SUBJECTS, write_dreambench  # noqa: E402

README_TITLE = "# Sandbox DreamBench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--output_dir",
        "--output-dir",
        type=Path,
        default=SANDBOX_DREAMBENCH,
        help="where README.md and dataset/ go (default: the shipped diffalign/sandbox/assets/dreambench)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the reference scenes' order and jitter (0: the shipped build)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    readme, dataset = out / "README.md", out / "dataset"
    if dataset.exists():
        # a previous build is replaced whole (a subject renamed or dropped leaves no stale folder); anything else
        # named dataset/ is left alone
        if not (readme.is_file() and readme.read_text(encoding="utf-8").startswith(README_TITLE)):
            print(
                f"error: {dataset} exists and {out} is not an earlier build of this script", file=sys.stderr
            )
            return 2
        shutil.rmtree(dataset)
    ddir = write_dreambench(out, seed=args.seed)
    files = sorted(p for p in Path(args.output_dir).rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(SUBJECTS)} subjects to {ddir} ({len(files)} files, {total / 1024:.1f} KiB in all)")
    return 0


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    raise SystemExit(main_for_people(main))
