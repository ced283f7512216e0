"""Training a multi-aspect (VP-Score-style) reward model on multi-aspect preference pairs, and evaluating it.

VisionPrefer (Wu et al., 2024, arXiv 2404.15100) labels each image pair on four aspects (prompt-following,
aesthetic, fidelity, harmlessness) and trains VP-Score on them. Its architecture is not public; here it is
:class:`~diffalign.rewards.multi_aspect.MultiAspectRewardModel` (CLIP backbone, one head per aspect over
``[u, v, u ⊙ v]``), trained with the Bradley–Terry loss per aspect (as ImageReward/PickScore train theirs).

Data (:class:`AspectPairs`)
    Image pairs ``(x0, x1)`` of one prompt, each aspect ``a`` labelled by the sandbox judge (the raters of this
    world) with Bradley–Terry noise, exactly as the preference-data builder labels ``overall``
    (:func:`diffalign.data.builder.bradley_terry_labels`)::

        |s0_a − s1_a| < tie_margin  →  tie: p_a = 0.5
        otherwise                   →  p_a = 1{u_a < σ((s0_a − s1_a) / T)}       (u_a ~ U[0, 1), one per pair and aspect)

    ``p_a = P(image 0 preferred on aspect a)`` ∈ {1, 0, 0.5}; the judge's ``overall`` is labelled the same way.
    Two sources of images:

    * ``"pickapic"``: a Pick-a-Pic-schema dataset (``jpg_0``, ``jpg_1``, ``caption``; the default is the shipped
      sandbox data, images *sampled from the sandbox models*). The stored ``label_0/label_1`` (one overall
      preference) are not used: every aspect is re-labelled by the judge from the decoded images. Rows the judge
      cannot score (caption outside the sandbox grammar, image not 32x32, undecodable bytes) are skipped and
      counted by reason.
    * ``"rendered"``: scenes drawn by the sandbox renderer for a random caption, each side independently with
      defects (:class:`RenderConfig`: the scene of a *wrong* caption, the hazard mark, pixel noise, smear).

    Train and held-out pairs never share a prompt: a Pick-a-Pic source uses its own prompt-disjoint splits (train
    vs test + test_unique by default); otherwise :func:`split_by_prompt` holds out a share of the prompts, keyed by
    the parsed caption spec (so "a red circle" and "an icon of a red circle" count as one prompt).

Training (:func:`fit`)
    Per aspect, on the pairs where it has a label (ties only with ``tie_policy="soft"``)::

        ℓ_a,i = −[p_a,i log σ(s_a(x0_i) − s_a(x1_i)) + (1 − p_a,i) log σ(s_a(x1_i) − s_a(x0_i))]
        loss  = Σ_a Σ_i m_a,i ℓ_a,i / Σ_a Σ_i m_a,i                  (m: 1 for a used label; every decision counts once)

    (``soft_bt_loss``; for p ∈ {0, 1} it is ``bt_loss`` of the winner and the loser). AdamW; the backbone is frozen
    (heads only: the joint features are computed once and cached) or fine-tuned with its own learning rate.

Evaluation (:func:`pair_accuracy`)
    Held-out pair accuracy per aspect: on pairs with a decisive label (ties excluded), the share where the
    predictor ranks the preferred image higher; a predictor tie (equal scores) counts one half. Wilson 95% interval.
    ``overall``: the model's ``overall`` score (weighted mean of its heads; the non-negative weights are fitted to
    the judge's ``overall`` labels on the training pairs, :func:`fit_overall_weights`) against those labels;
    ``pooled``: all four aspects' decisions together. Baselines: ``sandbox_clip`` — the backbone's own text–image
    cosine (``cos(u, v)``, what the ``sandbox-clip`` catalog reward scores) used as the predictor of every aspect;
    ``judge_scores`` — the judge's noiseless scores (the ceiling set by the label noise: below 1 only because of
    the Bradley–Terry draws); ``chance`` = 0.5.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.rewards.multi_aspect import (
    VISIONPREFER_ASPECTS,
    MultiAspectConfig,
    MultiAspectRewardModel,
    soft_bt_loss,
)

LABEL_KEYS: tuple[str, ...] = (*VISIONPREFER_ASPECTS, "overall")
"""Judge keys labelled for every pair: the four aspects, then the judge's ``overall``."""
SOURCES: tuple[str, ...] = ("pickapic", "rendered")
TIE_POLICIES: tuple[str, ...] = ("drop", "soft")
BACKBONE_STORAGE: tuple[str, ...] = ("auto", "reference", "copy")


