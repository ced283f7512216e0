"""Tiny, seeded, randomly initialised SD1.x- and SDXL-shaped pipelines and Pick-a-Pic-schema data, built in tests.

They exercise the real code paths (``from_pretrained`` on a pipeline directory, two text encoders and time ids for
SDXL, Parquet data through ``datasets``) in seconds, without the sandbox assets.
"""

from __future__ import annotations

import datetime
import io
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.sandbox.tokenizer import build_clip_tokenizer


def _text_config(hidden: int = 16, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=32,
        projection_dim=projection or hidden,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    """A 16x16-pixel SD1.x-shaped pipeline directory (VAE factor 2 -> 8x8 latents)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(16)),
        tokenizer=build_clip_tokenizer(32),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """The SDXL-shaped UNet of :func:`build_tiny_sdxl`: cross-attention width 16, pooled embeds and time ids."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 4 + 8,  # 6 time ids x 4 + pooled dim of text_encoder_2
        norm_num_groups=4,
    )


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """A 16x16-pixel SDXL-shaped pipeline: two text encoders (8 + 8 = 16 dims), pooled embeds, time ids."""
    unet = tiny_sdxl_unet(seed)
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(8)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(8, projection=8)),
        tokenizer=build_clip_tokenizer(32),
        tokenizer_2=build_clip_tokenizer(32),
        scheduler=_scheduler(),
    )
    pipe.save_pretrained(path)
    return path


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_tiny_pairs(
    path: Path, n: int = 16, size: int = 16, seed: int = 0, splits=("train", "test_unique")
) -> Path:
    """Pick-a-Pic-schema Parquet with ``n`` random pairs per split (winner = the brighter image)."""
    from diffalign.data.schema import write_pickapic_dataset

    rng = np.random.default_rng(seed)
    data = {}
    for split in splits:
        rows = []
        for i in range(n):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            b = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            l0 = 1.0 if a.mean() > b.mean() else 0.0
            rows.append(
                {
                    "are_different": True,
                    "best_image_uid": f"{split}-{i}-{0 if l0 else 1}",
                    "caption": f"a red circle number {i % 5}",
                    "created_at": datetime.datetime(2024, 1, 1),
                    "has_label": True,
                    "image_0_uid": f"{split}-{i}-0",
                    "image_0_url": "",
                    "image_1_uid": f"{split}-{i}-1",
                    "image_1_url": "",
                    "jpg_0": jpeg_bytes(a),
                    "jpg_1": jpeg_bytes(b),
                    "label_0": l0,
                    "label_1": 1.0 - l0,
                    "model_0": "random",
                    "model_1": "random",
                    "ranking_id": i,
                    "user_id": i % 4,
                    "num_example_per_prompt": 1,
                }
            )
        data[split] = rows
    write_pickapic_dataset(data, path)
    return path


def assert_lora_fully_loaded(pipe, lora_dir) -> int:
    """Every tensor of an exported LoRA file must be present, with the same values, in ``pipe.unet`` after
    ``pipe.load_lora_weights(lora_dir)`` (diffusers drops mismatched keys with only a warning). Returns the count."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(lora_dir) / "pytorch_lora_weights.safetensors"))
    loaded = pipe.unet.state_dict()
    adapter = next(iter(pipe.unet.peft_config))
    for key, value in saved.items():
        name = key.removeprefix("unet.").replace(".lora_A.weight", f".lora_A.{adapter}.weight")
        name = name.replace(".lora_B.weight", f".lora_B.{adapter}.weight")
        assert name in loaded, f"{key} was not loaded into the pipeline"
        assert torch.equal(loaded[name].float(), value.float()), f"{key} was loaded with other values"
    return len(saved)


def build_tiny_hf_clip(
    path: Path, *, vision_hidden: int = 16, projection_dim: int = 8, logit_scale: float | None = None
) -> Path:
    """A tiny random transformers ``CLIPModel`` (32x32 images, text width 16) + ``CLIPProcessor`` with the real
    CLIP tokenizer, saved to ``path`` (a stand-in for PickScore / CLIP ViT-L checkpoints)."""
    import math

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32)  # fmt: skip
    vision = dict(image_size=32, patch_size=8, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    extra = {} if logit_scale is None else {"logit_scale_init_value": math.log(logit_scale)}
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim, **extra)
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(path)
    model.save_pretrained(path)
    return path
