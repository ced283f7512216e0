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


def _fit_lines(text: str, width: float, font, max_lines: int) -> list[str]:
    """``text`` word-wrapped to ``width`` pixels in ``font``, at most ``max_lines`` lines; a line that does not fit
    (a long word, or the last line when words are left over) is cut and ends with "..."."""

    def cut(line: str) -> str:
        while line and font.getlength(line + "...") > width:
            line = line[:-1]
        return line.rstrip() + "..."

    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line if font.getlength(line) <= width else cut(line))
    if words and lines:
        lines[-1] = cut(lines[-1])
    return lines


def labelled_grid(
    images: np.ndarray | Sequence[np.ndarray],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    ncols: int | None = None,
    scale: int = 4,
    pad: int = 1,
    max_header_lines: int = 3,
) -> Image.Image:
    """:func:`image_grid` with a label left of each row ("base", "step 200") and a header over each column (its
    prompt, word-wrapped to the tile width, at most ``max_header_lines`` lines, cut with "..."), in PIL's default
    font, black on white.

    ``images``: ``[N, H, W, 3]`` uint8, row-major, ``N = len(row_labels) * ncols``; ``ncols`` defaults to
    ``len(col_labels)``. The grid itself is :func:`image_grid`'s, unchanged, at the bottom right of the result;
    the row labels take the width of the longest one (at most twice a tile's).
    """
    from PIL import ImageDraw, ImageFont

    images = np.asarray(images)
    ncols = len(col_labels) if ncols is None else ncols
    if not row_labels or ncols < 1 or len(col_labels) != ncols:
        raise ValueError(
            f"labelled_grid: {len(row_labels)} row labels, {len(col_labels)} column labels for ncols={ncols}; "
            "give one label per row and per column"
        )
    if images.ndim != 4 or len(images) != len(row_labels) * ncols:
        raise ValueError(
            f"labelled_grid: images of shape {images.shape} for {len(row_labels)} row labels x {ncols} columns; "
            "give [rows * columns, H, W, 3] images, row-major"
        )
    body = image_grid(images, ncols=ncols, scale=scale, pad=pad)
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    tile_h, tile_w = images.shape[1] * scale, images.shape[2] * scale
    margin = 4  # white pixels around every label

    left_w = min(max(font.getlength(str(x)) for x in row_labels), 2 * tile_w)
    left = int(left_w) + 2 * margin
    headers = [_fit_lines(str(x), tile_w, font, max_header_lines) for x in col_labels]
    top = max(len(h) for h in headers) * line_h + 2 * margin

    canvas = Image.new("RGB", (left + body.width, top + body.height), "white")
    canvas.paste(body, (left, top))
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(headers):
        x0 = left + pad + c * (tile_w + pad)
        y = top - margin - len(lines) * line_h
        for line in lines:
            draw.text((x0 + (tile_w - font.getlength(line)) / 2, y), line, fill="black", font=font)
            y += line_h
    for r, label in enumerate(row_labels):
        lines = _fit_lines(str(label), left_w, font, max(1, tile_h // line_h))
        y = top + pad + r * (tile_h + pad) + (tile_h - len(lines) * line_h) / 2
        for line in lines:
            draw.text((left - margin - font.getlength(line), y), line, fill="black", font=font)
            y += line_h
    return canvas
