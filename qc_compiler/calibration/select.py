"""Calibration-set selection: an open registry of selectors and one pass per selector.

A selector maps a pool's features to the indices of the calibration set::

    selector(features (N, D) float32, steps (N,) int, size, seed, **options) -> unique int indices

Register a new one with ``@register_selector("name")``. The passes collect a pool over the *current*
graph (so after ``StepCache`` it holds what the cached model sees), run their selector, and provide
``ctx.artifacts["calibration_set"]``. The chosen items are fitted state (``calibration.set.*`` in
``ctx.fitted``), so loading a compiled model restores them instead of collecting a pool again.

Example:
    >>> import numpy as np
    >>> steps = np.repeat(np.arange(50), 4)                      # 50 steps x 4 samples
    >>> idx = SELECTORS["uniform"](np.zeros((200, 8), np.float32), steps, size=20, seed=0, num_steps=10)
    >>> sorted(set(steps[idx].tolist()))[:3], len(idx)
    ([0, 5, 11], 20)
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.fx as fx
from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans
from sklearn.metrics import pairwise_distances_argmin
from sklearn.neighbors import NearestNeighbors

from ..errors import CalibrationError
from ..pipeline import Pass, PassResult, register_pass
from .pool import CalibrationPool, collect_pool
from .tap import check_features, check_tap_options, draw_per_cluster, tap_clusters

__all__ = [
    "SELECTORS", "register_selector", "CalibrationSelector", "UniformCalibration", "RandomCalibration",
    "KMeansCalibration", "DBSCANCalibration", "AgglomerativeCalibration", "TAPCalibration",
]

log = logging.getLogger(__name__)

Selector = Callable[..., np.ndarray]
SELECTORS: Dict[str, Selector] = {}
FITTED_PREFIX = "calibration.set"
_FIELDS = ("x", "t", "step", "y", "meta")  # the tensors CalibrationPool.to_tensors writes
_INFO = f"{FITTED_PREFIX}.info"  # JSON: which pass selected the set, and from how many candidates


def register_selector(name: str) -> Callable[[Selector], Selector]:
    """Decorator: make ``fn(features, steps, size, seed, **options) -> indices`` selectable by name."""

    def wrap(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        return fn

    return wrap


def _positive(name: str, value: Any) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


# --- selectors ------------------------------------------------------------------------------------

@register_selector("uniform")
def select_uniform(features: np.ndarray, steps: np.ndarray, size: int, seed: int, num_steps: int = 25) -> np.ndarray:
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
def select_kmeans(features: np.ndarray, steps: np.ndarray, size: int, seed: int, clusters: int = 100) -> np.ndarray:
    """Plain k-means on the features, then 3..10 items per cluster in proportion to its size."""
    x = check_features(features, steps)
    k = min(_positive("clusters", clusters), len(x))
    labels = KMeans(n_clusters=k, n_init=3, random_state=int(seed)).fit_predict(x)
    return draw_per_cluster(labels, _positive("size", size), seed)


@register_selector("dbscan")
def select_dbscan(features: np.ndarray, steps: np.ndarray, size: int, seed: int, eps: Optional[float] = None,
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
def select_agglomerative(features: np.ndarray, steps: np.ndarray, size: int, seed: int, clusters: int = 100,
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
def select_tap(features: np.ndarray, steps: np.ndarray, size: int, seed: int, clusters: int = 100,
               alpha: float = 0.5, rounds: int = 3, landmark_ratio: float = 1 / 20,
               embed_dim: Optional[int] = None, n_jobs: int = 3, max_landmarks: Optional[int] = None) -> np.ndarray:
    """TAP (docs/method.md section 4): cluster with :func:`~.tap.tap_clusters`, then draw 3..10 per cluster."""
    labels = tap_clusters(features, steps, clusters, alpha, rounds, landmark_ratio, embed_dim, seed, n_jobs,
                          max_landmarks)
    return draw_per_cluster(labels, _positive("size", size), seed)


# --- passes ---------------------------------------------------------------------------------------

def _concat(pools: List[CalibrationPool]) -> CalibrationPool:
    if len(pools) == 1:
        return pools[0]
    return CalibrationPool(*(torch.cat([getattr(p, f) for p in pools]) for f in ("x", "t", "step", "y")),
                           null_label=pools[0].null_label, cfg=pools[0].cfg)


def _pool_from_fitted(fitted: Dict[str, Any]) -> CalibrationPool:
    x, t, step, y, meta = (fitted[f"{FITTED_PREFIX}.{f}"] for f in _FIELDS)
    return CalibrationPool(x, t.long(), step.long(), y.long(), null_label=int(meta[0]), cfg=bool(meta[1]))


class CalibrationSelector(Pass):
    """Collect a pool over the current graph, select ``size`` items, provide ``calibration_set``.

    The pool holds ``pool_labels`` labels (cycling 0..num_classes-1) x every sampler step, collected
    ``batch`` labels per sampling run. Subclasses set ``name``/``selector`` and their options.
    """

    provides = frozenset({"calibration_set"})
    selector = ""

    def __init__(self, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32):
        self.size, self.pool_labels = _positive("size", size), _positive("pool_labels", pool_labels)
        self.batch = _positive("batch", batch)
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)

    def selector_options(self) -> Dict[str, Any]:
        """The selector's own keyword options (JSON-able)."""
        return {}

    def options(self) -> Dict[str, Any]:
        return {"size": self.size, "pool_labels": self.pool_labels, "seed": self.seed, "batch": self.batch,
                **self.selector_options()}

    def groups_note(self, pool_size: int) -> str:
        """The tail of the pass note: how many groups the selector drew from."""
        clusters = getattr(self, "clusters", None)
        return f", {min(clusters, pool_size)} clusters" if clusters else ""

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        keys = [f"{FITTED_PREFIX}.{f}" for f in _FIELDS]
        info = ctx.fitted.get(_INFO)
        # a set fitted by another selector (or a partial one) is not ours to reuse
        restored = all(k in ctx.fitted for k in keys) and isinstance(info, dict) and info.get("selector") == self.name
        if not restored:
            for key in keys + [_INFO]:
                ctx.fitted.pop(key, None)
            for key, value in self._select(gm, ctx).items():
                ctx.fit(key, lambda v=value: v)
        chosen, n_pool = _pool_from_fitted(ctx.fitted), int(ctx.fitted[_INFO]["pool_size"])
        ctx.artifacts["calibration_set"], ctx.artifacts["calibration_pool_size"] = chosen, n_pool
        note = f"{self.selector}: {len(chosen)} of {n_pool} candidates" + self.groups_note(n_pool)
        return PassResult(gm, modified=False, notes=note + (" (restored)" if restored else ""))

    def _select(self, gm: fx.GraphModule, ctx) -> Dict[str, Any]:
        pool = self._collect(gm, ctx)
        indices = np.asarray(SELECTORS[self.selector](pool.features(), pool.step.numpy(), self.size, self.seed,
                                                      **self.selector_options()))
        if indices.size == 0 or len(np.unique(indices)) != indices.size or indices.min() < 0 or indices.max() >= len(pool):
            raise CalibrationError(f"selector {self.selector!r} returned invalid indices for a pool of {len(pool)}: "
                                   "they must be unique, in range, and not empty")
        subset = pool.subset(np.sort(indices))
        return {**subset.to_tensors(FITTED_PREFIX), _INFO: {"selector": self.name, "pool_size": len(pool)}}

    def _collect(self, gm: fx.GraphModule, ctx) -> CalibrationPool:
        num_classes = int(ctx.model_info.get("num_classes") or 0)
        if num_classes < 1:
            raise CalibrationError(f"pass {self.name!r} needs a class-conditional model (num_classes in model_info)")
        labels = [i % num_classes for i in range(self.pool_labels)]
        # One sampling run per `batch` labels bounds each run's memory; run i uses seed + i, so runs
        # differ. Under torchrun, run i belongs to rank i % world and the runs are gathered: every rank
        # ends with the same pool, equal to a single process's (each run is the same batch).
        from ..distributed import gather_by_index, rank_world

        rank, world = rank_world()
        starts = list(range(0, len(labels), self.batch))
        mine = {i: collect_pool(ctx, gm, labels[lo:lo + self.batch], seed=self.seed + i)
                for i, lo in enumerate(starts) if i % world == rank}
        runs = gather_by_index(mine)
        return _concat([runs[i] for i in range(len(starts))])


