"""The sandbox models' recipes: the build's knobs (:class:`BuildConfig`, :class:`BuildPaths`), the world data they
train on, and how each model is made and trained (tiny CLIP, VAE, UNet and their schedulers).

:mod:`diffalign.sandbox.build` (whose docstring describes the five models) assembles the pipeline from these,
evaluates it and publishes the build; it re-exports the names below. Library code only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .captions import (
    PREFIXES,
    CaptionSpec,
    WorldConfig,
    caption_text,
    corrupt_spec,
    sample_spec,
    scene_for_spec,
)
from .scene import IMAGE_SIZE, Scene, render
from .tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE

# OpenAI CLIP's image normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LATENT_SIZE = 8  # 32x32 images -> 8x8 latents (VAE with 3 blocks: 2 downsamplings)


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class BuildConfig:
    """Every knob of the sandbox build. Defaults are the shipped build (16.7 min measured on 2 idle CPU cores)."""

    seed: int = 0  # seeds numpy (data) and torch (init, noise); the build is deterministic given it
    threads: int = 1  # torch threads per training process (1: fastest on a shared 2-core machine)
    parallel_vae: bool = True  # train the VAE in a second process while CLIP trains (both are independent)
    n_train: int = 40_000  # rendered (image, caption) training examples shared by VAE and UNet
    n_clip_train: int = 30_000  # rendered (image, true caption) examples for CLIP
    # Tiny CLIP
    clip_text_hidden: int = 32  # text width; the 49,408 x hidden token table dominates the asset size
    clip_text_layers: int = 4
    clip_vision_hidden: int = 64
    clip_vision_layers: int = 3
    clip_projection_dim: int = 64
    clip_steps: int = 800
    clip_batch: int = 128
    clip_lr: float = 1e-3
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 32)
    # GroupNorm groups. One group per channel would be instance normalisation, which removes every channel's
    # per-image mean: the absolute colour of flat images would be lost (measured: decoded colours wrong).
    vae_norm_groups: int = 4
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5  # weight of KL (summed over the 8x8x4 latent) vs mean L1 + L2 reconstruction
    vae_logvar: (
        float | None
    ) = -9.0  # fixed posterior log-variance (std 0.011), see fix_vae_logvar; None: learned
    # UNet
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    unet_norm_groups: int = 4  # >= 8 channels per group (see vae_norm_groups)
    unet_steps: int = 1600
    unet_batch: int = 128
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    early_fraction: float = 0.3  # the "early" UNet is saved after this share of the UNet steps
    warmup_steps: int = 100  # linear warm-up of every stage's learning rate, then cosine decay to 10%
    # Evaluation
    eval_retrieval_groups: int = 300  # random groups of 16 held-out (image, caption) pairs
    eval_psnr_images: int = 1000
    eval_judge_prompts: int = 200
    eval_guidance: float = 7.5
    eval_steps: int = 20  # DDIM steps for the judge evaluation and the timing
    eval_seed: int = 1234  # seeds the held-out prompts and the sampling noise
    eval_timing_repeats: int = 3  # the sampling time is the best of this many runs after one warm-up

    @classmethod
    def quick(cls, **overrides) -> BuildConfig:
        """Tiny step counts: the same pipeline end to end in about a minute (outputs are not meant to be good)."""
        small = dict(
            n_train=1024,
            n_clip_train=1024,
            clip_steps=20,
            clip_batch=64,
            vae_steps=20,
            vae_batch=16,
            unet_steps=20,
            unet_batch=64,
            warmup_steps=5,
            eval_retrieval_groups=10,
            eval_psnr_images=64,
            eval_judge_prompts=16,
            eval_steps=5,
            eval_timing_repeats=1,
        )
        small.update(overrides)
        return cls(**small)

    def __post_init__(self) -> None:
        if not 0.0 < self.early_fraction < 1.0:
            raise ValueError(f"BuildConfig.early_fraction={self.early_fraction} must lie in (0, 1)")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"BuildConfig.caption_dropout={self.caption_dropout} must lie in [0, 1)")
        for name in ("clip_steps", "vae_steps", "unet_steps", "n_train", "n_clip_train"):
            if getattr(self, name) < 1:
                raise ValueError(f"BuildConfig.{name}={getattr(self, name)} must be >= 1")
        self.vae_channels = tuple(self.vae_channels)
        self.unet_channels = tuple(self.unet_channels)
        if len(self.vae_channels) != 3:
            raise ValueError(
                f"BuildConfig.vae_channels={self.vae_channels} must have 3 entries (32x32 -> 8x8 latents)"
            )

    @property
    def early_step(self) -> int:
        """UNet step after which the early checkpoint is taken (at least 1)."""
        return max(1, round(self.early_fraction * self.unet_steps))


@dataclass
class BuildPaths:
    """Where a build writes: the pipeline directory, the early UNet, the tiny CLIP, and the report."""

    pipeline: Path
    unet_early: Path
    clip: Path
    report: Path

    @classmethod
    def under(cls, root: str | Path) -> BuildPaths:
        root = Path(root)
        return cls(root / "pipeline", root / "unet-early", root / "sandbox-clip", root / "build_report.json")

    @classmethod
    def shipped(cls) -> BuildPaths:
        from . import ASSETS_DIR, SANDBOX_CLIP, SANDBOX_PIPELINE, SANDBOX_UNET_EARLY

        return cls(SANDBOX_PIPELINE, SANDBOX_UNET_EARLY, SANDBOX_CLIP, ASSETS_DIR / "build_report.json")

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------------------------
# Data: rendered (image, caption) pairs of the world


@dataclass
class WorldData:
    """``n`` rendered examples. ``images`` (n, 32, 32, 3) uint8; ``captions`` as the world shows them (noisy);
    ``true_captions`` of the scene's real spec (same prefix); ``specs`` the true specs; ``scenes`` the scenes."""

    images: np.ndarray
    captions: list[str]
    true_captions: list[str]
    specs: list[CaptionSpec]
    scenes: list[Scene]


