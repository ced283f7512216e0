"""Multi-aspect preference pairs for training a VP-Score-style reward model (:mod:`diffalign.training.reward_model`).

Data (:class:`AspectPairs`)
    Image pairs ``(x0, x1)`` of one prompt, each aspect ``a`` labelled by the sandbox judge (the raters of this
    world) with Bradley–Terry noise, exactly as the preference-data builder labels ``overall``
    (:func:`diffalign.data.labelling.bradley_terry_labels`)::

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
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffalign.rewards.multi_aspect import VISIONPREFER_ASPECTS
from diffalign.rewards.reward_model_config import RenderConfig, RewardTrainConfig, resolve_source

LABEL_KEYS: tuple[str, ...] = (*VISIONPREFER_ASPECTS, "overall")
"""Judge keys labelled for every pair: the four aspects, then the judge's ``overall``."""


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
    the preference builder's :func:`~diffalign.data.labelling.bradley_terry_labels`."""
    from diffalign.data.labelling import bradley_terry_labels

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


def render_pair_images(
    n: int,
    rng: np.random.Generator,
    cfg: RenderConfig = RenderConfig(),  # noqa: B008 - a frozen dataclass: immutable, safe as a default
    progress: bool = False,
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
