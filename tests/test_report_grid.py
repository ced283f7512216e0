"""Validation grids with labels: ``labelled_grid`` puts a label left of each row and each column's prompt above it,
around the unchanged ``image_grid``."""

from __future__ import annotations

import numpy as np
import pytest

from diffalign.eval.report import image_grid, labelled_grid

ROWS = ["base", "step 200"]
PROMPTS = [
    "a large red circle on the left",
    "a green cross",
    "a small blue triangle with an outline at the top on a white background next to a large yellow square "
    "in the bottom right corner",  # longer than the header's three lines: cut with "..."
]


def _images(rows: int = 2, cols: int = 3, size: int = 8) -> np.ndarray:
    """``[rows * cols, size, size, 3]`` uint8 tiles of distinct mid-grey levels (no tile is white)."""
    levels = np.linspace(40, 200, rows * cols).astype(np.uint8)
    return np.stack([np.full((size, size, 3), v, np.uint8) for v in levels])


def _ink(region: np.ndarray) -> int:
    """Pixels of a region that are not the white background."""
    return int((region < 250).any(axis=-1).sum())


def test_labelled_grid_holds_the_plain_grid_under_the_headers_right_of_the_labels():
    images = _images()
    body = np.asarray(image_grid(images, ncols=3, scale=4))
    out = np.asarray(labelled_grid(images, ROWS, PROMPTS, scale=4))
    top, left = out.shape[0] - body.shape[0], out.shape[1] - body.shape[1]
    assert top > 0 and left > 0
    np.testing.assert_array_equal(out[top:, left:], body)  # the images themselves untouched
    # at most three header lines of PIL's default font, whatever the prompt's length
    assert top <= 3 * 16 + 8


def test_every_row_label_and_column_header_is_drawn_where_it_belongs():
    images = _images(size=32)  # sandbox-sized tiles, 128 px wide at scale 4
    body = np.asarray(image_grid(images, ncols=3, scale=4))
    out = np.asarray(labelled_grid(images, ROWS, PROMPTS, scale=4))
    top, left = out.shape[0] - body.shape[0], out.shape[1] - body.shape[1]
    tile, pad = 32 * 4, 1
    for r in range(len(ROWS)):
        y0 = top + pad + r * (tile + pad)
        assert _ink(out[y0 : y0 + tile, :left]) > 10, f"row {r} has no label"
    for c in range(len(PROMPTS)):
        x0 = left + pad + c * (tile + pad)
        assert _ink(out[:top, x0 : x0 + tile]) > 10, f"column {c} has no header"
    assert _ink(out[:top, :left]) == 0  # the corner stays blank
    # a longer prompt takes more header lines than a short one (wrapped, not squeezed onto one line)
    short_rows = np.flatnonzero(_ink_rows(out[:top, left + (tile + pad) + pad : left + 2 * (tile + pad)]))
    long_rows = np.flatnonzero(_ink_rows(out[:top, left + 2 * (tile + pad) + pad : left + 3 * (tile + pad)]))
    assert long_rows.min() < short_rows.min()


def _ink_rows(region: np.ndarray) -> np.ndarray:
    return (region < 250).any(axis=-1).any(axis=-1)


def test_labelled_grid_says_what_to_pass_when_labels_and_images_disagree():
    images = _images()
    with pytest.raises(ValueError, match="column labels"):
        labelled_grid(images, ROWS, PROMPTS[:2], ncols=3)
    with pytest.raises(ValueError, match="row labels x 3 columns"):
        labelled_grid(images, ["base"], PROMPTS)
    with pytest.raises(ValueError, match="row labels"):
        labelled_grid(images[:0], [], PROMPTS)


def test_long_labels_are_cut_to_the_tile_width():
    from PIL import ImageFont

    from diffalign.eval.report import _fit_lines

    font = ImageFont.load_default()
    lines = _fit_lines(PROMPTS[2], 32.0 * 4, font, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(font.getlength(x) <= 128 for x in lines)
    assert _fit_lines("supercalifragilisticexpialidocious", 40.0, font, 2)[0].endswith("...")
    assert _fit_lines("a green cross", 128.0, font, 3) == ["a green cross"]
