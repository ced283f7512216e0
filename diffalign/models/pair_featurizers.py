"""Frozen pair featurisers for PPD's user encoder: what a user's context pairs look like as vectors.

A featuriser reads (caption, preferred image, rejected image) and returns one feature row per pair; it is frozen, so
a run featurises every pair once (:func:`diffalign.models.user_encoder.pair_features_table`). ``odd_dims``: how many
leading features flip sign when a pair is read the other way round (the difference block; 0 when there is none),
which :mod:`diffalign.models.odd_projector` uses. The protocol, the CLIP and VLM featurisers and the registry by
kind live here; :mod:`diffalign.models.user_encoder` (projector, encoder, files) re-exports them.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..rewards.base import ImageInput, freeze, to_pil_list

CLIP_KINDS = ("sandbox_clip", "hf_clip", "open_clip", "hps")  # catalog kinds with image_ and text_features
DEFAULT_VLM_PROMPT = (
    "Which image does the user prefer for '{caption}'? Image A: {image} Image B: {image}. The user prefers A."
)


# ---------------------------------------------------------------------------------------------------------------
# Featurisers (frozen)
# ---------------------------------------------------------------------------------------------------------------


@runtime_checkable
class PairFeaturizer(Protocol):
    """A frozen map from preference pairs to feature rows. ``kind`` names the implementation in saved configs."""

    kind: str
    dim: int

    def features(self, captions: Sequence[str], preferred: ImageInput, rejected: ImageInput) -> Tensor:
        """``[P, dim]`` float32 rows without gradient, one per (caption, preferred, rejected) pair."""
        ...

    def describe(self) -> dict[str, Any]:
        """What :meth:`UserEncoder.load` needs to rebuild the featuriser: ``kind``, ``model_path``, options."""
        ...


def _check_pairs(captions: Sequence[str], preferred: ImageInput, rejected: ImageInput):
    captions = [captions] if isinstance(captions, str) else list(captions)
    pref, rej = to_pil_list(preferred), to_pil_list(rejected)
    if not len(captions) == len(pref) == len(rej):
        raise ValueError(f"got {len(captions)} captions, {len(pref)} preferred, {len(rej)} rejected images")
    return captions, pref, rej


class ClipPairFeaturizer:
    """Per pair ``[n(ê(pref) − ê(rej)), ê(pref) + ê(rej), t̂(caption)]`` (``F = 3 · E``; ``n``: to unit length), hats: L2-normalised CLIP
    embeddings. The difference carries the taste and flips sign when the pair is read the other way round (exactly:
    both sides are embedded in separate passes of the same batch shape, so swapping only swaps the operands); the
    sum and the text carry the context the choice was made in.

    ``model``: a catalog name (``"sandbox-clip"``, the default, or any CLIP reward of ``reward_models/``, loaded
    with :func:`~diffalign.rewards.load_reward`), a transformers ``CLIPModel`` + processor directory, or an already
    loaded CLIP reward (an object with ``image_features``, ``text_features``, ``pixel_values``: ``HFClipReward``,
    ``OpenClipReward``). Images go through the reward's exact (PIL, authors') preprocessing."""

    kind = "clip"

    def __init__(
        self,
        model: str | os.PathLike | Any = "sandbox-clip",
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 256,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            self.model_path: str | None = str(model)
            if Path(model).is_dir():
                from ..rewards.hf_clip import HFClipReward

                clip = HFClipReward.from_pretrained(
                    model, name="clip-pair", score="cosine", device=device, dtype=dtype, batch_size=batch_size
                )
            else:
                from ..rewards.catalog import load_manifest, load_reward

                if (kind := load_manifest(str(model))["kind"]) not in CLIP_KINDS:
                    raise ValueError(f"{model!r} is not a CLIP reward: kind {kind!r} not in {CLIP_KINDS}")
                clip = load_reward(str(model), device=device, dtype=dtype, batch_size=batch_size)
        else:
            self.model_path, clip = None, model
        needed = ("image_features", "text_features", "pixel_values")
        if not all(hasattr(clip, n) for n in needed):
            raise ValueError(f"{model!r} is not a CLIP reward: it needs {', '.join(needed)}")
        self.clip = freeze(clip) if isinstance(clip, nn.Module) else clip
        self.batch_size = int(batch_size)
        with torch.no_grad():
            self.embed_dim = int(self.clip.text_features([""]).shape[-1])
        self.dim = 3 * self.embed_dim
        self.odd_dims = (
            self.embed_dim
        )  # the difference block: negated when a pair is read the other way round

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_path": self.model_path}

    def _embed(self, fn: Any, items: list) -> Tensor:
        rows = [fn(items[i : i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        return F.normalize(torch.cat(rows).float(), dim=-1)  # float32: fp16 norms lose digits

    def _image_rows(self, images: list[Image.Image]) -> Tensor:
        return self.clip.image_features(self.clip.pixel_values(images))

    def features(self, captions: Sequence[str], preferred: ImageInput, rejected: ImageInput) -> Tensor:
        """``[P, 3E]`` float32 on the CLIP's device: difference, sum, caption blocks of width ``E`` each."""
        captions, pref, rej = _check_pairs(captions, preferred, rejected)
        if not captions:
            return torch.zeros(0, self.dim)
        exact = getattr(self.clip, "differentiable_mode", None)
        with torch.no_grad(), exact(False) if exact is not None else contextlib.nullcontext():
            e_pref, e_rej = self._embed(self._image_rows, pref), self._embed(self._image_rows, rej)
            e_txt = self._embed(self.clip.text_features, captions)
        # unit-length difference: two samples of one caption are close in CLIP space, so the raw difference is tiny
        # next to the sum, and a projector fed it gave every user the same tokens (cosine 0.998 on the sandbox)
        return torch.cat([F.normalize(e_pref - e_rej, dim=1), e_pref + e_rej, e_txt], dim=1)


