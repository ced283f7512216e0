"""Build the sandbox's tiny models (tokenizer, tiny CLIP, VAE, UNet, early UNet) and the StableDiffusionPipeline.

The full build (16.7 min measured on 2 idle CPU cores; longer under load) writes the shipped assets::

    python scripts/build_sandbox.py

    # -> diffalign/sandbox/assets/pipeline/  diffalign/sandbox/assets/unet-early/
    #    reward_models/sandbox-clip/        diffalign/sandbox/assets/build_report.json

The quick build runs the same code with tiny step counts (about a minute) into a folder of your choice; its outputs
are only a smoke test and are never shipped::

    python scripts/build_sandbox.py --quick --output-dir /tmp/sandbox-quick

Every ``BuildConfig`` step count can be overridden, e.g. ``--unet-steps 5000``; ``--seed`` changes every random
draw (the build is deterministic given the seed and the torch thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded

from diffalign.sandbox.build import BuildConfig, BuildPaths, build_sandbox  # noqa: E402

OVERRIDABLE = (
    "n_train",
    "n_clip_train",
    "clip_steps",
    "vae_steps",
    "unet_steps",
    "unet_batch",
    "eval_judge_prompts",
    "eval_retrieval_groups",
    "eval_steps",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="tiny step counts (smoke test); needs --output-dir or a temp dir"
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="write pipeline/, unet-early/, sandbox-clip/ and build_report.json here instead of the shipped places",
    )
    p.add_argument(
        "--clip-from",
        type=Path,
        default=None,
        help="reuse the tiny CLIP of an earlier build with the same seed and CLIP settings (its sandbox-clip/)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds numpy and torch (default 0: the shipped build)")
    p.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance for the judge evaluation"
    )
    for name in OVERRIDABLE:
        p.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"override BuildConfig.{name}"
        )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {name: getattr(args, name) for name in OVERRIDABLE if getattr(args, name) is not None}
    overrides["seed"] = args.seed
    if args.guidance is not None:
        overrides["eval_guidance"] = args.guidance
    cfg = BuildConfig.quick(**overrides) if args.quick else BuildConfig(**overrides)
    if args.output_dir is not None:
        paths = BuildPaths.under(args.output_dir)
    elif args.quick:
        paths = BuildPaths.under(tempfile.mkdtemp(prefix="sandbox-quick-"))
    else:
        paths = BuildPaths.shipped()
    command = "python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    result = build_sandbox(cfg, paths, command=command, clip_from=args.clip_from)
    print("\n[build] outputs:")
    for name, path in result.paths.items():
        print(f"  {name:11s} {path}")
    print("[build] metrics:")
    print(json.dumps(result.metrics, indent=2))
    print(f"[build] sizes (MB): { {k: round(v / 1e6, 2) for k, v in result.sizes_bytes.items()} }")
    print(f"[build] timings (s): { {k: round(v, 1) for k, v in result.timings_s.items()} }")
    return 0


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    raise SystemExit(main_for_people(main))
