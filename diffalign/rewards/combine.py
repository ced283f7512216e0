"""Combining rewards: a normalised weighted sum, and RPO's λ-Harmonic reward.

CombinedReward
--------------
``r(x, c) = Σ_k w_k · norm_k(r_k(x, c))`` with, per component ``k``:

- ``normalize="none"``:   ``norm(s) = s``;
- ``normalize="zscore"``: ``norm(s) = (s − μ_k) / σ_k``;
- ``normalize="minmax"``: ``norm(s) = (s − min_k) / (max_k − min_k)``.

Statistics are **fixed** when given in ``stats`` (``{name: {"mean": μ, "std": σ}}`` or ``{"min": .., "max": ..}``,
e.g. measured once on the evaluation prompts and stored in the config, so that scores are comparable across runs),
and **running** otherwise: every scored batch first updates the component's statistics (Welford mean and population
variance over all scores seen so far; min/max so far), then is normalised with them. Running statistics make the
first batches' values depend on the batch order; use fixed statistics for evaluation. While σ is 0 (a single score
seen) it is replaced by 1; a zero range ``max − min`` likewise by 1. Statistics are computed on detached scores, so
gradients (differentiable components) flow only through ``s``.

λ-Harmonic (RPO, arXiv 2407.12164)
----------------------------------
``s_img`` = mean cosine between the generated image and the reference images, ``s_txt`` = text–image cosine, each
mapped to [0, 1] by ``(cos + 1) / 2``; ``r = 1 / (λ / s_img + (1 − λ) / s_txt)`` (a weighted harmonic mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from diffalign.rewards.base import ImageInput, Reward, check_prompts

NORMALIZATIONS = ("none", "zscore", "minmax")


class RunningStats:
    """Running mean / population variance (Welford, batched) and min / max of a stream of scores."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def update(self, x: Tensor) -> None:
        """Add a batch ``[B]`` (Chan et al. parallel update of mean and sum of squared deviations)."""
        x = x.detach().double().flatten()
        x = x[torch.isfinite(x)]
        b = int(x.numel())
        if b == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        delta = b_mean - self.mean
        total = self.n + b
        self.mean += delta * b / total
        self.m2 += b_m2 + delta * delta * self.n * b / total
        self.n = total
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))

    @property
    def std(self) -> float:
        """Population standard deviation of everything seen (0 before two values)."""
        return math.sqrt(self.m2 / self.n) if self.n > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max, "n": self.n}


class CombinedReward:
    """Weighted sum of normalised rewards (see the module docstring).

    Args:
        components: ``[(reward, weight), ...]``; reward names must be distinct.
        normalize: ``"none"``, ``"zscore"`` or ``"minmax"``.
        stats: fixed statistics per reward name (see the module docstring); names not listed use running ones.
        name: the combined score's name.
    """

    def __init__(
        self,
        components: Sequence[tuple[Reward, float]],
        normalize: str = "zscore",
        stats: Mapping[str, Mapping[str, float]] | None = None,
        *,
        name: str = "combined",
    ) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not components:
            raise ValueError("CombinedReward needs at least one (reward, weight) component")
        names = [r.name for r, _ in components]
        if len(set(names)) != len(names):
            raise ValueError(f"component rewards need distinct names, got {names}")
        stats = dict(stats or {})
        unknown = set(stats) - set(names)
        if unknown:
            raise ValueError(f"stats given for unknown rewards {sorted(unknown)}; components are {names}")
        needed = {"zscore": ("mean", "std"), "minmax": ("min", "max")}.get(normalize, ())
        for key, s in stats.items():
            missing = [f for f in needed if f not in s]
            if missing:
                raise ValueError(f"stats[{key!r}] lacks {missing} needed by normalize={normalize!r}")
        self.components = [(r, float(w)) for r, w in components]
        self.normalize = normalize
        self.fixed_stats = {k: dict(v) for k, v in stats.items()}
        self.running = {n: RunningStats() for n in names}
        self.name = name
        self.aspects = tuple(names)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], loader: Callable[..., Reward] | None = None, **load_kwargs
    ):
        """Build from a config dict (a ``kind: combined`` manifest)::

            {"name": "combined", "normalize": "zscore",
             "components": [{"reward": "pickscore", "weight": 10.0}, ...],
             "stats": {"pickscore": {"mean": 21.0, "std": 1.0}}}

        ``reward`` is a catalog name or manifest path, loaded with ``loader`` (default
        :func:`diffalign.rewards.catalog.load_reward`) and ``load_kwargs`` (device, dtype, ...).
        """
        if loader is None:
            from diffalign.rewards.catalog import load_reward as loader
        comps = config.get("components")
        if not comps:
            raise ValueError("combined reward config needs a non-empty 'components' list of {reward, weight}")
        built = []
        for i, c in enumerate(comps):
            if "reward" not in c or "weight" not in c:
                raise ValueError(f"components[{i}] = {c!r} needs both 'reward' and 'weight'")
            built.append((loader(c["reward"], **load_kwargs), float(c["weight"])))
        return cls(
            built,
            normalize=config.get("normalize", "zscore"),
            stats=config.get("stats"),
            name=config.get("name", "combined"),
        )

    def _normalise(self, name: str, s: Tensor) -> Tensor:
        if self.normalize == "none":
            return s
        if name in self.fixed_stats:
            st = self.fixed_stats[name]
        else:
            self.running[name].update(s)
            st = self.running[name].as_dict()
        if self.normalize == "zscore":
            std = float(st["std"]) or 1.0
            return (s - float(st["mean"])) / std
        span = (float(st["max"]) - float(st["min"])) or 1.0
        return (s - float(st["min"])) / span

    def score_aspects(self, images: ImageInput, prompts: Sequence[str] | str) -> dict[str, Tensor]:
        """Raw score of every component under its name, plus the combined score under ``self.name``."""
        prompts = check_prompts(images, prompts)
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for reward, weight in self.components:
            s = reward.score(images, prompts).float()
            out[reward.name] = s
            term = weight * self._normalise(reward.name, s)
            total = term if total is None else total + term.to(total.device)
        out[self.name] = total
        return out

    def score(self, images: ImageInput, prompts: Sequence[str] | str) -> Tensor:
        return self.score_aspects(images, prompts)[self.name]

    def stats(self) -> dict[str, dict[str, float]]:
        """Statistics in use per component (fixed ones as given, running ones so far): store them in a config to
        freeze the normalisation."""
        return {n: self.fixed_stats.get(n, self.running[n].as_dict()) for n in self.aspects}