@register_pass
class UniformCalibration(CalibrationSelector):
    """PTQ4DiT's uniform-timestep set: ``num_steps`` evenly spaced steps x size/num_steps samples.

    Example:
        >>> UniformCalibration(size=800, num_steps=25).options()["num_steps"]
        25
    """

    name, selector = "uniform_calibration", "uniform"

    def __init__(self, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32, num_steps: int = 25):
        super().__init__(size, pool_labels, seed, batch)
        self.num_steps = _positive("num_steps", num_steps)

    def selector_options(self):
        return {"num_steps": self.num_steps}

    def groups_note(self, pool_size):
        return f", {self.num_steps} steps"


@register_pass
class RandomCalibration(CalibrationSelector):
    """A seeded random draw from the pool (ablation baseline)."""

    name, selector = "random_calibration", "random"


@register_pass
class KMeansCalibration(CalibrationSelector):
    """Plain k-means on x_t, 3..10 items per cluster (ablation baseline)."""

    name, selector = "kmeans_calibration", "kmeans"

    def __init__(self, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32, clusters: int = 100):
        super().__init__(size, pool_labels, seed, batch)
        self.clusters = _positive("clusters", clusters)

    def selector_options(self):
        return {"clusters": self.clusters}


@register_pass
class DBSCANCalibration(CalibrationSelector):
    """DBSCAN on x_t with an automatic eps; noise is a group of its own (ablation baseline)."""

    name, selector = "dbscan_calibration", "dbscan"

    def __init__(self, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32,
                 eps: Optional[float] = None, min_samples: int = 5, eps_quantile: float = 0.9):
        super().__init__(size, pool_labels, seed, batch)
        if eps is not None and not float(eps) > 0:
            raise ValueError(f"eps must be > 0 or None, got {eps}")
        if not 0.0 < float(eps_quantile) <= 1.0:
            raise ValueError(f"eps_quantile must be in (0, 1], got {eps_quantile}")
        self.eps = None if eps is None else float(eps)
        self.min_samples, self.eps_quantile = _positive("min_samples", min_samples), float(eps_quantile)

    def selector_options(self):
        return {"eps": self.eps, "min_samples": self.min_samples, "eps_quantile": self.eps_quantile}


