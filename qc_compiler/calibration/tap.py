"""TAP: temporal-aware parallel clustering of a calibration pool (docs/method.md section 4).

Landmark spectral clustering, run as ``rounds`` independent rounds and aggregated::

    features (N, D) --L2--> x_hat     steps (N,) --> s
          |                                 |
          +--- round r (seed r), in parallel: -------------------------------------+
          |    n landmarks; A (N, n) = alpha*max(0, cos) + (1-alpha)*exp(-|ds|)    |
          |    L = D_r^-1/2 A D_c^-1/2 --randomized SVD--> U (N, k) --row norm--> E_r
          +-----------------------------------------------------------------------+
    [E_1 | ... | E_m] (N, m*k) --KMeans(clusters)--> labels --draw 3..10 per cluster--> indices

Memory is O(N * n): the affinity is built in row chunks against the landmarks only, never N x N.
Every random choice comes from ``np.random.SeedSequence(seed)``, so a seed fixes the result, also
when the rounds run in parallel threads.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> centers = rng.normal(size=(3, 16)) * 3
    >>> x = np.concatenate([c + rng.normal(size=(100, 16)) for c in centers]).astype(np.float32)
    >>> steps = np.repeat([0, 10, 20], 100)
    >>> labels = tap_clusters(x, steps, clusters=3, seed=0, n_jobs=1)
    >>> len(set(labels[:100])), len(set(labels))
    (1, 3)
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import numpy as np
from joblib import Parallel, delayed
from sklearn.cluster import KMeans
from sklearn.utils.extmath import randomized_svd

from ..errors import CalibrationError
from ..options import check_float, check_int

__all__ = ["TAPConfig", "tap_clusters", "tap_embedding", "tap_affinity", "l2_normalize", "draw_per_cluster",
           "check_features"]

log = logging.getLogger(__name__)

_CHUNK_ROWS = 4096  # rows of the affinity built at once: bounds the temporaries to 4096 x n
_KMEANS_INIT = 3  # k-means restarts of the final clustering


def check_features(features: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Return features as float32 (N, D); raise ``CalibrationError`` for NaN/inf or an empty pool."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[0] == 0:
        raise CalibrationError("the calibration pool is empty: there is nothing to select from")
    if np.asarray(steps).shape != (x.shape[0],):
        raise ValueError(f"steps must be ({x.shape[0]},) like the features, got {np.asarray(steps).shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise CalibrationError(f"features have NaN or inf in {int(bad.sum())} of {len(x)} items "
                               f"(first: item {int(np.flatnonzero(bad)[0])}); check the model that produced the pool")
    return x


@dataclass(frozen=True)
class TAPConfig:
    """TAP's options (docs/method.md 4), checked when built.

    ``clusters`` k-means clusters; ``alpha`` the weight of feature cosine against step distance;
    ``rounds`` parallel landmark rounds; ``landmark_ratio`` landmarks per item (the paper's 1/20);
    ``embed_dim`` the SVD rank (None: ``clusters``); ``n_jobs`` threads for the rounds (negative:
    joblib style); ``max_landmarks`` caps the landmarks (None: no cap), which makes TAP linear in N.
    """

    clusters: int = 100
    alpha: float = 0.5
    rounds: int = 3
    landmark_ratio: float = 1 / 20
    embed_dim: Optional[int] = None
    n_jobs: int = 3
    max_landmarks: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "clusters", check_int("clusters", self.clusters, lo=1))
        object.__setattr__(self, "alpha", check_float("alpha", self.alpha, lo=0.0, hi=1.0))
        object.__setattr__(self, "rounds", check_int("rounds", self.rounds, lo=1))
        object.__setattr__(self, "landmark_ratio", check_float("landmark_ratio", self.landmark_ratio, lo=0.0, hi=1.0,
                                                               lo_open=True))
        if self.embed_dim is not None:
            object.__setattr__(self, "embed_dim", check_int("embed_dim", self.embed_dim, lo=1))
        if check_int("n_jobs", self.n_jobs) == 0:
            raise ValueError("n_jobs must be >= 1 (or negative, joblib style), got 0")
        if self.max_landmarks is not None:
            object.__setattr__(self, "max_landmarks", check_int("max_landmarks", self.max_landmarks, lo=2))

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero (their cosine to anything is 0)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def tap_affinity(xa: np.ndarray, sa: np.ndarray, xb: np.ndarray, sb: np.ndarray, *, alpha: float,
                 chunk_rows: int = _CHUNK_ROWS) -> np.ndarray:
    """A (len(xa), len(xb)) = alpha*max(0, cos) + (1-alpha)*exp(-|s_a - s_b|), float32, in row chunks.

    ``xa``/``xb`` must already be L2-normalized, so their dot product is the cosine.
    """
    out = np.empty((len(xa), len(xb)), dtype=np.float32)  # (N, n)
    sb = sb.astype(np.float32)
    for lo in range(0, len(xa), chunk_rows):
        hi = min(lo + chunk_rows, len(xa))
        cos = xa[lo:hi] @ xb.T  # (c, n)
        np.maximum(cos, 0.0, out=cos)
        temporal = np.exp(-np.abs(sa[lo:hi, None].astype(np.float32) - sb[None, :]))  # (c, n)
        out[lo:hi] = alpha * cos + (1.0 - alpha) * temporal
    return out


def _int_seed(seq: np.random.SeedSequence) -> int:
    return int(seq.generate_state(1, np.uint32)[0])


def tap_embedding(xn: np.ndarray, s: np.ndarray, *, alpha: float, n_landmarks: int, k: int,
                  seq: np.random.SeedSequence) -> np.ndarray:
    """One round: landmarks, N x n affinity, bipartite normalization, top-k left singular vectors,
    row-normalized (N, k). ``xn`` is L2-normalized; ``seq`` fixes the landmarks and the SVD."""
    land_seq, svd_seq = seq.spawn(2)
    landmarks = np.sort(np.random.default_rng(land_seq).choice(len(xn), n_landmarks, replace=False))
    a = tap_affinity(xn, s, xn[landmarks], s[landmarks], alpha=alpha)  # (N, n)
    eps = np.finfo(np.float32).tiny  # exp(-|ds|) can underflow to 0 for alpha=1 or huge step gaps
    d_r = np.maximum(a.sum(axis=1), eps)  # (N,)
    d_c = np.maximum(a.sum(axis=0), eps)  # (n,)
    a /= np.sqrt(d_r)[:, None]
    a /= np.sqrt(d_c)[None, :]
    u, _, _ = randomized_svd(a, n_components=k, random_state=_int_seed(svd_seq))  # (N, k)
    return l2_normalize(u.astype(np.float32))


def tap_clusters(features: np.ndarray, steps: np.ndarray, config: Optional[TAPConfig] = None, *, seed: int = 0,
                 **options: Any) -> np.ndarray:
    """Cluster labels (N,) from TAP's parallel landmark spectral rounds and one final k-means.

    Options come as a :class:`TAPConfig` or as its fields by keyword (``clusters=10``), not both.

    With n = N/20 landmarks (the paper's) the affinity costs N * N/20: quadratic with a small
    constant. ``max_landmarks`` caps n, which makes the cost linear in N for large pools.

    ``steps`` are step indices 0..S-1 (not raw timesteps; docs/method.md 4.1). ``clusters`` is capped at
    N; ``embed_dim`` (the SVD rank k) defaults to ``clusters`` and is capped at n - 1 landmarks.
    """
    if config is not None and options:
        raise ValueError(f"give TAP options as a TAPConfig or as keywords, not both (got {sorted(options)})")
    cfg = config if config is not None else TAPConfig(**options)
    clusters, alpha, rounds, embed_dim, n_jobs = cfg.clusters, cfg.alpha, cfg.rounds, cfg.embed_dim, cfg.n_jobs
    landmark_ratio, max_landmarks = cfg.landmark_ratio, cfg.max_landmarks
    x = check_features(features, steps)
    n_items = len(x)
    clusters = min(int(clusters), n_items)
    if clusters == 1 or n_items < 3:
        return np.zeros(n_items, dtype=np.int64)
    k = int(embed_dim) if embed_dim is not None else clusters
    n_landmarks = min(n_items, max(k + 1, int(round(n_items * landmark_ratio))))
    if max_landmarks is not None:
        n_landmarks = min(n_landmarks, max(k + 1, int(max_landmarks)))
    k = max(1, min(k, n_landmarks - 1))
    xn, s = l2_normalize(x), np.asarray(steps)
    round_seqs = np.random.SeedSequence(seed).spawn(int(rounds) + 1)
    embeddings = Parallel(n_jobs=min(int(n_jobs), int(rounds)) if n_jobs > 0 else n_jobs, prefer="threads")(
        delayed(tap_embedding)(xn, s, alpha=float(alpha), n_landmarks=n_landmarks, k=k, seq=seq)
        for seq in round_seqs[:-1])
    joined = np.concatenate(embeddings, axis=1)  # (N, rounds * k), in round order: deterministic
    log.debug("tap: %d items, %d rounds x %d landmarks, embedding %d, %d clusters",
              n_items, rounds, n_landmarks, k, clusters)
    km = KMeans(n_clusters=clusters, n_init=_KMEANS_INIT, random_state=_int_seed(round_seqs[-1]))
    return km.fit_predict(joined).astype(np.int64)


def _apportion(sizes: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integer quotas with lo <= q <= hi and sum q == total (given sum lo <= total <= sum hi),
    filled greedily towards each group's proportional share total * size / sum(sizes)."""
    target = total * sizes / sizes.sum()
    quota = lo.copy()
    # heap of (-deficit, group): always top up the group furthest below its share; ties by index
    heap = [(-(target[g] - quota[g]), g) for g in range(len(sizes)) if quota[g] < hi[g]]
    heapq.heapify(heap)
    for _ in range(total - int(quota.sum())):
        _, g = heapq.heappop(heap)
        quota[g] += 1
        if quota[g] < hi[g]:
            heapq.heappush(heap, (-(target[g] - quota[g]), g))
    return quota


def draw_per_cluster(labels: np.ndarray, size: int, seed: int = 0, *, min_per: int = 3,
                     max_per: int = 10) -> np.ndarray:
    """Sorted unique indices: ``min_per``..``max_per`` items per cluster, in proportion to cluster size,
    ``min(size, N)`` in total; a cluster smaller than ``min_per`` gives all its items.

    When the bounds cannot meet the total (``size`` below min_per per cluster, or above max_per per
    cluster), the total wins and the bounds are relaxed, with a warning in the log.

    Example:
        >>> draw_per_cluster(np.repeat([0, 1], [50, 2]), size=8).size
        8
    """
    labels = np.asarray(labels)
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 0 <= min_per <= max_per:
        raise ValueError(f"need 0 <= min_per <= max_per, got {min_per}, {max_per}")
    groups, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    total = min(int(size), len(labels))
    lo, hi = np.minimum(min_per, sizes), np.minimum(max_per, sizes)
    if total < lo.sum():
        log.warning("size %d < %d per cluster x %d clusters: some clusters give fewer", total, min_per, len(groups))
        lo, hi = np.zeros_like(lo), lo
    elif total > hi.sum():
        log.warning("size %d > %d per cluster x %d clusters: clusters give more", total, max_per, len(groups))
        lo, hi = hi, sizes
    quota = _apportion(sizes.astype(np.float64), total, lo, hi)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    members = np.argsort(inverse, kind="stable")  # indices grouped by cluster, ascending within
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    chosen = [rng.choice(members[bounds[g]:bounds[g + 1]], quota[g], replace=False) for g in range(len(groups))]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
