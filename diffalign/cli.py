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

from .config import OnlineConfig, parse_config
from .errors import ConfigError, TrainingError


def at_least(minimum: int):
    """An argparse ``type`` for a whole number >= ``minimum`` (counts of steps, epochs, seeds, processes): a 0 or a
    negative count is refused by the parser in one line instead of failing later (a division by zero, an empty run).
    """

    def parse(text: str) -> int:
        import argparse

        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def objective_recipe(argv: list[str], default_config: Path, loop: str | None = None) -> Path:
    """The recipe a run without ``--config`` starts from: ``sandbox_<objective>.yaml`` beside ``default_config`` when
    ``--objective`` names one whose method runs on ``loop`` (the script's: ``--objective pso_online`` must not inherit
    PRDP's β and clip range), else the default (whose config then names a wrong objective in one line)."""
    from .objectives.registry import get_objective

    objective = None
    for i, arg in enumerate(argv):
        if arg == "--objective" and i + 1 < len(argv):
            objective = argv[i + 1]
        elif arg.startswith("--objective="):
            objective = arg.split("=", 1)[1]
    if objective:
        try:
            same_loop = loop is None or get_objective(objective).loop == loop
        except ConfigError:  # an unknown name: the config says so, listing the valid ones
            same_loop = False
        recipe = default_config.parent / f"sandbox_{objective}.yaml"
        if same_loop and recipe.is_file() and recipe != default_config:
            print(
                f"no --config given: starting from {recipe.name}, the sandbox recipe of objective {objective!r}",
                file=sys.stderr,
            )
            return recipe
    return default_config


def run_training(config_cls: type, trainer: str, default_config: Path, argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (when no ``--config`` is given, ``--config`` of :func:`objective_recipe` is prepended), then run
    ``trainer`` (``"module:Class"``): ``setup()``, ``train()``, ``export()``, then ``evaluate()`` unless ``skip_eval``
    and the model card again with its result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        loop = "online" if issubclass(config_cls, OnlineConfig) else "offline_pairs"
        default_config = objective_recipe(argv, Path(default_config), loop)
        if Path(default_config).is_file():
            argv = ["--config", str(default_config), *argv]
    cfg = parse_config(config_cls, argv)
    cfg.check_paths()

    module, _, name = trainer.partition(":")
    t = getattr(importlib.import_module(module), name)(cfg)  # heavy: torch, diffusers, accelerate
    t.setup()
    summary = t.train()
    result = None
    metrics = {"final_train": summary["history"][-1] if summary["history"] else {}, "eval": None}
    # the weights go out before the evaluation: an evaluation that fails (memory, a file) then loses no training
    target = t.export(metrics)
    if not cfg.skip_eval:
        metrics["eval"] = result = t.evaluate()
        t.export(metrics, weights=False)  # the model card again, with the evaluation
    t.accelerator.print(
        f"done: weights in {target}, logs in {cfg.output_dir}/train_log.jsonl, model card {cfg.output_dir}/README.md"
    )
    t.end()
    return {"summary": summary, "eval": result, "weights": str(target)}


def main_for_people(main):
    """Run ``main()`` and return what it returns; configuration errors become one line and exit code 2, training
    errors one line and exit 1, unless ``--debug`` is on the command line. Every script's entry point goes through
    it."""
    debug = "--debug" in sys.argv[1:]
    try:
        return main()
    except (ConfigError, TrainingError, FileNotFoundError) as err:
        if debug:
            raise
        kind = (
            "configuration error" if isinstance(err, (ConfigError, FileNotFoundError)) else "training stopped"
        )
        print(f"{kind}: {err} (--debug for the traceback)", file=sys.stderr)
        raise SystemExit(2 if kind == "configuration error" else 1) from None
