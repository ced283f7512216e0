#!/usr/bin/env python
"""Offline preference training: Diffusion-DPO (default), its SFT baseline, or any registered offline objective.

    # the sandbox default: LoRA Diffusion-DPO on the shipped sandbox model and data, then base-vs-aligned evaluation
    accelerate launch scripts/train_diffusion_dpo.py

    # a recipe, with command-line overrides (any config field is a --flag; see --help)
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_diffusion_dpo.py \
        --config configs/sd15_pickapic.yaml --output_dir outputs/dpo-sd15

Runs with plain `python scripts/train_diffusion_dpo.py` too (one process). Writes checkpoints, logs, the exported
weights (LoRA in diffusers format or a full UNet), a model card and `<output_dir>/eval.json`. Configuration mistakes
are reported as one line before anything heavy loads (`--debug` shows the traceback); `--help` answers at once.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffalign.config import TrainConfig, parse_config  # noqa: E402  (light: no torch until the config is valid)
from diffalign.errors import ConfigError, TrainingError  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sandbox_dpo.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and DEFAULT_CONFIG.is_file():
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    cfg = parse_config(TrainConfig, argv)
    cfg.check_paths()

    from diffalign.training.offline import OfflinePairsTrainer  # heavy: torch, diffusers, accelerate

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


def cli() -> None:
    """``main`` with errors for people: one line and exit code 2 (config) or 1 (training), unless ``--debug``."""
    debug = "--debug" in sys.argv[1:]
    try:
        main()
    except (ConfigError, TrainingError, FileNotFoundError) as err:
        if debug:
            raise
        kind = (
            "configuration error" if isinstance(err, (ConfigError, FileNotFoundError)) else "training stopped"
        )
        print(f"{kind}: {err} (--debug for the traceback)", file=sys.stderr)
        raise SystemExit(2 if kind == "configuration error" else 1) from None


if __name__ == "__main__":
    cli()
