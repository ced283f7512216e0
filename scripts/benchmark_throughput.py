#!/usr/bin/env python
"""Whole-process training throughput of diffalign's Diffusion-DPO, cold and with its caches reused, against the
public diffusers research script at equal settings.

    python scripts/benchmark_throughput.py                               # the sandbox, 50 steps of 32 pairs
    python scripts/benchmark_throughput.py --reference_script PATH/train_diffusion_dpo.py   # + the public script
    python scripts/benchmark_throughput.py --model sd15-shaped --resolution 256 --width 0.25 --batch 2 --steps 12

Every setting is one whole process of ``scripts/train_diffusion_dpo.py`` (imports, model loading, data set-up, any
cache building, training, export) timed from start to exit, runs of all settings alternating ``--repeats`` times;
peak memory is the process's peak RSS (``wait4``). Settings (same model, data, LoRA targets and rank, batch, steps):

* ``no caches``: encode every step, reference forward every step (what the public script does);
* ``cold``: the defaults on an empty cache directory (the lazy latent cache and the reference-error cache fill as
  training goes);
* ``latent cache reused``: a second run: latents and text embeddings read back, reference forward computed;
* ``all caches reused``: latents and the reference's errors read back (a β / lr / loss-type sweep, a rerun);
  and the same with ``channels_last: true``;
* ``public script`` (with ``--reference_script``): diffusers' ``examples/research_projects/diffusion_dpo/
  train_diffusion_dpo.py`` on the same pipeline and Pick-a-Pic-schema data (it imports ``wandb``; install it, or
  give a folder holding it with ``--reference_extra_path``). Its LoRA targets are fixed to the attention
  projections, so diffalign runs with those too.

``--suite methods`` compares the cost of the offline objectives instead, every one with the latent cache reused and
no reference-error cache (each pays its reference forward): Diffusion-DPO, InPO as the official code runs it (the
current model inverts every image at every visit), InPO inverting with the frozen reference, and that variant with
``inversion_cache: true`` (each image inverted once per run). The inversion cache only pays from the second epoch
on, so give the runs several epochs (``--max_train_samples 640 --steps 100``: 5 epochs of 20 steps). Steady-state
pairs/s (from each run's ``train_log.jsonl``, the first step excluded) are reported next to the whole-process ones.

``--model sd15-shaped`` builds SD1.5's architecture with channels x ``--width``, randomly initialised (VAE / UNet
cost ratio SD-like), and synthetic pairs. Writes a table and JSON (``--out``). torch.compile is measured by
``scripts/profile_step.py --compile`` (its one-off compile cost is the question there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffalign.cli import at_least  # noqa: E402


def build_sd_like(path: Path, width: float, seed: int = 0) -> None:
    """SD1.5-shaped pipeline with channels scaled by ``width`` (width 1.0 = SD1.5's sizes)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.sandbox.tokenizer import build_clip_tokenizer

    def c(n: int) -> int:
        return max(32, int(round(n * width / 32)) * 32)

    torch.manual_seed(seed)
    hidden = c(768)
    unet = UNet2DConditionModel(
        block_out_channels=(c(320), c(640), c(1280), c(1280)),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        layers_per_block=2,
        sample_size=64,
    )
    vae = AutoencoderKL(
        block_out_channels=(c(128), c(256), c(512), c(512)),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=max(1, hidden // 64),
            num_hidden_layers=max(2, int(12 * width)), max_position_embeddings=77, vocab_size=49408,
        )
    )  # fmt: skip
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(77), scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(path)  # fmt: skip


def build_pairs(path: Path, n: int, resolution: int) -> None:
    import datetime
    import io

    import numpy as np
    from PIL import Image

    from diffalign.data.schema import write_pickapic_dataset

    rng = np.random.default_rng(0)

    def jpg():
        buf = io.BytesIO()
        small = rng.integers(0, 256, (resolution // 8, resolution // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    rows = [
        {"are_different": True, "best_image_uid": f"{i}a", "caption": f"a photo of object {i % 50}",
         "created_at": datetime.datetime(2024, 1, 1), "has_label": True, "image_0_uid": f"{i}a", "image_0_url": "",
         "image_1_uid": f"{i}b", "image_1_url": "", "jpg_0": jpg(), "jpg_1": jpg(), "label_0": 1.0, "label_1": 0.0,
         "model_0": "m", "model_1": "m", "ranking_id": i, "user_id": 0, "num_example_per_prompt": 1}
        for i in range(n)
    ]  # fmt: skip
    write_pickapic_dataset({"train": rows}, path)


ATTENTION_TARGETS = "[to_q, to_k, to_v, to_out.0]"  # the public script's LoRA targets (fixed there)


def _timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd`` to completion: wall seconds, peak RSS (MiB) and exit code; output to ``log``."""
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to what else the host runs
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_MiB": usage.ru_maxrss / 1024, "rc": proc.returncode}


def diffalign_cmd(
    args, model: str, data: str, out: Path, cache: Path, use_cache: bool, ref_cache: bool, *extra: str
) -> list:
    return [sys.executable, str(REPO / "scripts" / "train_diffusion_dpo.py"),
            "--pretrained_model", model, "--dataset", data, "--split", "train", "--resolution", str(args.resolution),
            "--train_batch_size", str(args.batch), "--max_train_steps", str(args.steps), "--lora_rank", str(args.rank),
            "--lora_target_modules", ATTENTION_TARGETS, "--random_flip", "false", "--learning_rate", "1e-3",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0", "--output_dir", str(out),
            "--cache_dir", str(cache), "--use_cache", str(use_cache).lower(), "--reference_cache", str(ref_cache).lower(),
            "--checkpointing_steps", "0", "--validation_steps", "0", "--skip_eval", "true", "--report_to", "none",
            "--logging_steps", str(args.steps),
            *(["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []), *extra]  # fmt: skip


def public_cmd(args, model: str, data: str, out: Path) -> list:
    boot = ("import runpy, sys; sys.path.append(sys.argv.pop(1)); script = sys.argv.pop(1); "
            "sys.argv = [script] + sys.argv[1:]; runpy.run_path(script, run_name='__main__')")  # fmt: skip
    return [sys.executable, "-c", boot, args.reference_extra_path or "", args.reference_script,
            "--pretrained_model_name_or_path", model, "--dataset_name", data, "--dataset_split_name", "train",
            "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
            "--max_train_steps", str(args.steps), "--rank", str(args.rank), "--no_hflip", "--learning_rate", "1e-3",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0", "--output_dir", str(out),
            "--report_to", "tensorboard", "--checkpointing_steps", "1000000000"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sandbox", choices=["sandbox", "sd15-shaped"])
    p.add_argument(
        "--resolution", type=at_least(1), default=None, help="image size (sandbox: 32; sd15-shaped: 256)"
    )
    p.add_argument("--width", type=float, default=0.25, help="sd15-shaped: channel multiplier (1.0 = SD1.5)")
    p.add_argument("--pairs", type=at_least(1), default=256, help="sd15-shaped: synthetic pairs")
    p.add_argument("--batch", type=at_least(1), default=32, help="pairs per step")
    p.add_argument("--steps", type=at_least(1), default=50, help="optimizer steps per run")
    p.add_argument(
        "--rank", type=at_least(1), default=32, help="LoRA rank (targets: the attention projections)"
    )
    p.add_argument("--repeats", type=at_least(1), default=3, help="alternating runs of every setting")
    p.add_argument("--threads", type=at_least(1), default=1, help="OMP_NUM_THREADS of every run")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--reference_script", default=None, help="diffusers' research train_diffusion_dpo.py")
    p.add_argument(
        "--reference_extra_path", default=None, help="a folder appended to its sys.path (e.g. wandb)"
    )
    p.add_argument("--out", default="outputs/benchmark_throughput.json", help="JSON results file")
    p.add_argument(
        "--suite",
        default="caches",
        choices=["caches", "methods"],
        help="caches: DPO with and without diffalign's caches (and the public script); methods: DPO vs InPO variants",
    )
    p.add_argument(
        "--max_train_samples", type=at_least(1), default=None, help="train on the first N pairs only"
    )
    args = p.parse_args()
    args.resolution = args.resolution or (32 if args.model == "sandbox" else 256)

    work = Path(tempfile.mkdtemp(prefix="diffalign-bench-"))
    if args.model == "sandbox":
        from diffalign.sandbox import SANDBOX_PIPELINE

        model, data = str(SANDBOX_PIPELINE), str(SANDBOX_PIPELINE.parent / "pickapic")
    else:
        print(
            f"building an SD1.5-shaped model (width {args.width}) and {args.pairs} pairs at {args.resolution}px"
        )
        build_sd_like(work / "model", args.width)
        build_pairs(work / "data", args.pairs, args.resolution)
        model, data = str(work / "model"), str(work / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "ACCELERATE_MIXED_PRECISION": args.mixed_precision, "PYTHONUNBUFFERED": "1"}  # fmt: skip
    if args.mixed_precision != "no":
        env["ACCELERATE_MIXED_PRECISION"] = args.mixed_precision

    warm = work / "cache-warm"  # filled once (untimed) for the "reused" settings
    settings = {
        "no caches": lambda out, rep: diffalign_cmd(args, model, data, out, work / "unused", False, False),
        "cold": lambda out, rep: diffalign_cmd(
            args, model, data, out, work / f"cache-cold-{rep}", True, True
        ),
        "latent cache reused": lambda out, rep: diffalign_cmd(args, model, data, out, warm, True, False),
        "all caches reused": lambda out, rep: diffalign_cmd(args, model, data, out, warm, True, True),
        "all caches reused, channels-last": lambda out, rep: diffalign_cmd(
            args, model, data, out, warm, True, True, "--channels_last", "true"
        ),
    }
    if args.suite == "methods":
        inpo = ("--objective", "inpo", "--beta", "2000", "--inversion_steps", "10", "--inversion_eta", "0.1")
        settings = {
            name: (lambda out, rep, extra=extra: diffalign_cmd(args, model, data, out, warm, True, False, *extra))
            for name, extra in {
                "dpo": ("--objective", "dpo"),
                "inpo (current model inverts)": (*inpo, "--inversion_model", "current"),
                "inpo (reference inverts)": (*inpo, "--inversion_model", "reference"),
                "inpo (reference, inversion cache)": (*inpo, "--inversion_model", "reference",
                                                      "--inversion_cache", "true"),
            }.items()
        }  # fmt: skip
    if args.reference_script:
        settings["public script"] = lambda out, rep: public_cmd(args, model, data, out)
    print(f"filling the caches for the 'reused' settings ({work})")
    fill = _timed(diffalign_cmd(args, model, data, work / "fill", warm, True, True), env, work / "fill.log")
    if fill["rc"]:
        sys.exit(f"the cache-filling run failed: see {work / 'fill.log'}")
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for rep in range(args.repeats):
        for name, make in settings.items():
            out = work / f"{name.replace(' ', '-')}-{rep}"
            r = _timed(make(out, rep), env, work / f"{out.name}.log")
            if r["rc"]:
                sys.exit(f"{name} (repeat {rep}) failed: see {work / (out.name + '.log')}")
            log = out / "train_log.jsonl"
            if log.exists():  # steady state: the loop's own window, the first step excluded
                last = json.loads(log.read_text().splitlines()[-1])
                r["steady_pairs_per_s"] = last.get("perf/pairs_per_s")
            print(f"  {name:34s} repeat {rep}: {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU, "
                  f"peak RSS {r['peak_rss_MiB']:.0f} MiB")  # fmt: skip
            runs[name].append(r)

    import statistics

    pairs = args.steps * args.batch
    rows, summary = [], {}

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    public = "public script" if args.reference_script else None
    for name, rs in runs.items():
        walls, cpus = [r["wall_s"] for r in rs], [r["cpu_s"] for r in rs]
        wall, cpu = med(name, "wall_s"), med(name, "cpu_s")
        summary[name] = {"wall_s": walls, "cpu_s": cpus, "median_wall_s": wall, "median_cpu_s": cpu,
                         "pairs_per_s": pairs / wall,
                         "steady_pairs_per_s": statistics.median(r.get("steady_pairs_per_s") or 0.0 for r in rs),
                         "peak_rss_MiB": max(r["peak_rss_MiB"] for r in rs),
                         "speedup_vs_public_wall": med(public, "wall_s") / wall if public else None,
                         "speedup_vs_public_cpu": med(public, "cpu_s") / cpu if public else None}  # fmt: skip
        x = summary[name]
        rows.append([name, f"{wall:.2f} ({min(walls):.2f}-{max(walls):.2f})", f"{pairs / wall:.1f}",
                     f"{x['steady_pairs_per_s']:.1f}",
                     f"{x['speedup_vs_public_wall']:.2f}x" if public else "-",
                     f"{cpu:.2f} ({min(cpus):.2f}-{max(cpus):.2f})",
                     f"{x['speedup_vs_public_cpu']:.2f}x" if public else "-", f"{x['peak_rss_MiB']:.0f}"])  # fmt: skip

    from diffalign.eval.report import markdown_table

    print(f"\n{args.model}, {args.steps} steps of {args.batch} pairs, LoRA rank {args.rank} on {ATTENTION_TARGETS}, "
          f"{args.threads} thread(s), precision {args.mixed_precision}, {args.repeats} alternating repeats")  # fmt: skip
    print(markdown_table(["setting", "wall s: median (min-max)", "pairs/s (whole process)",
                          "pairs/s (steady, median)", "vs public (wall)",
                          "CPU s: median (min-max)", "vs public (CPU)", "peak RSS MiB"], rows))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from diffalign.training.environment import describe

    out.write_text(json.dumps({"args": vars(args), "pairs_per_run": pairs, "settings": summary,
                               "environment": describe()}, indent=2))  # fmt: skip
    print(f"results written to {out}")


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
