#!/usr/bin/env python
"""Run one training config over N training seeds and report each seed's evaluation with their mean, min and max.

One training seed is an anecdote: the sandbox Diffusion-DPO recipe once gave 0.645, 0.500 and 0.655 with seeds
0, 1, 2. This script runs the same config once per seed (each in its own process, ``--parallel`` at a time, the
machine's cores split between them), every seed evaluated identically (same prompts, same evaluation seeds), and
writes ``<output_dir>/multi_seed.json`` and ``multi_seed.md``.

    # the sandbox default over seeds 0, 1, 2, two at a time (one thread each on a 2-core machine)
    python scripts/multi_seed.py --config configs/sandbox_dpo.yaml --seeds 0 1 2 --parallel 2

    # any training flag after `--` goes to every run
    python scripts/multi_seed.py --config configs/sandbox_dpo.yaml --output_dir outputs/ms-beta1000 -- --beta 1000

Runs trained with ``--eval_curve_steps`` (e.g. ``-- --eval_curve_steps [150,300,450]``) also get the win rate vs
steps over the seeds (mean, min, max, training wall-clock) in ``multi_seed.json`` under ``curve``; plot several with
``scripts/plot_curves.py``.

Seeds run in separate batches (say 0-2, then 3 and 4 into another directory) are summarised together, without
training anything, with ``--merge``: the per-seed results joined and every mean, bound and curve point recomputed
over all of them (a seed in two files is an error)::

    python scripts/multi_seed.py --merge outputs/a/multi_seed.json outputs/b/multi_seed.json --output_dir outputs/ab

A seed whose ``eval.json`` already exists is not rerun (pass ``--rerun`` to force it), so an interrupted sweep
continues where it stopped. ``--script`` selects the training entry point (default: ``train_online.py`` for an
online objective such as PRDP or DDPO, else ``train_diffusion_dpo.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from diffalign.cli import at_least  # noqa: E402
from diffalign.eval.multi_seed import (  # noqa: E402
    format_curve,
    format_summary,
    merge_summaries,
    summarise_curves,
    summarise_seeds,
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default=str(ROOT / "configs" / "sandbox_dpo.yaml"), help="training YAML recipe"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--parallel", type=at_least(1), default=2, help="runs at a time (default 2)")
    p.add_argument(
        "--threads", type=at_least(1), default=None, help="torch threads per run (default: cores / parallel)"
    )
    p.add_argument("--output_dir", default=None, help="default: outputs/multi-seed/<config name>")
    p.add_argument(
        "--script",
        default=None,
        help="training script (default: train_online.py for an online objective, else train_diffusion_dpo.py)",
    )
    p.add_argument("--rerun", action="store_true", help="rerun seeds that already have an eval.json")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="MULTI_SEED_JSON",
        help="summarise these multi_seed.json files together (no training; needs --output_dir)",
    )
    args = p.parse_args(argv)
    if args.merge is not None:
        if args.output_dir is None:
            p.error("--merge needs --output_dir (where the merged multi_seed.json goes)")
        for f in args.merge:
            if not Path(f).is_file():
                p.error(f"--merge {f} does not exist")
        return args, extra
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    if not Path(args.config).is_file():
        p.error(f"--config {args.config} does not exist")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has repeats: {args.seeds}")
    return args, extra


def _is_online(config: str) -> bool:
    """Whether the config's objective trains with the online loop (sample, score, update)."""
    import yaml

    from diffalign.objectives.registry import get_objective

    objective = (yaml.safe_load(Path(config).read_text()) or {}).get("objective", "dpo")
    return get_objective(objective).loop == "online"


def write_summary(summary: dict, out: Path) -> None:
    """``multi_seed.json`` and ``multi_seed.md`` (the per-seed table, and the curve when there is one)."""
    (out / "multi_seed.json").write_text(json.dumps(summary, indent=2))
    text = format_summary(summary)
    if summary.get("curve"):
        text += "\n\nwin rate vs training steps (eval_curve_steps):\n" + format_curve(summary["curve"])
    (out / "multi_seed.md").write_text(text + "\n")
    print(text)
    print(f"written: {out / 'multi_seed.json'}, {out / 'multi_seed.md'}")


def merge(files: list[str], out: Path) -> dict:
    summaries = [json.loads(Path(f).read_text()) for f in files]
    summary = merge_summaries(summaries, sources=files)
    for key in ("config", "extra_flags"):  # kept when every batch agrees, else listed per file
        values = [s.get(key) for s in summaries]
        summary[key] = values[0] if all(v == values[0] for v in values) else values
    summary["failed_seeds"] = sorted({f for s in summaries for f in s.get("failed_seeds", [])})
    write_summary(summary, out)
    return summary


def main(argv: list[str] | None = None) -> dict:
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.output_dir or ROOT / "outputs" / "multi-seed" / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge is not None:
        return merge(args.merge, out)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    online = _is_online(args.config)
    if args.script is None:
        args.script = str(ROOT / "scripts" / ("train_online.py" if online else "train_diffusion_dpo.py"))
    todo = [s for s in args.seeds if args.rerun or not (out / f"seed-{s}" / "eval.json").is_file()]
    print(
        f"multi-seed: {args.config}, seeds {args.seeds} ({len(todo)} to run), {args.parallel} at a time, "
        f"{threads} thread(s) each, extra flags {extra or 'none'} -> {out}"
    )
    running: list[tuple[int, subprocess.Popen, float]] = []
    failed: list[int] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            s = todo.pop(0)
            d = out / f"seed-{s}"
            d.mkdir(parents=True, exist_ok=True)
            # Each seed gets its own cache directory: concurrent builds of one cache would race.
            cmd = [
                sys.executable,
                args.script,
                "--config",
                args.config,
                "--seed",
                str(s),
                "--output_dir",
                str(d),
                *([] if online else ["--cache_dir", str(d / ".cache")]),
                "--report_to",
                "none",
                *extra,
            ]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            log = open(d / "run.log", "w")
            print(f"  seed {s}: started ({' '.join(cmd[1:])}); log {d / 'run.log'}")
            running.append(
                (s, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
            )
        time.sleep(2)
        for item in list(running):
            s, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"  seed {s}: {status} in {time.time() - t0:.0f} s")
            if proc.returncode != 0:
                failed.append(s)
    summary = summarise_seeds({s: out / f"seed-{s}" / "eval.json" for s in args.seeds if s not in failed})
    summary.update({"config": args.config, "extra_flags": extra, "failed_seeds": failed})
    curve = summarise_curves(
        {s: out / f"seed-{s}" / "eval_curve.jsonl" for s in args.seeds if s not in failed}
    )
    if curve:  # the runs had eval_curve_steps: win rate vs steps over the seeds
        summary["curve"] = curve
    write_summary(summary, out)
    if failed:
        raise SystemExit(f"seeds {failed} failed; see their run.log under {out}")
    return summary


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
