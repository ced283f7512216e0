"""A model card next to the exported weights: how to load it, how it was trained, on what, and what it scored."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


def write_model_card(output_dir: Path, cfg, data_description: dict, metrics: dict, weights_dir: Path) -> Path:
    lora = cfg.finetune == "lora"
    load = (
        f'pipe = DiffusionPipeline.from_pretrained("{cfg.pretrained_model}")\npipe.load_lora_weights("{weights_dir}")'
        if lora
        else f'unet = UNet2DConditionModel.from_pretrained("{weights_dir}")\n'
        f'pipe = DiffusionPipeline.from_pretrained("{cfg.pretrained_model}", unet=unet)'
    )
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [diffalign, diffusion-dpo, text-to-image]"
        if cfg.objective == "dpo"
        else "tags: [diffalign, sft, text-to-image]",
        f"base_model: {cfg.pretrained_model}",
        "---",
        f"# {'Diffusion-DPO' if cfg.objective == 'dpo' else 'SFT'} {'LoRA' if lora else 'UNet'} trained with diffalign",
        "",
        "## Load",
        "```python",
        "from diffusers import DiffusionPipeline, UNet2DConditionModel",
        load,
        "```",
        "",
        "## Data",
        "```json",
        json.dumps(data_description, indent=2),
        "```",
        "",
        "## Metrics",
        "```json",
        json.dumps(metrics, indent=2, default=str),
        "```",
        "",
        "## Training configuration",
        "```json",
        json.dumps(asdict(cfg), indent=2),
        "```",
    ]
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
