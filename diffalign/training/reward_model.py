"""Training a multi-aspect (VP-Score-style) reward model on multi-aspect preference pairs, and evaluating it.

VisionPrefer (Wu et al., 2024, arXiv 2404.15100) labels each image pair on four aspects (prompt-following,
aesthetic, fidelity, harmlessness) and trains VP-Score on them. Its architecture is not public; here it is
:class:`~diffalign.rewards.multi_aspect.MultiAspectRewardModel` (CLIP backbone, one head per aspect over
``[u, v, u ⊙ v]``), trained with the Bradley–Terry loss per aspect (as ImageReward/PickScore train theirs).

The pairs: :mod:`diffalign.rewards.aspect_pairs`; the configuration: :mod:`diffalign.rewards.reward_model_config`;
the held-out metrics: :mod:`diffalign.rewards.pair_metrics`. This module is the fitting loop and the whole run.
It is a loop of its own, not the diffusion trainer's (:mod:`diffalign.training.offline`): the model is a CLIP
backbone with Bradley–Terry heads, usually trained on cached features, with no accelerator or checkpoint resume.

Training (:func:`fit`)
    Per aspect, on the pairs where it has a label (ties only with ``tie_policy="soft"``)::

        ℓ_a,i = −[p_a,i log σ(s_a(x0_i) − s_a(x1_i)) + (1 − p_a,i) log σ(s_a(x1_i) − s_a(x0_i))]
        loss  = Σ_a Σ_i m_a,i ℓ_a,i / Σ_a Σ_i m_a,i                  (m: 1 for a used label; every decision counts once)

    (``soft_bt_loss``; for p ∈ {0, 1} it is ``bt_loss`` of the winner and the loser). AdamW; the backbone is frozen
    (heads only: the joint features are computed once and cached) or fine-tuned with its own learning rate.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ..rewards.aspect_pairs import AspectPairs, build_pairs
from ..rewards.multi_aspect import MultiAspectConfig, MultiAspectRewardModel, soft_bt_loss
from ..rewards.pair_metrics import accuracy_table, metrics_markdown
from ..rewards.reward_model_config import RewardTrainConfig, resolve_backbone

# ---------------------------------------------------------------------------------------------------------------
# Features and scoring


def pixel_values(processor: Any, images: np.ndarray, batch_size: int = 1024) -> Tensor:
    """The processor's own image pipeline (exactly what :class:`MultiAspectReward` uses at inference) on uint8
    ``[N, H, W, 3]`` → float32 ``[N, 3, S, S]``."""
    from diffalign.rewards.hf_clip import processor_pixels

    if len(images) == 0:
        raise ValueError("no images to preprocess")
    chunks = [
        processor_pixels(processor, [Image.fromarray(im) for im in images[s : s + batch_size]])
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def joint_features(
    model: MultiAspectRewardModel, pixels: Tensor, prompts: Sequence[str], batch_size: int = 256
) -> Tensor:
    """``model.joint_features`` in batches, without gradients: ``[N, 3D]`` = ``[u, v, u ⊙ v]`` (normalised ``u``,
    ``v``), so ``cos(u, v) = h[:, 2D:].sum(-1)``."""
    device = next(model.parameters()).device
    return torch.cat(
        [
            model.joint_features(pixels[s : s + batch_size].to(device), prompts[s : s + batch_size]).cpu()
            for s in range(0, len(prompts), batch_size)
        ]
    )


def head_scores(model: MultiAspectRewardModel, features: Tensor) -> dict[str, Tensor]:
    """Per-aspect scores ``{aspect: [N]}`` and ``"overall"`` from joint features ``[N, 3D]`` (the forward pass of
    :class:`MultiAspectRewardModel` after its backbone)."""
    out = {a: head(features).squeeze(-1) for a, head in model.heads.items()}
    w = torch.tensor(model.config.weights(), dtype=features.dtype, device=features.device)
    stacked = torch.stack([out[a] for a in model.config.aspects], dim=-1)
    out["overall"] = (stacked * w).sum(-1) / w.sum()
    return out


def cosine_from_features(features: Tensor) -> Tensor:
    """``cos(u, v)`` ``[N]`` from ``[u, v, u ⊙ v]`` ``[N, 3D]`` (``u``, ``v`` unit vectors)."""
    d = features.shape[-1] // 3
    return features[:, 2 * d :].sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class PairTensors:
    """What the training loop reads for one set of pairs: either cached joint features (frozen backbone) or
    pixels (fine-tuning), plus label tensors ``[N, A]`` and the mask of labels used by the loss."""

    prompts: list[str]
    labels: Tensor  # [N, A] float32, P(image 0 preferred) per aspect
    mask: Tensor  # [N, A] float32, 1 where the label enters the loss
    features_0: Tensor | None = None  # [N, 3D]
    features_1: Tensor | None = None
    pixels_0: Tensor | None = None  # [N, 3, S, S]
    pixels_1: Tensor | None = None


def label_tensors(pairs: AspectPairs, aspects: Sequence[str], tie_policy: str) -> tuple[Tensor, Tensor]:
    """``(labels, mask)``, float32 ``[N, A]``: mask 1 for decisive labels, and for ties when ``tie_policy="soft"``."""
    missing = [a for a in aspects if a not in pairs.labels]
    if missing:
        raise KeyError(f"pairs have no labels for aspect(s) {missing}; they have {sorted(pairs.labels)}")
    labels = torch.tensor(np.stack([pairs.labels[a] for a in aspects], axis=1), dtype=torch.float32)
    mask = torch.ones_like(labels) if tie_policy == "soft" else (labels != 0.5).float()
    return labels, mask


def multi_aspect_loss(
    scores_0: Tensor, scores_1: Tensor, labels: Tensor, mask: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Bradley–Terry loss over aspects (module docstring): ``scores_*``, ``labels``, ``mask`` are ``[B, A]``.

    Returns the pooled mean ``Σ m ℓ / Σ m`` (0 when nothing is labelled) and metrics: ``train/loss``,
    ``train/acc`` (share of used decisive labels ranked right)."""
    per = soft_bt_loss(scores_0, scores_1, labels)  # [B, A]
    denom = mask.sum()
    loss = (per * mask).sum() / denom.clamp_min(1.0)
    with torch.no_grad():
        decisive = mask * (labels != 0.5).float()
        right = ((scores_0 > scores_1).float() == labels).float() * decisive
        acc = float(right.sum() / decisive.sum().clamp_min(1.0))
    return loss, {"train/loss": float(loss.detach()), "train/acc": acc}