# ---------------------------------------------------------------------------------------------------------------
# Configuration


def _f(help_text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class RewardTrainConfig:
    """Train a VP-Score-style multi-aspect reward model (CLIP backbone + one Bradley–Terry head per aspect)."""

    # ---- data ------------------------------------------------------------------------------------------------
    source: str = _f(
        "'sandbox' (the shipped sandbox Pick-a-Pic data), 'rendered' (render defective scenes), or a "
        "Pick-a-Pic-schema directory / Parquet file / glob",
        "sandbox",
    )
    train_splits: str = _f("Pick-a-Pic splits to train on (comma-separated)", "train")
    eval_splits: str = _f(
        "Pick-a-Pic splits held out (comma-separated, prompt-disjoint from train); '' = hold out "
        "held_out_fraction of the training prompts instead",
        "test,test_unique",
    )
    max_train_pairs: int | None = _f(
        "use at most this many training pairs (first rows / first rendered)", None
    )
    max_eval_pairs: int | None = _f("use at most this many held-out pairs", None)
    num_pairs: int = _f("rendered source: pairs to render (train + held out)", 3000)
    held_out_fraction: float = _f("share of prompts held out when no eval split is used", 0.2)
    p_wrong: float = _f("rendered: probability that a side shows the scene of a wrong caption", 0.3)
    p_hazard: float = _f("rendered: probability of the hazard mark on a side", 0.25)
    p_noise: float = _f("rendered: probability of pixel noise (std 0.06-0.14) on a side", 0.25)
    p_smear: float = _f("rendered: probability of a 3x3 box blur on a side", 0.25)
    temperature: float = _f("Bradley-Terry temperature T of the judge labels: P(0 wins) = σ(Δ/T)", 0.05)
    tie_margin: float = _f("|Δ judge score| below this is a tie (0.5/0.5), per aspect", 0.01)
    tie_policy: str = _f("'drop' ties from the loss, or 'soft' (train them towards equal scores)", "drop")

    # ---- model -----------------------------------------------------------------------------------------------
    backbone: str = _f(
        "transformers CLIPModel + processor directory; 'sandbox' = reward_models/sandbox-clip", "sandbox"
    )
    freeze_backbone: bool = _f("train the heads only (features cached once) instead of fine-tuning", True)
    head_hidden: int = _f("0: linear heads; H > 0: Linear(3D, H) → GELU → Linear(H, 1)", 0)
    fit_overall: bool = _f(
        "fit the 'overall' weights of the aspects to the judge's overall labels (else equal weights)", True
    )
    backbone_storage: str = _f(
        "'reference' (checkpoint points to the frozen backbone directory, no copy), 'copy' (write backbone/), "
        "'auto' (reference when frozen, else copy)",
        "auto",
    )

    # ---- optimisation ----------------------------------------------------------------------------------------
    epochs: int = _f("passes over the training pairs", 30)
    batch_size: int = _f("pairs per optimisation step", 64)
    learning_rate: float = _f("AdamW learning rate of the heads", 3e-3)
    backbone_learning_rate: float = _f("AdamW learning rate of the backbone when fine-tuned", 2e-5)
    weight_decay: float = _f("AdamW weight decay", 1e-2)
    seed: int = _f("seeds the rendered data, the prompt split, the label draws, the heads and the order", 0)
    feature_batch_size: int = _f("images per forward pass when caching features / scoring", 256)
    judge_batch_size: int = _f("images per judge call (progress granularity)", 512)

    # ---- output ----------------------------------------------------------------------------------------------
    output_dir: str = _f("checkpoint directory (config.json, heads.safetensors, metrics.json, README.md)", "")
    progress: bool = _f("show progress bars", True)

    def __post_init__(self) -> None:
        if not self.output_dir:
            self.output_dir = "outputs/reward-model"
        for name, valid in (("tie_policy", TIE_POLICIES), ("backbone_storage", BACKBONE_STORAGE)):
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"config field {name}={getattr(self, name)!r} is not valid; choose one of {valid}"
                )
        if self.backbone_storage == "reference" and not self.freeze_backbone:
            raise ValueError(
                "backbone_storage='reference' needs freeze_backbone=true: a fine-tuned backbone differs from the "
                "directory it came from, so it must be copied (backbone_storage='copy' or 'auto')"
            )
        for name in ("epochs", "batch_size", "num_pairs", "feature_batch_size", "judge_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name}={getattr(self, name)} must be >= 1")
        for name in ("p_wrong", "p_hazard", "p_noise", "p_smear"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"config field {name}={getattr(self, name)} must lie in [0, 1]")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction={self.held_out_fraction} must lie in (0, 1)")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)) or self.tie_margin < 0:
            raise ValueError("temperature must be finite and >= 0, tie_margin >= 0")
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden={self.head_hidden} must be >= 0")

    @property
    def source_kind(self) -> str:
        """``"rendered"`` or ``"pickapic"``."""
        return "rendered" if self.source == "rendered" else "pickapic"

    def render_config(self) -> RenderConfig:
        return RenderConfig(self.p_wrong, self.p_hazard, self.p_noise, self.p_smear)


