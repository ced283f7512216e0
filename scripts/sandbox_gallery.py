#!/usr/bin/env python
"""A PNG grid of sandbox samples per caption: ground truth (rendered) in the first column, then model samples.

    python scripts/sandbox_gallery.py                                   # base model -> docs/img/sandbox_samples.png
    python scripts/sandbox_gallery.py --lora outputs/dpo-sandbox/lora --out docs/img/sandbox_dpo_samples.png

Each row is one caption; the judge's prompt-following score of every sample is printed under it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from diffalign.cli import at_least  # noqa: E402

CAPTIONS = [
    "a large red circle on the left on a white background",
    "a small blue square at the top",
    "a green triangle in the center on a black background",
    "a yellow diamond on the right",
    "a large purple cross on a sky background",
    "an orange circle with an outline at the bottom",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sandbox", help="pipeline directory ('sandbox' = the shipped one)")
    p.add_argument("--lora", default=None, help="optional LoRA directory to load into the pipeline")
    p.add_argument("--seeds", type=at_least(1), default=6, help="samples per caption")
    p.add_argument("--steps", type=at_least(1), default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--out", default="docs/img/sandbox_samples.png")
    args = p.parse_args()

    import torch
    from diffusers import StableDiffusionPipeline

    from diffalign.eval.compare import expand_prompts, generate
    from diffalign.models.pipeline import resolve_model_path
    from diffalign.sandbox.captions import parse_caption, scene_for_spec
    from diffalign.sandbox.judge import Judge
    from diffalign.sandbox.scene import render

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path(args.model))
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        if not (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
            from diffalign.errors import ConfigError

            raise ConfigError(
                f"--lora {args.lora}: no pytorch_lora_weights.safetensors there; give the lora/ folder a training run "
                "exported (e.g. outputs/dpo-sandbox/lora)"
            )
        pipe.load_lora_weights(args.lora)
    rows_p, rows_s = expand_prompts(CAPTIONS, list(range(args.seeds)))
    images = generate(pipe, rows_p, rows_s, steps=args.steps, guidance=args.guidance)
    pf = Judge().score(images, rows_p)["prompt_following"]

    scale, label_w, cell = 4, 330, 32 * 4 + 6
    canvas = Image.new("RGB", (label_w + cell * (args.seeds + 1), 18 + len(CAPTIONS) * (cell + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 2), "truth", fill="black")
    draw.text(
        (label_w + cell, 2), f"samples (seeds 0-{args.seeds - 1}); judge prompt-following below", fill="black"
    )
    rng = np.random.default_rng(0)
    for r, caption in enumerate(CAPTIONS):
        y = 18 + r * (cell + 14)
        draw.text((4, y + cell // 2 - 6), caption, fill="black")
        truth = render(scene_for_spec(parse_caption(caption), rng, jitter=False))
        tiles = [truth] + [images[r * args.seeds + k] for k in range(args.seeds)]
        for c, tile in enumerate(tiles):
            big = Image.fromarray(tile).resize((32 * scale, 32 * scale), Image.NEAREST)
            canvas.paste(big, (label_w + c * cell, y))
            if c:
                draw.text(
                    (label_w + c * cell + 40, y + 32 * scale + 1),
                    f"{pf[r * args.seeds + c - 1]:.2f}",
                    fill="black",
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"mean judge prompt-following of these samples: {float(np.mean(pf)):.3f}")
    print(f"grid written to {args.out}")


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
