"""Sample-quality metric math on feature arrays: FID/sFID, Inception Score, precision/recall, accuracy.

Pure numpy/scipy so the formulas can be tested on synthetic data with known answers, independent of
any network.

Example:
    >>> import numpy as np
    >>> mu, sigma = np.zeros(3), np.eye(3)
    >>> round(frechet_distance(mu, sigma, mu + 1.0, sigma), 6)
    3.0
    >>> round(inception_score(np.eye(10))[0], 6)
    10.0
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Tuple

import numpy as np

from ..errors import QCError

__all__ = [
    "MetricError", "frechet_distance", "gaussian_stats", "inception_score", "knn_radii", "precision_recall",
    "class_accuracy", "trace_sqrt_product",
]

logger = logging.getLogger(__name__)


class MetricError(QCError, ValueError):
    """A metric got inputs it cannot score (wrong shapes, NaN, too few samples) or failed numerically."""


def _as_2d(features: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(features, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise MetricError(f"{name} must be a non-empty (N, D) array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise MetricError(f"{name} contains NaN or inf")
    return a


def gaussian_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64.

    Example:
        >>> mu, sigma = gaussian_stats(np.array([[0.0, 0.0], [2.0, 2.0]]))
        >>> mu.tolist(), sigma.tolist()
        ([1.0, 1.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    f = _as_2d(features, "features")
    if f.shape[0] < 2:
        raise MetricError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _check_covariance(sigma: np.ndarray, name: str, *, vectors: bool):
    """A covariance's eigenvalues (and eigenvectors with ``vectors``), refusing one that is not symmetric
    PSD up to round-off."""
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-8 * scale:
        raise MetricError(f"{name} is not symmetric: are sigma1 and sigma2 symmetric positive semi-definite?")
    w, v = np.linalg.eigh(sigma) if vectors else (np.linalg.eigvalsh(sigma), None)
    if float(w.min()) < -1e-6 * max(float(np.abs(w).max()), 1e-300):
        raise MetricError(f"{name} has a negative eigenvalue ({float(w.min()):.3g}): are sigma1 and sigma2 symmetric "
                          "positive semi-definite?")
    return w, v


def _psd_root(sigma: np.ndarray, name: str) -> np.ndarray:
    """The symmetric square root of a covariance (checked by :func:`_check_covariance`)."""
    w, v = _check_covariance(sigma, name, vectors=True)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


_ROOTS: "OrderedDict[str, np.ndarray]" = OrderedDict()  # the reference's root, computed once per process


def _cached_root(sigma: np.ndarray, name: str) -> np.ndarray:
    key = hashlib.sha1(np.ascontiguousarray(sigma).tobytes()).hexdigest() + str(sigma.shape)
    if key not in _ROOTS:
        _ROOTS[key] = _psd_root(sigma, name)
        while len(_ROOTS) > 4:
            _ROOTS.popitem(last=False)
    return _ROOTS[key]


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr sqrt(sigma1 sigma2)`` for symmetric PSD covariances.

    ``sigma1 sigma2`` is similar to the symmetric PSD ``R sigma1 R`` with ``R = sqrt(sigma2)``, so its
    square root's trace is the sum of the square roots of that matrix's eigenvalues: two symmetric
    eigendecompositions instead of a general Schur ``sqrtm`` (4x faster at 1024 dimensions, and no
    complex round-off on the singular covariances sFID has). Eigenvalues below zero by round-off
    count as zero. ``sigma2`` (the reference, in every use here) has its root cached.

    Example:
        >>> round(trace_sqrt_product(np.diag([1.0, 4.0]), np.diag([4.0, 1.0])), 6)
        4.0
    """
    _check_covariance(sigma1, "sigma1", vectors=False)  # its root is not needed
    root = _cached_root(sigma2, "sigma2")
    m = root @ sigma1 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``.

    Example:
        >>> round(frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), 4 * np.eye(2)), 6)
        2.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricError(
            f"inconsistent shapes: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise MetricError(f"{name} contains NaN or inf")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def inception_score(probs: np.ndarray, splits: int = 1) -> Tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from class posteriors (N, C): (mean, std) over splits.

    Example:
        >>> inception_score(np.full((4, 10), 0.1))[0]
        1.0
    """
    p = _as_2d(probs, "probs")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise MetricError("probs must be non-negative rows that sum to 1 (pass softmax outputs, not logits)")
    if not 1 <= splits <= p.shape[0]:
        raise MetricError(f"splits must be in [1, {p.shape[0]}], got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log(0) = 0: xlogy-style masking keeps one-hot posteriors finite.
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d = (a * a).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)  # round-off can make ||a - a||^2 slightly negative


def knn_radii(features: np.ndarray, k: int = 3, batch_size: int = 1024) -> np.ndarray:
    """Distance from each row to its k-th nearest neighbour in the same set, excluding itself."""
    f = _as_2d(features, "features")
    if not 1 <= k < f.shape[0]:
        raise MetricError(f"k must be in [1, {f.shape[0] - 1}] for {f.shape[0]} samples, got {k}")
    sq = (f * f).sum(axis=1)
    radii = np.empty(f.shape[0])
    for start in range(0, f.shape[0], batch_size):
        d = _pairwise_sq_dists(f[start : start + batch_size], f, sq)
        # Index k (0-based) of the sorted row skips the point itself at distance 0.
        radii[start : start + batch_size] = np.partition(d, k, axis=1)[:, k]
    return np.sqrt(radii)


def _coverage(queries: np.ndarray, support: np.ndarray, support_radii: np.ndarray, batch_size: int) -> float:
    """Fraction of queries inside at least one support point's k-NN ball."""
    sq = (support * support).sum(axis=1)
    r2 = support_radii**2
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        d = _pairwise_sq_dists(queries[start : start + batch_size], support, sq)
        inside += int((d <= r2[None, :]).any(axis=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = 1024
) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifold estimates.

    Precision: share of fake samples inside the real manifold (union of balls around each real
    sample, radius = distance to its k-th nearest real neighbour). Recall: share of real samples
    inside the fake manifold. Distances are computed ``batch_size`` rows at a time, so 10k x 10k
    needs about ``batch_size * 10k * 8`` bytes at once.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 4))
        >>> precision_recall(x, x)
        (1.0, 1.0)
    """
    real = _as_2d(real_features, "real_features")
    fake = _as_2d(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise MetricError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if batch_size < 1:
        raise MetricError(f"batch_size must be >= 1, got {batch_size}")
    precision = _coverage(fake, real, knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


def class_accuracy(logits_or_probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose argmax equals the label.

    Example:
        >>> class_accuracy(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]))
        0.5
    """
    scores = np.asarray(logits_or_probs)
    labels = np.asarray(labels)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],) or scores.shape[0] == 0:
        raise MetricError(f"need scores (N, C) and labels (N,), got {scores.shape} and {labels.shape}")
    return float((scores.argmax(axis=1) == labels).mean())