def sample_world_example(rng: np.random.Generator, world: WorldConfig) -> tuple[Scene, CaptionSpec, str, str]:
    """Like ``captions.sample_example`` (same random draws in the same order, so the same shown caption for the
    same generator state) but also returns the true spec and the true caption: ``(scene, spec, shown, true)``."""
    spec = sample_spec(rng)
    scene = scene_for_spec(spec, rng, p_hazard=world.p_hazard, p_noise=world.p_noise, p_smear=world.p_smear)
    shown = corrupt_spec(spec, rng) if rng.random() < world.p_caption_noise else spec
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    return scene, spec, caption_text(shown, prefix), caption_text(spec, prefix)


def render_world(n: int, seed: int, world: WorldConfig | None = None, desc: str = "render") -> WorldData:
    """Render ``n`` examples of the world's distribution (default ``WorldConfig()``) with ``default_rng(seed)``."""
    world = world or WorldConfig()
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions, true_captions, specs, scenes = [], [], [], []
    for i in tqdm(range(n), desc=desc, mininterval=5.0, leave=False):
        scene, spec, shown, true = sample_world_example(rng, world)
        images[i] = render(scene)
        captions.append(shown)
        true_captions.append(true)
        specs.append(spec)
        scenes.append(scene)
    return WorldData(images, captions, true_captions, specs, scenes)


def images_to_unit(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] (the VAE's input range)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def images_to_clip(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) CLIP pixel values: ``(x/255 − mean) / std`` with OpenAI CLIP's
    mean/std (what ``CLIPImageProcessor`` at 32x32 computes; tested)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, 32) int64 ids padded with ``<|endoftext|>`` to ``model_max_length`` (as the SD pipeline does)."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------------------------------------------------
# Tiny CLIP