def resolve_source(source: str) -> str:
    """``"sandbox"`` → the shipped sandbox data directory (``SANDBOX_DATA``), which must be built; anything else
    unchanged."""
    from diffalign.data.sources import resolve_built_dataset

    return resolve_built_dataset(source, instead="train on rendered pairs with --source rendered")


def resolve_backbone(backbone: str) -> Path:
    """``"sandbox"`` → ``reward_models/sandbox-clip``; a directory otherwise (checked)."""
    from diffalign.sandbox import SANDBOX_CLIP

    path = SANDBOX_CLIP if backbone == "sandbox" else Path(backbone)
    if not (path / "config.json").is_file():
        hint = (
            "build it with `python scripts/build_sandbox.py`"
            if backbone == "sandbox"
            else "give --backbone a transformers CLIPModel directory (config.json, weights, processor files)"
        )
        raise FileNotFoundError(f"CLIP backbone directory {path} has no config.json: {hint}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Multi-aspect pairs


@dataclass
class AspectPairs:
    """Image pairs with per-aspect judge scores and labels.

    Attributes:
        images_0, images_1: uint8 ``[N, H, W, 3]``.
        prompts: ``N`` captions.
        scores_0, scores_1: ``{key: float64 [N]}`` judge scores of each side (keys :data:`LABEL_KEYS`).
        labels: ``{key: float64 [N]}`` ``P(image 0 preferred)`` ∈ {1, 0, 0.5 (tie)}.
        source: where the pairs came from (for reports).
    """

    images_0: np.ndarray
    images_1: np.ndarray
    prompts: list[str]
    scores_0: dict[str, np.ndarray] = field(default_factory=dict)
    scores_1: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if self.images_0.shape != self.images_1.shape or len(self.images_0) != n:
            raise ValueError(
                f"images_0 {self.images_0.shape}, images_1 {self.images_1.shape} and {n} prompts disagree"
            )
        for name in ("scores_0", "scores_1", "labels"):
            for k, v in getattr(self, name).items():
                if len(v) != n:
                    raise ValueError(f"{name}[{k!r}] has {len(v)} entries for {n} pairs")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: Sequence[int] | np.ndarray) -> AspectPairs:
        idx = np.asarray(index, dtype=np.int64)
        pick = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
        return AspectPairs(
            self.images_0[idx],
            self.images_1[idx],
            [self.prompts[i] for i in idx],
            pick(self.scores_0),
            pick(self.scores_1),
            pick(self.labels),
            self.source,
        )

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Per label key: decisive pairs, ties, and pairs where image 0 is preferred."""
        return {
            k: {
                "decisive": int(np.sum(v != 0.5)),
                "ties": int(np.sum(v == 0.5)),
                "image_0_preferred": int(np.sum(v == 1.0)),
            }
            for k, v in self.labels.items()
        }


def label_aspects(
    scores_0: Mapping[str, np.ndarray],
    scores_1: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    temperature: float,
    tie_margin: float,
    keys: Sequence[str] = LABEL_KEYS,
) -> dict[str, np.ndarray]:
    """Bradley–Terry labels per key (module docstring): ``{key: P(image 0 preferred) ∈ {1, 0, 0.5}}``.

    One uniform draw per pair and key, drawn key by key in ``keys`` order from ``rng`` (deterministic). The rule is
    the preference builder's :func:`~diffalign.data.builder.bradley_terry_labels`."""
    from diffalign.data.builder import bradley_terry_labels

    out = {}
    for k in keys:
        draws = rng.random(len(scores_0[k]))
        out[k] = bradley_terry_labels(scores_0[k], scores_1[k], draws, temperature, tie_margin)[0]
    return out


