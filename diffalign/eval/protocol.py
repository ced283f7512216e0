"""The evaluation a training run ends with: Pick-a-Pic protocol on the sandbox (or any Pick-a-Pic-schema data).

Prompts come from a split (``test_unique`` by default: one pair per prompt, prompts disjoint from train); base and
aligned generate with identical seeds; a reward decides each prompt's winner; the win rate carries a Wilson 95%
interval, and every aspect of the reward is reported before and after.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..data.sources import resolve_dataset  # also importable from here, as before
from ..data.splits import split_captions
from .compare import PairedSamples, compare, expand_prompts, generate
from .report import image_grid, markdown_table


def split_prompts(dataset: str, split: str, num_prompts: int | None = None) -> list[str]:
    """Unique captions of a Pick-a-Pic-schema split, in first-appearance order.

    Local directories (and ``"sandbox"``) are read split by split (:func:`~diffalign.data.splits.split_captions`),
    so another split being empty does not matter; hub names go to ``datasets.load_dataset``.

    Raises:
        ValueError: the split does not exist, has no rows, or has no ``caption`` column.
    """
    seen: dict[str, None] = {}
    for c in split_captions(resolve_dataset(dataset), split, name=dataset):
        if c and c.strip():
            seen.setdefault(c, None)
    prompts = list(seen)
    return prompts[:num_prompts] if num_prompts else prompts


def reward_score_fn(name: str) -> Callable[[np.ndarray, list[str]], dict[str, np.ndarray]]:
    """``fn(images uint8 [N,H,W,3], prompts) -> {aspect: [N]}`` for a catalog reward."""
    if name == "sandbox-judge":
        from ..sandbox.judge import Judge

        judge = Judge()
        return lambda images, prompts: judge.score(images, prompts)
    from ..rewards.catalog import load_reward

    reward = load_reward(name)

    def fn(images, prompts):
        out = reward.score_aspects(images, prompts)
        out = {k: v.detach().float().cpu().numpy() for k, v in out.items()}
        if "overall" not in out:
            if len(out) == 1:
                out = {"overall": next(iter(out.values()))}
            else:  # e.g. a combined reward: its components and its own name; the total decides
                out["overall"] = reward.score(images, prompts).detach().float().cpu().numpy()
        return out

    return fn


def evaluate_pipeline_pair(
    pipe,
    *,
    base_context,
    dataset: str,
    split: str,
    num_prompts: int | None,
    seeds: list[int],
    steps: int,
    guidance: float,
    reward: str,
    batch_size: int,
    output_dir: str | Path,
    prompts: list[str] | None = None,
    prompt_source: str | None = None,
    base_images: dict | None = None,
) -> dict:
    """Generate base (inside ``base_context``) and aligned images, compare them, write ``eval.json`` and a grid.

    The prompts are the ``split`` of ``dataset`` unless ``prompts`` are given (then ``prompt_source`` names them in
    ``eval.json``, e.g. held-out sandbox-grammar captions of an online run). ``base_images``: a dict the caller
    keeps between evaluations of one run (an evaluation curve); the base images are generated once per (prompts,
    seeds, steps, guidance) and reused from it."""
    output_dir = Path(output_dir)
    if prompts is None:
        prompts = split_prompts(dataset, split, num_prompts)
    else:
        prompts = list(prompts)[:num_prompts] if num_prompts else list(prompts)
    rows_p, rows_s = expand_prompts(prompts, seeds)
    key = (tuple(rows_p), tuple(rows_s), steps, guidance)
    base = None if base_images is None else base_images.get(key)
    if base is None:
        with base_context:
            base = generate(
                pipe, rows_p, rows_s, steps=steps, guidance=guidance, batch_size=batch_size, desc="eval base"
            )
        if base_images is not None:
            base_images[key] = base
    aligned = generate(
        pipe, rows_p, rows_s, steps=steps, guidance=guidance, batch_size=batch_size, desc="eval aligned"
    )
    samples = PairedSamples(rows_p, rows_s, base, aligned)
    primary = "overall"
    result = compare(samples, reward_score_fn(reward), primary=primary)
    result.update(
        {
            "dataset": dataset if prompt_source is None else prompt_source,
            "split": split if prompt_source is None else "held-out",
            "reward": reward,
            "steps": steps,
            "guidance": guidance,
            "seeds": list(seeds),
        }
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "eval.json").write_text(json.dumps(result, indent=2))
    k = min(16, len(prompts)) * len(seeds)
    image_grid(np.concatenate([base[:k], aligned[:k]]), ncols=k, scale=3).save(
        output_dir / "eval_samples.png"
    )
    print(format_eval(result))
    print(
        f"evaluation written to {output_dir / 'eval.json'} (grid: {output_dir / 'eval_samples.png'}: base top, aligned bottom)"
    )
    return result


def format_eval(result: dict) -> str:
    wr = result["win_rate"]
    head = (
        f"win rate aligned vs base ({result['reward']}:{result['primary']}, {result['num_prompts']} prompts x "
        f"{result['seeds_per_prompt']} seeds): {wr['win_rate']:.3f} [95% CI {wr['ci_low']:.3f}, {wr['ci_high']:.3f}] "
        f"(wins {wr['wins']}, ties {wr['ties']}, losses {wr['losses']})"
    )
    rows = [
        [name, v["base"]["mean"], v["aligned"]["mean"], v["aligned"]["mean"] - v["base"]["mean"]]
        for name, v in result["aspects"].items()
    ]
    return head + "\n" + markdown_table(["aspect", "base", "aligned", "change"], rows)