def make_clip(cfg: BuildConfig):
    """An untrained transformers ``CLIPModel``: text (vocab 49,408, 32 positions) + ViT on 32x32 with 4x4 patches."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.clip_text_hidden,
        intermediate_size=4 * cfg.clip_text_hidden,
        num_hidden_layers=cfg.clip_text_layers,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=cfg.clip_projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.clip_vision_hidden,
        intermediate_size=4 * cfg.clip_vision_hidden,
        num_hidden_layers=cfg.clip_vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=4,
        projection_dim=cfg.clip_projection_dim,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.clip_projection_dim
    )
    return CLIPModel(config)


def make_clip_processor(tokenizer):
    """``CLIPProcessor`` = ``CLIPImageProcessor`` at 32x32 (resize shortest edge to 32, centre-crop 32: a no-op on
    sandbox images) with OpenAI CLIP's mean/std, plus the tokenizer."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train_clip(cfg: BuildConfig, data: WorldData, tokenizer, log=print):
    """Contrastive training (symmetric InfoNCE over the batch) on (image, TRUE caption) pairs."""
    torch.manual_seed(cfg.seed + 1)
    model = make_clip(cfg)
    model.train()
    ids_all = tokenize(tokenizer, data.true_captions)
    pix_all = images_to_clip(data.images)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.clip_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    n = len(data.captions)
    bar = tqdm(range(cfg.clip_steps), desc="clip", mininterval=10.0)
    for _ in bar:
        idx = torch.randint(0, n, (cfg.clip_batch,), generator=gen)
        ids = ids_all[idx]
        # Causal attention + EOS pooling: trailing padding does not change the pooled text embedding, so the
        # batch is cut to its longest caption (exact, and faster).
        length = int((ids != tokenizer.pad_token_id).sum(1).max()) + 1
        out = model(input_ids=ids[:, :length], pixel_values=pix_all[idx], return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{out.loss.item():.3f}", refresh=False)
    model.eval()
    return model


@torch.no_grad()
def clip_retrieval_at_16(model, tokenizer, data: WorldData, groups: int, seed: int) -> dict[str, float]:
    """Caption -> image retrieval among 16 candidates, averaged over ``groups`` random groups of 16 held-out pairs.

    ``clip/retrieval_top1@16``: the top image is the caption's own image. ``clip/retrieval_consistent@16``: the
    top image satisfies the caption's spec (captions leave attributes open, so several candidates may fit)."""
    rng = np.random.default_rng(seed)
    n = len(data.captions)
    text = model.get_text_features(input_ids=tokenize(tokenizer, data.true_captions))
    image = model.get_image_features(pixel_values=images_to_clip(data.images))
    text = _as_tensor(text)
    image = _as_tensor(image)
    text = F.normalize(text, dim=-1)
    image = F.normalize(image, dim=-1)
    top1, consistent = [], []
    for _ in range(groups):
        idx = rng.choice(n, size=16, replace=False)
        sim = text[idx] @ image[idx].T  # (16 captions, 16 images)
        best = sim.argmax(dim=1).numpy()
        top1.extend((best == np.arange(16)).tolist())
        consistent.extend(data.specs[idx[i]].matches(data.scenes[idx[best[i]]]) for i in range(16))
    return {
        "clip/retrieval_top1@16": float(np.mean(top1)),
        "clip/retrieval_consistent@16": float(np.mean(consistent)),
    }


def _as_tensor(x) -> torch.Tensor:
    """transformers 5 may return a model output with ``pooler_output`` from ``get_*_features``; take the tensor."""
    if isinstance(x, torch.Tensor):
        return x
    return x.pooler_output if getattr(x, "pooler_output", None) is not None else x[0]


def clip_text_encoder(clip_model):
    """The tiny CLIP's text tower as a stand-alone transformers ``CLIPTextModel`` (what SD's ``text_encoder`` is)."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(clip_model.config.text_config)
    encoder.load_state_dict(clip_model.text_model.state_dict())  # transformers 5: CLIPModel.text_model is one
    encoder.eval().requires_grad_(False)
    return encoder


# ---------------------------------------------------------------------------------------------------------------
# VAE


def make_vae(cfg: BuildConfig):
    """An untrained diffusers ``AutoencoderKL``: 32x32x3 <-> 8x8x4."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=IMAGE_SIZE,
    )


