#!/usr/bin/env python
"""Pick-a-Pic-protocol benchmark: base vs aligned model, same prompts and seeds, win rate per reward with CIs.

    # sandbox: the DPO LoRA vs the sandbox base on the 500 test_unique prompts, judge + sandbox CLIP
    python scripts/benchmark_pickapic.py --aligned outputs/dpo-sandbox/lora --output-dir outputs/bench-pickapic

    # PartiPrompts (stratified 200 of the 1,632 over the 12 categories), CLIP reward only (the judge would be skipped)
    python scripts/benchmark_pickapic.py --prompts ../shared/data/PartiPrompts.tsv --num-prompts 200 \
        --aligned outputs/dpo-sandbox/lora --rewards sandbox-clip --output-dir outputs/bench-parti

    # a real model: SD1.5 + a Diffusion-DPO LoRA, PickScore and HPSv2 on the HPSv2 benchmark prompts (a dir of JSON)
    python scripts/benchmark_pickapic.py --base /models/sd15 --aligned outputs/dpo-sd15 \
        --prompts data/hps_benchmark/ --rewards pickscore,hpsv2 --steps 50 --guidance 7.5 --dtype float16

Flags may be written --num-prompts or --num_prompts; `--help` lists them all. Writes results.json, results.md,
scores.jsonl, win_rate.png, win_rate_by_category.png (when prompts have categories) and index.html to --output-dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffalign.config import parse_config  # noqa: E402
from diffalign.eval.benchmark_pickapic import PickapicBenchmarkConfig, run_pickapic_benchmark  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(PickapicBenchmarkConfig, argv)
    return run_pickapic_benchmark(cfg)


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
