"""Readable outputs: image grids, Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..utils.markdown import markdown_table  # re-exported: reports import it from here

__all__ = ["image_grid", "markdown_table"]


def image_grid(
    images: np.ndarray | Sequence[np.ndarray], ncols: int, scale: int = 1, pad: int = 1
) -> Image.Image:
    """Tile ``[N, H, W, 3]`` uint8 images row-major into one PIL image (nearest-neighbour upscaling by ``scale``,
    ``pad`` white pixels between tiles)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"image_grid expects [N, H, W, 3] images, got shape {images.shape}")
    n, h, w, _ = images.shape
    nrows = -(-n // ncols)
    H, W = h * scale, w * scale
    canvas = np.full((nrows * (H + pad) + pad, ncols * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        big = img.repeat(scale, 0).repeat(scale, 1) if scale > 1 else img
        canvas[
            pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W
        ] = big
    return Image.fromarray(canvas)
