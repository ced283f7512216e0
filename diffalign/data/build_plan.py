"""The plan of a preference-data build (:mod:`diffalign.data.builder`): its configuration and everything decided
about each pair before any image exists (pure numpy, deterministic given ``seed``).

Captions come from the world's distribution (``captions.sample_spec`` + ``caption_text`` with a random prefix from
``captions.PREFIXES``). Every pair gets two generator names drawn independently and uniformly from the generator list
(so about 1/len(generators) of the pairs compare two samples of the same model, as in Pick-a-Pic), two noise seeds, a
simulated user (uniform over the user ids) and one uniform number for the Bradley–Terry draw.

Splits (all prompt-disjoint at the level of the caption *spec*, i.e. ignoring the prefix: "a red circle" in train
and "an icon of a red circle" in test would leak, so that cannot happen)
    ``validation_unique``, ``test_unique``: ``num_unique`` prompts each, **one pair per prompt**, distinct specs.
    ``validation``, ``test``: ``num_validation_prompts`` / ``num_test_prompts`` prompts with distinct specs,
    ``pairs_per_prompt`` pairs each. ``train``: ``num_train_prompts`` prompts, ``pairs_per_prompt`` pairs each,
    whose specs avoid every held-out spec. The world has 7,560 distinct specs (about 6,900 reachable in practice),
    so large train sets must repeat captions: a train caption already drawn is redrawn up to
    ``max_caption_redraws`` times and then accepted (counted as ``repeated_captions`` in the report), as the same
    prompt is typed many times in Pick-a-Pic. ``pairs_per_prompt = (a, b)``: each prompt gets ``k ~ U{a..b}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..sandbox.captions import PREFIXES, CaptionSpec, caption_text, sample_spec
from .labelling import LABELLERS
from .schema import PICKAPIC_SPLITS

HELD_OUT_SPLITS: tuple[str, ...] = ("validation_unique", "test_unique", "validation", "test")
"""Held-out splits in the order their prompts are drawn (each spec used at most once over all of them)."""


# ---------------------------------------------------------------------------------------------------------------
# Configuration


def parse_pairs_per_prompt(value: str | int | Sequence[int]) -> tuple[int, int]:
    """``3`` or ``"3"`` -> (3, 3) (exactly 3 pairs per prompt); ``"1-4"`` or ``(1, 4)`` -> (1, 4) (uniform)."""
    if isinstance(value, str):
        lo, sep, hi = value.partition("-")
        try:
            bounds = (int(lo), int(hi) if sep else int(lo))
        except ValueError as err:
            raise ValueError(f"pairs per prompt {value!r} must be 'N' or 'A-B' (e.g. '1-4')") from err
    elif isinstance(value, int):
        bounds = (value, value)
    else:
        bounds = (int(value[0]), int(value[1]))
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"pairs per prompt {value!r}: need 1 <= A <= B")
    return bounds


@dataclass
class BuilderConfig:
    """Every knob of a preference-data build. Defaults are the shipped sandbox dataset: 4,494 pairs, 7.3 MB.

    Size: a 32x32 JPEG (quality 95, 4:4:4) of the sandbox models is ~1.23 KB, but every such file repeats the same
    ~600 bytes of quantisation and Huffman tables, which Parquet's compression removes: ~1.6 KB per pair on disk
    (measured on the shipped data: 3,509 train pairs = 5.70 MB)."""

    seed: int = 0  # seeds the plan (prompts, models, noise seeds, users, label draws): deterministic builds
    num_train_prompts: int = 1400  # train prompts (~3,500 pairs); captions repeat only when specs run out
    pairs_per_prompt: tuple[int, int] = (1, 4)  # pairs per prompt ~ U{a..b} in train/validation/test
    num_validation_prompts: int = 120  # validation prompts (distinct specs)
    num_test_prompts: int = 120  # test prompts (distinct specs)
    num_unique: int = 200  # prompts (= pairs) in each of validation_unique and test_unique
    num_inference_steps: int = 20  # DDIM steps per image
    eta: float = 0.0  # DDIM eta (0: deterministic given the initial noise)
    resolution: int | None = None  # image side; None: the pipeline's default (32 for the sandbox)
    batch_size: int = 64  # prompts per pipeline call
    chunk_pairs: int = 1024  # pairs sampled and labelled together (bounds memory for large builds)
    labeller: str = "users"  # "users" (each pair labelled by its simulated user) or "judge" (judge "overall")
    user_ids: tuple[int, ...] | None = None  # ids pairs are assigned to; None: the simulated users' (1..4)
    temperature: float = 0.05  # Bradley–Terry temperature T: P(0 preferred) = σ((s0 − s1)/T)
    tie_margin: float = 0.015  # |s0 − s1| below this -> tie (0.5/0.5): ~10% ties (Pick-a-Pic v2: ~11%)
    jpeg_quality: int = 95  # JPEG quality of the stored images (4:4:4 chroma)
    max_caption_redraws: int = 20  # redraws of an already-used train caption before a repeat is accepted

    @classmethod
    def quick(cls, **overrides: Any) -> BuilderConfig:
        """A few dozen pairs (used by tests and for a smoke run): 12 train prompts, 4 per held-out split."""
        small: dict[str, Any] = dict(
            num_train_prompts=12,
            pairs_per_prompt=(1, 2),
            num_validation_prompts=4,
            num_test_prompts=4,
            num_unique=4,
            num_inference_steps=10,
            batch_size=32,
        )
        small.update(overrides)
        return cls(**small)

    def __post_init__(self) -> None:
        self.pairs_per_prompt = parse_pairs_per_prompt(self.pairs_per_prompt)
        for name in ("num_train_prompts", "num_validation_prompts", "num_test_prompts", "num_unique"):
            if getattr(self, name) < 0:
                raise ValueError(f"BuilderConfig.{name}={getattr(self, name)} must be >= 0")
        for name in ("num_inference_steps", "batch_size", "chunk_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"BuilderConfig.{name}={getattr(self, name)} must be >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"BuilderConfig.temperature={self.temperature} must be a finite number >= 0")
        if not self.tie_margin >= 0:
            raise ValueError(f"BuilderConfig.tie_margin={self.tie_margin} must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"BuilderConfig.jpeg_quality={self.jpeg_quality} must lie in 1..100")
        if self.labeller not in LABELLERS:
            raise ValueError(f"BuilderConfig.labeller={self.labeller!r} is not one of {sorted(LABELLERS)}")
        if self.user_ids is not None:
            self.user_ids = tuple(int(u) for u in self.user_ids)
            if not self.user_ids:
                raise ValueError("BuilderConfig.user_ids must name at least one user (or be None)")

    @property
    def mean_pairs_per_prompt(self) -> float:
        return (self.pairs_per_prompt[0] + self.pairs_per_prompt[1]) / 2

    def expected_pairs(self) -> dict[str, float]:
        """Expected pairs per split (prompts × mean pairs per prompt; exactly ``num_unique`` for unique splits)."""
        m = self.mean_pairs_per_prompt
        return {
            "train": self.num_train_prompts * m,
            "validation": self.num_validation_prompts * m,
            "test": self.num_test_prompts * m,
            "validation_unique": float(self.num_unique),
            "test_unique": float(self.num_unique),
        }


# ---------------------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class PairPlan:
    """Everything decided about one pair before any image exists."""

    split: str
    ranking_id: int
    caption: str
    spec: CaptionSpec
    prompt_index: int  # index of the prompt within its split
    model_0: str
    model_1: str
    seed_0: int
    seed_1: int
    user_id: int
    draw: float  # u ~ U[0, 1) for the Bradley–Terry draw


def _draw_caption(rng: np.random.Generator) -> tuple[CaptionSpec, str]:
    spec = sample_spec(rng)
    return spec, caption_text(spec, PREFIXES[rng.integers(len(PREFIXES))])


def draw_held_out_prompts(
    rng: np.random.Generator, counts: Mapping[str, int]
) -> dict[str, list[tuple[CaptionSpec, str]]]:
    """Draw ``counts[split]`` prompts per held-out split (in :data:`HELD_OUT_SPLITS` order), every spec distinct
    over all of them. Raises ``ValueError`` when the world runs out of distinct specs."""
    used: set[CaptionSpec] = set()
    out: dict[str, list[tuple[CaptionSpec, str]]] = {}
    for split in HELD_OUT_SPLITS:
        prompts: list[tuple[CaptionSpec, str]] = []
        attempts, max_attempts = 0, 1000 * max(counts.get(split, 0), 1)
        while len(prompts) < counts.get(split, 0):
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(
                    f"could not find {counts[split]} distinct caption specs for split {split!r} after "
                    f"{max_attempts:,} draws ({len(used):,} specs already held out); the sandbox world has about "
                    "6,900 reachable specs: ask for fewer held-out prompts (--num-unique, --num-validation-prompts, "
                    "--num-test-prompts)"
                )
            spec, caption = _draw_caption(rng)
            if spec in used:
                continue
            used.add(spec)
            prompts.append((spec, caption))
        out[split] = prompts
    return out


def draw_train_prompts(
    rng: np.random.Generator, n: int, held_out: set[CaptionSpec], max_redraws: int
) -> tuple[list[tuple[CaptionSpec, str]], int]:
    """``n`` train prompts whose specs avoid ``held_out``; an already-drawn caption is redrawn up to ``max_redraws``
    times, then accepted. Returns ``(prompts, number of repeated captions accepted)``."""
    seen: set[str] = set()
    prompts: list[tuple[CaptionSpec, str]] = []
    repeats = draws = 0
    limit = 10_000 * max(n, 1)
    while len(prompts) < n:
        redraws = 0
        while True:
            spec, caption = _draw_caption(rng)
            draws += 1
            if draws > limit:
                raise ValueError(
                    f"drew {limit:,} captions without finding {n} train prompts outside the {len(held_out):,} "
                    "held-out specs; hold out fewer prompts"
                )
            if spec in held_out:
                continue  # never a train prompt; does not count as a redraw
            if caption not in seen:
                break
            redraws += 1
            if redraws > max_redraws:
                repeats += 1
                break
        seen.add(caption)
        prompts.append((spec, caption))
    return prompts, repeats


def plan_pairs(
    cfg: BuilderConfig, generator_names: Sequence[str], user_ids: Sequence[int]
) -> tuple[dict[str, list[PairPlan]], dict[str, int]]:
    """The full plan of a build: ``({split: [PairPlan, ...]}, {"repeated_captions": n})``.

    Random streams (``np.random.SeedSequence(seed).spawn(2)``): one for the prompts, one for everything about the
    pairs (models, seeds, users, draws), so changing the generator list leaves the prompts unchanged. Splits are
    planned in :data:`PICKAPIC_SPLITS` order and ``ranking_id`` counts up from 1 over all of them.
    """
    if not generator_names:
        raise ValueError("at least one generator is needed")
    if len(set(generator_names)) != len(generator_names):
        raise ValueError(f"generator names must be distinct, got {list(generator_names)}")
    if not user_ids:
        raise ValueError("at least one user id is needed")
    prompt_ss, pair_ss = np.random.SeedSequence(cfg.seed).spawn(2)
    prompt_rng, pair_rng = np.random.default_rng(prompt_ss), np.random.default_rng(pair_ss)
    held = draw_held_out_prompts(
        prompt_rng,
        {
            "validation_unique": cfg.num_unique,
            "test_unique": cfg.num_unique,
            "validation": cfg.num_validation_prompts,
            "test": cfg.num_test_prompts,
        },
    )
    held_specs = {spec for prompts in held.values() for spec, _ in prompts}
    train, repeats = draw_train_prompts(
        prompt_rng, cfg.num_train_prompts, held_specs, cfg.max_caption_redraws
    )
    prompts_by_split = {"train": train, **held}
    names = list(generator_names)
    users = [int(u) for u in user_ids]
    plans: dict[str, list[PairPlan]] = {}
    ranking_id = 1
    lo, hi = cfg.pairs_per_prompt
    for split in PICKAPIC_SPLITS:
        rows = []
        for p, (spec, caption) in enumerate(prompts_by_split[split]):
            k = 1 if split.endswith("_unique") else int(pair_rng.integers(lo, hi + 1))
            for _ in range(k):
                m0, m1 = pair_rng.integers(len(names), size=2)
                s0, s1 = pair_rng.integers(0, 2**31 - 1, size=2)
                user = users[int(pair_rng.integers(len(users)))]
                draw = float(pair_rng.random())
                rows.append(
                    PairPlan(
                        split,
                        ranking_id,
                        caption,
                        spec,
                        p,
                        names[m0],
                        names[m1],
                        int(s0),
                        int(s1),
                        user,
                        draw,
                    )
                )
                ranking_id += 1
        plans[split] = rows
    return plans, {"repeated_captions": repeats}
