"""The images of a preference pair: decoding to RGB, the augmentation both images share, and the example dict.

Image modes: ``RGB`` is used as is; ``L``, ``1``, ``CMYK`` (PIL undoes Adobe inversion) and ``YCbCr`` are converted
with PIL's standard formulas; modes with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) are
composited over **white** (a plain ``convert("RGB")`` would show whatever colour the transparent pixels store,
often black). 16-bit and float modes (``I``, ``I;16*``, ``F``) are skipped as ``unsupported_mode``: their value
range is not defined by the file, so any scaling would be a guess.

Both images of a pair get the **same** crop and the **same** horizontal flip (:class:`PairTransform`); the draws of
one example come from :func:`example_rng`, keyed by ``(seed, epoch, position)`` so that they are reproducible
across resumes and worker counts.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .pair_filter import SOFT_LABEL, TIE, PairSkip, is_missing

CROP_MODES: tuple[str, ...] = ("random", "center")

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_CONVERTIBLE_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "P"} | _ALPHA_MODES


def decode_rgb(data: object) -> Image.Image:
    """JPEG (or any PIL-readable) bytes -> fully decoded RGB image.

    Raises:
        PairSkip: ``missing_image`` (None/empty), ``corrupt_image`` (undecodable) or ``unsupported_mode``.
    """
    if data is None or (isinstance(data, (bytes, bytearray, memoryview)) and len(data) == 0):
        raise PairSkip("missing_image")
    if isinstance(data, Mapping) and "bytes" in data:  # datasets Image feature storage {"bytes", "path"}
        return decode_rgb(data["bytes"])
    if isinstance(data, Image.Image):
        image = data
    else:
        try:
            image = Image.open(io.BytesIO(bytes(data)))
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise PairSkip("corrupt_image", str(err)) from err
    mode = image.mode
    if mode not in _CONVERTIBLE_MODES:
        raise PairSkip("unsupported_mode", mode)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class PairTransform:
    """Resize (shortest side -> ``resolution``, bilinear, antialiased), crop a square, maybe flip, scale to [-1, 1].

    Both images of a pair share the same draws: crop fractions ``(u_top, u_left)`` in [0, 1) and one flip bit.
    For an image resized to ``(H, W)``: random crop ``top = min(floor(u_top * (H - R + 1)), H - R)`` (uniform over
    the valid offsets), centre crop ``top = (H - R) // 2``; likewise ``left``. Images of the same size therefore get
    identical crops. The flip is applied *after* cropping.

    SDXL micro-conditioning, per image: ``original_size = (h, w)`` of the decoded image before resizing;
    ``crop_top_left = (top, left)`` in the resized image, where for a flipped image ``left`` is measured in the
    flipped image (``W - left - R``), i.e. the coordinates of what the model actually sees.
    """

    resolution: int = 512
    crop: str = "random"
    random_flip: bool = True

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def draw(self, rng: np.random.Generator) -> tuple[float, float, bool]:
        """The shared random draws of one pair: ``(u_top, u_left, flip)`` (always 3 draws, fixed order)."""
        u_top, u_left, u_flip = rng.random(3)
        return float(u_top), float(u_left), bool(self.random_flip and u_flip < 0.5)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """``(H, W)`` after scaling the shortest side of an ``(h, w)`` image to ``resolution``."""
        r = self.resolution
        scale = r / min(w, h)
        return max(r, round(h * scale)), max(r, round(w * scale))

    def _offset(self, size: int, u: float) -> int:
        margin = size - self.resolution
        if self.crop == "center":
            return margin // 2
        return min(int(math.floor(u * (margin + 1))), margin)

    def apply(
        self, image: Image.Image, u_top: float, u_left: float, flip: bool
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """One image -> ``(pixels [3, R, R] in [-1, 1], original_size (h, w), crop_top_left (top, left))``."""
        r = self.resolution
        w, h = image.size
        new_h, new_w = self.resized_size(h, w)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        top, left = self._offset(new_h, u_top), self._offset(new_w, u_left)
        image = image.crop((left, top, left + r, top + r))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            left = new_w - left - r
        array = np.asarray(image, dtype=np.uint8)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return pixels, (h, w), (top, left)

    def __call__(
        self, images: Sequence[Image.Image], rng: np.random.Generator, flip: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """A pair -> ``(pixel_values [2, 3, R, R], original_sizes [2, 2], crop_top_lefts [2, 2], flipped)``.

        ``flip`` overrides the drawn flip bit (the latent cache encodes both orientations).
        """
        u_top, u_left, drawn_flip = self.draw(rng)
        flip = drawn_flip if flip is None else flip
        outs = [self.apply(im, u_top, u_left, flip) for im in images]
        pixel_values = torch.stack([o[0] for o in outs])
        original_sizes = torch.tensor([o[1] for o in outs], dtype=torch.long)
        crop_top_lefts = torch.tensor([o[2] for o in outs], dtype=torch.long)
        return pixel_values, original_sizes, crop_top_lefts, flip


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one example's augmentation: ``default_rng([seed, epoch, position])``."""
    return np.random.default_rng([seed, epoch, position])


def _as_int(value: object, default: int = -1) -> int:
    return default if is_missing(value) else int(value)  # type: ignore[arg-type]


def build_example(
    row: Mapping[str, Any],
    winner: int,
    transform: PairTransform,
    rng: np.random.Generator,
    flip: bool | None = None,
) -> dict[str, Any]:
    """A source row (whose metadata passed :func:`~diffalign.data.pair_filter.classify_row`) -> one example dict,
    winner first.

    Raises :class:`PairSkip` for image problems. Keys: ``pixel_values`` [2, 3, R, R] (winner, loser; for a kept
    tie: image 0, image 1), ``caption``, ``original_sizes`` [2, 2], ``crop_top_lefts`` [2, 2], ``flipped``,
    ``ranking_id``, ``user_id``, ``label_0``/``label_1`` (source values), ``winner`` (source index of
    the first image: 0 or 1, -1 for a tie or -2 for a soft label, both kept in source order), ``pref_prob`` (P(first
    image preferred): 1.0, 0.5 for a tie, ``label_0`` for a soft label), ``is_tie``, ``skipped`` ({} here), and
    ``caption_1`` (the second image's own prompt) when the row has a ``caption_1`` column (subject-driven data).
    """
    images = [decode_rgb(row["jpg_0"]), decode_rgb(row["jpg_1"])]
    captions = [row["caption"].strip()]
    if row.get("caption_1") is not None:  # subject-driven data: image 1 has a prompt of its own
        if not isinstance(row["caption_1"], str) or not row["caption_1"].strip():
            raise PairSkip("empty_caption", "caption_1 is empty")
        captions.append(row["caption_1"].strip())
    if winner == 1:
        images = images[::-1]
        captions = captions[::-1]
    pixel_values, original_sizes, crop_top_lefts, flipped = transform(images, rng, flip=flip)
    label_0 = float(row["label_0"])
    pref_prob = 0.5 if winner == TIE else label_0 if winner == SOFT_LABEL else 1.0
    example = {
        "pixel_values": pixel_values,
        "caption": captions[0],
        "original_sizes": original_sizes,
        "crop_top_lefts": crop_top_lefts,
        "flipped": flipped,
        "ranking_id": _as_int(row.get("ranking_id")),
        "user_id": _as_int(row.get("user_id")),
        "label_0": float(row["label_0"]),
        "label_1": float(row["label_1"]),
        "winner": winner,
        "pref_prob": pref_prob,
        "is_tie": winner == TIE,
        "skipped": {},
    }
    if len(captions) == 2:
        example["caption_1"] = captions[1]
    return example
