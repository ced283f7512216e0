"""ImageReward (Xu et al., NeurIPS 2023, arXiv 2304.05977) from the released ``ImageReward.pt``, on transformers' BLIP.

The model, as the authors score with it (``ImageReward/ImageReward.py`` of THUDM/ImageReward, ``ImageReward.score``
and ``inference_rank``; the same steps in ``train/src/ImageReward.py``, ``encode_data``)::

    ids, mask = BertTokenizer("bert-base-uncased" + [DEC], [ENC])(prompt, padding="max_length", truncation=True,
                                                                    max_length=35)
    image_embeds = blip.visual_encoder(x)                  # BLIP ViT-L/16 at 224 px, all 197 tokens after the norm
    h = blip.text_encoder(ids, attention_mask=mask,        # BLIP's BERT-base, each layer: self-attention,
                          encoder_hidden_states=image_embeds,   # cross-attention to every image token, FFN
                          encoder_attention_mask=ones)
    s = mlp(h.last_hidden_state[:, 0, :].float())          # first-token state -> 768 -> 1024 -> 128 -> 64 -> 16 -> 1
    reward = (s - 0.16717362830052426) / 1.0333394966054072

Facts this implementation follows, and where they were read:

- The first token is the tokenizer's own ``[CLS]``: ``score`` and ``inference_rank`` pass ``text_input.input_ids``
  unchanged; they do **not** replace it with ``[ENC]`` as BLIP's image-text-matching path does
  (``input_ids[:, 0] = tokenizer.enc_token_id``). The tokenizer is BLIP's ``init_tokenizer``
  (``train/src/models/blip.py``): ``bert-base-uncased`` plus the special tokens ``[DEC]`` (bos) and ``[ENC]``,
  ids 30522 and 30523, hence the text encoder's vocabulary of 30524.
- The text encoder runs in BLIP's default ``mode='multimodal'`` (``med.py``: ``BertEncoder.forward``), i.e. with the
  cross-attention in every layer; its embeddings are word + absolute position, then LayerNorm (no token types).
  Padding keys get ``−10000`` added before the softmax (here: the dtype's minimum; both give probability 0).
- The MLP has **no activations** (the ``nn.ReLU()`` lines are commented out) and dropouts at indices 1, 3, 5, so
  its parameters are ``mlp.layers.{0,2,4,6,7}``: the improved-aesthetic-predictor head, reused here as
  :class:`~diffalign.rewards.aesthetic.AestheticHead`.
- ``BLIP_Pretrain(image_size=224, vit='large')`` of the ImageReward package holds ``visual_encoder``,
  ``text_encoder`` (``add_pooling_layer=False``), ``vision_proj`` and ``text_proj``; the last two are not used for
  scoring. The ViT (``models/vit.py`` of salesforce/BLIP) is timm's: pre-norm blocks
  ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with exact GELU, fused ``qkv`` with bias, LayerNorm eps 1e-6, a
  final ``norm``.
- Images: torchvision ``Resize(224, BICUBIC)`` (shorter side) → ``CenterCrop(224)`` → RGB → ``ToTensor`` →
  ``Normalize`` with OpenAI CLIP's mean and std.
- The authors load the checkpoint with ``load_state_dict(strict=False)``. Here the load is strict instead: every
  parameter of the scorer must come from the file, and a key of the file is skipped only if it is in
  :data:`UNUSED_PREFIXES` / :data:`UNUSED_KEYS`; anything else raises an error naming the keys.

Weight names: ``ImageReward.pt`` keeps the original Salesforce BLIP names. :func:`convert_imagereward_state_dict`
maps them onto transformers' :class:`~transformers.BlipVisionModel` (``visual_encoder.blocks.N.attn.qkv`` →
``encoder.layers.N.self_attn.qkv``, ...) and :class:`~transformers.BlipTextModel` (BLIP's ``med.py`` names, which
transformers kept). Architecture sizes are read from the tensor shapes (so small test checkpoints load too); the
attention head counts cannot be, and come from ``med_config.json`` (text) or ``hidden / 64`` (the head width of
BLIP's ViT-B/L and of BERT-base), or the ``vision_num_heads`` / ``text_num_heads`` arguments.

Checked in ``tests/test_imagereward.py`` against a float64 re-implementation of the original architecture that reads
the original parameter names directly, on a small random checkpoint. Not checked here: a score of the real 1.8 GB
checkpoint against the authors' package (no network on the development machines).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from diffalign.rewards.aesthetic import AestheticHead
from diffalign.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ModelReward,
    freeze,
    normalize,
    pil_resize_shortest_center_crop,
    pil_to_tensor,
    tensor_resize_shortest_center_crop,
)
from diffalign.rewards.catalog import MissingWeightsError

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
# prompt tokens, [CLS] and [SEP] included (ImageReward.score: padding="max_length", max_length=35)
TEXT_MAX_LENGTH = 35
BLIP_VIT_LAYER_NORM_EPS = 1e-6  # BLIP's vit.py: norm_layer = partial(nn.LayerNorm, eps=1e-6)
BERT_LAYER_NORM_EPS = 1e-12  # med_config.json of BLIP / ImageReward
# attention head width of BLIP's ViT-B/16 (768/12), ViT-L/16 (1024/16) and of BERT-base (768/12)
HEAD_WIDTH = 64

CHECKPOINT_SOURCE = (
    "Hugging Face hub: THUDM/ImageReward (file ImageReward.pt); "
    "`huggingface-cli download THUDM/ImageReward ImageReward.pt med_config.json --local-dir <folder>`"
)
TOKENIZER_SOURCE = (
    "Hugging Face hub: google-bert/bert-base-uncased (tokenizer files only); "
    "`huggingface-cli download google-bert/bert-base-uncased vocab.txt tokenizer.json tokenizer_config.json "
    "--local-dir <folder>`"
)

# Parts of ImageReward.pt (or of a full BLIP_Pretrain state dict) that the score does not use: by prefix, and by key.
UNUSED_PREFIXES = (
    "blip.vision_proj.",  # BLIP_Pretrain's contrastive projections (ImageReward keeps them, never calls them)
    "blip.text_proj.",
    "blip.text_encoder.pooler.",  # a pooler, should a file have one (ImageReward builds add_pooling_layer=False)
    "blip.visual_encoder_m.",  # momentum encoders, decoder, ITM head and queues of a full BLIP_Pretrain
    "blip.text_encoder_m.",
    "blip.vision_proj_m.",
    "blip.text_proj_m.",
    "blip.text_decoder.",
    "blip.itm_head.",
)
UNUSED_KEYS = (
    "blip.text_encoder.embeddings.position_ids",  # the buffer arange(512): persistent in med.py, rebuilt here
    "blip.temp",
    "blip.image_queue",
    "blip.text_queue",
    "blip.idx_queue",
    "blip.ptr_queue",
)

# ---------------------------------------------------------------------------------------------------------------
# Name mapping: original BLIP names -> transformers' BLIP names
# ---------------------------------------------------------------------------------------------------------------

_SLOTS = {
    "n": r"\d+",
    "p": r"weight|bias",
    "a": r"attention|crossattention",
    "q": r"query|key|value",
    "o": r"dense|LayerNorm",
    "i": r"0|2|4|6|7",
}

# (original name without its part prefix, transformers name); {slot} placeholders are filled from _SLOTS.
VISION_NAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{n}.norm1.{p}", "encoder.layers.{n}.layer_norm1.{p}"),
    ("blocks.{n}.attn.qkv.{p}", "encoder.layers.{n}.self_attn.qkv.{p}"),
    ("blocks.{n}.attn.proj.{p}", "encoder.layers.{n}.self_attn.projection.{p}"),
    ("blocks.{n}.norm2.{p}", "encoder.layers.{n}.layer_norm2.{p}"),
    ("blocks.{n}.mlp.fc1.{p}", "encoder.layers.{n}.mlp.fc1.{p}"),
    ("blocks.{n}.mlp.fc2.{p}", "encoder.layers.{n}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)
TEXT_NAMES = tuple(
    (name, name)  # transformers' BlipTextModel kept the names of BLIP's med.py
    for name in (
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.{p}",
        "encoder.layer.{n}.{a}.self.{q}.{p}",
        "encoder.layer.{n}.{a}.output.{o}.{p}",
        "encoder.layer.{n}.intermediate.dense.{p}",
        "encoder.layer.{n}.output.{o}.{p}",
    )
)
MLP_NAMES = (("layers.{i}.{p}", "layers.{i}.{p}"),)

# part -> (prefix in ImageReward.pt, name rules)
PARTS = {
    "vision": ("blip.visual_encoder.", VISION_NAMES),
    "text": ("blip.text_encoder.", TEXT_NAMES),
    "mlp": ("mlp.", MLP_NAMES),
}


@functools.cache
def _pattern(template: str) -> re.Pattern:
    """``"blocks.{n}.norm1.{p}"`` → a regex with named groups ``n`` and ``p`` (dots literal)."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w)\}", template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>{_SLOTS[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


def _rename(name: str, rules: Sequence[tuple[str, str]], reverse: bool = False) -> str | None:
    """Apply the first rule whose source template matches ``name`` fully; ``None`` if none does."""
    for src, dst in rules:
        if reverse:
            src, dst = dst, src
        m = _pattern(src).fullmatch(name)
        if m is not None:
            return dst.format(**m.groupdict())
    return None


def original_name(part: str, name: str) -> str:
    """The ``ImageReward.pt`` key of a transformers parameter name of ``part`` (``vision``/``text``/``mlp``)."""
    prefix, rules = PARTS[part]
    return prefix + (_rename(name, rules, reverse=True) or name)


def _is_unused(key: str) -> bool:
    return key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES)


def _short_list(keys: Sequence[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def convert_imagereward_state_dict(
    state_dict: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Split and rename ``ImageReward.pt`` into ``(vision_sd, text_sd, mlp_sd)``.

    ``vision_sd`` has :class:`~transformers.BlipVisionModel` names, ``text_sd``
    :class:`~transformers.BlipTextModel` names (with cross-attention, no pooler), ``mlp_sd``
    :class:`~diffalign.rewards.aesthetic.AestheticHead` names (``layers.{0,2,4,6,7}.*``).

    Raises:
        ValueError: naming every key that is neither mapped nor in :data:`UNUSED_PREFIXES` / :data:`UNUSED_KEYS`.
            (Completeness, i.e. that every parameter of the modules is present, is checked when loading them: see
            :func:`load_part`.)
    """
    out: dict[str, dict[str, Tensor]] = {part: {} for part in PARTS}
    unknown = []
    for key, value in state_dict.items():
        if _is_unused(key):
            continue
        for part, (prefix, rules) in PARTS.items():
            if key.startswith(prefix):
                new = _rename(key[len(prefix) :], rules)
                if new is not None:
                    out[part][new] = value
                    break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"ImageReward checkpoint: {len(unknown)} unexpected key(s): {_short_list(unknown)}. They are neither "
            "BLIP ViT / BERT / MLP parameters that the scorer maps nor known-unused parts "
            f"({', '.join(UNUSED_PREFIXES + UNUSED_KEYS)}). Is this ImageReward.pt (THUDM/ImageReward)?"
        )
    return out["vision"], out["text"], out["mlp"]


def load_part(module: nn.Module, part: str, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load ``state_dict`` into ``module`` strictly; errors name the keys as in ``ImageReward.pt``."""
    expected = module.state_dict()
    missing = [original_name(part, k) for k in expected if k not in state_dict]
    unexpected = [original_name(part, k) for k in state_dict if k not in expected]
    wrong = [
        f"{original_name(part, k)} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_short_list(unexpected)}")
    if wrong:
        problems.append(f"wrong shape: {_short_list(wrong)}")
    if problems:
        raise ValueError(f"ImageReward checkpoint, {part} part: " + "; ".join(problems))
    module.load_state_dict(dict(state_dict), strict=True)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Architecture from the checkpoint's shapes
# ---------------------------------------------------------------------------------------------------------------


def _num_layers(sd: Mapping[str, Tensor], pattern: str) -> int:
    found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _heads(hidden: int, given: int | None, what: str, arg: str) -> int:
    heads = given or hidden // HEAD_WIDTH
    if heads < 1 or hidden % heads:
        raise ValueError(
            f"cannot split the {what} width {hidden} into attention heads ({heads}); pass {arg}= (the number of "
            f"heads; the default is width / {HEAD_WIDTH} as in BLIP's ViT-L/16 and BERT-base)"
        )
    return heads


def _need(sd: Mapping[str, Tensor], part: str, key: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"ImageReward checkpoint, {part} part: missing key {original_name(part, key)}")
    return sd[key]


def vision_config_from_state_dict(vision_sd: Mapping[str, Tensor], num_heads: int | None = None):
    """:class:`~transformers.BlipVisionConfig` of BLIP's ViT with the sizes of ``vision_sd`` (transformers names)."""
    from transformers import BlipVisionConfig

    hidden = int(_need(vision_sd, "vision", "embeddings.class_embedding").shape[-1])
    patch = int(_need(vision_sd, "vision", "embeddings.patch_embedding.weight").shape[-1])
    positions = int(_need(vision_sd, "vision", "embeddings.position_embedding").shape[1])
    grid = math.isqrt(positions - 1)
    if grid * grid + 1 != positions:
        raise ValueError(
            f"ImageReward checkpoint: pos_embed has {positions} positions, not 1 + a square number of patches"
        )
    layers = _num_layers(vision_sd, r"encoder\.layers\.(\d+)\.")
    return BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=int(_need(vision_sd, "vision", "encoder.layers.0.mlp.fc1.weight").shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=_heads(hidden, num_heads, "ViT", "vision_num_heads"),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",  # exact (erf) GELU, as nn.GELU in BLIP's vit.py
        layer_norm_eps=BLIP_VIT_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )


def text_config_from_state_dict(
    text_sd: Mapping[str, Tensor], med_config: Mapping | None = None, num_heads: int | None = None
):
    """:class:`~transformers.BlipTextConfig` (cross-attention on, no cache) with the sizes of ``text_sd``.

    ``med_config`` (BLIP's ``med_config.json``) gives the head count, LayerNorm eps and activation; its sizes must
    agree with the tensors.
    """
    from transformers import BlipTextConfig

    med = dict(med_config or {})
    vocab, hidden = (int(s) for s in _need(text_sd, "text", "embeddings.word_embeddings.weight").shape)
    sizes = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": _num_layers(text_sd, r"encoder\.layer\.(\d+)\."),
        "intermediate_size": int(
            _need(text_sd, "text", "encoder.layer.0.intermediate.dense.weight").shape[0]
        ),
        "max_position_embeddings": int(
            _need(text_sd, "text", "embeddings.position_embeddings.weight").shape[0]
        ),
    }
    disagree = {k: (med[k], v) for k, v in sizes.items() if k in med and int(med[k]) != v}
    if disagree:
        raise ValueError(
            "med_config.json disagrees with the checkpoint (config value, checkpoint value): "
            + ", ".join(f"{k}={a} vs {b}" for k, (a, b) in disagree.items())
        )
    return BlipTextConfig(
        **sizes,
        encoder_hidden_size=int(
            _need(text_sd, "text", "encoder.layer.0.crossattention.self.key.weight").shape[1]
        ),
        num_attention_heads=_heads(
            hidden, num_heads or med.get("num_attention_heads"), "BERT", "text_num_heads"
        ),
        hidden_act=str(med.get("hidden_act", "gelu")),
        layer_norm_eps=float(med.get("layer_norm_eps", BERT_LAYER_NORM_EPS)),
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,  # generation token ids: unused by the encoder
        eos_token_id=None,
        sep_token_id=None,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,  # transformers builds the cross-attention layers only for is_decoder configs; the forward
        use_cache=False,  # pass is called with is_decoder=False (bidirectional self-attention, as BLIP's encoder)
    )


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def load_blip_tokenizer(path: str | os.PathLike):
    """BLIP's ``init_tokenizer`` from a local ``bert-base-uncased`` folder: the BERT tokenizer plus ``[DEC]`` (bos)
    and ``[ENC]`` (additional special token), ids 30522 and 30523 for the real vocabulary."""
    from transformers import BertTokenizer

    path = Path(path)
    if not path.is_dir() or not any((path / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise MissingWeightsError(
            f"ImageReward tokenizer: no vocab.txt or tokenizer.json in {path}. Get it from: {TOKENIZER_SOURCE}. "
            "Put the files in that folder. diffalign never downloads weights."
        )
    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------------------------


class ImageRewardScorer(ModelReward):
    """ImageReward score ``[B]`` of (image, prompt) pairs; see the module docstring for the model.

    Args:
        vision: :class:`~transformers.BlipVisionModel` (BLIP's ViT).
        text: :class:`~transformers.BlipTextModel` with cross-attention (``is_decoder`` config), no pooler.
        head: the MLP (:class:`~diffalign.rewards.aesthetic.AestheticHead` layout, input = text width).
        tokenizer: BLIP's BERT tokenizer (:func:`load_blip_tokenizer`).
        max_length: prompt tokens (35 as the authors; capped by the position table).
        mean, std: the standardisation of the raw MLP output (the authors' constants).
    """

    def __init__(
        self,
        vision: nn.Module,
        text: nn.Module,
        head: AestheticHead,
        tokenizer,
        *,
        name: str = "imagereward",
        max_length: int = TEXT_MAX_LENGTH,
        mean: float = IMAGEREWARD_MEAN,
        std: float = IMAGEREWARD_STD,
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, differentiable=differentiable)
        self.name = name
        self.vision = freeze(vision)
        self.text = freeze(text)
        self.head = freeze(head)
        self.tokenizer = tokenizer
        self.max_length = int(min(max_length, text.config.max_position_embeddings))
        self.mean, self.std = float(mean), float(std)
        self.image_size = int(vision.config.image_size)
        if len(tokenizer) > text.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the text encoder's vocabulary only "
                f"{text.config.vocab_size}; ImageReward needs bert-base-uncased (30522 + [DEC], [ENC] = 30524)"
            )
        if int(text.config.encoder_hidden_size) != int(vision.config.hidden_size):
            raise ValueError(
                f"the text encoder cross-attends to width {text.config.encoder_hidden_size} but the ViT width is "
                f"{vision.config.hidden_size}"
            )

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        tokenizer,
        *,
        med_config: Mapping | None = None,
        vision_num_heads: int | None = None,
        text_num_heads: int | None = None,
        **kwargs,
    ) -> ImageRewardScorer:
        """Build from an ``ImageReward.pt`` state dict (original BLIP names); ``kwargs`` go to the constructor."""
        from transformers import BlipTextModel, BlipVisionModel

        vision_sd, text_sd, mlp_sd = convert_imagereward_state_dict(state_dict)
        vision = BlipVisionModel(vision_config_from_state_dict(vision_sd, vision_num_heads))
        text = BlipTextModel(
            text_config_from_state_dict(text_sd, med_config, text_num_heads), add_pooling_layer=False
        )
        head = AestheticHead(int(_need(mlp_sd, "mlp", "layers.0.weight").shape[1]))
        load_part(vision, "vision", vision_sd)
        load_part(text, "text", text_sd)
        load_part(head, "mlp", mlp_sd)
        return cls(vision, text, head, tokenizer, **kwargs)

    # -- preprocessing -----------------------------------------------------------------------------------------
    def preprocess_pil(self, images: list[Image.Image]) -> Tensor:
        """The authors' transform: bicubic resize of the shorter side, centre crop, CLIP normalisation."""
        x = torch.stack(
            [pil_to_tensor(pil_resize_shortest_center_crop(img, self.image_size)) for img in images]
        )
        return normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def preprocess_tensor(self, x: Tensor) -> Tensor:
        """Differentiable version: ``[B, 3, H, W]`` in [0, 1] → normalised ``[B, 3, S, S]``."""
        x = tensor_resize_shortest_center_crop(x, self.image_size)
        return normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    # -- model -------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, each ``[B, max_length]``: padded and truncated as the authors."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def text_features(self, pixel_values: Tensor, prompts: Sequence[str]) -> Tensor:
        """First-token state ``[B, D_text]`` of the text encoder cross-attending to the image tokens."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # [B, 1 + patches, D_vision]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        input_ids, attention_mask = self.tokenize(prompts)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        return out.last_hidden_state[:, 0, :]

    def forward_scores(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        raw = self.head(self.text_features(pixel_values, prompts)).float()
        return {self.name: (raw - self.mean) / self.std}


def _read_med_config(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read med_config {path}: {err}") from err


def load_imagereward(
    weights: Mapping[str, str | os.PathLike],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vision_num_heads: int | None = None,
    text_num_heads: int | None = None,
    **kwargs,
) -> ImageRewardScorer:
    """Catalog builder: ``weights["checkpoint"]`` (``ImageReward.pt``), ``weights["tokenizer"]`` (a local
    ``bert-base-uncased`` folder) and optionally ``weights["med_config"]`` (default: ``med_config.json`` beside the
    checkpoint, if there). ``kwargs`` go to :class:`ImageRewardScorer` (``name``, ``batch_size``,
    ``differentiable``, ``max_length``).
    """
    if "tokenizer" not in weights:
        raise ValueError(
            "ImageReward needs weights['tokenizer']: a local bert-base-uncased tokenizer folder "
            f"({TOKENIZER_SOURCE})"
        )
    checkpoint = Path(weights["checkpoint"])
    if not checkpoint.is_file():
        raise MissingWeightsError(
            f"ImageReward checkpoint {checkpoint} not found. Get it from: {CHECKPOINT_SOURCE}. Put it at "
            f"{checkpoint}. diffalign never downloads weights."
        )
    med_path = weights.get("med_config")
    if med_path is None and (checkpoint.parent / "med_config.json").is_file():
        med_path = checkpoint.parent / "med_config.json"
    tokenizer = load_blip_tokenizer(weights["tokenizer"])
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    scorer = ImageRewardScorer.from_state_dict(
        state,
        tokenizer,
        med_config=_read_med_config(med_path),
        vision_num_heads=vision_num_heads,
        text_num_heads=text_num_heads,
        **kwargs,
    )
    del state
    return scorer.to(device, dtype)
