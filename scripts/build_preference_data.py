#!/usr/bin/env python
"""Build Pick-a-Pic-v2-schema preference pairs by sampling images from diffusion models and labelling them.

    # the shipped sandbox dataset (diffalign/sandbox/assets/pickapic, about 8 MB; labelled by the simulated users)
    nice -n 5 python scripts/build_preference_data.py

    # a larger one, AI feedback from the judge, elsewhere
    python scripts/build_preference_data.py --num-train-prompts 100000 --labeller judge --output-dir outputs/pickapic-100k

    # a few dozen pairs in seconds (smoke test)
    python scripts/build_preference_data.py --quick --output-dir /tmp/pickapic-quick

    # pairs from another sandbox-compatible pipeline (e.g. an aligned one) against the base
    python scripts/build_preference_data.py --model outputs/dpo/pipeline --generator aligned:5 \
        --generator base:5:diffalign/sandbox/assets/pipeline/unet --output-dir outputs/pairs-aligned

Writes ``<output-dir>/data/<split>-00000-of-00001.parquet`` for the five splits (``datasets.load_dataset(<dir>)``
loads them), ``<output-dir>/build_report.json`` (every number printed at the end, and the configuration) and a
short ``README.md``. Deterministic given ``--seed`` on one device type and ``--threads`` count (CPU and GPU
kernels, and different thread counts, round differently: rarely, an image differs by a JPEG byte or so).
What is sampled, how labels are drawn and what each column holds: ``diffalign/data/builder.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

from diffalign.data.builder import (  # noqa: E402
    LABELLERS,
    BuilderConfig,
    GeneratorSpec,
    build_preference_data,
    format_summary,
    load_generators,
    make_labeller,
    parse_generator_spec,
    sandbox_generator_specs,
)
from diffalign.sandbox import SANDBOX_DATA, SANDBOX_PIPELINE  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--output-dir", default=str(SANDBOX_DATA), help="dataset folder (default: the shipped sandbox data)"
    )
    p.add_argument("--model", default="sandbox", help="diffusers pipeline directory, or 'sandbox' (default)")
    p.add_argument(
        "--generator",
        action="append",
        default=None,
        metavar="NAME:GUIDANCE[:UNET_DIR]",
        help="a model of the mix (repeat the flag); UNET_DIR replaces the pipeline's UNet. Default for the sandbox: "
        "sandbox-base:5, sandbox-base-cfg2:2, sandbox-early:5:<assets/unet-early>; for another --model: "
        "<name>:7.5 and <name>-cfg3:3",
    )
    p.add_argument("--labeller", choices=sorted(LABELLERS), default=None, help="'users' (default) or 'judge'")
    p.add_argument("--seed", type=int, default=None, help="seed of the whole build (default 0)")
    p.add_argument("--num-train-prompts", type=int, default=None, help="train prompts (default 1400)")
    p.add_argument("--pairs-per-prompt", default=None, help="'N' or 'A-B' (uniform); default '1-4'")
    p.add_argument(
        "--num-validation-prompts", type=int, default=None, help="validation prompts (default 120)"
    )
    p.add_argument("--num-test-prompts", type=int, default=None, help="test prompts (default 120)")
    p.add_argument("--num-unique", type=int, default=None, help="pairs in each *_unique split (default 200)")
    p.add_argument(
        "--steps", type=int, default=None, dest="num_inference_steps", help="DDIM steps (default 20)"
    )
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per pipeline call (default 64)")
    p.add_argument("--temperature", type=float, default=None, help="Bradley-Terry temperature (default 0.05)")
    p.add_argument(
        "--tie-margin", type=float, default=None, help="|s0 - s1| below this is a tie (default 0.015)"
    )
    p.add_argument("--jpeg-quality", type=int, default=None, help="JPEG quality (default 95)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the tiny sandbox models are fastest on one thread, measured 6.5 s vs "
        "113 s for --quick on a busy 2-core machine, and the bytes then do not depend on the core count; "
        "0: torch's default)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few dozen pairs (BuilderConfig.quick), for smoke tests"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


CONFIG_FLAGS = (
    "labeller",
    "seed",
    "num_train_prompts",
    "pairs_per_prompt",
    "num_validation_prompts",
    "num_test_prompts",
    "num_unique",
    "num_inference_steps",
    "eta",
    "resolution",
    "batch_size",
    "temperature",
    "tie_margin",
    "jpeg_quality",
)


def config_from_args(args: argparse.Namespace) -> BuilderConfig:
    overrides = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    return BuilderConfig.quick(**overrides) if args.quick else BuilderConfig(**overrides)


def generator_specs(args: argparse.Namespace) -> list[GeneratorSpec]:
    if args.generator:
        return [parse_generator_spec(g) for g in args.generator]
    is_sandbox = args.model == "sandbox" or Path(args.model).resolve() == SANDBOX_PIPELINE.resolve()
    if is_sandbox:
        return sandbox_generator_specs()
    name = Path(args.model.rstrip("/")).name or "model"
    return [GeneratorSpec(f"{name}", 7.5), GeneratorSpec(f"{name}-cfg3", 3.0)]


def weight_fingerprints(dirs: list[str]) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of every ``*.safetensors``/``*.bin`` file under ``dirs``: which weights the
    data was sampled from (a rebuilt model gives new fingerprints, so stale data can be detected)."""
    out = {}
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            continue
        for f in sorted([*root.rglob("*.safetensors"), *root.rglob("*.bin")]):
            name = f.resolve()
            name = name.relative_to(REPO) if name.is_relative_to(REPO) else name
            out[str(name)] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import diffusers
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    specs = generator_specs(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    expected = cfg.expected_pairs()
    print(
        f"building ~{sum(expected.values()):,.0f} pairs ({', '.join(f'{s} ~{n:,.0f}' for s, n in expected.items())}) "
        f"= ~{2 * sum(expected.values()):,.0f} images x {cfg.num_inference_steps} DDIM steps on {device}; "
        f"generators: {', '.join(f'{s.name} (cfg {s.guidance_scale:g})' for s in specs)}; labeller: {cfg.labeller}"
    )
    generators = load_generators(args.model, specs, cfg, device=device, dtype=args.dtype)
    labeller = make_labeller(cfg.labeller)
    model_dir = getattr(generators[specs[0].name].pipe, "name_or_path", None) or args.model
    extra = {
        "command": " ".join(
            ["python scripts/build_preference_data.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "model": str(model_dir),
        "generator_specs": [asdict(s) for s in specs],
        "weights": weight_fingerprints([str(model_dir)] + [s.unet for s in specs if s.unet]),
        "device": device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    report = build_preference_data(cfg, generators, labeller, args.output_dir, not args.no_progress, extra)
    print(format_summary(report))
    print(f"wall time {report['wall_seconds']:.1f} s; report: {Path(args.output_dir) / 'build_report.json'}")
    return report


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
