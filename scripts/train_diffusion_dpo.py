#!/usr/bin/env python
"""Diffusion-DPO (or its SFT baseline) on Pick-a-Pic-schema preference pairs.

    # the sandbox default: LoRA Diffusion-DPO on the shipped sandbox model and data, then base-vs-aligned evaluation
    accelerate launch scripts/train_diffusion_dpo.py

    # a recipe, with command-line overrides (any config field is a --flag; see --help)
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_diffusion_dpo.py \
        --config configs/sd15_pickapic.yaml --output_dir outputs/dpo-sd15

Runs with plain `python scripts/train_diffusion_dpo.py` too (one process). Writes checkpoints, logs, the exported
weights (LoRA in diffusers format or a full UNet), a model card and `<output_dir>/eval.json`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffalign.config import DPOConfig, parse_config  # noqa: E402
from diffalign.training.offline import OfflinePairsTrainer  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sandbox_dpo.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and DEFAULT_CONFIG.is_file():
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    cfg = parse_config(DPOConfig, argv)
    trainer = OfflinePairsTrainer(cfg)
    trainer.setup()
    summary = trainer.train()
    result = None if cfg.skip_eval else trainer.evaluate()
    metrics = {"final_train": summary["history"][-1] if summary["history"] else {}, "eval": result}
    target = trainer.export(metrics)
    trainer.accelerator.print(
        f"done: weights in {target}, logs in {cfg.output_dir}/logs, model card {cfg.output_dir}/README.md"
    )
    trainer.end()
    return {"summary": summary, "eval": result, "weights": str(target)}


if __name__ == "__main__":
    main()
