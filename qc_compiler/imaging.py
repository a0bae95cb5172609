"""Turn sample batches into PNG grids.

Example:
    >>> import torch, tempfile
    >>> save_grid(torch.zeros(4, 1, 8, 8), tempfile.mkdtemp() + "/g.png", nrow=2)
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from .io import atomic_write_bytes

__all__ = ["to_uint8", "make_grid", "save_grid", "side_by_side", "add_column_labels", "scatter_png"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8; NaN or inf is an error, never a black image."""
    if not bool(torch.isfinite(images).all()):
        raise ValueError("the samples hold NaN or inf (a diverged model or sampler); no image was written")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int = 10, pad: int = 2, scale: int = 2) -> Image.Image:
    """Tile a batch row by row, ``nrow`` images per row, with a dark border, scaled up ``scale`` times."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 40, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def add_column_labels(img: Image.Image, labels: Sequence[str], ncol: int, band: int = 14) -> Image.Image:
    """Add a white band on top of a grid with one label centred over each column."""
    out = Image.new(img.mode, (img.width, img.height + band), 255 if img.mode == "L" else (255,) * 3)
    out.paste(img, (0, band))
    draw = ImageDraw.Draw(out)
    col_w = img.width / ncol
    for i, text in enumerate(labels[:ncol]):
        draw.text((int((i + 0.5) * col_w) - 3 * len(text), 1), text, fill=0 if img.mode == "L" else (0, 0, 0))
    return out


def _write_png(img: Image.Image, path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def save_grid(images: torch.Tensor, path, *, nrow: int = 10, scale: int = 2,
              col_labels: Optional[Sequence[str]] = None) -> None:
    """Write a PNG grid of ``images`` atomically, optionally with a label over each column."""
    img = make_grid(images, nrow=nrow, scale=scale)
    _write_png(add_column_labels(img, col_labels, nrow) if col_labels else img, path)


def side_by_side(left: torch.Tensor, right: torch.Tensor, path, *, nrow: int = 10, gap: int = 16,
                 scale: int = 2, titles: Optional[tuple] = None) -> None:
    """Two grids next to each other (e.g. FP32 and compiled samples from the same noise)."""
    a, b = make_grid(left, nrow, scale=scale), make_grid(right, nrow, scale=scale)
    canvas = Image.new(a.mode, (a.width + gap + b.width, max(a.height, b.height)), 255 if a.mode == "L" else (255,) * 3)
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    _write_png(canvas, path)


# Colours of the scatter plot's series, by kind; a kind's points are joined by a line when it is "front".
_KINDS = {"point": ((150, 150, 150), "other schedules"), "front": ((31, 119, 180), "Pareto front"),
          "reference": ((255, 127, 14), "reference"), "chosen": ((214, 39, 40), "chosen")}


def _ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    step = (hi - lo) / (n - 1)
    return [lo + i * step for i in range(n)]


def scatter_png(points: Sequence[Tuple[float, float, str]], path, *, xlabel: str, ylabel: str, title: str = "",
                hline: Optional[float] = None, vline: Optional[float] = None, line: Sequence[Tuple[float, float]] = (),
                size: Tuple[int, int] = (720, 460)) -> None:
    """A scatter plot as PNG (pillow only, so no plotting library is needed): ``points`` are (x, y,
    kind) with kind one of "point", "front", "reference", "chosen" (its colour); ``line`` is a polyline
    drawn under them in x order (the Pareto front, whatever the kinds of its members);
    ``hline``/``vline`` draw dashed bounds. Non-finite points are left out."""
    pts = [(float(x), float(y), k) for x, y, k in points if np.isfinite(x) and np.isfinite(y)]
    if not pts:
        raise ValueError("nothing to plot: no finite points")
    xs = [p[0] for p in pts] + ([vline] if vline is not None else [])
    ys = [p[1] for p in pts] + ([hline] if hline is not None else [])
    pad_x, pad_y = 0.08 * ((max(xs) - min(xs)) or 1.0), 0.08 * ((max(ys) - min(ys)) or 1.0)
    x0, x1, y0, y1 = min(xs) - pad_x, max(xs) + pad_x, min(ys) - pad_y, max(ys) + pad_y
    w, h = size
    left, right, top, bottom = 70, 20, 34, 50
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)

    def at(x: float, y: float) -> Tuple[int, int]:
        return (int(left + (x - x0) / (x1 - x0) * (w - left - right)), int(h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)))

    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for tx in _ticks(x0, x1):
        px, _ = at(tx, y0)
        d.line([px, h - bottom, px, h - bottom + 4], fill=(0, 0, 0))
        d.text((px - 12, h - bottom + 6), f"{tx:.2f}", fill=(0, 0, 0))
    for ty in _ticks(y0, y1):
        _, py = at(x0, ty)
        d.line([left - 4, py, left, py], fill=(0, 0, 0))
        d.text((4, py - 5), f"{ty:.1f}", fill=(0, 0, 0))
    d.text((left + (w - left - right) // 2 - 3 * len(xlabel), h - 20), xlabel, fill=(0, 0, 0))
    d.text((4, 8), ylabel, fill=(0, 0, 0))
    d.text((left + 150, 8), title, fill=(0, 0, 0))
    for value, horizontal in ((hline, True), (vline, False)):
        if value is None:
            continue
        a, b = (at(x0, value), at(x1, value)) if horizontal else (at(value, y0), at(value, y1))
        n = 40
        for i in range(0, n, 2):  # dashed
            d.line([a[0] + (b[0] - a[0]) * i / n, a[1] + (b[1] - a[1]) * i / n,
                    a[0] + (b[0] - a[0]) * (i + 1) / n, a[1] + (b[1] - a[1]) * (i + 1) / n], fill=(120, 120, 120))
    joined = sorted((float(x), float(y)) for x, y in line if np.isfinite(x) and np.isfinite(y))
    if len(joined) > 1:
        d.line([at(x, y) for x, y in joined], fill=_KINDS["front"][0], width=2)
    shown: Dict[str, bool] = {}
    for kind in ("point", "front", "reference", "chosen"):  # the chosen one drawn last, on top
        for x, y, k in pts:
            if k != kind:
                continue
            cx, cy = at(x, y)
            r = 7 if kind == "chosen" else 5
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_KINDS[kind][0], outline=(0, 0, 0))
            shown[kind] = True
    ly = top + 6
    for kind, (colour, name) in _KINDS.items():
        if shown.get(kind):
            d.ellipse([w - right - 130, ly, w - right - 122, ly + 8], fill=colour, outline=(0, 0, 0))
            d.text((w - right - 116, ly - 1), name, fill=(0, 0, 0))
            ly += 14
    _write_png(img, path)
