"""Calibration-set selection: an open registry of selectors (pool features in, indices out).

A selector maps a pool's features to the indices of the calibration set::

    selector(features (N, D) float32, steps (N,) int, size, seed, **options) -> unique int indices

Register a new one with ``@register_selector("name")``. The calibration passes
(``qc_compiler.passes.calibrate``) collect a pool over the current graph and call a selector.

Example:
    >>> import numpy as np
    >>> steps = np.repeat(np.arange(50), 4)                      # 50 steps x 4 samples
    >>> idx = SELECTORS["uniform"](np.zeros((200, 8), np.float32), steps, size=20, seed=0, num_steps=10)
    >>> sorted(set(steps[idx].tolist()))[:3], len(idx)
    ([0, 5, 11], 20)
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import numpy as np
from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans
from sklearn.metrics import pairwise_distances_argmin
from sklearn.neighbors import NearestNeighbors

from ..options import check_int
from .tap import TAPConfig, check_features, draw_per_cluster, tap_clusters

__all__ = ["SELECTORS", "register_selector"]

log = logging.getLogger(__name__)

Selector = Callable[..., np.ndarray]
SELECTORS: Dict[str, Selector] = {}


def register_selector(name: str) -> Callable[[Selector], Selector]:
    """Decorator: make ``fn(features, steps, size, seed, **options) -> indices`` selectable by name."""

    def wrap(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        return fn

    return wrap


def _positive(name: str, value: Any) -> int:
    return check_int(name, value, lo=1)


# --- selectors ------------------------------------------------------------------------------------

@register_selector("uniform")
def select_uniform(features: np.ndarray, steps: np.ndarray, size: int, seed: int, *, num_steps: int = 25) -> np.ndarray:
    """PTQ4DiT: ``num_steps`` evenly spaced steps (among those present) x a seeded draw per step."""
    check_features(features, steps)
    steps = np.asarray(steps)
    present = np.unique(steps)
    picks = np.unique(np.round(np.linspace(0, len(present) - 1, min(_positive("num_steps", num_steps), len(present)))))
    chosen = present[picks.astype(int)]
    by_step = [np.flatnonzero(steps == s) for s in chosen]
    counts = np.array([len(m) for m in by_step])
    total = min(_positive("size", size), int(counts.sum()))
    quota = np.minimum(counts, total // len(chosen))
    # the remainder (and what short steps could not give) goes to the earliest steps with items left
    for g in np.argsort(-(counts - quota), kind="stable"):
        quota[g] += min(counts[g] - quota[g], total - int(quota.sum()))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    return np.sort(np.concatenate([rng.choice(m, q, replace=False) for m, q in zip(by_step, quota)])).astype(np.int64)


@register_selector("random")
def select_random(features: np.ndarray, steps: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded draw without replacement, ignoring steps and features."""
    x = check_features(features, steps)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3]))
    return np.sort(rng.choice(len(x), min(_positive("size", size), len(x)), replace=False)).astype(np.int64)


@register_selector("kmeans")
def select_kmeans(features: np.ndarray, steps: np.ndarray, size: int, seed: int, *, clusters: int = 100) -> np.ndarray:
    """Plain k-means on the features, then 3..10 items per cluster in proportion to its size."""
    x = check_features(features, steps)
    k = min(_positive("clusters", clusters), len(x))
    labels = KMeans(n_clusters=k, n_init=3, random_state=int(seed)).fit_predict(x)
    return draw_per_cluster(labels, _positive("size", size), seed)


@register_selector("dbscan")
def select_dbscan(features: np.ndarray, steps: np.ndarray, size: int, seed: int, *, eps: Optional[float] = None,
                  min_samples: int = 5, eps_quantile: float = 0.9) -> np.ndarray:
    """DBSCAN on the features; ``eps`` defaults to the ``eps_quantile`` of the distances to each
    item's ``min_samples``-th neighbour. Noise points form one group of their own."""
    x = check_features(features, steps)
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be > 0 or None, got {eps}")
    if not 0.0 < eps_quantile <= 1.0:
        raise ValueError(f"eps_quantile must be in (0, 1], got {eps_quantile}")
    min_samples = min(_positive("min_samples", min_samples), len(x))
    if eps is None:
        eps = _kdistance_eps(x, min_samples, eps_quantile, seed)
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(x)  # noise is -1: one more group
    log.debug("dbscan: eps %.4g, %d clusters, %d noise", eps, len(set(labels) - {-1}), int((labels == -1).sum()))
    return draw_per_cluster(labels, _positive("size", size), seed)


def _kdistance_eps(x: np.ndarray, k: int, quantile: float, seed: int, max_queries: int = 2000) -> float:
    # the k-distance curve from a seeded sample of queries keeps this O(N * max_queries)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4]))
    queries = x[rng.choice(len(x), min(max_queries, len(x)), replace=False)]
    dist, _ = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(queries)  # column 0 is the item itself
    eps = float(np.quantile(dist[:, -1], quantile))
    return eps if eps > 0 else 1e-12  # all-duplicate pools: any positive eps groups the copies


@register_selector("agglomerative")
def select_agglomerative(features: np.ndarray, steps: np.ndarray, size: int, seed: int, *, clusters: int = 100,
                         max_fit: int = 5000) -> np.ndarray:
    """Ward clustering of a seeded subsample of at most ``max_fit`` items (Ward is O(n^2) in memory);
    the other items join the cluster with the nearest centroid."""
    x = check_features(features, steps)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 5]))
    fit_idx = np.sort(rng.choice(len(x), min(_positive("max_fit", max_fit), len(x)), replace=False))
    k = min(_positive("clusters", clusters), len(fit_idx))
    if k == 1:
        return draw_per_cluster(np.zeros(len(x), np.int64), _positive("size", size), seed)
    fit_labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x[fit_idx])
    centroids = np.stack([x[fit_idx[fit_labels == c]].mean(axis=0) for c in range(k)])  # (k, D)
    labels = pairwise_distances_argmin(x, centroids)
    labels[fit_idx] = fit_labels  # fitted items keep their Ward cluster
    return draw_per_cluster(labels, _positive("size", size), seed)


@register_selector("tap")
def select_tap(features: np.ndarray, steps: np.ndarray, size: int, seed: int, **options: Any) -> np.ndarray:
    """TAP (docs/method.md section 4): cluster with :func:`~.tap.tap_clusters` (options: :class:`TAPConfig`'s
    fields), then draw 3..10 per cluster."""
    labels = tap_clusters(features, steps, TAPConfig(**options), seed=seed)
    return draw_per_cluster(labels, _positive("size", size), seed)
