"""The reward catalog: one YAML manifest per reward model in ``reward_models/``, and ``load_reward``.

Manifest fields (``reward_models/README.md`` has the full description)::

    name: pickscore                 # the catalog name (= the file stem)
    kind: hf_clip                   # builder, one of KINDS
    description: ...
    weights:                        # named weight locations (may be empty)
      model:
        path: weights/pickscore     # absolute, or relative to a weights directory (see below)
        source: "hub: yuvalkirstain/PickScore_v1"     # where to get it (text, never fetched)
        get: "huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir <path>"
    params: {score: pickscore}      # keyword arguments of the builder
    preprocessing: ...              # text: the authors' preprocessing
    output_scale: ...               # text: range and meaning of the score
    licence: ...
    reference: ...

A relative weight path is looked up, in order, under ``weights_dir`` (argument of :func:`load_reward`), each entry of
the ``DIFFALIGN_REWARD_WEIGHTS`` environment variable (``os.pathsep``-separated), and the manifest's own folder
(``reward_models/``). Nothing is ever downloaded: a missing file raises :class:`MissingWeightsError` naming the
file, where to get it and where to put it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

# the manifest and weight rules live with the configuration check, which must not import torch; re-exported here
from diffalign.preflight import (  # noqa: F401
    WEIGHTS_ENV,
    MissingWeightsError,
    resolve_weights,
    reward_manifest,
    reward_names,
    weight_search_dirs,
)
from diffalign.rewards.base import Reward
from diffalign.sandbox import REWARD_MODELS_DIR

CATALOG_DIR = REWARD_MODELS_DIR  # reward_models/ of the checkout, or its copy inside an installed wheel
REQUIRED_FIELDS = (
    "name",
    "kind",
    "description",
    "weights",
    "params",
    "preprocessing",
    "output_scale",
    "licence",
)


# ---------------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------------


def list_rewards(catalog_dir: str | os.PathLike = CATALOG_DIR) -> list[str]:
    """Names of the shipped manifests (``reward_models/*.yaml``), sorted."""
    return reward_names(catalog_dir)


def manifest_path(name_or_path: str | os.PathLike, catalog_dir: str | os.PathLike = CATALOG_DIR) -> Path:
    """Resolve a catalog name (``"pickscore"``) or a manifest file path to the manifest file (the rule lives in
    :func:`diffalign.preflight.reward_manifest`, which the configuration check uses without importing torch)."""
    return reward_manifest(name_or_path, catalog_dir)


def load_manifest(
    name_or_path: str | os.PathLike, catalog_dir: str | os.PathLike = CATALOG_DIR
) -> dict[str, Any]:
    """Read and validate a manifest; adds ``_path`` (the manifest file). Raises ``ValueError`` naming the field."""
    path = manifest_path(name_or_path, catalog_dir)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a manifest must be a YAML mapping, got {type(data).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing} (required: {list(REQUIRED_FIELDS)})")
    if data["kind"] not in KINDS:
        raise ValueError(f"{path}: kind {data['kind']!r} is not one of {sorted(KINDS)}")
    if not isinstance(data["weights"] or {}, dict) or not isinstance(data["params"] or {}, dict):
        raise ValueError(f"{path}: 'weights' and 'params' must be mappings (may be empty: {{}})")
    for key, w in (data["weights"] or {}).items():
        if not isinstance(w, dict) or "path" not in w or "source" not in w:
            raise ValueError(f"{path}: weights.{key} needs 'path' and 'source' (where to get it)")
    data["weights"] = data["weights"] or {}
    data["params"] = data["params"] or {}
    data["_path"] = path
    return data


# ---------------------------------------------------------------------------------------------------------------
# Builders: kind -> fn(weights: dict[str, Path], params: dict, device, dtype) -> Reward
# ---------------------------------------------------------------------------------------------------------------


def _build_open_clip(weights, params, device, dtype):
    from diffalign.rewards.clip import OpenClipReward

    params = dict(params)
    arch = params.pop("arch")
    return OpenClipReward.from_pretrained(
        arch,
        weights["checkpoint"],
        model_config=weights.get("model_config"),
        device=device,
        dtype=dtype,
        **params,
    )


def _build_hps(weights, params, device, dtype):
    from diffalign.rewards.hps import load_hps

    return load_hps(
        weights["checkpoint"], model_config=weights.get("model_config"), device=device, dtype=dtype, **params
    )


def _build_hf_clip(weights, params, device, dtype):
    from diffalign.rewards.hf_clip import HFClipReward

    return HFClipReward.from_pretrained(
        weights["model"], weights.get("processor"), device=device, dtype=dtype, **params
    )


def _build_aesthetic(weights, params, device, dtype):
    from diffalign.rewards.aesthetic import AestheticReward

    return AestheticReward.from_pretrained(
        weights["clip"],
        weights["head"],
        model_config=weights.get("model_config"),
        device=device,
        dtype=dtype,
        **params,
    )


def _build_multi_aspect(weights, params, device, dtype):
    from diffalign.rewards.multi_aspect import MultiAspectReward

    return MultiAspectReward.from_pretrained(weights["checkpoint"], device=device, dtype=dtype, **params)


def _build_imagereward(weights, params, device, dtype):
    from diffalign.rewards.imagereward import load_imagereward

    return load_imagereward(weights, device=device, dtype=dtype, **params)


def _build_sandbox_judge(weights, params, device, dtype):
    from diffalign.rewards.sandbox import SandboxJudgeReward

    return SandboxJudgeReward(device=device, **params)


def _build_random_control(weights, params, device, dtype):
    from diffalign.rewards.control import RandomControlReward

    return RandomControlReward(device=device, **params)


def _build_sandbox_clip(weights, params, device, dtype):
    from diffalign.rewards.sandbox import sandbox_clip_reward

    return sandbox_clip_reward(weights["model"], device=device, dtype=dtype, **params)


def _build_image_features(weights, params, device, dtype):
    """A feature backbone (DreamBench's DINO metric), not a reward: it embeds images and has no ``score``."""
    from diffalign.rewards.features import ImageFeatureExtractor

    return ImageFeatureExtractor.from_pretrained(weights["model"], device=device, dtype=dtype, **params)


KINDS: dict[str, Callable[..., Reward]] = {
    "open_clip": _build_open_clip,
    "hps": _build_hps,
    "hf_clip": _build_hf_clip,
    "aesthetic": _build_aesthetic,
    "multi_aspect": _build_multi_aspect,
    "imagereward": _build_imagereward,
    "sandbox_judge": _build_sandbox_judge,
    "sandbox_clip": _build_sandbox_clip,
    "random_control": _build_random_control,  # no preference at all: the control for "did the method follow its reward?"
    "image_features": _build_image_features,  # embeddings for DreamBench metrics (dino-vits16), no score
    "combined": None,  # built by CombinedReward.from_config (components are loaded recursively)
}


def load_reward(
    name_or_path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | os.PathLike | None = None,
    catalog_dir: str | os.PathLike = CATALOG_DIR,
    **overrides: Any,
) -> Reward:
    """Load a reward by catalog name (``"pickscore"``) or manifest path.

    Args:
        device, dtype: where and in which precision the model runs (scores are always float32).
        weights_dir: an extra folder searched first for relative weight paths.
        overrides: builder keyword arguments overriding the manifest's ``params`` (e.g. ``batch_size=8``,
            ``differentiable=True``, ``aspect="aesthetic"``).

    Raises:
        ValueError: unknown name or invalid manifest (lists the valid names / names the field).
        MissingWeightsError: a weight file is missing (names it, its source and where to put it).
    """
    manifest = load_manifest(name_or_path, catalog_dir)
    if manifest["kind"] == "combined":
        from diffalign.rewards.combine import CombinedReward

        cfg = {**manifest["params"], **overrides}
        cfg.setdefault("name", manifest["name"])
        return CombinedReward.from_config(
            cfg,
            device=device,
            dtype=dtype,
            weights_dir=weights_dir,
            catalog_dir=Path(manifest["_path"]).parent,
        )
    weights = resolve_weights(manifest, weights_dir)
    params = {**manifest["params"], **overrides}
    return KINDS[manifest["kind"]](weights, params, device, dtype)
