"""Turn sample batches into PNG grids.

Example:
    >>> import torch, tempfile
    >>> save_grid(torch.zeros(4, 1, 8, 8), tempfile.mkdtemp() + "/g.png", nrow=2)
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .io import atomic_write_bytes

__all__ = ["to_uint8", "make_grid", "save_grid", "side_by_side"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
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


def _write_png(img: Image.Image, path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def save_grid(images: torch.Tensor, path, nrow: int = 10, scale: int = 2) -> None:
    """Write a PNG grid of ``images`` atomically."""
    _write_png(make_grid(images, nrow=nrow, scale=scale), path)


def side_by_side(left: torch.Tensor, right: torch.Tensor, path, nrow: int = 10, gap: int = 16,
                 scale: int = 2, titles: Optional[tuple] = None) -> None:
    """Two grids next to each other (e.g. FP32 and compiled samples from the same noise)."""
    a, b = make_grid(left, nrow, scale=scale), make_grid(right, nrow, scale=scale)
    canvas = Image.new(a.mode, (a.width + gap + b.width, max(a.height, b.height)), 255 if a.mode == "L" else (255,) * 3)
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    _write_png(canvas, path)
