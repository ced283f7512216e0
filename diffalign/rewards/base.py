"""The ``Reward`` protocol, the shared image conversion and the preprocessing primitives every scorer uses.

Scoring modes
-------------
Every model-backed reward (a :class:`ModelReward`) scores in one of two modes:

- **exact** (default, ``differentiable=False``): runs under ``torch.no_grad``; every image is converted to an 8-bit
  PIL image (a float tensor in [0, 1] is quantised as ``round(255·x)``, i.e. the image as it would be saved) and
  preprocessed with the *authors'* PIL pipeline (the open_clip transform, the transformers ``CLIPProcessor``, HPSv2's
  resize-longest-and-pad). Scores then match the reference implementations.
- **differentiable** (``differentiable=True`` at construction, or ``with reward.differentiable_mode():``): the input
  must be a float tensor ``[B, 3, H, W]`` in [0, 1]; preprocessing is done with tensor operations
  (``F.interpolate(..., antialias=True)``, padding, normalisation), so the graph runs from the input pixels to the
  score, as reward-gradient methods (DRaFT, AlignProp, ReFL) need. Model parameters stay frozen. The tensor resize
  differs from PIL's by interpolation rounding only (about 1/255 per pixel; see ``tests/test_rewards.py``).

Images may be a list of PIL images, a uint8 numpy array ``[B, H, W, 3]`` (or one ``[H, W, 3]``), or a float tensor
``[B, 3, H, W]`` in [0, 1]. Scores are always returned as float32 ``[B]`` on the reward's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

# CLIP's normalisation constants (OpenAI CLIP, used unchanged by open_clip and by the transformers CLIP processors).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Sequence[Image.Image] | np.ndarray | Tensor


@runtime_checkable
class Reward(Protocol):
    """What every reward offers. ``aspects`` is ``()`` for single-score rewards."""

    name: str
    aspects: tuple[str, ...]

    def score(self, images: ImageInput, prompts: Sequence[str]) -> Tensor:
        """Scores ``[B]`` (float32), one per (image, prompt) pair."""
        ...

    def score_aspects(self, images: ImageInput, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Per-aspect scores ``{aspect: [B]}``; ``{self.name: score}`` for single-score rewards."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# Conversion (the one shared helper for every input type)
# ---------------------------------------------------------------------------------------------------------------


def batch_size_of(images: ImageInput) -> int:
    """Number of images in any accepted input type."""
    if isinstance(images, Image.Image):
        return 1
    if isinstance(images, np.ndarray):
        return 1 if images.ndim == 3 else int(images.shape[0])
    if isinstance(images, Tensor):
        return 1 if images.ndim == 3 else int(images.shape[0])
    return len(images)


def to_float_tensor(images: ImageInput, device: torch.device | str | None = None) -> Tensor:
    """Convert any accepted input to a float32 tensor ``[B, 3, H, W]`` in [0, 1] (keeps a float tensor's graph).

    - PIL images (converted to RGB; all must share one size), uint8 numpy ``[B, H, W, 3]`` / ``[H, W, 3]``:
      ``x = uint8 / 255``.
    - float tensor ``[B, 3, H, W]`` / ``[3, H, W]``: cast to float32 (values must already be in [0, 1]).
    - uint8 tensor ``[B, 3, H, W]``: divided by 255.
    """
    if isinstance(images, Tensor):
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"image tensors must be [B, 3, H, W] (channels first), got shape {tuple(images.shape)}"
            )
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x.to(device) if device is not None else x
    if isinstance(images, np.ndarray):
        arr = images[None] if images.ndim == 3 else images
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(
                f"numpy images must be uint8 [B, H, W, 3] (channels last), got shape {images.shape}"
            )
        if arr.dtype != np.uint8:
            raise ValueError(
                f"numpy images must be uint8 in [0, 255], got dtype {arr.dtype}; pass floats as a tensor"
            )
        x = torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2).float() / 255.0
        return x.to(device) if device is not None else x
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [np.asarray(img.convert("RGB")) for img in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"PIL images of different sizes {sorted(sizes)} cannot be stacked into one tensor")
    return to_float_tensor(np.stack(arrays), device)


def to_pil_list(images: ImageInput) -> list[Image.Image]:
    """Convert any accepted input to a list of RGB PIL images; a float tensor is quantised as ``round(255·x)``."""
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, Tensor):
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"image tensors must be [B, 3, H, W] (channels first), got shape {tuple(images.shape)}"
            )
        if x.dtype != torch.uint8:
            x = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        arr = x.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
    if isinstance(images, np.ndarray):
        arr = images[None] if images.ndim == 3 else images
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 [B, H, W, 3], got {arr.dtype} {images.shape}")
        return [Image.fromarray(a) for a in arr]
    return [img.convert("RGB") for img in images]


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing primitives: PIL (exact, as the authors) and tensor (differentiable) versions of the same operations
# ---------------------------------------------------------------------------------------------------------------


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x − mean[c]) / std[c]`` per channel for ``x`` ``[B, 3, H, W]``."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output ``(h, w)`` of a resize of the shorter side to ``size`` (torchvision ``Resize(int)`` rule: the longer
    side becomes ``int(size · long / short)``, truncated)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def longest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output ``(h, w)`` of HPSv2's ``ResizeMaxSize``: ``scale = size / max(h, w)``, each side ``round(side·scale)``
    (Python's round, half to even, as in the original code)."""
    scale = size / float(max(h, w))
    return round(h * scale), round(w * scale)


def center_pad_amounts(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` padding that centres an ``h × w`` image in ``size × size``: the extra pixel of an
    odd difference goes right/bottom (HPSv2: ``[pad_w//2, pad_h//2, pad_w − pad_w//2, pad_h − pad_h//2]``)."""
    pad_h, pad_w = size - h, size - w
    return pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2


def resize_tensor(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """Bicubic, antialiased resize of ``[B, C, H, W]`` to ``hw`` (differentiable), clamped to [0, 1] as 8-bit PIL
    output would be."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    y = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(0.0, 1.0)


def tensor_resize_shortest_center_crop(x: Tensor, size: int, crop: int | None = None) -> Tensor:
    """CLIP's ``Resize(size) → CenterCrop(crop)`` on tensors ``[B, 3, H, W]`` → ``[B, 3, crop, crop]``.

    The crop offset is ``round((H − crop) / 2)`` (torchvision's ``center_crop``).
    """
    crop = crop or size
    h, w = x.shape[-2:]
    x = resize_tensor(x, shortest_side_size(h, w, size))
    h, w = x.shape[-2:]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return x[..., top : top + crop, left : left + crop]


def tensor_resize_longest_pad(x: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """HPSv2's resize-longest-side-and-pad on tensors ``[B, 3, H, W]`` → ``[B, 3, size, size]`` (see
    :func:`pil_resize_longest_pad`); ``fill`` is the pad value in [0, 1] pixel units (HPSv2: 0, black)."""
    h, w = x.shape[-2:]
    nh, nw = longest_side_size(h, w, size)
    x = resize_tensor(x, (nh, nw))
    left, top, right, bottom = center_pad_amounts(nh, nw, size)
    return F.pad(x, (left, right, top, bottom), value=fill)  # F.pad order: last dim first


def pil_resize_shortest_center_crop(img: Image.Image, size: int, crop: int | None = None) -> Image.Image:
    """CLIP's eval transform ``Resize(size, BICUBIC) → CenterCrop(crop)`` on a PIL image, as torchvision does it:

    bicubic PIL resize to :func:`shortest_side_size` (skipped when the size already matches), then a crop whose
    top-left corner is ``round((H − crop) / 2), round((W − crop) / 2)``. The tensor version is
    :func:`tensor_resize_shortest_center_crop`.
    """
    crop = crop or size
    if crop > size:
        raise ValueError(f"crop {crop} is larger than the resized shorter side {size}")
    w, h = img.size
    nh, nw = shortest_side_size(h, w, size)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def pil_resize_longest_pad(img: Image.Image, size: int, fill: int = 0) -> Image.Image:
    """HPSv2's ``ResizeMaxSize(size, fill=0)`` (the open_clip fork shipped with HPSv2, ``resize_longest_max=True``):

    ``scale = size / max(h, w)``; resize bicubic to ``(round(h·scale), round(w·scale))``; pad with ``fill`` (black)
    to ``size × size``, centred, the odd pixel right/bottom. One deliberate difference: the original pads only when
    ``scale != 1``, so an image whose longer side is already ``size`` but is not square stays unpadded and then fails
    in the ViT; here it is padded.
    """
    w, h = img.size
    nh, nw = longest_side_size(h, w, size)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top, _, _ = center_pad_amounts(nh, nw, size)
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(img.convert("RGB"), (left, top))
    return canvas


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image → float32 ``[3, H, W]`` in [0, 1] (torchvision ``ToTensor``)."""
    return (
        torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float()
        / 255.0
    )


# ---------------------------------------------------------------------------------------------------------------
# Shared machinery for model-backed rewards
# ---------------------------------------------------------------------------------------------------------------


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with every parameter frozen (gradients still flow to the *inputs*)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def check_prompts(images: ImageInput, prompts: Sequence[str] | str) -> list[str]:
    """Return prompts as a list the length of the image batch (a single string is repeated)."""
    n = batch_size_of(images)
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts; pass one prompt per image")
    return prompts


def _slice_images(images: ImageInput, start: int, stop: int) -> ImageInput:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, Tensor)) and images.ndim == 3:
        return images[None]
    return images[start:stop]


class ModelReward(nn.Module):
    """Base of the model-backed rewards: batching, the exact/differentiable modes, device and dtype.

    Subclasses implement ``preprocess_pil(list[PIL]) -> Tensor[B,3,S,S]`` (the authors' pipeline),
    ``preprocess_tensor(Tensor[B,3,H,W] in [0,1]) -> Tensor[B,3,S,S]`` (differentiable) and
    ``forward_scores(pixel_values, prompts) -> dict[str, Tensor[B]]`` (aspect → score); single-score rewards return
    ``{self.name: score}``.
    """

    name: str = "reward"
    aspects: tuple[str, ...] = ()

    def __init__(self, *, batch_size: int = 32, differentiable: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.differentiable = differentiable

    # -- to implement ------------------------------------------------------------------------------------------
    def preprocess_pil(self, images: list[Image.Image]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def preprocess_tensor(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_scores(
        self, pixel_values: Tensor, prompts: list[str]
    ) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    # -- device / dtype ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @contextlib.contextmanager
    def differentiable_mode(self, enabled: bool = True) -> Iterator[ModelReward]:
        """Temporarily switch the differentiable mode (see the module docstring)."""
        previous = self.differentiable
        self.differentiable = enabled
        try:
            yield self
        finally:
            self.differentiable = previous

    # -- scoring -----------------------------------------------------------------------------------------------
    def pixel_values(self, images: ImageInput) -> Tensor:
        """Preprocessed model input ``[B, 3, S, S]`` on the reward's device and dtype, by the current mode."""
        if self.differentiable:
            if not (isinstance(images, Tensor) and images.is_floating_point()):
                raise TypeError(
                    f"{self.name}: differentiable scoring needs a float tensor [B, 3, H, W] in [0, 1], got "
                    f"{type(images).__name__}; pass the decoded images as a tensor or use differentiable=False"
                )
            x = self.preprocess_tensor(to_float_tensor(images, self.device))
        else:
            x = self.preprocess_pil(to_pil_list(images)).to(self.device)
        return x.to(self.dtype)

    def score_aspects(self, images: ImageInput, prompts: Sequence[str] | str) -> dict[str, Tensor]:
        """Per-aspect scores ``{aspect: [B]}`` (float32), computed in batches of ``self.batch_size``."""
        prompts = check_prompts(images, prompts)
        n = len(prompts)
        grad = torch.enable_grad() if self.differentiable else torch.no_grad()
        chunks: dict[str, list[Tensor]] = {}
        with grad:
            for start in range(0, n, self.batch_size):
                stop = min(n, start + self.batch_size)
                pixels = self.pixel_values(_slice_images(images, start, stop))
                out = self.forward_scores(pixels, prompts[start:stop])
                for key, value in out.items():
                    # scores are reported in float32 whatever the model dtype (fp16 sums lose digits)
                    chunks.setdefault(key, []).append(value.float())
        return {key: torch.cat(values) for key, values in chunks.items()}

    def score(self, images: ImageInput, prompts: Sequence[str] | str) -> Tensor:
        """Scores ``[B]`` (float32): the single score, or the ``overall`` aspect of a multi-aspect reward."""
        out = self.score_aspects(images, prompts)
        key = self.name if self.name in out else "overall"
        if key not in out:
            raise KeyError(f"{self.name}: scores have keys {sorted(out)}, none is {self.name!r} or 'overall'")
        return out[key]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, batch_size={self.batch_size}, differentiable={self.differentiable}"


def cosine_rows(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Row-wise cosine ``a_i · b_i / (‖a_i‖ ‖b_i‖)`` for ``[B, D]`` inputs, computed in float32 (fp16 norms
    overflow for wide embeddings)."""
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps))
