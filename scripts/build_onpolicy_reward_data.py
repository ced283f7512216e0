#!/usr/bin/env python
"""Preference pairs of the sandbox base model's *own* samples, for training a reward model the online methods can use.

    python scripts/build_onpolicy_reward_data.py --output_dir outputs/onpolicy-pairs
    python scripts/train_reward_model.py --source outputs/onpolicy-pairs --eval_splits test \\
        --output_dir reward_models/sandbox-vp-onpolicy

Why: the shipped ``sandbox-vp-score`` is trained on the shipped pairs (a mix of sandbox models and guidance scales).
On two samples of the base model for one prompt — what PRDP and DDPO compare — it agrees with the judge on only about
half of the decided pairs. PickScore was trained on people's choices between samples of the models it later scores;
this builds the sandbox's equivalent: pairs of base-model samples (two seeds of one prompt) labelled by the judge.

Prompts come from the online loop's training pool (``PromptStream('sandbox-grammar', pool_size=10000)`` with the
1,000 held-out evaluation captions excluded, as ``configs/sandbox_prdp.yaml`` uses them), so neither the reward model
nor the policy ever sees an evaluation prompt. Half of the pairs are drawn with the online training sampler (10 DDIM
steps, η = 1), half with the evaluation sampler (20 steps, η = 0); guidance 5. The last ``--test_prompts`` prompts
form the ``test`` split (the reward model's held-out accuracy). Labels: the judge's overall score decides (ties when
equal); ``train_reward_model.py`` re-labels every aspect with the judge anyway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.cli import at_least  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="outputs/onpolicy-pairs")
    p.add_argument(
        "--num_prompts", type=at_least(1), default=3000, help="prompts (one pair each), test split included"
    )
    p.add_argument("--test_prompts", type=at_least(1), default=300)
    p.add_argument(
        "--seed", type=int, default=0, help="the training pool's seed (configs/sandbox_prdp.yaml: 0)"
    )
    p.add_argument("--pool_size", type=at_least(1), default=10000)
    p.add_argument(
        "--eval_prompts", type=at_least(0), default=1000, help="held-out evaluation captions to exclude"
    )
    p.add_argument("--batch_size", type=at_least(1), default=64)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    from diffalign.data.build_plan import PairPlan
    from diffalign.data.pickapic_rows import encode_jpeg, fill_examples_per_prompt, make_row
    from diffalign.data.schema import write_pickapic_dataset
    from diffalign.eval.prompt_stream import PromptStream, eval_prompt_set
    from diffalign.sandbox import SANDBOX_PIPELINE
    from diffalign.sandbox.captions import parse_caption
    from diffalign.sandbox.judge import Judge

    held_out = eval_prompt_set("sandbox-grammar", args.eval_prompts, seed=0)
    stream = PromptStream("sandbox-grammar", seed=args.seed, pool_size=args.pool_size, exclude=held_out)
    prompts = stream.epoch_prompts(0, args.num_prompts)  # the first pass over the pool: distinct prompts
    pipe = StableDiffusionPipeline.from_pretrained(
        str(SANDBOX_PIPELINE), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    judge = Judge()
    samplers = {"train-sampler": (10, 1.0), "eval-sampler": (20, 0.0)}
    rows: dict[str, list] = {"train": [], "test": []}
    n_train = len(prompts) - args.test_prompts
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="pairs"):
        chunk = prompts[start : start + args.batch_size]
        name = list(samplers)[(start // args.batch_size) % 2]
        steps, eta = samplers[name]
        images = []
        for side in (0, 1):
            gens = [torch.Generator().manual_seed(2 * (start + i) + side) for i in range(len(chunk))]
            out = pipe(chunk, num_inference_steps=steps, guidance_scale=5.0, eta=eta, generator=gens,
                       output_type="np").images  # fmt: skip
            images.append(np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
        s0 = judge.score(images[0], chunk)["overall"]
        s1 = judge.score(images[1], chunk)["overall"]
        for i, caption in enumerate(chunk):
            k = start + i
            l0 = 1.0 if s0[i] > s1[i] else 0.0 if s0[i] < s1[i] else 0.5
            plan = PairPlan(
                split="train" if k < n_train else "test", ranking_id=k, caption=caption,
                spec=parse_caption(caption), prompt_index=k, model_0=name, model_1=name,
                seed_0=2 * k, seed_1=2 * k + 1, user_id=0, draw=0.0,
            )  # fmt: skip
            rows[plan.split].append(
                make_row(
                    plan,
                    args.seed,
                    encode_jpeg(images[0][i]),
                    encode_jpeg(images[1][i]),
                    bool(np.any(images[0][i] != images[1][i])),
                    l0,
                    1.0 - l0,
                )  # fmt: skip
            )
    for split_rows in rows.values():
        fill_examples_per_prompt(split_rows)
    write_pickapic_dataset(rows, args.output_dir)
    print(f"written: {args.output_dir} ({len(rows['train'])} train pairs, {len(rows['test'])} test pairs; "
          f"prompts from {stream.describe()})")  # fmt: skip
    return Path(args.output_dir)


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
