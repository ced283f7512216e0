"""Models for benchmarks: a base pipeline, and "variants" of it (a LoRA, a full UNet, another pipeline, a training
run's output or checkpoint) applied temporarily, so base and variant images come from the same code with the same
seeds.

What a model path may be (:func:`resolve_variant`, checked in this order):

=====================================  ===========  =====================================================
directory holds                        kind         applied as
=====================================  ===========  =====================================================
``pytorch_lora_weights.safetensors``   ``lora``     ``pipe.load_lora_weights(dir)`` (unloaded afterwards)
``model_index.json``                   ``pipeline`` a second pipeline loaded from ``dir``
``config.json`` of a UNet              ``unet``     ``UNet2DConditionModel.from_pretrained(dir)`` swapped in
``unet/config.json`` (no model_index)  ``unet``     as above, from ``dir/unet``
``model.safetensors`` (accelerate)     ``unet_state`` a copy of the base UNet with that state dict (full-FT
                                                    checkpoint ``checkpoint-N`` written by ``save_state``)
``lora/`` or ``unet/`` (a run dir)     (its kind)   the run's exported weights
``checkpoint-N/`` (a run dir)          (its kind)   the newest complete checkpoint
=====================================  ===========  =====================================================

``"base"`` (or ``None``) is the base itself, and ``"sandbox-early"`` the sandbox's early UNet (``SANDBOX_UNET_EARLY``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import _help
from ..errors import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class SamplingConfig:
    """Sampling settings shared by the benchmarks (their configs extend it; the flags have the same names)."""

    steps: int = _help("sampling steps", 20)
    guidance: float = _help("classifier-free guidance scale", 5.0)
    negative_prompt: str | None = _help("negative prompt (for base and aligned alike)", None)
    height: int | None = _help("image height in pixels (None: the pipeline's default)", None)
    width: int | None = _help("image width in pixels (None: same as height)", None)
    batch_size: int = _help("images per sampling batch", 32)
    device: str = _help("'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...", "auto")
    dtype: str = _help("pipeline precision: float32 | float16 | bfloat16", "float32")

    def generate_kwargs(self) -> dict:
        """The keyword arguments of :func:`diffalign.eval.compare.generate` these settings give."""
        return dict(
            steps=self.steps,
            guidance=self.guidance,
            batch_size=self.batch_size,
            negative_prompt=self.negative_prompt,
            height=self.height,
            width=self.width or self.height,
        )


@dataclass(frozen=True)
class Variant:
    """A resolved model variant: ``kind`` in ``base | lora | unet | pipeline | unet_state`` and its ``path``."""

    kind: str
    path: Path | None
    spec: str

    def describe(self) -> str:
        return "base" if self.kind == "base" else f"{self.kind} from {self.path}"


def _is_unet_config(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return data.get("_class_name") == "UNet2DConditionModel" or "cross_attention_dim" in data


def resolve_variant(spec: str | Path | None) -> Variant:
    """Recognise what a model directory holds (module docstring). Raises ``FileNotFoundError`` / ``ValueError``
    naming the directory and what was expected."""
    if spec is None or str(spec) == "base":
        return Variant("base", None, "base")
    if str(spec) == "sandbox-early":
        from ..sandbox import SANDBOX_UNET_EARLY

        spec = SANDBOX_UNET_EARLY
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {str(spec)!r} not found: give a LoRA directory (with {LORA_FILE}), a UNet directory "
            "(save_pretrained), a pipeline directory (model_index.json), a training run's output directory or one "
            "of its checkpoint-N directories"
        )
    if (path / LORA_FILE).is_file():
        return Variant("lora", path, str(spec))
    if (path / "model_index.json").is_file():
        return Variant("pipeline", path, str(spec))
    if _is_unet_config(path):
        return Variant("unet", path, str(spec))
    if _is_unet_config(path / "unet"):
        return Variant("unet", path / "unet", str(spec))
    if (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file():
        return Variant("unet_state", path, str(spec))
    if (path / "lora" / LORA_FILE).is_file():
        return Variant("lora", path / "lora", str(spec))
    ckpts = sorted((int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := _CKPT.match(p.name)))
    if ckpts:
        return resolve_variant(ckpts[-1][1])
    raise ValueError(
        f"{path} holds no model diffalign recognises (looked for {LORA_FILE}, model_index.json, a UNet config.json, "
        "unet/, lora/, model.safetensors, checkpoint-N/); point at the run's lora/ or unet/ directory"
    )


def load_base_pipeline(base: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from ``"sandbox"`` or a pipeline directory / hub id already in the cache (no
    downloads), on ``device`` with progress bars of the pipeline itself disabled (the benchmark shows its own)."""
    from diffusers import DiffusionPipeline

    from ..models.pipeline import resolve_model_path

    path = resolve_model_path(base)
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise ConfigError(
            f"could not load the base pipeline {path!r} ({err}); give 'sandbox' or a diffusers pipeline directory"
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_unet_state(base_unet: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of the base UNet with the full state dict of an accelerate checkpoint (``model.safetensors``)."""
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    else:
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    unet = copy.deepcopy(base_unet)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: the state dict does not match the base UNet (missing {len(missing)} keys e.g. {missing[:3]}, "
            f"unexpected {len(unexpected)} e.g. {unexpected[:3]}); is this checkpoint from a run on this base model?"
        )
    return unet


@contextlib.contextmanager
def apply_variant(pipe, variant: Variant | str | None) -> Iterator:
    """Yield a pipeline that generates as ``variant``; ``pipe`` is restored on exit.

    - ``base``: ``pipe`` itself;
    - ``lora``: adapters loaded into ``pipe`` and removed afterwards (base weights untouched);
    - ``unet`` / ``unet_state``: ``pipe.unet`` swapped for the variant's UNet, then swapped back;
    - ``pipeline``: a separate pipeline from the directory, on ``pipe``'s device and dtype.
    """
    if not isinstance(variant, Variant):
        variant = resolve_variant(variant)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    if variant.kind == "base":
        yield pipe
    elif variant.kind == "lora":
        pipe.load_lora_weights(str(variant.path), adapter_name="benchmark_variant")
        try:
            yield pipe
        finally:
            pipe.unload_lora_weights()
    elif variant.kind in ("unet", "unet_state"):
        if variant.kind == "unet":
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(variant.path, dtype=dtype)
        else:
            unet = _load_unet_state(pipe.unet, variant.path)
        original = pipe.unet
        pipe.unet = unet.to(device, dtype).eval()
        try:
            yield pipe
        finally:
            pipe.unet = original
    elif variant.kind == "pipeline":
        from diffusers import DiffusionPipeline

        other = DiffusionPipeline.from_pretrained(str(variant.path), dtype=dtype)
        other.set_progress_bar_config(disable=True)
        yield other.to(device)
    else:  # pragma: no cover - resolve_variant only makes the kinds above
        raise ValueError(f"unknown variant kind {variant.kind!r}")
