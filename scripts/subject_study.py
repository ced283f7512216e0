#!/usr/bin/env python
"""DreamBooth vs RPO on the sandbox subjects over several training seeds, evaluated by the DreamBench protocol.

    python scripts/subject_study.py                      # seeds 0 1 2, every sandbox subject, 2 jobs at a time
    python scripts/subject_study.py --seeds 0 --subjects redyellow_split_circle --jobs 1

For each seed: `scripts/train_subjects.py` with configs/sandbox_dreambooth.yaml and configs/sandbox_rpo.yaml (RPO's
checkpoint chosen for λ = 0.3, 0.5, 0.7 from one run), then `scripts/benchmark_dreambench.py --data sandbox` on the
base and on every model set, each with the same prompts and seeds. Jobs run as separate processes, one thread each.
Writes <output_dir>/study.json and study.md: per method the mean over seeds of the subject-mean metrics, min and max
over seeds, and a 95% t-interval over the (seed, subject) means; and the wall time of each job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffalign.cli import at_least  # noqa: E402

METRICS = ("dino", "clip_i", "clip_t", "harmonic", "judge_context", "subject_match")
LABELS = {
    "dino": "DINO*",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "harmonic": "λ-harmonic",
    "judge_context": "judge context",
    "subject_match": "subject match",
}


def _run(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}; see {log}")
    return round(time.time() - t0, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--subjects", nargs="*", default=None, help="subject names (default: all)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--jobs", type=at_least(1), default=2, help="processes at a time (one thread each)")
    ap.add_argument("--methods", nargs="+", default=["dreambooth", "rpo"], choices=["dreambooth", "rpo"])
    ap.add_argument("--output_dir", default="outputs/subject-study")
    ap.add_argument(
        "--train_args", nargs=argparse.REMAINDER, default=[], help="extra flags for both trainings"
    )
    args = ap.parse_args(argv)
    out = Path(args.output_dir)
    py = sys.executable
    subj = ["--subject_subjects", *args.subjects] if args.subjects else []
    bench_subj = ["--subjects", ",".join(args.subjects)] if args.subjects else []
    lam_flags = ["--subject_select_lambdas", *map(str, args.lambdas)]

    def train(method: str, seed: int) -> tuple[str, float]:
        d = out / method / f"seed-{seed}"
        cmd = [py, "scripts/train_subjects.py", "--config", f"configs/sandbox_{method}.yaml", "--seed", str(seed),
               "--subject_output_dir", str(d), "--subject_eval", "false", *subj, *args.train_args]  # fmt: skip
        if method == "rpo":
            cmd += lam_flags
        return f"train {method} seed {seed}", _run(cmd, out / "logs" / f"train-{method}-{seed}.log")

    def bench(name: str, models: Path | None) -> tuple[str, float]:
        cmd = [
            py,
            "scripts/benchmark_dreambench.py",
            "--data",
            "sandbox",
            "--output_dir",
            str(out / "bench" / name),
            *bench_subj,
        ]
        if models is not None:
            cmd += ["--subject_models", str(models)]
        return f"benchmark {name}", _run(cmd, out / "logs" / f"bench-{name}.log")

    t0 = time.time()
    timings: dict[str, float] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(bench, "base", None)]
        jobs += [pool.submit(train, m, s) for s in args.seeds for m in args.methods]
        for j in jobs:
            k, v = j.result()
            timings[k] = v
        variants = {}
        if "dreambooth" in args.methods:
            variants.update({f"dreambooth-seed-{s}": out / "dreambooth" / f"seed-{s}" for s in args.seeds})
        for s in args.seeds if "rpo" in args.methods else []:
            for lam in args.lambdas:
                variants[f"rpo-lambda-{lam:g}-seed-{s}"] = out / "rpo" / f"seed-{s}" / f"lambda-{lam:g}"
        for j in [pool.submit(bench, n, d) for n, d in variants.items()]:
            k, v = j.result()
            timings[k] = v

    from diffalign.eval.stats import mean_ci

    def load(name: str) -> dict:
        return json.loads((out / "bench" / name / "results.json").read_text())

    methods = {"base": ["base"]}
    if "dreambooth" in args.methods:
        methods["DreamBooth"] = [f"dreambooth-seed-{s}" for s in args.seeds]
    for lam in args.lambdas if "rpo" in args.methods else []:
        methods[f"RPO λ={lam:g}"] = [f"rpo-lambda-{lam:g}-seed-{s}" for s in args.seeds]
    table: dict[str, dict] = {}
    for method, names in methods.items():
        runs = [load(n) for n in names]
        row: dict = {"runs": names}
        for m in METRICS:
            if not all(m in r["mean"] for r in runs):
                continue
            per_seed = [r["mean"][m] for r in runs]
            cells = [s[m] for r in runs for s in r["subjects"].values()]
            ci = mean_ci(cells)
            row[m] = {
                "mean": sum(per_seed) / len(per_seed),
                "min": min(per_seed),
                "max": max(per_seed),
                "per_seed": per_seed,
                # over one (seed, subject) cell there is no interval: null, not NaN, in the JSON
                "ci": [ci["ci_low"], ci["ci_high"]] if len(cells) > 1 else None,
            }
        table[method] = row
    result = {
        "seeds": args.seeds,
        "subjects": list(load("base")["subjects"]),
        "methods": table,
        "timings_s": timings,
        "wall_s": round(time.time() - t0, 1),
        "command": "python scripts/subject_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "study.json").write_text(json.dumps(result, indent=2))
    md = format_study(result)
    (out / "study.md").write_text(md)
    print(md)
    return result


def format_study(result: dict) -> str:
    from diffalign.utils.markdown import markdown_table

    metrics = [m for m in METRICS if any(m in row for row in result["methods"].values())]
    header = ["method", *(LABELS[m] for m in metrics)]
    rows = []
    for method, row in result["methods"].items():
        cells = []
        for m in metrics:
            c = row.get(m)
            if c is None:
                cells.append("")
            elif c["ci"] is None:  # one (seed, subject) cell: no interval
                cells.append(f"{c['mean']:.3f}")
            elif len(c["per_seed"]) > 1:
                cells.append(
                    f"{c['mean']:.3f} ({c['min']:.3f}–{c['max']:.3f}) [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]"
                )
            else:
                cells.append(f"{c['mean']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]")
        rows.append([method, *cells])
    return (
        f"# Sandbox subjects: DreamBooth vs RPO, seeds {result['seeds']}, {len(result['subjects'])} subjects\n\n"
        "Cells: mean over training seeds of the subject-mean (min–max over seeds) [95% CI over (seed, subject)].\n"
        "DINO* is the stand-in backbone (the sandbox CLIP's vision tower).\n\n"
        + markdown_table(header, rows)
        + f"\n\nwall time {result['wall_s']} s; jobs: "
        + ", ".join(f"{k} {v} s" for k, v in result["timings_s"].items())
        + "\n"
    )


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
