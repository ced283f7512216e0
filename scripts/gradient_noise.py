#!/usr/bin/env python
"""How many samples does one update of an online objective need? The gradient noise scale at the start of a run.

    python scripts/gradient_noise.py                                   # PRDP's sandbox recipe, 16 independent epochs
    python scripts/gradient_noise.py --config configs/sandbox_ddpo.yaml --epochs 24
    python scripts/gradient_noise.py --compare_reward sandbox-judge    # + the judge's gradient on the same samples
    python scripts/gradient_noise.py --config configs/sandbox_dpo.yaml --batches 160 --train_batch_size 4   # offline

With the weights fixed at the start (θ = θ_old, nothing is updated), ``--epochs`` independent epochs are sampled
exactly as the training loop samples them (same prompts stream, noise, trained steps, objective) and every
micro-batch's gradient ``g_i`` of the trainable weights is kept. From n micro-batch gradients of B prompts each:

* ``|G|^2``, the squared norm of the expected gradient, unbiased: the mean of ``g_i . g_j`` over i != j;
* ``tr(S_B) = mean |g_i|^2 - |G|^2``, the variance of one micro-batch's gradient;
* the **critical batch** ``B_crit = B * tr(S_B) / |G|^2`` in prompts (McCandlish et al. 2018, "An empirical model of
  large-batch training", B_simple): an update's gradient has signal-to-noise ratio about 1 when it averages
  ``B_crit`` prompts; below it, updates are mostly noise and Adam turns noise into full-size steps;
* the mean cosine of two micro-batch gradients (near 0: the updates do not agree on a direction);
* a leave-one-out jackknife standard error of ``|G|^2``, and with it a lower bound of the critical batch that holds
  when ``|G|^2`` itself is not resolved from zero (then the critical batch is "infinite" and only the bound says
  something: each update needs at least that many prompts before its signal matches its noise).

``--compare_reward NAME`` also scores every sample with NAME and takes the same objective's gradients with those
rewards (same samples, same steps): the cosine between the two expected gradients says whether ascending the
training reward ascends NAME (the judge, say) at the start.

An offline config (``loop`` of its objective: Diffusion-DPO and the other pair methods) is measured the same way on
``--batches`` consecutive micro-batches of its data loader (``train_batch_size`` pairs each, each pair's noise and t
as in training): the same quantities in pairs instead of prompts, for comparing a step of the offline core with an
online update. Prints a table and writes JSON (``--out``). Every other
flag is a config field, as for ``scripts/train_online.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.cli import at_least  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sandbox_prdp.yaml"


def noise_scale(grads, prompts_per_grad: int) -> dict[str, float]:
    """Estimates from ``grads`` [n, d] (n >= 3 independent micro-batch gradients of ``prompts_per_grad`` prompts),
    with a leave-one-out jackknife standard error of ``|G|^2`` and a lower bound of the critical batch (``|G|^2`` +
    2 SE in the denominator) that holds even when ``|G|^2`` is not resolved from zero."""
    g = grads.double()
    n = g.shape[0]
    if n < 3:
        raise ValueError("need at least three independent gradients")
    gram = g @ g.T
    sq = gram.diagonal()
    off = gram.sum() - sq.sum()  # sum over i != j of g_i . g_j
    cross = off / (n * (n - 1))
    var = sq.mean() - cross
    loo = (off - 2 * (gram.sum(1) - sq)) / ((n - 1) * (n - 2))  # cross without gradient k
    se = ((n - 1) / n * ((loo - loo.mean()) ** 2).sum()).sqrt()
    norms = sq.sqrt().clamp_min(1e-300)
    cos = gram / norms.unsqueeze(0) / norms.unsqueeze(1)
    bound = cross + 2 * se
    return {
        "n_gradients": n,
        "prompts_per_gradient": prompts_per_grad,
        "expected_grad_sq_norm": float(cross),
        "expected_grad_sq_norm_se": float(se),
        "micro_batch_grad_sq_norm": float(sq.mean()),
        "micro_batch_variance": float(var),
        "critical_batch_prompts": float(prompts_per_grad * var / cross) if cross > 0 else float("inf"),
        "critical_batch_prompts_lower_bound": float(prompts_per_grad * var / bound)
        if bound > 0
        else float("inf"),
        "mean_pairwise_cosine": float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))),
        "snr_per_micro_batch": float(cross / var) if var > 0 else float("inf"),
    }


def expected_cosine(a, b) -> float:
    """Cosine between the expected gradients of two paired sets [n, d] (row i of both from the same samples), from
    cross products over i != j only, so that neither the noise of one micro-batch nor the pairing biases it."""
    a, b = a.double(), b.double()
    n = a.shape[0]

    def cross(x, y):
        return (x.sum(0) @ y.sum(0) - (x * y).sum()) / (n * (n - 1))

    aa, bb = cross(a, a), cross(b, b)
    return float(cross(a, b) / (aa * bb).sqrt()) if aa > 0 and bb > 0 else float("nan")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument(
        "--epochs", type=at_least(2), default=16, help="independent epochs sampled at the starting weights"
    )
    p.add_argument(
        "--compare_reward", default=None, help="a second reward (e.g. sandbox-judge) on the same samples"
    )
    p.add_argument(
        "--batches", type=at_least(2), default=160, help="offline configs: micro-batches of the data loader"
    )
    p.add_argument("--out", default="outputs/gradient_noise.json")
    p.add_argument("-h", "--help", action="store_true")
    own, rest = p.parse_known_args(argv)
    if own.help:
        p.print_help()
        print("\nevery other flag is a config field of scripts/train_online.py")
        return {}
    import tempfile

    from diffalign.config import OnlineConfig, TrainConfig, load_yaml, parse_config
    from diffalign.objectives.registry import get_objective

    if "--config" not in rest:
        rest = ["--config", str(DEFAULT_CONFIG), *rest]
    rest = [*rest, "--output_dir", tempfile.mkdtemp(prefix="diffalign-gradnoise-"), "--report_to", "none"]
    objective = load_yaml(rest[rest.index("--config") + 1]).get("objective", "dpo")
    if "--objective" in rest:
        objective = rest[rest.index("--objective") + 1]
    if get_objective(objective).loop != "online":
        return offline(parse_config(TrainConfig, rest), own, rest)
    cfg = parse_config(OnlineConfig, rest)
    cfg.check_paths()
    if own.epochs * max(1, cfg.prompts_per_epoch // cfg.train_batch_size) < 3:
        sys.exit(
            "gradient_noise: --epochs x micro-batches per epoch must be at least 3 (independent gradients)"
        )

    import torch

    from diffalign.training.online import OnlineTrainer, reward_function

    t = OnlineTrainer(cfg)
    t.setup()
    params = [q for q in t.run.unet.parameters() if q.requires_grad]
    other = reward_function(own.compare_reward, t.accelerator.device) if own.compare_reward else None
    grads: dict[str, list] = {cfg.reward: [], **({own.compare_reward: []} if other else {})}
    states: dict[str, dict] = {
        name: {} for name in grads
    }  # per-prompt reward statistics (DDPO), one per reward
    n_img, bsz = cfg.images_per_prompt, cfg.train_batch_size
    for e in range(own.epochs):
        samples, _ = t.sample_epoch(e)
        t.epoch = e
        sets = {cfg.reward: samples.rewards}
        if other:
            sets[own.compare_reward] = other(samples.images, samples.prompts).float()
        advantages = {}
        for name, rewards in sets.items():  # once per epoch and reward, as the loop does
            samples.rewards, t.reward_state = rewards, states[name]
            advantages[name] = t._advantages(samples)
        n_groups = len(samples.prompts) // n_img
        for b in range(0, n_groups, bsz):
            rows, steps = t.micro_batch(samples, torch.arange(b, min(b + bsz, n_groups)), e, 0)
            for name, rewards in sets.items():
                samples.rewards = rewards
                loss, _ = t.spec.loss(t.trajectory_inputs(samples, rows, steps, advantages[name]), cfg.params)
                grads[name].append(flat_grad(loss, params))
        print(f"epoch {e + 1}/{own.epochs}: {len(grads[cfg.reward])} micro-batch gradients", flush=True)

    out: dict = {"config": rest, "epochs": own.epochs, "objective": cfg.objective, "rewards": {}}
    update_prompts = bsz * cfg.gradient_accumulation_steps
    out["prompts_per_update"] = update_prompts
    print(f"\n{cfg.objective}, {own.epochs} epochs at the starting weights; an update averages {update_prompts} prompts "
          f"x {n_img} images")  # fmt: skip
    report(out, {name: torch.stack(gl) for name, gl in grads.items()}, bsz, "prompts")
    if other:
        c = expected_cosine(torch.stack(grads[cfg.reward]), torch.stack(grads[own.compare_reward]))
        out["cosine_of_expected_gradients"] = c
        print(
            f"cosine between the two rewards' expected gradients: {c:.3f} (NaN: a norm estimate is not positive)"
        )
    return write(out, own.out)


def flat_grad(loss, params):
    """The gradient of ``loss.mean()`` over ``params`` as one CPU vector (zeros where a weight gets none)."""
    import torch

    g = torch.autograd.grad(loss.mean(), params, allow_unused=True)
    return torch.cat(
        [(x if x is not None else torch.zeros_like(q)).flatten() for x, q in zip(g, params)]
    ).cpu()


def report(out: dict, grads: dict, per_grad: int, unit: str) -> None:
    """Estimates of every set of gradients into ``out["rewards"]``, printed as a table."""
    print(f"| gradient of | micro-batch gradients | mean cosine of two | SNR of one micro-batch (SE) | critical batch, "
          f"{unit} (2-SE lower bound) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, g in grads.items():
        est = out["rewards"][name] = noise_scale(g, per_grad)
        print(f"| {name} | {est['n_gradients']} x {per_grad} {unit} | {est['mean_pairwise_cosine']:.3f} | "
              f"{est['snr_per_micro_batch']:.4f} ({est['expected_grad_sq_norm_se'] / est['micro_batch_variance']:.4f}) | "
              f"{est['critical_batch_prompts']:.0f} (> {est['critical_batch_prompts_lower_bound']:.0f}) |")  # fmt: skip


def write(out: dict, path: str) -> dict:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    print(f"written: {path}")
    return out


def offline(cfg, own, rest: list[str]) -> dict:
    """The offline core's step: gradients of ``own.batches`` consecutive micro-batches at the starting weights."""
    import torch

    from diffalign.training.offline import OfflinePairsTrainer

    cfg.check_paths()
    if own.batches < 3:
        sys.exit("gradient_noise: --batches must be at least 3 (independent gradients)")
    t = OfflinePairsTrainer(cfg)
    t.setup()
    params = [q for q in t.run.unet.parameters() if q.requires_grad]
    grads, epoch = [], 0
    while len(grads) < own.batches:
        t.data.set_epoch(epoch)
        for batch in t.dataloader:
            batch["epoch"] = epoch
            loss, _ = t.compute_loss(batch)
            grads.append(flat_grad(loss, params))
            if len(grads) == own.batches:
                break
        epoch += 1
    out: dict = {"config": rest, "batches": own.batches, "objective": cfg.objective, "rewards": {}}
    update = cfg.train_batch_size * cfg.gradient_accumulation_steps
    out["pairs_per_update"] = update
    print(
        f"\n{cfg.objective}, {own.batches} micro-batches at the starting weights; an update averages {update} pairs"
    )
    report(out, {"preference labels": torch.stack(grads)}, cfg.train_batch_size, "pairs")
    return write(out, own.out)


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)
