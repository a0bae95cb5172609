"""Calibration data: candidate pools gathered by the sampler, and the selectors that pick from them.

The passes that run a selector live in ``qc_compiler.passes.calibrate``.

Example:
    >>> from qc_compiler.calibration import SELECTORS, TAPConfig
    >>> sorted(SELECTORS)
    ['agglomerative', 'dbscan', 'kmeans', 'random', 'tap', 'uniform']
    >>> TAPConfig(clusters=5).alpha
    0.5
"""
from .pool import CalibrationPool, collect_pool
from .selectors import SELECTORS, register_selector
from .tap import TAPConfig, draw_per_cluster, tap_clusters

__all__ = ["CalibrationPool", "collect_pool", "SELECTORS", "register_selector", "TAPConfig", "tap_clusters",
           "draw_per_cluster"]
