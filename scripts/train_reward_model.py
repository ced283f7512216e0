#!/usr/bin/env python
"""Train a VP-Score-style multi-aspect reward model (CLIP backbone, one Bradley–Terry head per aspect) on
multi-aspect preference pairs labelled by the sandbox judge, and report held-out pair accuracy per aspect against
the backbone CLIP's own cosine and chance.

    # the shipped sandbox model: heads on the frozen sandbox CLIP, pairs from the sandbox Pick-a-Pic data
    python scripts/train_reward_model.py --output_dir reward_models/sandbox-vp-score

    # rendered pairs (defective scenes) instead, fine-tuning the backbone too
    python scripts/train_reward_model.py --source rendered --num_pairs 3000 --freeze_backbone false \
        --output_dir outputs/vp-score-rendered

Every field of ``diffalign.rewards.reward_model_config.RewardTrainConfig`` is a ``--flag`` (see ``--help``; ``--config`` reads
a YAML file). Writes the checkpoint (``config.json``, ``heads.safetensors``, and ``backbone/`` unless it references
the frozen backbone's directory), ``metrics.json`` and ``README.md`` to ``--output_dir``.
"""

import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model comes from a local directory

from diffalign.config import parse_config  # noqa: E402
from diffalign.rewards.reward_model_config import RewardTrainConfig  # noqa: E402
from diffalign.training.reward_model import train_reward_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(RewardTrainConfig, argv)
    command = "python scripts/train_reward_model.py " + shlex.join(argv)
    metrics = train_reward_model(cfg, command=command.strip())
    print(f"done in {metrics['wall_seconds']} s: checkpoint and metrics.json in {cfg.output_dir}")
    return metrics


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
