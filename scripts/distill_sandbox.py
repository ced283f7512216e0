"""Distil the sandbox base into a 4-step model without guidance (SDXL-Turbo's sampler), measure it, ship it.

The full build (teacher trajectories, student training, the measurement on the 200 ``test_unique`` prompts x seeds
{0, 1} and on 400 held-out grammar captions; times in docs/sandbox.md) writes the shipped model::

    python scripts/distill_sandbox.py

    # -> diffalign/sandbox/assets/distilled/{unet/, scheduler/, README.md, distill_report.json}

That is the first recipe (``--recipe endpoint``, 600 steps at lr 1e-4), which the shipped UNet was built with; the
better recipe (targets from a re-run of the teacher's ODE, 1200 steps at lr 2e-4; diffalign/sandbox/distill.py) is::

    python scripts/distill_sandbox.py --recipe rerun --output-dir /tmp/distilled-rerun

The quick build runs the same code with tiny counts (well under a minute) into a folder of your choice; its model
is only a smoke test and is never shipped::

    python scripts/distill_sandbox.py --quick --output-dir /tmp/distill-quick

Every count can be overridden, e.g. ``--train-steps 1200``; ``--seed`` changes every random draw (the build is
deterministic given the seed and the torch thread count). Load the result as ``"sandbox-4step"``
(``diffalign.models.pipeline.resolve_model_path``) or see the folder's README.md.
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
from diffalign.sandbox import SANDBOX_DISTILLED, SANDBOX_PIPELINE  # noqa: E402
from diffalign.sandbox.distill import (  # noqa: E402
    DistillConfig,
    distill_sandbox,
    eval_rows,
    eval_sets,
    format_table,
    measure,
)

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
    p.add_argument(
        "--recipe",
        choices=("rerun", "endpoint"),
        default=None,
        help="endpoint (default: the shipped UNet, 600 steps at lr 1e-4) or rerun (targets from a re-run of the "
        "teacher's ODE, 1200 steps at lr 2e-4; better)",
    )
    p.add_argument(
        "--measure-only",
        type=Path,
        default=None,
        metavar="DIR",
        help="train nothing: measure the distilled model in DIR (its unet/) on the build's two prompt sets",
    )
    for name in OVERRIDABLE:
        p.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"override DistillConfig.{name}"
        )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {name: getattr(args, name) for name in OVERRIDABLE if getattr(args, name) is not None}
    overrides["seed"] = args.seed
    for name in ("lr", "p_renoised", "recipe"):
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
    prompts = split_prompts("sandbox", "test_unique")  # the evaluation prompts (kept out of the teacher's)
    if args.measure_only is not None:
        return measure_only(cfg, args.measure_only, prompts)
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


def measure_only(cfg: DistillConfig, directory: Path, prompts: list[str]) -> int:
    """The build's measurement of an existing distilled model (``directory/unet``), printed, nothing written."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.set_num_threads(cfg.threads)
    pipe = StableDiffusionPipeline.from_pretrained(SANDBOX_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    unet = UNet2DConditionModel.from_pretrained(Path(directory) / "unet").eval()
    for name, (rows_p, rows_s) in eval_sets(cfg, prompts).items():
        print(f"[distill] {directory}: judge on {name} ({len(rows_p)} images)")
        print(format_table(measure(pipe, unet, rows_p, rows_s, eval_rows(cfg), generate, cfg.eval_batch)))
    return 0


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    raise SystemExit(main_for_people(main))