def fix_vae_logvar(vae, logvar: float) -> None:
    """Fix the posterior log-variance of ``vae`` to the constant ``logvar`` (its rows of ``quant_conv``: weights 0,
    bias ``logvar``, gradients masked to 0).

    Why: with Adam, even a tiny KL weight moves the log-variance bias at ~lr per step towards the KL optimum
    (σ = 1), since Adam normalises that consistent gradient while the reconstruction's gradient through the
    sampling noise is noisy. Measured: σ ≈ 0.4 after 200 steps with a learned log-variance, and reconstructions
    stuck at ~18 dB PSNR with wrong colours. SD's VAE has a small posterior σ compared with its latents' spread;
    fixing it keeps that property and ``latent_dist.sample()`` stays a faithful encoding."""
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:] = 0.0
        vae.quant_conv.bias[c:] = logvar

    def mask(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[c:] = 0.0
        return grad

    vae.quant_conv.weight.register_hook(mask)
    vae.quant_conv.bias.register_hook(mask)


def train_vae(cfg: BuildConfig, data: WorldData, log=print):
    """Reconstruction training: ``loss = |x − x̂|₁ + ‖x − x̂‖²₂ (pixel means) + kl_weight · KL(q(z|x) ‖ N(0, I))``
    with the KL summed over the latent's 8·8·4 elements and averaged over the batch; x̂ decodes a sample of q."""
    torch.manual_seed(cfg.seed + 2)
    vae = make_vae(cfg)
    if cfg.vae_logvar is not None:
        fix_vae_logvar(vae, cfg.vae_logvar)
    vae.train()
    x_all = images_to_unit(data.images)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.vae_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 12)
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=10.0)
    for _ in bar:
        idx = torch.randint(0, len(x_all), (cfg.vae_batch,), generator=gen)
        x = x_all[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        kl = posterior.kl().mean()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.1f}", refresh=False)
    vae.eval().requires_grad_(False)
    return vae


def train_vae_state(cfg: BuildConfig, images: np.ndarray) -> dict[str, torch.Tensor]:
    """Worker of the parallel VAE stage (a spawned process): train and return the state dict."""
    torch.set_num_threads(cfg.threads)
    data = WorldData(images, [], [], [], [])
    return {k: v.clone() for k, v in train_vae(cfg, data).state_dict().items()}


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std, each (N, 4, 8, 8), unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images_to_unit(images[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray, batch: int = 256) -> float:
    """Mean PSNR (dB, images in [0, 255]) of ``decode(posterior mean)`` against the input, over ``images``."""
    psnrs = []
    for i in range(0, len(images), batch):
        x = images_to_unit(images[i : i + batch])
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        a = (recon + 1) * 127.5
        b = (x + 1) * 127.5
        mse = (a - b).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(255.0**2 / mse))
    return float(torch.cat(psnrs).mean())


# ---------------------------------------------------------------------------------------------------------------
# UNet (latent diffusion)


SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}
"""SD's noise schedule, shared by the training and the sampling scheduler."""


def make_noise_scheduler():
    """SD's training schedule: DDPM, 1000 steps, scaled_linear β from 0.00085 to 0.012, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULE)


def make_sampling_scheduler():
    """SD's DDIM sampling config (steps_offset 1, set_alpha_to_one False, clip_sample False)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def make_unet(cfg: BuildConfig, cross_attention_dim: int):
    """An untrained diffusers ``UNet2DConditionModel`` on 8x8x4 latents with cross-attention on text states."""
    from diffusers import UNet2DConditionModel

    levels = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=cfg.unet_layers_per_block,
        block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=cfg.unet_attention_head_dim,
        norm_num_groups=cfg.unet_norm_groups,
    )


def train_unet(
    cfg: BuildConfig,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    captions: list[str],
    text_encoder,
    tokenizer,
    log=print,
):
    """Epsilon-prediction training; returns ``(final_unet, early_unet_state_dict)``.

    Each step: z0 = scaling_factor · (μ + σ·n) from the cached posterior (B, 4, 8, 8); captions dropped to ""
    with probability ``caption_dropout``; c = text_encoder(ids).last_hidden_state (B, 32, hidden), frozen;
    t ~ U{0..999}; loss = mean ‖ε − ε_θ(z_t, t, c)‖²."""
    torch.manual_seed(cfg.seed + 3)
    unet = make_unet(cfg, text_encoder.config.hidden_size)
    unet.train()
    noise_scheduler = make_noise_scheduler()
    ids_all = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.unet_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 13)
    early_state = None
    n = len(captions)
    bar = tqdm(range(cfg.unet_steps), desc="unet", mininterval=10.0)
    for step in bar:
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        z0 = scaling_factor * (
            latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        )
        ids = ids_all[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        ids[drop] = empty_ids
        with torch.no_grad():
            cond = text_encoder(input_ids=ids).last_hidden_state
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        zt = noise_scheduler.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step + 1 == cfg.early_step:
            early_state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
            log(f"[unet] early checkpoint taken after step {step + 1}/{cfg.unet_steps}")
    unet.eval().requires_grad_(False)
    return unet, early_state
