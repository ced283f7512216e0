"""What the training scripts share: config parsing before anything heavy, the set-up → train → evaluate → export
sequence of a trainer, and errors printed as one line for people.

    python scripts/train_diffusion_dpo.py     # TrainConfig  + diffalign.training.offline:OfflinePairsTrainer
    python scripts/train_online.py            # OnlineConfig + diffalign.training.online:OnlineTrainer

Importing this module does not import torch: the trainer module is imported only once the config is valid.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from .config import parse_config
from .errors import ConfigError, TrainingError


def run_training(config_cls: type, trainer: str, default_config: Path, argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (``--config default_config`` prepended when no ``--config`` is given), then run
    ``trainer`` (``"module:Class"``): ``setup()``, ``train()``, ``evaluate()`` unless ``skip_eval``, ``export()``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and Path(default_config).is_file():
        argv = ["--config", str(default_config), *argv]
    cfg = parse_config(config_cls, argv)
    cfg.check_paths()

    module, _, name = trainer.partition(":")
    t = getattr(importlib.import_module(module), name)(cfg)  # heavy: torch, diffusers, accelerate
    t.setup()
    summary = t.train()
    result = None if cfg.skip_eval else t.evaluate()
    metrics = {"final_train": summary["history"][-1] if summary["history"] else {}, "eval": result}
    target = t.export(metrics)
    t.accelerator.print(
        f"done: weights in {target}, logs in {cfg.output_dir}/train_log.jsonl, model card {cfg.output_dir}/README.md"
    )
    t.end()
    return {"summary": summary, "eval": result, "weights": str(target)}


def main_for_people(main) -> None:
    """Run ``main()``; configuration errors become one line and exit code 2, training errors one line and exit 1,
    unless ``--debug`` is on the command line."""
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