class VLMHiddenStateFeaturizer:
    """Mean of one layer's hidden states of a vision-language model reading the pair, as PPD reads LLaVA-OneVision.

    Prompt: ``prompt_template`` with ``{caption}`` and two ``{image}`` slots (A: preferred, B: rejected;
    :data:`DEFAULT_VLM_PROMPT` states "The user prefers A."). Raw mode puts the processor's image token in the slots
    (LLaVA-style processors expand it); ``chat_template=True`` sends the same text and images as one user message
    through ``processor.apply_chat_template``, for models whose images need markup (LLaVA-OneVision's chat format,
    Qwen2-VL's vision tags). The image token is removed from captions, so a caption cannot add images.

    ``layer`` indexes ``outputs.hidden_states`` (entry 0: the input embeddings, ``-1``: the last layer); the mean
    runs over every non-padding position (text and image tokens). Padding goes on the right, so that with a causal
    model a pair's feature does not depend on what else is in its batch. ``dim`` is the text model's hidden size.

    Loads any transformers image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``, local
    files only; transformers is imported here, lazily), or takes ``model`` and ``processor`` objects. Tested offline
    without real weights: ``tests/test_user_encoder.py`` builds a tiny random ``LlavaForConditionalGeneration`` (tiny
    CLIP vision, Llama text, a word-level tokenizer made on the spot), reloads it by path and checks the pooling and
    the layer choice against a direct forward."""

    kind = "vlm"

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        layer: int = -1,
        prompt_template: str = DEFAULT_VLM_PROMPT,
        *,
        chat_template: bool = False,
        model: Any = None,
        processor: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
    ) -> None:
        if prompt_template.count("{image}") != 2 or "{caption}" not in prompt_template:
            raise ValueError(f"prompt_template needs {{caption}}, two {{image}}: {prompt_template!r}")
        if (model is None) != (processor is None) or (model is None and model_path is None):
            raise ValueError("give model_path, or both model and processor")
        if model is None:
            from transformers import AutoModelForImageTextToText as AutoVLM
            from transformers import AutoProcessor

            if not Path(model_path).is_dir():  # type: ignore[arg-type]
                raise FileNotFoundError(
                    f"VLM directory {model_path} not found; diffalign never downloads weights: download the model "
                    "(e.g. `huggingface-cli download <hub id> --local-dir <dir>`) and pass that directory"
                )
            processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
            model = AutoVLM.from_pretrained(model_path, local_files_only=True, dtype=dtype)
        self.model = freeze(model.to(device))
        self.processor = processor
        self.model_path = None if model_path is None else str(model_path)
        self.layer = int(layer)
        self.prompt_template = prompt_template
        self.chat_template = bool(chat_template)
        self.batch_size = int(batch_size)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.dim = int(config.hidden_size)
        self.image_token = str(getattr(processor, "image_token", None) or "<image>")
        self._keep_one_logit = "logits_to_keep" in inspect.signature(model.forward).parameters

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model_path": self.model_path,
            "layer": self.layer,
            "prompt_template": self.prompt_template,
            "chat_template": self.chat_template,
        }

    def prompt(self, caption: str) -> str:
        """The text sent to the processor for one pair (image slots filled or marked up, see the class doc)."""
        caption = caption.replace(self.image_token, "")
        parts = [p.replace("{caption}", caption) for p in self.prompt_template.split("{image}")]
        if not self.chat_template:
            return self.image_token.join(parts)
        content: list[dict[str, str]] = []
        for i, part in enumerate(parts):
            if part:
                content.append({"type": "text", "text": part})
            if i < 2:
                content.append({"type": "image"})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def _batch(self, captions: list[str], pref: list[Image.Image], rej: list[Image.Image]) -> Tensor:
        # image A (preferred), then B (rejected) of each pair, in prompt order
        images = [im for pair in zip(pref, rej) for im in pair]
        texts = [self.prompt(c) for c in captions]
        enc = self.processor(
            text=texts, images=images, return_tensors="pt", padding=True, padding_side="right"
        )
        device, dtype = next(self.model.parameters()).device, next(self.model.parameters()).dtype
        inputs = {
            k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            for k, v in enc.items()
            if isinstance(v, Tensor)
        }
        # the logits are not used: skip computing [L, vocab] of them
        extra = {"logits_to_keep": 1} if self._keep_one_logit else {}
        out = self.model(**inputs, output_hidden_states=True, return_dict=True, **extra)
        states = getattr(out, "hidden_states", None) or getattr(out, "decoder_hidden_states", None)
        if not states:
            raise ValueError(f"{type(self.model).__name__} returned no hidden_states")
        if not -len(states) <= self.layer < len(states):
            raise ValueError(f"layer {self.layer} is out of range of {len(states)} hidden states")
        return masked_mean(states[self.layer], inputs.get("attention_mask"))

    def features(self, captions: Sequence[str], preferred: ImageInput, rejected: ImageInput) -> Tensor:
        """``[P, hidden_size]`` float32 on the model's device."""
        captions, pref, rej = _check_pairs(captions, preferred, rejected)
        if not captions:
            return torch.zeros(0, self.dim)
        b, rows = self.batch_size, []
        with torch.no_grad():
            for i in range(0, len(pref), b):
                rows.append(self._batch(captions[i : i + b], pref[i : i + b], rej[i : i + b]))
        return torch.cat(rows)