def feature_stats(features_0: Tensor, features_1: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std ``[3D]`` of the joint features of both sides of the pairs (std floored at 1e-6)."""
    both = torch.cat([features_0, features_1])
    return both.mean(0), both.std(0).clamp_min(1e-6)


def fit(
    model: MultiAspectRewardModel,
    data: PairTensors,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    backbone_learning_rate: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    stats: tuple[Tensor, Tensor] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """Train ``model`` on ``data`` with AdamW; returns one record per epoch (mean loss and accuracy).

    With ``data.features_*`` set, only the heads are trained (on the cached features); with ``data.pixels_*`` the
    backbone is fine-tuned too (``backbone_learning_rate``). The order is a per-epoch permutation from a
    ``torch.Generator`` seeded with ``seed`` (deterministic).

    The heads read standardised features ``x = (h − μ) / σ`` (per dimension; ``stats = (μ, σ)``, by default
    :func:`feature_stats` of the cached features; fine-tuning without ``stats`` uses raw features): the unit-norm
    CLIP features are otherwise small and unevenly scaled for AdamW. Afterwards the standardisation is folded into
    each head's first ``Linear`` (:func:`fold_standardization`), so the saved heads read the raw features ``h``
    exactly as :class:`MultiAspectRewardModel` computes them."""
    aspects = list(model.config.aspects)
    cached = data.features_0 is not None
    if not cached and data.pixels_0 is None:
        raise ValueError(
            "PairTensors needs either features_0/features_1 (frozen) or pixels_0/pixels_1 (fine-tune)"
        )
    if stats is None and cached:
        stats = feature_stats(data.features_0, data.features_1)
    device = next(model.heads.parameters()).device
    mean, std = (t.to(device) for t in stats) if stats is not None else (0.0, 1.0)
    groups = [{"params": list(model.heads.parameters()), "lr": learning_rate}]
    if not cached:
        groups.append(
            {
                "params": [p for p in model.backbone.parameters() if p.requires_grad],
                "lr": backbone_learning_rate,
            }
        )
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    n = len(data.prompts)
    steps_per_epoch = math.ceil(n / batch_size)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(total=epochs * steps_per_epoch, desc="train reward model", disable=not progress)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        sums, weight = Counter(), 0
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            labels, mask = data.labels[idx].to(device), data.mask[idx].to(device)
            if cached:
                h0, h1 = data.features_0[idx].to(device), data.features_1[idx].to(device)
            else:
                prompts = [data.prompts[i] for i in idx.tolist()]
                px = torch.cat([data.pixels_0[idx], data.pixels_1[idx]]).to(device)
                h0, h1 = model.joint_features(px, prompts + prompts).split(len(idx))
            s0 = head_scores(model, (h0 - mean) / std)
            s1 = head_scores(model, (h1 - mean) / std)
            loss, metrics = multi_aspect_loss(
                torch.stack([s0[a] for a in aspects], -1),
                torch.stack([s1[a] for a in aspects], -1),
                labels,
                mask,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in metrics.items():
                sums[k] += v * len(idx)
            weight += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", epoch=epoch + 1)
        history.append({"epoch": epoch + 1, **{k: v / weight for k, v in sums.items()}})
    bar.close()
    if stats is not None:
        fold_standardization(model, mean, std)
    model.eval()
    log(f"trained {epochs} epochs x {steps_per_epoch} steps; last epoch: {history[-1]}")
    return history


@torch.no_grad()
def fold_standardization(model: MultiAspectRewardModel, mean: Tensor, std: Tensor) -> None:
    """Make every head read raw features: a first layer ``W x + b`` on ``x = (h − μ) / σ`` becomes
    ``(W / σ) h + (b − (W / σ) μ)`` (in place; exact up to float rounding)."""
    for head in model.heads.values():
        first = head if isinstance(head, torch.nn.Linear) else head[0]
        w = first.weight / std  # [out, 3D] / [3D]
        first.bias.sub_(w @ mean)
        first.weight.copy_(w)


def fit_overall_weights(diff: Tensor, label_0: Tensor, steps: int = 500, lr: float = 0.05) -> list[float]:
    """Non-negative weights of the aspects in ``overall``, fitted to overall labels.

    ``diff``: per-aspect score differences ``s_a(x0) − s_a(x1)``, ``[N, A]``; ``label_0``: ``[N]`` overall labels
    (ties ignored). Model ``P(x0 ≻ x1) = σ(Σ_a w_a · diff_a)`` with ``w = softplus(θ)`` (θ starts at 0), full-batch
    Adam on the Bradley–Terry loss; returns ``w / Σ w`` as floats (``overall`` only uses ratios)."""
    decisive = label_0 != 0.5
    if not bool(decisive.any()):
        return [1.0 / diff.shape[1]] * diff.shape[1]
    d, p = diff[decisive].detach().float(), label_0[decisive].float()
    theta = torch.zeros(diff.shape[1], requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        s = d @ torch.nn.functional.softplus(theta)
        loss = soft_bt_loss(s, torch.zeros_like(s), p).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = torch.nn.functional.softplus(theta.detach())
    return (w / w.sum()).tolist()


@torch.no_grad()
def score_pairs(
    model: MultiAspectRewardModel, data: PairTensors, batch_size: int = 256
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Model scores of both sides: ``({key: [N]}, {key: [N]})`` (aspects and ``"overall"``)."""
    model.eval()
    if data.features_0 is not None:
        return head_scores(model, data.features_0), head_scores(model, data.features_1)
    f0 = joint_features(model, data.pixels_0, data.prompts, batch_size)
    f1 = joint_features(model, data.pixels_1, data.prompts, batch_size)
    return head_scores(model, f0), head_scores(model, f1)


# ---------------------------------------------------------------------------------------------------------------
# The whole run


MODEL_CARD = """# {name}: VP-Score-style multi-aspect reward model (diffalign)

CLIP backbone `{backbone}` ({backbone_mode}) + one Bradley-Terry head per aspect ({aspects}) over [u, v, u*v],
trained with `scripts/train_reward_model.py` on {train_pairs} {source} pairs labelled per aspect by the sandbox
judge (temperature {temperature}, tie margin {tie_margin}); evaluated on {eval_pairs} prompt-disjoint held-out pairs.

Command: `{command}`

Held-out pair accuracy (ties excluded; Wilson 95% interval; n = decisive pairs):

{table}

Load: `from diffalign.rewards import load_reward; load_reward("<manifest or name>")` or
`MultiAspectRewardModel.load("<this directory>")`. All numbers: `metrics.json`.
"""


def train_reward_model(
    cfg: RewardTrainConfig, command: str = "", log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Build the pairs, train, evaluate against the baselines, save the checkpoint and ``metrics.json``.

    Returns the metrics (also written to ``<output_dir>/metrics.json``)."""
    from diffalign.rewards.hf_clip import load_clip_dir

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    backbone_dir = resolve_backbone(cfg.backbone)
    storage = cfg.backbone_storage
    if storage == "auto":
        storage = "reference" if cfg.freeze_backbone else "copy"

    # ---- data ------------------------------------------------------------------------------------------------
    train, held, data_report = build_pairs(cfg)
    log(
        f"pairs: {len(train)} train / {len(held)} held out ({data_report['train']['prompts']} / "
        f"{data_report['held_out']['prompts']} prompts), source {cfg.source!r}"
    )
    for name in ("skipped", "skipped_held_out"):
        if data_report.get(name):
            log(f"{name} rows by reason: {data_report[name]}")

    # ---- model -----------------------------------------------------------------------------------------------
    backbone, processor = load_clip_dir(backbone_dir)
    torch.manual_seed(cfg.seed)
    model = MultiAspectRewardModel(backbone, processor, MultiAspectConfig(head_hidden=cfg.head_hidden))
    model.backbone.requires_grad_(not cfg.freeze_backbone)
    aspects = list(model.config.aspects)
    n_head = sum(p.numel() for p in model.heads.parameters())
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    log(
        f"model: {n_head:,} head parameters, backbone {n_backbone:,} ({'frozen' if cfg.freeze_backbone else 'fine-tuned'}); "
        f"{cfg.epochs} epochs x {math.ceil(len(train) / cfg.batch_size)} steps = {steps} steps of {cfg.batch_size} pairs"
    )

    # ---- features (the baseline's cosine comes from the untouched backbone) ----------------------------------
    sets = {}
    for name, pairs in (("train", train), ("held_out", held)):
        px0, px1 = pixel_values(processor, pairs.images_0), pixel_values(processor, pairs.images_1)
        f0 = joint_features(model, px0, pairs.prompts, cfg.feature_batch_size)
        f1 = joint_features(model, px1, pairs.prompts, cfg.feature_batch_size)
        labels, mask = label_tensors(pairs, aspects, cfg.tie_policy)
        sets[name] = {
            "tensors": PairTensors(
                pairs.prompts,
                labels,
                mask,
                *((f0, f1, None, None) if cfg.freeze_backbone else (None, None, px0, px1)),
            ),
            "cosine": (cosine_from_features(f0), cosine_from_features(f1)),
            "features": (f0, f1),
        }

    # ---- train -----------------------------------------------------------------------------------------------
    history = fit(
        model,
        sets["train"]["tensors"],
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        backbone_learning_rate=cfg.backbone_learning_rate,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        stats=feature_stats(*sets["train"]["features"]),
        progress=cfg.progress,
        log=log,
    )

    # ---- overall weights -------------------------------------------------------------------------------------
    if cfg.fit_overall:
        m0, m1 = score_pairs(model, sets["train"]["tensors"], cfg.feature_batch_size)
        diff = torch.stack([m0[a] - m1[a] for a in aspects], -1)
        weights = fit_overall_weights(diff, torch.as_tensor(train.labels["overall"], dtype=torch.float32))
        model.config.overall_weights = dict(zip(aspects, weights, strict=True))
        log("overall = " + " + ".join(f"{w:.3f}·{a}" for a, w in model.config.overall_weights.items()))

    # ---- evaluate --------------------------------------------------------------------------------------------
    evaluation = {}
    for name, pairs in (("train", train), ("held_out", held)):
        m0, m1 = score_pairs(model, sets[name]["tensors"], cfg.feature_batch_size)
        c0, c1 = sets[name]["cosine"]
        evaluation[name] = {
            "model": accuracy_table(m0, m1, pairs.labels),
            "sandbox_clip": accuracy_table({"*": c0}, {"*": c1}, pairs.labels),
            "judge_scores": accuracy_table(pairs.scores_0, pairs.scores_1, pairs.labels),
            "chance": 0.5,
        }

    # ---- save ------------------------------------------------------------------------------------------------
    model.save(out_dir, backbone_ref=backbone_dir if storage == "reference" else None)
    metrics = {
        "config": asdict(cfg),
        "command": command,
        "backbone_dir": str(backbone_dir),
        "backbone_storage": storage,
        "overall_weights": dict(model.config.overall_weights),
        "data": data_report,
        "history": history,
        **evaluation,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    table = metrics_markdown(metrics)
    (out_dir / "README.md").write_text(
        MODEL_CARD.format(
            name=out_dir.name,
            backbone=cfg.backbone,
            backbone_mode="frozen" if cfg.freeze_backbone else "fine-tuned",
            aspects=", ".join(aspects),
            train_pairs=len(train),
            eval_pairs=len(held),
            source=cfg.source,
            temperature=cfg.temperature,
            tie_margin=cfg.tie_margin,
            command=command or "python scripts/train_reward_model.py",
            table=table,
        )
    )
    log("\nheld-out pair accuracy (ties excluded; 95% Wilson interval):\n" + table)
    return metrics
