"""Build the sandbox's tiny models: tokenizer, tiny CLIP, VAE, latent-diffusion UNet, and the assembled pipeline.

Everything is trained from scratch on CPU on rendered (image, caption) pairs of the sandbox world
(``captions.sample_example``: noisy captions, hazard marks, pixel noise and smear, like web data):

1. **Tokenizer** — OpenAI CLIP's BPE vocabulary, built offline from open_clip's shipped file (``tokenizer.py``),
   ``model_max_length`` 32.
2. **Tiny CLIP** — transformers ``CLIPModel`` (text hidden 32, vision ViT hidden 64 with 4x4 patches on 32x32),
   trained with the symmetric InfoNCE loss of Radford et al. (2021) on (defective image, TRUE caption) pairs.
3. **VAE** — diffusers ``AutoencoderKL`` 32x32x3 -> 8x8x4, loss = L1 + L2 reconstruction + ``kl_weight`` · KL;
   ``scaling_factor`` = 1 / std of the sampled latents (what SD's 0.18215 is).
4. **UNet** — diffusers ``UNet2DConditionModel`` on 8x8x4 latents, epsilon prediction under SD's DDPM schedule
   (1000 steps, scaled_linear β 0.00085 .. 0.012), conditioned on the frozen tiny CLIP text tower's
   ``last_hidden_state`` (B, 32, 32), trained on the world's NOISY captions with 10% of captions dropped to ""
   (classifier-free guidance, Ho & Salimans 2022). Loss: ``E_{t,ε} ‖ε − ε_θ(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, c)‖²``.
   A checkpoint at ``early_fraction`` of training is kept as a second, weaker model.
5. **Pipeline** — a stock ``StableDiffusionPipeline`` (DDIM scheduler configured like SD's, no safety checker).

Library code only: ``scripts/build_sandbox.py`` is the entry point.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .captions import (
    WorldConfig,
    caption_text,
    sample_spec,
)
from .recipes import (
    BuildConfig,
    BuildPaths,
    clip_retrieval_at_16,
    clip_text_encoder,
    encode_latents,
    make_clip,
    make_clip_processor,
    make_sampling_scheduler,
    make_unet,
    make_vae,
    render_world,
    train_clip,
    train_unet,
    train_vae,
    train_vae_state,
    vae_psnr,
)
from .scene import IMAGE_SIZE
from .tokenizer import build_clip_tokenizer, save_clip_tokenizer

# ---------------------------------------------------------------------------------------------------------------
# Pipeline assembly and evaluation


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    """A stock ``StableDiffusionPipeline`` (no safety checker, no feature extractor)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 50) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images, DDIM ``steps`` with classifier-free ``guidance``; the noise of batch ``k`` comes
    from ``torch.Generator().manual_seed(seed + k)``."""
    out = []
    for k, i in enumerate(range(0, len(prompts), batch)):
        gen = torch.Generator().manual_seed(seed + k)
        images = pipe(
            prompts[i : i + batch],
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="np",
        ).images
        out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def time_sampling(pipe, steps: int = 20, n: int = 16, guidance: float = 7.5, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time (s) to sample ``n`` images with ``steps`` DDIM steps, after one warm-up."""
    prompts = ["a red circle"] * n
    generate(pipe, prompts, seed=0, steps=steps, guidance=guidance, batch=n)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, prompts, seed=0, steps=steps, guidance=guidance, batch=n)
        times.append(time.perf_counter() - t0)
    return min(times)


def judge_prompts(n: int, seed: int) -> list[str]:
    """``n`` held-out prompts: ``caption_text(sample_spec(rng))`` with ``rng = default_rng(seed)`` (no prefix)."""
    rng = np.random.default_rng(seed)
    return [caption_text(sample_spec(rng)) for _ in range(n)]


def judge_scores(images: np.ndarray, prompts: list[str]) -> dict[str, float] | None:
    """Mean judge prompt-following and hazard share (harmlessness < 0.5); ``None`` if the judge is not available."""
    try:
        from .judge import Judge
    except ImportError:
        return None
    scores = Judge().score(images, prompts)
    pf = np.asarray(scores["prompt_following"], dtype=np.float64)
    out = {"judge/prompt_following": float(pf.mean())}
    if "harmlessness" in scores:
        out["judge/hazard_share"] = float((np.asarray(scores["harmlessness"], dtype=np.float64) < 0.5).mean())
    for key in ("aesthetic", "fidelity", "harmlessness"):
        if key in scores:
            out[f"judge/{key}"] = float(np.asarray(scores[key], dtype=np.float64).mean())
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole build


