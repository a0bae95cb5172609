"""Turn sample batches into PNG grids.

Example:
    >>> import torch, tempfile
    >>> save_grid(torch.zeros(4, 1, 8, 8), tempfile.mkdtemp() + "/g.png", nrow=2)
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .io import atomic_write_bytes

__all__ = ["to_uint8", "make_grid", "save_grid", "side_by_side", "add_column_labels"]


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
