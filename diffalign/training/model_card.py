"""A model card next to the exported weights: how to load it, how it was trained, on what, and what it scored.

The card's Python snippet runs as written, in any working directory: the weights are named by absolute path, a local
base pipeline too, and the sandbox base through ``diffalign.sandbox.SANDBOX_PIPELINE`` (the pipeline shipped inside
the installed package) rather than the name ``"sandbox"``, which only diffalign resolves.
"""

from __future__ import annotations

import json
from pathlib import Path


def _base_pipeline(model: str) -> tuple[list[str], str]:
    """Import lines and the Python expression that locate the base pipeline in the snippet."""
    if model == "sandbox":
        return (
            ["from diffalign.sandbox import SANDBOX_PIPELINE  # the sandbox pipeline shipped with diffalign"],
            "SANDBOX_PIPELINE",
        )
    local = Path(model).expanduser()
    return [], repr(str(local.resolve()) if local.exists() else model)  # a local directory, or a hub id


def load_snippet(cfg, weights_dir: Path) -> str:
    """Python that loads the base pipeline with the exported weights and draws one image (runs as written).

    LoRA: ``pipe.load_lora_weights(<weights_dir>)``; full fine-tuning: the exported UNet
    (``UNet2DConditionModel.from_pretrained(<weights_dir>)``) passed to the pipeline in place of the base one.
    """
    imports, base = _base_pipeline(cfg.pretrained_model)
    weights = repr(str(Path(weights_dir).resolve()))
    hub_kw = "".join(
        f", {k}={v!r}" for k, v in (("revision", cfg.revision), ("variant", cfg.variant)) if v is not None
    )
    if cfg.finetune == "lora":
        classes = "DiffusionPipeline"
        load = [
            f"pipe = DiffusionPipeline.from_pretrained({base}{hub_kw})",
            f"pipe.load_lora_weights({weights})",
        ]
    else:
        classes = "DiffusionPipeline, UNet2DConditionModel"
        load = [
            f"unet = UNet2DConditionModel.from_pretrained({weights})",
            f"pipe = DiffusionPipeline.from_pretrained({base}{hub_kw}, unet=unet)",
        ]
    prompt = cfg.validation_prompts[0] if cfg.validation_prompts else "a photo of a cat"
    sample = (
        f"image = pipe({prompt!r}, num_inference_steps={cfg.eval_steps}, "
        f"guidance_scale={cfg.eval_guidance}).images[0]"
    )
    return "\n".join([f"from diffusers import {classes}", *imports, "", *load, sample])


def _control_notice(cfg) -> list[str]:
    """A warning paragraph when the run is a null control (no preference in its signal), else nothing."""
    why = None
    if getattr(cfg, "reward_control", "none") == "permute":
        why = "its rewards were shuffled among each prompt's images (`reward_control: permute`)"
    elif "sandbox-random-control" in str(getattr(cfg, "reward", "")):
        why = "its reward is `sandbox-random-control`, blind to what the image shows"
    elif (Path(str(getattr(cfg, "dataset", ""))) / "label_control.json").is_file():
        why = "its pairs' labels were flipped by a fair coin (`scripts/shuffle_labels.py`)"
    if why is None:
        return []
    return [
        f"> **Null control, not an aligned model**: {why}. Its gain over the base is what the loop gives without "
        "a preference; compare with it, do not use it.",
        "",
    ]


def write_model_card(output_dir: Path, cfg, data_description: dict, metrics: dict, weights_dir: Path) -> Path:
    """``<output_dir>/README.md``: front matter, the load snippet, the data, the metrics and the full config."""
    from ..config import to_dict
    from ..objectives.registry import get_objective

    spec = get_objective(cfg.objective)  # the card describes the method from its registry entry
    lora = cfg.finetune == "lora"
    base = "diffalign-sandbox" if cfg.pretrained_model == "sandbox" else cfg.pretrained_model
    lines = [
        "---",
        "library_name: diffusers",
        f"tags: [diffalign, {spec.name}, text-to-image]",
        f"base_model: {base}",
        "---",
        f"# {spec.name} {'LoRA' if lora else 'UNet'} trained with diffalign",
        "",
        f"{spec.description}.",
        "",
        *_control_notice(cfg),
        "## Load",
        "```python",
        load_snippet(cfg, weights_dir),
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
        json.dumps(to_dict(cfg), indent=2),
        "```",
    ]
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