@dataclass
class BuildResult:
    """The report written to ``build_report.json``."""

    config: dict
    paths: dict
    metrics: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    sizes_bytes: dict = field(default_factory=dict)
    command: str = ""
    clip_from: str | None = None  # set when the tiny CLIP was reused from an earlier build


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _publish(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` (rename within the same file system where possible)."""
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(target))


def load_trained_clip(cfg: BuildConfig, directory: Path):
    """Reuse a tiny CLIP saved by an earlier build (``<output>/sandbox-clip``) instead of training it again.

    Raises ``ValueError`` naming the directory when its architecture differs from what ``cfg`` would build."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(directory)
    expected = make_clip(cfg).config
    for part in ("text_config", "vision_config"):
        got, want = getattr(model.config, part).to_dict(), getattr(expected, part).to_dict()
        diff = {
            k: (got.get(k), want.get(k))
            for k in ("hidden_size", "num_hidden_layers", "vocab_size")
            if got.get(k) != want.get(k)
        }
        if diff:
            raise ValueError(
                f"{directory}: tiny CLIP {part} differs from the build config (got, expected): {diff}"
            )
    model.eval()
    return model


def build_sandbox(
    cfg: BuildConfig, paths: BuildPaths, command: str = "", log=print, clip_from: Path | None = None
) -> BuildResult:
    """Train every sandbox model, assemble and save them to ``paths``, evaluate, and write the report.

    Outputs are first written under a staging folder next to the report and moved into place at the end, so a
    reader never sees a half-written pipeline."""
    t_start = time.perf_counter()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    world = WorldConfig()
    log(f"[build] config: {json.dumps(asdict(cfg))}")
    log(
        f"[build] derived: CLIP sees {cfg.clip_steps} x {cfg.clip_batch} = {cfg.clip_steps * cfg.clip_batch:,} pairs; "
        f"VAE {cfg.vae_steps} x {cfg.vae_batch} = {cfg.vae_steps * cfg.vae_batch:,} images; "
        f"UNet {cfg.unet_steps} x {cfg.unet_batch} = {cfg.unet_steps * cfg.unet_batch:,} examples "
        f"(~{cfg.unet_steps * cfg.unet_batch / cfg.n_train:.1f} epochs of {cfg.n_train:,}); "
        f"early UNet after step {cfg.early_step}; torch threads {torch.get_num_threads()}"
    )

    # ---- data
    t0 = time.perf_counter()
    tokenizer = build_clip_tokenizer()
    train = render_world(cfg.n_train, cfg.seed, world, desc="render train")
    clip_train = render_world(cfg.n_clip_train, cfg.seed + 100_000, world, desc="render clip")
    held_out = render_world(
        max(16 * 8, cfg.eval_psnr_images), cfg.seed + 200_000, world, desc="render held-out"
    )
    timings["data"] = time.perf_counter() - t0
    log(f"[data] rendered {cfg.n_train:,} + {cfg.n_clip_train:,} + {len(held_out.captions):,} examples")

    # ---- tiny CLIP (and, in parallel, the VAE)
    t0 = time.perf_counter()
    pool = vae_job = None
    if cfg.parallel_vae and clip_from is None:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(1)
        vae_job = pool.apply_async(train_vae_state, (cfg, train.images))
        log("[vae] training in a second process while CLIP trains")
    if clip_from is not None:
        log(f"[clip] reusing the tiny CLIP trained by an earlier build: {clip_from}")
        clip = load_trained_clip(cfg, Path(clip_from))
    else:
        clip = train_clip(cfg, clip_train, tokenizer, log=log)
    metrics = clip_retrieval_at_16(clip, tokenizer, held_out, cfg.eval_retrieval_groups, cfg.eval_seed)
    timings["clip"] = time.perf_counter() - t0
    log(f"[clip] {metrics}")
    text_encoder = clip_text_encoder(clip)

    # ---- VAE
    t0 = time.perf_counter()
    if vae_job is not None:
        vae = make_vae(cfg)
        vae.load_state_dict(vae_job.get())
        vae.eval().requires_grad_(False)
        pool.close()
        pool.join()
    else:
        vae = train_vae(cfg, train, log=log)
    latent_mean, latent_std = encode_latents(vae, train.images)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    sampled = latent_mean + latent_std * torch.randn(latent_mean.shape, generator=gen)
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    metrics["vae/psnr_db"] = vae_psnr(vae, held_out.images[: cfg.eval_psnr_images])
    metrics["vae/scaling_factor"] = scaling_factor
    timings["vae"] = time.perf_counter() - t0
    log(f"[vae] PSNR {metrics['vae/psnr_db']:.2f} dB, scaling_factor {scaling_factor:.5f}")

    # ---- UNet
    t0 = time.perf_counter()
    unet, early_state = train_unet(
        cfg, latent_mean, latent_std, scaling_factor, train.captions, text_encoder, tokenizer, log=log
    )
    early = make_unet(cfg, text_encoder.config.hidden_size)
    early.load_state_dict(early_state)
    early.eval().requires_grad_(False)
    timings["unet"] = time.perf_counter() - t0

    # ---- save into staging
    staging = paths.report.parent / f".staging-{paths.report.stem}"
    if staging.exists():
        shutil.rmtree(staging)
    staged = BuildPaths.under(staging)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer)
    pipe.save_pretrained(staged.pipeline, safe_serialization=True)
    save_clip_tokenizer(tokenizer, staged.pipeline / "tokenizer")
    early.save_pretrained(staged.unet_early, safe_serialization=True)
    clip.save_pretrained(staged.clip, safe_serialization=True)
    make_clip_processor(tokenizer).save_pretrained(staged.clip)
    (staged.clip / "tokenizer.json").unlink(missing_ok=True)
    save_clip_tokenizer(tokenizer, staged.clip)

    # ---- evaluation (from the saved pipeline, exactly what users load)
    t0 = time.perf_counter()
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(staged.pipeline)
    loaded.set_progress_bar_config(disable=True)
    metrics["sampling/seconds_16_images_20_steps_1_thread"] = time_sampling(
        loaded, 20, 16, cfg.eval_guidance, cfg.eval_timing_repeats
    )
    torch.set_num_threads(default_threads)  # the timing users see: torch's default thread count
    metrics["sampling/seconds_16_images_20_steps"] = time_sampling(
        loaded, 20, 16, cfg.eval_guidance, cfg.eval_timing_repeats
    )
    metrics["sampling/default_threads"] = default_threads
    torch.set_num_threads(cfg.threads)
    log(
        f"[eval] 16 images x 20 DDIM steps (CFG): {metrics['sampling/seconds_16_images_20_steps']:.3f} s with "
        f"{default_threads} threads, {metrics['sampling/seconds_16_images_20_steps_1_thread']:.3f} s with 1"
    )
    prompts = judge_prompts(cfg.eval_judge_prompts, cfg.eval_seed)
    images = generate(loaded, prompts, cfg.eval_seed, cfg.eval_steps, cfg.eval_guidance)
    final_scores = judge_scores(images, prompts)
    loaded.unet = early
    early_images = generate(loaded, prompts, cfg.eval_seed, cfg.eval_steps, cfg.eval_guidance)
    early_scores = judge_scores(early_images, prompts)
    if final_scores is None:
        log("[eval] diffalign.sandbox.judge is not available: judge metrics skipped (null in the report)")
        metrics["judge/prompt_following"] = None
    else:
        metrics.update(final_scores)
        metrics.update({f"early/{k}": v for k, v in early_scores.items()})
        log(f"[eval] judge final {final_scores}")
        log(f"[eval] judge early {early_scores}")
    metrics["judge/settings"] = {
        "prompts": cfg.eval_judge_prompts,
        "prompt_seed": cfg.eval_seed,
        "ddim_steps": cfg.eval_steps,
        "guidance": cfg.eval_guidance,
    }
    timings["eval"] = time.perf_counter() - t0

    # ---- publish
    for src, dst in (
        (staged.pipeline, paths.pipeline),
        (staged.unet_early, paths.unet_early),
        (staged.clip, paths.clip),
    ):
        _publish(src, dst)
    shutil.rmtree(staging, ignore_errors=True)
    timings["total"] = time.perf_counter() - t_start
    sizes = {
        name: _dir_size(p)
        for name, p in (("pipeline", paths.pipeline), ("unet_early", paths.unet_early), ("clip", paths.clip))
    }
    sizes["total"] = sum(sizes.values())
    result = BuildResult(
        config=asdict(cfg),
        paths=paths.as_dict(),
        metrics=metrics,
        timings_s=timings,
        sizes_bytes=sizes,
        command=command,
        clip_from=None if clip_from is None else str(clip_from),
    )
    paths.report.parent.mkdir(parents=True, exist_ok=True)
    paths.report.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result
