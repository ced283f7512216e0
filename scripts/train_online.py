#!/usr/bin/env python
"""Online preference training: PRDP (default) or DDPO — sample with the current model, score with a reward, update.

    # the sandbox default: PRDP (LoRA) on 10,000 grammar prompts with the learned sandbox reward, then the judge's
    # base-vs-aligned evaluation on 1,000 held-out prompts
    accelerate launch scripts/train_online.py

    # the DDPO baseline on the same loop, or any recipe with overrides (every config field is a --flag; see --help)
    accelerate launch scripts/train_online.py --config configs/sandbox_ddpo.yaml --seed 1

Runs with plain `python scripts/train_online.py` too (one process). Writes checkpoints (per epoch), train_log.jsonl
(reward, loss and the sampling / scoring / update seconds of every epoch), validation grids, the exported weights
(LoRA in diffusers format or a full UNet), a model card and `<output_dir>/eval.json`. Configuration mistakes are one
line before anything heavy loads (`--debug` shows the traceback).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffalign.cli import main_for_people, run_training  # noqa: E402  (light: no torch until the config is valid)
from diffalign.config import OnlineConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sandbox_prdp.yaml"


def main(argv: list[str] | None = None) -> dict:
    return run_training(OnlineConfig, "diffalign.training.online:OnlineTrainer", DEFAULT_CONFIG, argv)


def cli() -> None:
    """``main`` with errors for people: one line and exit code 2 (config) or 1 (training), unless ``--debug``."""
    main_for_people(main)


if __name__ == "__main__":
    cli()