def lambda_harmonic(cos_img: Tensor, cos_txt: Tensor, lam: float) -> Tensor:
    """RPO's λ-Harmonic reward ``1 / (λ / s_img + (1 − λ) / s_txt)`` with ``s = (cos + 1) / 2``; shapes ``[B]``.

    ``λ = 0`` gives ``s_txt``, ``λ = 1`` gives ``s_img``. E.g. cos_img 0.6, cos_txt 0.2, λ 0.5:
    ``s = 0.8, 0.6`` → ``1 / (0.625 + 0.8333) = 0.68571``.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    s_img = (cos_img + 1.0) / 2.0
    s_txt = (cos_txt + 1.0) / 2.0
    return 1.0 / (lam / s_img + (1.0 - lam) / s_txt)


class LambdaHarmonicReward:
    """RPO's subject-driven reward with a CLIP model (an ``OpenClipReward`` or ``HFClipReward``) and reference images.

    Args:
        clip: a CLIP reward exposing ``pixel_values``, ``image_features`` and ``text_features``.
        reference_images: the subject's reference images (any accepted image input).
        lam: λ (RPO: 0.3 favours the text, 0.7 the subject's identity).
    """

    def __init__(
        self, clip, reference_images: ImageInput, lam: float = 0.5, *, name: str = "lambda-harmonic"
    ) -> None:
        self.clip = clip
        self.lam = float(lam)
        self.name = name
        self.aspects = ("s_img", "s_txt")
        with torch.no_grad():
            self.reference = self._normalised_image_features(reference_images).detach()  # [R, D]

    def _normalised_image_features(self, images: ImageInput) -> Tensor:
        f = self.clip.image_features(self.clip.pixel_values(images)).float()
        return f / f.norm(dim=-1, keepdim=True)

    def score_aspects(self, images: ImageInput, prompts: Sequence[str] | str) -> dict[str, Tensor]:
        prompts = check_prompts(images, prompts)
        grad = torch.enable_grad() if getattr(self.clip, "differentiable", False) else torch.no_grad()
        with grad:
            u = self._normalised_image_features(images)  # [B, D]
            v = self.clip.text_features(prompts).float()
            v = v / v.norm(dim=-1, keepdim=True)
            cos_img = (u @ self.reference.T).mean(dim=1)  # mean over reference images
            cos_txt = (u * v).sum(-1)
            r = lambda_harmonic(cos_img, cos_txt, self.lam)
        return {"s_img": (cos_img + 1) / 2, "s_txt": (cos_txt + 1) / 2, self.name: r}

    def score(self, images: ImageInput, prompts: Sequence[str] | str) -> Tensor:
        return self.score_aspects(images, prompts)[self.name]
