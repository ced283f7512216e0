#!/usr/bin/env python
"""Where one Diffusion-DPO training step spends its time: data, encoders, per-pair randomness, policy forward,
reference forward, loss, backward, optimizer — measured with torch.profiler on the real trainer.

    python scripts/profile_step.py                                  # the sandbox default recipe, 20 steps
    python scripts/profile_step.py --use_cache false                # encoders on the fly (the public script's way)
    python scripts/profile_step.py --model sd15-shaped --resolution 256 --width 0.25 --train_batch_size 2
    python scripts/profile_step.py --compile                        # + torch.compile of the UNet: cost and gain

Any other ``--flag value`` is a training-config field (``scripts/train_diffusion_dpo.py --help``). The step's parts
carry ``torch.profiler.record_function`` labels (``diffalign/...``, in ``diffalign/training/step.py`` and
``run.py``); "other" is the step's wall time not under a label (Python, hooks, logging). The first
``--warmup`` steps are not measured. Prints a table, writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffalign.cli import at_least  # noqa: E402

PARTS = ["encode", "pair_randomness", "noising", "policy_forward", "reference_forward", "loss", "backward",
         "optimizer"]  # fmt: skip


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "benchmark_throughput", REPO / "scripts" / "benchmark_throughput.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def profile(trainer, steps: int, warmup: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from diffalign.training.run import backward_and_step

    it = iter(trainer.dataloader)
    cuda = torch.cuda.is_available()

    def one(measure_data: list | None):
        t0 = time.perf_counter()
        batch = next(it)
        batch["epoch"] = 0
        if measure_data is not None:
            measure_data.append(time.perf_counter() - t0)
        loss, _ = trainer.compute_loss(batch)
        backward_and_step(trainer.run, loss, trainer.optimizer, trainer.lr_scheduler, "profile")
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        one(None)
    data_s: list[float] = []
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with torch_profile(activities=acts) as prof:
        for _ in range(steps):
            one(data_s)
    wall = (time.perf_counter() - t0) / steps
    trainer.flush_caches()  # a second profile with the same --cache_dir then measures the caches reused
    labelled = {e.key: e for e in prof.key_averages() if e.key.startswith("diffalign/")}
    parts = {"data": sum(data_s) / steps}
    for name in PARTS:
        e = labelled.get(f"diffalign/{name}")
        parts[name] = (e.cpu_time_total / 1e6 / steps) if e is not None else 0.0
    parts["other"] = max(wall - sum(parts.values()), 0.0)
    top = [
        {
            "op": e.key,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "calls_per_step": e.count / steps,
        }
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    ]
    return {"seconds_per_step": wall, "parts_s": parts, "top_ops": top}


def compile_gain(trainer, repeats: int = 10) -> dict:
    """Eager vs ``torch.compile``'d UNet forward+backward on one batch: compile seconds, ms per call, speed-up."""
    import torch

    batch = next(iter(trainer.dataloader))
    latents, text = trainer.step_fn.latents_and_text(batch)
    x = torch.cat([latents[:, 0], latents[:, 1]])
    t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    ehs = torch.cat([text[next(iter(text))]] * 2)
    unet = trainer.run.unwrapped_unet()

    def fb(model):
        model(x, t, encoder_hidden_states=ehs).sample.float().square().mean().backward()

    def timed(model):
        for _ in range(2):
            fb(model)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fb(model)
        return (time.perf_counter() - t0) / repeats * 1e3

    eager = timed(unet)
    compiled = torch.compile(unet)
    t0 = time.perf_counter()
    fb(compiled)
    compile_s = time.perf_counter() - t0
    comp = timed(compiled)
    return {"eager_ms": eager, "compiled_ms": comp, "speedup": eager / comp, "first_call_s": compile_s,
            "break_even_steps": compile_s / max((eager - comp) / 1e3, 1e-9)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sandbox", choices=["sandbox", "sd15-shaped"])
    p.add_argument("--width", type=float, default=0.25, help="sd15-shaped: channel multiplier (1.0 = SD1.5)")
    p.add_argument("--steps", type=at_least(1), default=20, help="measured steps")
    p.add_argument("--warmup", type=at_least(0), default=3, help="steps run before measuring")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of the UNet")
    p.add_argument("--out", default="outputs/profile_step.json")
    args, rest = p.parse_known_args()

    from diffalign.config import TrainConfig, parse_config
    from diffalign.training.offline import OfflinePairsTrainer

    work = Path(tempfile.mkdtemp(prefix="diffalign-profile-"))
    flags = ["--output_dir", str(work / "out"), "--validation_steps", "0", "--checkpointing_steps", "0",
             "--report_to", "none", "--lr_warmup_steps", "0", "--cache_dir", str(work / "cache")]  # fmt: skip
    if args.model == "sd15-shaped":
        bench = _bench_module()
        res = int(next((rest[i + 1] for i, a in enumerate(rest) if a == "--resolution"), 256))
        cache = next((rest[i + 1] for i, a in enumerate(rest) if a == "--cache_dir"), None)
        # with --cache_dir the model and data live beside the cache, so that a second profile reuses its caches
        # (their keys include the model's files)
        home = Path(cache).parent / f"sd15-shaped-w{args.width}-r{res}" if cache else work
        if not (home / "model" / "model_index.json").exists():
            bench.build_sd_like(home / "model", args.width)
            bench.build_pairs(home / "data", 64, res)
        flags += ["--pretrained_model", str(home / "model"), "--dataset", str(home / "data"), "--split", "train",
                  "--resolution", str(res), "--random_flip", "false"]  # fmt: skip
    cfg = parse_config(TrainConfig, ["--config", str(REPO / "configs" / "sandbox_dpo.yaml"), *flags, *rest])
    trainer = OfflinePairsTrainer(cfg)
    trainer.setup()
    result = {"model": args.model, "config": {k: str(v) for k, v in vars(cfg).items() if k != "params"},
              **profile(trainer, args.steps, args.warmup)}  # fmt: skip
    if args.compile:
        result["compile"] = compile_gain(trainer)

    import torch

    from diffalign.eval.report import markdown_table

    step = result["seconds_per_step"]
    rows = [[name, f"{s * 1e3:.1f}", f"{s / step:.0%}"] for name, s in result["parts_s"].items()]
    print(f"\n{args.model}: {step * 1e3:.1f} ms per step of {cfg.train_batch_size} pairs "
          f"({torch.get_num_threads()} threads, use_cache {cfg.use_cache}, reference_cache {cfg.reference_cache})")  # fmt: skip
    print(markdown_table(["part", "ms / step", "share"], rows))
    print(markdown_table(["op (self time)", "ms / step", "calls / step"],
                         [[o["op"], f"{o['self_cpu_ms_per_step']:.1f}", f"{o['calls_per_step']:.0f}"]
                          for o in result["top_ops"]]))  # fmt: skip
    if args.compile:
        c = result["compile"]
        print(f"torch.compile (UNet forward+backward, one batch): eager {c['eager_ms']:.1f} ms, compiled "
              f"{c['compiled_ms']:.1f} ms ({c['speedup']:.2f}x); first call {c['first_call_s']:.1f} s, which pays "
              f"for itself after {c['break_even_steps']:.0f} steps")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from diffalign.training.environment import describe

    out.write_text(json.dumps({**result, "environment": describe()}, indent=2))
    print(f"results written to {out}")


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
