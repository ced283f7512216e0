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

from diffalign.config import OnlineConfig, parse_config  # noqa: E402  (light: no torch until the config is valid)
from diffalign.errors import ConfigError, TrainingError  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sandbox_prdp.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and DEFAULT_CONFIG.is_file():
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    cfg = parse_config(OnlineConfig, argv)
    cfg.check_paths()

    from diffalign.training.online import OnlineTrainer  # heavy: torch, diffusers, accelerate

    trainer = OnlineTrainer(cfg)
    trainer.setup()
    summary = trainer.train()
    result = None if cfg.skip_eval else trainer.evaluate()
    metrics = {"final_train": summary["history"][-1] if summary["history"] else {}, "eval": result}
    target = trainer.export(metrics)
    trainer.accelerator.print(
        f"done: weights in {target}, logs in {cfg.output_dir}/train_log.jsonl, model card {cfg.output_dir}/README.md"
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