@register_pass
class AgglomerativeCalibration(CalibrationSelector):
    """Ward agglomerative clustering on a subsample of x_t (ablation baseline)."""

    name, selector = "agglomerative_calibration", "agglomerative"

    def __init__(self, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32,
                 clusters: int = 100, max_fit: int = 5000):
        super().__init__(size, pool_labels, seed, batch)
        self.clusters, self.max_fit = _positive("clusters", clusters), _positive("max_fit", max_fit)

    def selector_options(self):
        return {"clusters": self.clusters, "max_fit": self.max_fit}


@register_pass
class TAPCalibration(CalibrationSelector):
    """Q&C's temporal-aware parallel clustering (docs/method.md section 4), the default selector.

    Example:
        >>> import qc_compiler as qc
        >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
        >>> cm = qc.compile(model, passes=[TAPCalibration(clusters=5, size=20, pool_labels=8)],
        ...                 sampler=qc.DDPM(steps=5))
        >>> "tap: 20 of 40 candidates, 5 clusters" in cm.report()
        True
    """

    name, selector = "tap_calibration", "tap"

    def __init__(self, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32, clusters: int = 100,
                 alpha: float = 0.5, rounds: int = 3, landmark_ratio: float = 1 / 20,
                 embed_dim: Optional[int] = None, n_jobs: int = 3, max_landmarks: Optional[int] = None):
        super().__init__(size, pool_labels, seed, batch)
        check_tap_options(clusters, alpha, rounds, landmark_ratio, embed_dim, n_jobs)
        if max_landmarks is not None and int(max_landmarks) < 2:
            raise ValueError(f"max_landmarks must be >= 2 or None, got {max_landmarks}")
        self.max_landmarks = None if max_landmarks is None else int(max_landmarks)
        self.clusters, self.alpha, self.rounds = int(clusters), float(alpha), int(rounds)
        self.landmark_ratio, self.n_jobs = float(landmark_ratio), int(n_jobs)
        self.embed_dim = None if embed_dim is None else int(embed_dim)

    def selector_options(self):
        return {"clusters": self.clusters, "alpha": self.alpha, "rounds": self.rounds,
                "landmark_ratio": self.landmark_ratio, "embed_dim": self.embed_dim, "n_jobs": self.n_jobs,
                "max_landmarks": self.max_landmarks}
