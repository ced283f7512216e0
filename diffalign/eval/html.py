"""A self-contained HTML report: a summary table, then image pairs (base | aligned) with their scores.

Images are embedded as base64 PNG (one file to share, nothing to fetch). Small images (the sandbox's 32×32) are
upscaled with nearest-neighbour so their pixels stay visible; large ones are shrunk so the page stays light.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:26px 0 8px} .note{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0} th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left}
.pairs{display:flex;flex-wrap:wrap;gap:14px}
.pair{border:1px solid #ddd;border-radius:6px;padding:8px;width:300px;font-size:12px}
.pair .prompt{font-weight:600;margin-bottom:4px;min-height:30px} .pair .cat{color:#777}
.imgs{display:flex;gap:6px} .imgs figure{margin:0;text-align:center} .imgs img{image-rendering:pixelated;width:140px;height:140px;object-fit:contain;border:3px solid transparent}
.imgs img.win{border-color:#2a9d8f} figcaption{font-size:11px;color:#555}
.scores td,.scores th{padding:1px 5px;font-size:11px} .better{font-weight:700;color:#2a9d8f}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;color:#fff;font-size:11px}
.plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start;margin:10px 0}
.plots figure{margin:0} .plots img{max-height:300px;max-width:560px}
.b-aligned{background:#2a9d8f} .b-base{background:#e76f51} .b-tie{background:#888}
"""


def png_data_uri(image: np.ndarray, min_side: int = 128, max_side: int = 256) -> str:
    """``data:image/png;base64,...`` of a ``[H, W, 3]`` uint8 image: upscaled by an integer factor (nearest) until
    its shorter side is at least ``min_side``, or shrunk (Lanczos) so its longer side is at most ``max_side``."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    w, h = img.size
    if min(w, h) < min_side:
        k = math.ceil(min_side / min(w, h))
        img = img.resize((w * k, h * k), Image.Resampling.NEAREST)
    elif max(w, h) > max_side:
        s = max_side / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; floats with 3 decimals, everything escaped."""

    def fmt(x: object) -> str:
        return f"{x:.3f}" if isinstance(x, float) else html.escape(str(x))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(x)}</td>" for x in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


@dataclass
class ImagePair:
    """One (prompt, seed) row: the two images and ``{reward: (base score, aligned score)}``."""

    prompt: str
    seed: int
    base: np.ndarray
    aligned: np.ndarray
    scores: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    category: str | None = None


def winner(base: float, aligned: float, tie_tol: float = 1e-6) -> str:
    """``"aligned"``, ``"base"`` or ``"tie"`` (``|aligned − base| <= tie_tol``), as the win rate counts it."""
    d = aligned - base
    return "tie" if abs(d) <= tie_tol else ("aligned" if d > 0 else "base")


def _pair_html(pair: ImagePair, primary: str | None, tie_tol: float) -> str:
    win = winner(*pair.scores[primary], tie_tol) if primary in pair.scores else None
    rows = []
    for name, (b, a) in pair.scores.items():
        w = winner(b, a, tie_tol)
        bc = ' class="better"' if w == "base" else ""
        ac = ' class="better"' if w == "aligned" else ""
        rows.append(f"<tr><td>{html.escape(name)}</td><td{bc}>{b:.4f}</td><td{ac}>{a:.4f}</td></tr>")
    badge = f'<span class="badge b-{win}">{win if win != "tie" else "tie"}</span>' if win else ""
    cat = f' <span class="cat">[{html.escape(pair.category)}]</span>' if pair.category else ""
    return (
        '<div class="pair">'
        f'<div class="prompt">{html.escape(pair.prompt)}{cat}</div>'
        '<div class="imgs">'
        f'<figure><img src="{png_data_uri(pair.base)}" class="{"win" if win == "base" else ""}" alt="base">'
        "<figcaption>base</figcaption></figure>"
        f'<figure><img src="{png_data_uri(pair.aligned)}" class="{"win" if win == "aligned" else ""}" alt="aligned">'
        "<figcaption>aligned</figcaption></figure></div>"
        f"<div>seed {pair.seed} · winner ({html.escape(primary or '-')}): {badge}</div>"
        '<table class="scores"><tr><th>reward</th><th>base</th><th>aligned</th></tr>'
        + "".join(rows)
        + "</table>"
        "</div>"
    )


def write_pairs_report(
    path: str | Path,
    *,
    title: str,
    summary_html: str,
    pairs: Sequence[ImagePair],
    primary: str | None,
    notes: Sequence[str] = (),
    tie_tol: float = 1e-6,
    extra_images: Mapping[str, str | Path] | None = None,
    footer_html: str = "",
) -> Path:
    """Write the report: title, notes, the summary (HTML), plots (``extra_images``: caption → PNG file, embedded,
    side by side), every pair with the winner under ``primary`` (a reward name) marked, then ``footer_html``."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts.append(summary_html)
    if extra_images:
        parts.append('<div class="plots">')
        for caption, file in extra_images.items():
            data = base64.b64encode(Path(file).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append(f"<h2>Image pairs ({len(pairs)} shown; winner by {html.escape(primary or '-')})</h2>")
    parts.append('<div class="pairs">' + "".join(_pair_html(p, primary, tie_tol) for p in pairs) + "</div>")
    parts.append(footer_html)
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
