"""Calibration passes: collect a pool over the current graph, run a selector, provide ``calibration_set``.

One pass per selector of ``qc_compiler.calibration`` (uniform, random, k-means, DBSCAN, Ward, TAP).
The pool is gathered over the *current* graph, so after ``StepCache`` it holds what the cached model
sees (the deployment condition of Q&C). The chosen items are fitted state (``calibration.set.*`` in
``ctx.fitted``), so loading a compiled model restores them instead of collecting a pool again.

Example:
    >>> import qc_compiler as qc
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> cm = qc.compile(model, passes=[TAPCalibration(clusters=5, size=20, pool_labels=8)],
    ...                 sampler=qc.DDPM(steps=5))
    >>> "tap: 20 of 40 candidates, 5 clusters" in cm.report()
    True
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.fx as fx

from ..calibration import SELECTORS, CalibrationPool, TAPConfig, collect_pool
from ..distributed import gather_by_index, rank_world
from ..errors import CalibrationError
from ..options import check_float, check_int, config_or_keywords
from ..pipeline import Pass, PassResult, register_pass

__all__ = ["CalibrationSelector", "UniformCalibration", "RandomCalibration", "KMeansCalibration", "DBSCANCalibration",
           "AgglomerativeCalibration", "TAPCalibration"]

log = logging.getLogger(__name__)

FITTED_PREFIX = "calibration.set"
_FIELDS = ("x", "t", "step", "y", "meta")  # the tensors CalibrationPool.to_tensors writes
_INFO = f"{FITTED_PREFIX}.info"  # JSON: which pass selected the set, and from how many candidates


def _concat(pools: List[CalibrationPool]) -> CalibrationPool:
    if len(pools) == 1:
        return pools[0]
    return CalibrationPool(*(torch.cat([getattr(p, f) for p in pools]) for f in ("x", "t", "step", "y")),
                           null_label=pools[0].null_label, cfg=pools[0].cfg)


def _pool_from_fitted(fitted: Dict[str, Any]) -> CalibrationPool:
    x, t, step, y, meta = (fitted[f"{FITTED_PREFIX}.{f}"] for f in _FIELDS)
    return CalibrationPool(x, t, step.long(), y.long(), null_label=int(meta[0]), cfg=bool(meta[1]))


class CalibrationSelector(Pass):
    """Collect a pool over the current graph, select ``size`` items, provide ``calibration_set``.

    The pool holds ``pool_labels`` labels (cycling 0..num_classes-1) x every sampler step, collected
    ``batch`` labels per sampling run. Subclasses set ``name``/``selector`` and their options.
    """

    provides = frozenset({"calibration_set"})
    samples = True
    selector = ""

    def __init__(self, *, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32):
        self.size, self.pool_labels = check_int("size", size, lo=1), check_int("pool_labels", pool_labels, lo=1)
        self.batch = check_int("batch", batch, lo=1)
        self.seed = check_int("seed", seed, lo=0)

    def selector_options(self) -> Dict[str, Any]:
        """The selector's own keyword options (JSON-able)."""
        return {}

    def options(self) -> Dict[str, Any]:
        return {"size": self.size, "pool_labels": self.pool_labels, "seed": self.seed, "batch": self.batch,
                **self.selector_options()}

    def groups_note(self, pool_size: int) -> str:
        """The tail of the pass note: how many groups the selector drew from."""
        clusters = self.selector_options().get("clusters")
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
        if self.size > len(pool):
            log.warning("%s: asked for %d calibration items, but the pool holds %d (pool_labels %d x %d steps); "
                        "using all of them: raise pool_labels for more", self.name, self.size, len(pool),
                        self.pool_labels, len(pool) // max(1, self.pool_labels))
        indices = np.asarray(SELECTORS[self.selector](pool.features(), pool.step.numpy(), self.size, self.seed,
                                                      **self.selector_options()))
        if indices.size == 0 or len(np.unique(indices)) != indices.size or indices.min() < 0 or indices.max() >= len(pool):
            raise CalibrationError(f"selector {self.selector!r} returned invalid indices for a pool of {len(pool)}: "
                                   "they must be unique, in range, and not empty")
        subset = pool.subset(np.sort(indices))
        return {**subset.to_tensors(FITTED_PREFIX), _INFO: {"selector": self.name, "pool_size": len(pool)}}

    def _collect(self, gm: fx.GraphModule, ctx) -> CalibrationPool:
        num_classes = ctx.num_conditions
        if not num_classes:
            raise CalibrationError(f"pass {self.name!r} samples calibration trajectories: a text-conditioned model "
                                   "needs its prompts, qc.compile(..., conditions=qc.ConditionBank(...))")
        labels = [i % num_classes for i in range(self.pool_labels)]
        # One sampling run per `batch` labels bounds each run's memory; run i uses seed + i, so runs
        # differ. Under torchrun, run i belongs to rank i % world and the runs are gathered: every rank
        # ends with the same pool, equal to a single process's (each run is the same batch).
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

    def __init__(self, *, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32, num_steps: int = 25):
        super().__init__(size=size, pool_labels=pool_labels, seed=seed, batch=batch)
        self.num_steps = check_int("num_steps", num_steps, lo=1)

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

    def __init__(self, *, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32, clusters: int = 100):
        super().__init__(size=size, pool_labels=pool_labels, seed=seed, batch=batch)
        self.clusters = check_int("clusters", clusters, lo=1)

    def selector_options(self):
        return {"clusters": self.clusters}


@register_pass
class DBSCANCalibration(CalibrationSelector):
    """DBSCAN on x_t with an automatic eps; noise is a group of its own (ablation baseline)."""

    name, selector = "dbscan_calibration", "dbscan"

    def __init__(self, *, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32,
                 eps: Optional[float] = None, min_samples: int = 5, eps_quantile: float = 0.9):
        super().__init__(size=size, pool_labels=pool_labels, seed=seed, batch=batch)
        self.eps = None if eps is None else check_float("eps", eps, lo=0.0, lo_open=True)
        self.min_samples = check_int("min_samples", min_samples, lo=1)
        self.eps_quantile = check_float("eps_quantile", eps_quantile, lo=0.0, hi=1.0, lo_open=True)

    def selector_options(self):
        return {"eps": self.eps, "min_samples": self.min_samples, "eps_quantile": self.eps_quantile}


@register_pass
class AgglomerativeCalibration(CalibrationSelector):
    """Ward agglomerative clustering on a subsample of x_t (ablation baseline)."""

    name, selector = "agglomerative_calibration", "agglomerative"

    def __init__(self, *, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32,
                 clusters: int = 100, max_fit: int = 5000):
        super().__init__(size=size, pool_labels=pool_labels, seed=seed, batch=batch)
        self.clusters, self.max_fit = check_int("clusters", clusters, lo=1), check_int("max_fit", max_fit, lo=1)

    def selector_options(self):
        return {"clusters": self.clusters, "max_fit": self.max_fit}


@register_pass
class TAPCalibration(CalibrationSelector):
    """Q&C's temporal-aware parallel clustering (docs/method.md section 4), the default selector.

    TAP's options come as ``config=TAPConfig(...)`` or as its fields by keyword, not both.

    Example:
        >>> TAPCalibration(size=400, clusters=50).config.clusters
        50
    """

    name, selector = "tap_calibration", "tap"

    def __init__(self, *, size: int = 800, pool_labels: int = 32, seed: int = 0, batch: int = 32,
                 config: Optional[TAPConfig] = None, **tap_options: Any):
        super().__init__(size=size, pool_labels=pool_labels, seed=seed, batch=batch)
        self.config = config_or_keywords(self.name, TAPConfig, config, tap_options)

    def selector_options(self):
        return self.config.to_json()