def judge_scores(
    images: np.ndarray, prompts: Sequence[str], judge: Any = None, batch_size: int = 512, desc: str = ""
) -> dict[str, np.ndarray]:
    """The sandbox judge's :data:`LABEL_KEYS` scores of uint8 ``[N, 32, 32, 3]`` images, float64 ``[N]`` each."""
    from diffalign.sandbox.judge import Judge

    judge = judge if judge is not None else Judge()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in LABEL_KEYS}
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc=desc or "judge", disable=not desc, leave=False):
        out = judge.score(images[s : s + batch_size], list(prompts[s : s + batch_size]))
        for k in LABEL_KEYS:
            parts[k].append(np.asarray(out[k], dtype=np.float64))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def judge_label_pairs(
    images_0: np.ndarray,
    images_1: np.ndarray,
    prompts: Sequence[str],
    *,
    temperature: float,
    tie_margin: float,
    rng: np.random.Generator,
    source: str = "",
    batch_size: int = 512,
    progress: bool = False,
) -> AspectPairs:
    """Score both sides with the judge and label every key (:func:`label_aspects`)."""
    from diffalign.sandbox.judge import Judge

    judge = Judge()
    s0 = judge_scores(images_0, prompts, judge, batch_size, "judge image 0" if progress else "")
    s1 = judge_scores(images_1, prompts, judge, batch_size, "judge image 1" if progress else "")
    labels = label_aspects(s0, s1, rng, temperature, tie_margin)
    return AspectPairs(images_0, images_1, list(prompts), s0, s1, labels, source)


@dataclass(frozen=True)
class RenderConfig:
    """Defects of rendered pairs, drawn independently for each side of a pair (``WorldConfig``-like)."""

    p_wrong: float = 0.3  # the side shows the scene of a caption with one wrong attribute (corrupt_spec)
    p_hazard: float = 0.25  # the hazard mark in a random corner
    p_noise: float = 0.25  # additive Gaussian noise, std ~ U[0.06, 0.14]
    p_smear: float = 0.25  # 3x3 box blur


