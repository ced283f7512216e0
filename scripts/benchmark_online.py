#!/usr/bin/env python
"""Throughput of the online loop: samples/s and where an epoch's time goes (sampling, waiting for the reward,
updates), for PRDP and DDPO on the sandbox defaults.

    python scripts/benchmark_online.py                         # both objectives, 4 timed epochs each; table + JSON
    python scripts/benchmark_online.py --objectives prdp --epochs 8 --output docs/benchmark_online.json

Each objective runs the real trainer (``OnlineTrainer``) in-process on its sandbox config with evaluation, held-out
tracking, validation and checkpoints off; the first epoch is a warm-up and is not timed. Scoring runs in a worker
thread that overlaps the next chunk's sampling, so "score wait" is only the time the loop waited for it. Threads:
``torch.get_num_threads()`` at start (set ``OMP_NUM_THREADS`` to compare).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffalign.cli import at_least  # noqa: E402

CONFIGS = {"prdp": REPO / "configs" / "sandbox_prdp.yaml", "ddpo": REPO / "configs" / "sandbox_ddpo.yaml"}


def measure(objective: str, epochs: int, extra: list[str]) -> dict:
    import torch

    from diffalign.config import OnlineConfig, parse_config
    from diffalign.training.online import OnlineTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(
            OnlineConfig,
            ["--config", str(CONFIGS[objective]), "--output_dir", tmp, "--num_epochs", str(epochs + 1),
             "--skip_eval", "true", "--track_every", "0", "--validation_steps", "0", "--checkpointing_steps", "0",
             "--report_to", "none", *extra],
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer = OnlineTrainer(cfg)
        trainer.setup()
        setup_s = time.perf_counter() - t0
        history = trainer.train()["history"][1:]  # the first epoch warms up
        trainer.end()
    per_epoch = cfg.prompts_per_epoch * cfg.images_per_prompt
    total = sum(h["perf/epoch_seconds"] for h in history)
    split = {k: sum(h[f"perf/{k}_seconds"] for h in history) for k in ("sample", "score_wait", "train")}
    return {
        "objective": objective,
        "samples_per_epoch": per_epoch,
        "timed_epochs": len(history),
        "setup_seconds": round(setup_s, 2),
        "seconds_per_epoch": round(total / len(history), 3),
        "samples_per_s": round(per_epoch * len(history) / total, 3),
        "share": {k: round(v / total, 3) for k, v in split.items()},
        "seconds": {k: round(v / len(history), 3) for k, v in split.items()},
        "settings": {
            "sample_steps": cfg.sample_steps,
            "timestep_fraction": cfg.timestep_fraction,
            "sample_guidance": cfg.sample_guidance,
            "lora_rank": cfg.lora_rank,
            "reward": cfg.reward,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objectives", nargs="+", default=["prdp", "ddpo"], choices=sorted(CONFIGS))
    p.add_argument(
        "--epochs", type=at_least(1), default=4, help="timed epochs per objective (after one warm-up epoch)"
    )
    p.add_argument("--output", default="benchmark_online.json", help="JSON file to write")
    args, extra = p.parse_known_args(argv)
    rows = [measure(o, args.epochs, extra) for o in args.objectives]
    print("| objective | samples/epoch | s/epoch | samples/s | sampling | score wait | updates | set-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["share"]
        print(
            f"| {r['objective']} | {r['samples_per_epoch']} | {r['seconds_per_epoch']:.2f} | {r['samples_per_s']:.2f} | "
            f"{s['sample']:.0%} | {s['score_wait']:.0%} | {s['train']:.0%} | {r['setup_seconds']:.1f} |"
        )
    from diffalign.training.environment import describe

    out = {"environment": describe(), "extra_flags": extra, "rows": rows}
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"written: {args.output}")
    return rows


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
