"""Held-out implicit accuracy: does the trained model prefer the held-out winners more than the reference does?

For each held-out pair, the objective's reward margin (Diffusion-DPO: ``inside = −½β·Δ``, positive when the policy
moved towards the winner relative to the reference; PSO: its logits, against the current model's own samples) is averaged over ``draws`` (timestep, noise) draws, keyed by
(``seed``, draw, pair) exactly like training's randomness but with a seed training never used. The implicit
accuracy is the share of pairs with a positive mean margin. An untrained LoRA gives margin 0 on every pair (policy ==
reference); a model that moved without learning the preference direction is right on about half of the pairs, so
accuracy above ``0.5 + 3·0.5/√n`` (three binomial standard deviations) does not happen by chance.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from .data import build_train_data


@torch.no_grad()
def heldout_implicit_accuracy(
    trainer, splits=("validation", "test"), draws: int = 4, seed: int = 12345
) -> dict:
    """``{"accuracy", "n", "mean_margin", "mean_abs_margin", "chance_bound_3sd"}`` over the decided pairs of ``splits`` (ties dropped)
    of the trainer's dataset. ``trainer``: a set-up :class:`~diffalign.training.offline.OfflinePairsTrainer`."""
    step = replace(trainer.step_fn, seed=seed)
    if step.model_samples is not None:  # PSO: the held-out pairs get their own samples of the current model
        step = replace(step, model_samples=step.model_samples.fresh(seed))
    was_training = trainer.unet.training
    trainer.unet.eval()
    margins: list[torch.Tensor] = []
    for split in splits:
        cfg = replace(trainer.cfg, split=split, max_train_samples=None, tie_policy="drop")
        data = build_train_data(cfg, trainer.comps, trainer.accelerator)
        loader = DataLoader(data.dataloader.dataset, batch_size=64, collate_fn=data.dataloader.collate_fn)
        total = None
        for d in range(draws):
            per_draw = torch.cat([step(batch, d)[1]["reward_margin"] for batch in loader])
            total = per_draw if total is None else total + per_draw
        margins.append(total / draws)
    if was_training:
        trainer.unet.train()
    m = torch.cat(margins)
    n = len(m)
    return {
        "accuracy": float((m > 0).float().mean()),
        "n": n,
        "mean_margin": float(m.mean()),
        "mean_abs_margin": float(m.abs().mean()),
        "chance_bound_3sd": 0.5 + 3 * 0.5 / n**0.5,
    }
