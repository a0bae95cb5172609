"""Named compile variants shared by the benchmarks: name -> pass list factory.

Each factory takes the calibration/pool sizes so that quick runs and full runs use the same recipe.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from qc_compiler.passes import Quantize, StepCache


def _selector(kind: str, size: int, pool_labels: int):
    from qc_compiler.calibration import select

    cls = {"uniform": select.UniformCalibration, "tap": select.TAPCalibration, "random": select.RandomCalibration,
           "kmeans": select.KMeansCalibration, "dbscan": select.DBSCANCalibration,
           "agglomerative": select.AgglomerativeCalibration}[kind]
    return cls(size=size, pool_labels=pool_labels)


def variants(size: int = 800, pool_labels: int = 32) -> Dict[str, Callable[[], List]]:
    """The rows the quality and speed benchmarks know."""
    q = lambda bits, sel: [_selector(sel, size, pool_labels), Quantize(preset=bits)]  # noqa: E731
    return {
        "fp32": lambda: [],
        "w8a8-uniform": lambda: q("w8a8", "uniform"),
        "w8a8-tap": lambda: q("w8a8", "tap"),
        "w4a8-uniform": lambda: q("w4a8", "uniform"),
        "w4a8-tap": lambda: q("w4a8", "tap"),
        "cache-i2": lambda: [StepCache(interval=2)],
        "cache-i3": lambda: [StepCache(interval=3)],
        "cache-adaptive-0.1": lambda: [StepCache(policy="adaptive", threshold=0.1)],
        "cache-adaptive-0.3": lambda: [StepCache(policy="adaptive", threshold=0.3)],
        "cache-static-0.2": lambda: [StepCache(policy="static", threshold=0.2)],
    }