def render_pair_images(
    n: int, rng: np.random.Generator, cfg: RenderConfig = RenderConfig(), progress: bool = False
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` rendered pairs ``(images_0, images_1, prompts)``: a caption from the world's distribution
    (``sample_spec`` + a random prefix), and for each side a scene drawn for it (open attributes random, the
    world's jitter) with the defects of ``cfg``. uint8 ``[n, 32, 32, 3]`` each."""
    from diffalign.sandbox.captions import PREFIXES, caption_text, corrupt_spec, sample_spec, scene_for_spec
    from diffalign.sandbox.scene import render

    sides: list[list[np.ndarray]] = [[], []]
    prompts = []
    for _ in tqdm(range(n), desc="render pairs", disable=not progress, leave=False):
        spec = sample_spec(rng)
        prompts.append(caption_text(spec, PREFIXES[rng.integers(len(PREFIXES))]))
        for side in sides:
            shown = corrupt_spec(spec, rng) if rng.random() < cfg.p_wrong else spec
            scene = scene_for_spec(
                shown, rng, p_hazard=cfg.p_hazard, p_noise=cfg.p_noise, p_smear=cfg.p_smear
            )
            side.append(render(scene))
    return np.stack(sides[0]), np.stack(sides[1]), prompts


def prompt_key(caption: str) -> str:
    """What makes two captions "the same prompt": the parsed sandbox spec (prefix ignored), else the caption
    lower-cased with whitespace collapsed."""
    from diffalign.sandbox.captions import parse_caption

    try:
        return repr(parse_caption(caption))
    except ValueError:
        return " ".join(caption.lower().split())


def split_by_prompt(
    prompts: Sequence[str], held_out_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_index, held_out_index)``: ``ceil(fraction · K)`` of the ``K`` distinct prompts (by
    :func:`prompt_key`), chosen at random, go to held-out with all their pairs."""
    keys = [prompt_key(p) for p in prompts]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise ValueError(f"need at least 2 distinct prompts to split train/held-out, got {len(distinct)}")
    n_held = min(len(distinct) - 1, max(1, math.ceil(held_out_fraction * len(distinct))))
    held = {distinct[i] for i in rng.permutation(len(distinct))[:n_held]}
    mask = np.array([k in held for k in keys])
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def load_pickapic_images(
    source: Any, splits: Sequence[str], max_pairs: int | None = None, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, list[str], Counter]:
    """Read ``jpg_0``, ``jpg_1``, ``caption`` of Pick-a-Pic-schema ``splits`` (in order) for judge labelling.

    Returns ``(images_0, images_1, prompts, skipped)``; ``skipped`` counts rows left out by reason:
    ``empty_caption``, ``caption_not_in_grammar`` (the judge only reads sandbox captions), ``corrupt_image``
    (missing or undecodable bytes), ``wrong_size`` (the judge reads 32x32 images only). Stops after ``max_pairs``
    usable rows."""
    from diffalign.data.pickapic import decode_rgb, load_pickapic_split
    from diffalign.sandbox.captions import parse_caption
    from diffalign.sandbox.scene import IMAGE_SIZE

    skipped: Counter = Counter()
    sides: list[list[np.ndarray]] = [[], []]
    prompts: list[str] = []
    for split in splits:
        ds = load_pickapic_split(source, split)
        missing = {"jpg_0", "jpg_1", "caption"} - set(ds.column_names)
        if missing:
            raise ValueError(f"{source} [{split}] lacks column(s) {sorted(missing)} of the Pick-a-Pic schema")
        ds = ds.select_columns(["jpg_0", "jpg_1", "caption"])
        for row in tqdm(ds, desc=f"read {split}", disable=not progress, leave=False):
            if max_pairs is not None and len(prompts) >= max_pairs:
                break
            caption = row["caption"]
            if not caption or not str(caption).strip():
                skipped["empty_caption"] += 1
                continue
            try:
                parse_caption(caption)
            except ValueError:
                skipped["caption_not_in_grammar"] += 1
                continue
            try:
                pair = [np.asarray(decode_rgb(row[c]), dtype=np.uint8) for c in ("jpg_0", "jpg_1")]
            except Exception:  # noqa: BLE001 - any decoding failure of user data is counted, not fatal
                skipped["corrupt_image"] += 1
                continue
            if any(im.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) for im in pair):
                skipped["wrong_size"] += 1
                continue
            sides[0].append(pair[0])
            sides[1].append(pair[1])
            prompts.append(str(caption))
    empty = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    stack = lambda xs: np.stack(xs) if xs else empty  # noqa: E731
    return stack(sides[0]), stack(sides[1]), prompts, skipped


def build_pairs(cfg: RewardTrainConfig) -> tuple[AspectPairs, AspectPairs, dict[str, Any]]:
    """Train and held-out :class:`AspectPairs` for ``cfg`` (prompt-disjoint), plus a data report.

    Random streams (``np.random.SeedSequence(cfg.seed).spawn(3)``): rendering, the prompt split, the label draws
    (train pairs are labelled before held-out ones)."""
    render_ss, split_ss, label_ss = np.random.SeedSequence(cfg.seed).spawn(3)
    label_rng = np.random.default_rng(label_ss)
    report: dict[str, Any] = {"source": cfg.source}
    if cfg.source_kind == "rendered":
        i0, i1, prompts = render_pair_images(
            cfg.num_pairs, np.random.default_rng(render_ss), cfg.render_config(), cfg.progress
        )
        tr, ho = split_by_prompt(prompts, cfg.held_out_fraction, np.random.default_rng(split_ss))
        parts = {
            "train": (i0[tr], i1[tr], [prompts[i] for i in tr]),
            "held_out": (i0[ho], i1[ho], [prompts[i] for i in ho]),
        }
        report["render"] = asdict(cfg.render_config())
    else:
        source = resolve_source(cfg.source)
        report["source_path"] = source
        train_splits = [s for s in cfg.train_splits.split(",") if s]
        eval_splits = [s for s in cfg.eval_splits.split(",") if s]
        limit = cfg.max_train_pairs if eval_splits else None  # a prompt split needs the whole pool
        i0, i1, prompts, skipped = load_pickapic_images(source, train_splits, limit, cfg.progress)
        report["skipped"] = dict(skipped)
        if eval_splits:
            parts = {"train": (i0, i1, prompts)}
            e0, e1, ep, eskipped = load_pickapic_images(source, eval_splits, cfg.max_eval_pairs, cfg.progress)
            report["skipped_held_out"] = dict(eskipped)
            parts["held_out"] = (e0, e1, ep)
        else:
            tr, ho = split_by_prompt(prompts, cfg.held_out_fraction, np.random.default_rng(split_ss))
            parts = {
                "train": (i0[tr], i1[tr], [prompts[i] for i in tr]),
                "held_out": (i0[ho], i1[ho], [prompts[i] for i in ho]),
            }
        report["train_splits"], report["eval_splits"] = train_splits, eval_splits
    limits = {"train": cfg.max_train_pairs, "held_out": cfg.max_eval_pairs}
    out = {}
    for name, (a, b, p) in parts.items():
        if limits[name] is not None:
            a, b, p = a[: limits[name]], b[: limits[name]], p[: limits[name]]
        if len(p) == 0:
            raise ValueError(f"no usable {name} pairs from {cfg.source!r} (report: {report})")
        out[name] = judge_label_pairs(
            a,
            b,
            p,
            temperature=cfg.temperature,
            tie_margin=cfg.tie_margin,
            rng=label_rng,
            source=cfg.source,
            batch_size=cfg.judge_batch_size,
            progress=cfg.progress,
        )
    train_keys = {prompt_key(p) for p in out["train"].prompts}
    report["held_out_prompts_seen_in_train"] = int(
        sum(prompt_key(p) in train_keys for p in out["held_out"].prompts)
    )
    for name, pairs in out.items():
        report[name] = {
            "pairs": len(pairs),
            "prompts": len({prompt_key(p) for p in pairs.prompts}),
            "labels": pairs.label_counts(),
        }
    return out["train"], out["held_out"], report


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def pair_accuracy(
    score_0: np.ndarray | Tensor, score_1: np.ndarray | Tensor, label_0: np.ndarray
) -> dict[str, float | int | None]:
    """Pair accuracy of a predictor against labels ``P(image 0 preferred)`` ∈ {1, 0, 0.5}.

    Ties in the labels (0.5) are excluded; on the remaining ``n`` pairs a pair counts 1 when the predictor's score
    is higher for the preferred image, 0 when lower, 1/2 when the two scores are equal::

        accuracy = (#{sign(s0 − s1) = sign(2 p − 1)} + #{s0 = s1} / 2) / n

    Returns ``accuracy`` (None when n = 0), ``n``, ``correct`` (the fractional count), ``predictor_ties``,
    ``label_ties`` and the Wilson 95% interval ``ci_low``/``ci_high``."""
    from diffalign.utils.stats import wilson_interval

    conv = lambda x: x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)  # noqa: E731
    s0, s1, p = conv(score_0), conv(score_1), np.asarray(label_0, dtype=np.float64)
    if not (s0.shape == s1.shape == p.shape) or s0.ndim != 1:
        raise ValueError(
            f"score_0 {s0.shape}, score_1 {s1.shape} and label_0 {p.shape} must be equal 1-D shapes"
        )
    bad = ~np.isin(p, (0.0, 0.5, 1.0))
    if bad.any():
        raise ValueError(
            f"labels must be 1, 0 or 0.5; got {p[bad][:5].tolist()} at {np.flatnonzero(bad)[:5].tolist()}"
        )
    decisive = p != 0.5
    d = np.sign(s0[decisive] - s1[decisive])
    want = np.where(p[decisive] == 1.0, 1.0, -1.0)
    n = int(decisive.sum())
    correct = float(np.sum(d == want) + 0.5 * np.sum(d == 0))
    out: dict[str, float | int | None] = {
        "accuracy": correct / n if n else None,
        "n": n,
        "correct": correct,
        "predictor_ties": int(np.sum(d == 0)),
        "label_ties": int((~decisive).sum()),
        "ci_low": None,
        "ci_high": None,
    }
    if n:
        out["ci_low"], out["ci_high"] = wilson_interval(correct, n)
    return out


def accuracy_table(
    scores_0: Mapping[str, np.ndarray | Tensor],
    scores_1: Mapping[str, np.ndarray | Tensor],
    labels: Mapping[str, np.ndarray],
    aspects: Sequence[str] = VISIONPREFER_ASPECTS,
) -> dict[str, dict[str, Any]]:
    """:func:`pair_accuracy` for every aspect and ``"overall"`` (the predictor's key of the same name, or its
    single key ``"*"`` for every label), plus ``"pooled"`` (all aspects' decisions together)."""
    pick = lambda s, k: s[k] if k in s else s["*"]  # noqa: E731
    conv = lambda x: x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)  # noqa: E731
    out = {k: pair_accuracy(pick(scores_0, k), pick(scores_1, k), labels[k]) for k in (*aspects, "overall")}
    out["pooled"] = pair_accuracy(
        np.concatenate([conv(pick(scores_0, a)) for a in aspects]),
        np.concatenate([conv(pick(scores_1, a)) for a in aspects]),
        np.concatenate([labels[a] for a in aspects]),
    )
    return out


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


def _fmt_acc(r: Mapping[str, Any]) -> str:
    if r["accuracy"] is None:
        return "-"
    return f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n={r['n']})"


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """The held-out accuracy table: rows = aspects, overall, pooled; columns = model, baselines, chance."""
    from diffalign.utils.markdown import markdown_table

    ev = metrics["held_out"]
    rows = []
    for k in (*VISIONPREFER_ASPECTS, "overall", "pooled"):
        rows.append(
            [
                k,
                _fmt_acc(ev["model"][k]),
                _fmt_acc(ev["sandbox_clip"][k]),
                _fmt_acc(ev["judge_scores"][k]),
                "0.500",
            ]
        )
    header = [
        "aspect",
        "trained model",
        "backbone CLIP cosine",
        "judge scores (label-noise ceiling)",
        "chance",
    ]
    return markdown_table(header, rows)


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


__all__ = [
    "AspectPairs",
    "LABEL_KEYS",
    "PairTensors",
    "RenderConfig",
    "RewardTrainConfig",
    "accuracy_table",
    "build_pairs",
    "cosine_from_features",
    "feature_stats",
    "fit",
    "fit_overall_weights",
    "fold_standardization",
    "head_scores",
    "joint_features",
    "judge_label_pairs",
    "judge_scores",
    "label_aspects",
    "label_tensors",
    "load_pickapic_images",
    "metrics_markdown",
    "multi_aspect_loss",
    "pair_accuracy",
    "pixel_values",
    "prompt_key",
    "render_pair_images",
    "score_pairs",
    "split_by_prompt",
    "train_reward_model",
]
