#!/usr/bin/env python
"""DreamBench-protocol benchmark: 25 prompts per subject, 4 images per prompt; DINO, CLIP-I, CLIP-T, λ-harmonic.

    # sandbox models on a DreamBench copy (DINO column = the sandbox stand-in backbone, labelled as such)
    python scripts/benchmark_dreambench.py --data ../shared/data/dreambench-mini --output-dir outputs/bench-dreambench

    # real models: SD1.5 with one DreamBooth/RPO LoRA per subject (DIR/<subject>/), DINO ViT-S/16 and CLIP ViT-L/14
    python scripts/benchmark_dreambench.py --data /data/dreambooth --base /models/sd15 \
        --subject-models outputs/rpo-subjects --dino dino-vits16 --clip clip-vit-l14 --steps 50 --guidance 7.5

Flags may be written --subject-models or --subject_models; `--help` lists them all. Writes results.json,
results.md, metrics.png and grids/<subject>.png to --output-dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffalign.config import parse_config  # noqa: E402
from diffalign.eval.dreambench import DreamBenchConfig, run_dreambench  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(DreamBenchConfig, argv)
    return run_dreambench(cfg)


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
