#!/usr/bin/env python
"""Training throughput (pairs/s) and peak memory of Diffusion-DPO with and without the latent/text caches.

    python scripts/benchmark_throughput.py                       # CPU-sized default, prints a table, writes JSON
    python scripts/benchmark_throughput.py --resolution 512 --width 1.0 --steps 20 --batch 4   # real SD1.5 shapes (GPU)

The model is SD1.5's architecture (UNet 4 levels with cross-attention, 8x VAE, CLIP text encoder) with every channel
count multiplied by ``--width`` and randomly initialised, so that the VAE-encode / UNet cost ratio stays SD-like while
fitting a CPU. Each setting runs the real trainer (``OfflinePairsTrainer``) in its own subprocess, so peak memory is
that run's own (peak RSS on CPU; ``torch.cuda.max_memory_allocated`` on GPU), measured separately for set-up (model
loading and, when it runs, the one-off cache build) and for training. pairs/s excludes the first step (warm-up).
Three settings: caches off (encode every step, as the public scripts do), caches built in the run, caches reused.
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


def _peak_cpu_mib() -> float:
    """This process's peak resident memory since the last :func:`_reset_peak_cpu` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_cpu() -> None:
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_one(model: Path, data: Path, out: Path, args, use_cache: bool) -> dict:
    """One training run in this process (called in a subprocess by ``main``)."""
    import torch

    from diffalign.config import DPOConfig
    from diffalign.training.offline import OfflinePairsTrainer

    cuda = torch.cuda.is_available()
    cfg = DPOConfig(
        pretrained_model=str(model), dataset=str(data), resolution=args.resolution, output_dir=str(out),
        train_batch_size=args.batch, max_train_steps=args.steps, logging_steps=args.steps - 1 if args.steps > 1 else 1,
        checkpointing_steps=0, validation_steps=0, report_to="none", use_cache=use_cache, skip_eval=True,
        lr_warmup_steps=0, cache_dir=str(out.parent / "cache"), random_flip=False,
        cache_batch_size=args.cache_batch,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer = OfflinePairsTrainer(cfg)
    trainer.setup()
    setup_s = time.perf_counter() - t0
    setup_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_cpu_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_cpu()
    summary = trainer.train()
    last = summary["history"][-1]
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_cpu_mib()
    return {
        "use_cache": use_cache,
        "cache_reused": bool(trainer.data.info.get("cache_reused", False)),
        "pairs_per_s": last["perf/pairs_per_s"],
        "seconds_per_step": last["perf/seconds_per_step"],
        "setup_seconds": setup_s,
        "peak_memory_training_MiB": train_peak,
        "peak_memory_setup_MiB": setup_peak,
        "memory_kind": "cuda max allocated" if cuda else "peak RSS",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256, help="image size (SD1.5: 512)")
    p.add_argument(
        "--width", type=float, default=0.25, help="channel multiplier relative to SD1.5 (1.0 = SD1.5)"
    )
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per setting (the first is warm-up)")
    p.add_argument("--pairs", type=int, default=32, help="pairs in the synthetic dataset")
    p.add_argument(
        "--cache_batch", type=int, default=4, help="pairs per encoder call while building the cache"
    )
    p.add_argument(
        "--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="accelerate precision"
    )
    p.add_argument("--out", default="outputs/benchmark_throughput.json", help="JSON results file")
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        model, data, out, cache = args._child
        print("RESULT " + json.dumps(run_one(Path(model), Path(data), Path(out), args, cache == "1")))
        return

    work = Path(tempfile.mkdtemp(prefix="diffalign-bench-"))
    print(
        f"building an SD1.5-shaped model (width {args.width}) and {args.pairs} pairs at {args.resolution}px in {work}"
    )
    build_sd_like(work / "model", args.width)
    build_pairs(work / "data", args.pairs, args.resolution)
    rows = []
    # caches off; caches on, built in this run; caches on, reused from the previous run (the common case)
    for run, use_cache in enumerate((False, True, True)):
        cmd = [sys.executable, __file__, "--resolution", str(args.resolution), "--width", str(args.width),
               "--batch", str(args.batch), "--steps", str(args.steps), "--cache_batch", str(args.cache_batch),
               "--mixed_precision", args.mixed_precision,
               "--_child", str(work / "model"), str(work / "data"), str(work / f"run-{run}"), str(int(use_cache))]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_MIXED_PRECISION": args.mixed_precision}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(
                f"benchmark run failed (use_cache={use_cache}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        rows.append(json.loads(line[0][len("RESULT ") :]))

    from diffalign.eval.report import markdown_table

    def label(r: dict) -> str:
        return (
            "off" if not r["use_cache"] else ("on (reused)" if r["cache_reused"] else "on (built this run)")
        )

    print(
        markdown_table(
            ["caches", "pairs/s", "s/step", "setup s", "peak MiB (training)", "peak MiB (setup)", "memory",
             "device", "precision"],
            [[label(r), r["pairs_per_s"], r["seconds_per_step"], r["setup_seconds"], r["peak_memory_training_MiB"],
              r["peak_memory_setup_MiB"], r["memory_kind"], r["device"], args.mixed_precision] for r in rows],
        )
    )  # fmt: skip
    speedup = rows[2]["pairs_per_s"] / rows[0]["pairs_per_s"]
    print(f"speed-up from caches (reused cache vs encoding every step): {speedup:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(args) | {"_child": None}, "results": rows, "speedup": speedup}, indent=2)
    )
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