def masked_mean(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean over positions of ``hidden`` ``[B, L, H]`` where ``attention_mask`` ``[B, L]`` is 1 → ``[B, H]`` float32
    (summed in float32: a bf16 sum over thousands of image tokens loses digits)."""
    hidden = hidden.float()
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.device, torch.float32).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


from ..sandbox.pair_perception import AttributePairFeaturizer  # noqa: E402  (numpy + the judge: cheap)

FEATURIZERS: dict[str, type] = {
    "clip": ClipPairFeaturizer,
    "vlm": VLMHiddenStateFeaturizer,
    "attributes": AttributePairFeaturizer,  # the sandbox's perception stand-in (labelled as such in results)
}
"""Featuriser ``kind`` (as saved in ``user_encoder.json``) → class."""


def featurizer_from_config(config: Mapping[str, Any], **kwargs: Any) -> PairFeaturizer:
    """Rebuild a featuriser from its :meth:`~PairFeaturizer.describe` dict (``kwargs``: device, dtype, ...)."""
    kind = config.get("kind")
    if kind not in FEATURIZERS:
        raise ValueError(f"featurizer kind {kind!r} is not one of {sorted(FEATURIZERS)}")
    if config.get("model_path") is None:
        raise ValueError(f"the {kind} featurizer was built from objects, not a path: pass featurizer=")
    options = {k: v for k, v in config.items() if k not in ("kind", "model_path")}
    return FEATURIZERS[kind](config["model_path"], **options, **kwargs)
