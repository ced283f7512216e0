"""Distil the sandbox base into a 4-step model without guidance (SDXL-Turbo's sampler), measure it, ship it.

The full build (teacher trajectories, student training, the measurement on the 200 ``test_unique`` prompts x seeds
{0, 1}; time in docs/sandbox.md) writes the shipped model::

    python scripts/distill_sandbox.py

    # -> diffalign/sandbox/assets/distilled/{unet/, scheduler/, README.md, distill_report.json}

The quick build runs the same code with tiny counts (well under a minute) into a folder of your choice; its model
is only a smoke test and is never shipped::

    python scripts/distill_sandbox.py --quick --output-dir /tmp/distill-quick

Every count can be overridden, e.g. ``--train-steps 1200``; ``--seed`` changes every random draw. Load the result as
``"sandbox-4step"`` (``diffalign.models.pipeline.resolve_model_path``) or see the folder's README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded

from diffalign.eval.compare import generate  # noqa: E402
from diffalign.eval.protocol import split_prompts  # noqa: E402
from diffalign.sandbox import SANDBOX_DISTILLED  # noqa: E402
from diffalign.sandbox.distill import DistillConfig, distill_sandbox, format_table  # noqa: E402

OVERRIDABLE = ("n_teacher", "teacher_steps", "train_steps", "batch", "eval_prompts", "eval_grammar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="tiny counts (smoke test); writes --output-dir or a temp dir"
    )
    p.add_argument(
        "--output-dir", type=Path, default=None, help=f"write the model here instead of {SANDBOX_DISTILLED}"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds every random draw (default 0: the shipped build)"
    )
    p.add_argument("--lr", type=float, default=None, help="override DistillConfig.lr")
    p.add_argument("--p-renoised", type=float, default=None, help="override DistillConfig.p_renoised")
    for name in OVERRIDABLE:
        p.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"override DistillConfig.{name}"
        )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {name: getattr(args, name) for name in OVERRIDABLE if getattr(args, name) is not None}
    overrides["seed"] = args.seed
    for name in ("lr", "p_renoised"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = DistillConfig.quick(**overrides) if args.quick else DistillConfig(**overrides)
    if args.output_dir is not None:
        output_dir = args.output_dir
    elif args.quick:
        output_dir = Path(tempfile.mkdtemp(prefix="distill-quick-")) / "distilled"
    else:
        output_dir = SANDBOX_DISTILLED
    command = "python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    prompts = split_prompts(
        "sandbox", "test_unique"
    )  # the evaluation prompts (also kept out of the teacher's)
    result = distill_sandbox(cfg, output_dir, eval_prompts=prompts, generate=generate, command=command)
    s = result.settings
    print(f"\n[distill] judge on {s['eval_prompts']} test_unique prompts x seeds {s['eval_seeds']}:")
    print(format_table(result.metrics["test_unique"]))
    print(f"[distill] judge on {s['eval_grammar']}:")
    print(format_table(result.metrics["grammar"]))
    print(f"[distill] size (MB): {result.sizes_bytes['total'] / 1e6:.2f}")
    print(f"[distill] timings (s): { {k: round(v, 1) for k, v in result.timings_s.items()} }")
    print(f"[distill] model and report written to {output_dir} (distill_report.json, README.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
