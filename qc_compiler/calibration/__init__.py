"""Calibration data: candidate pools gathered by the sampler, and the selectors that pick from them.

Example:
    >>> from qc_compiler.calibration import SELECTORS, TAPCalibration
    >>> sorted(SELECTORS)
    ['agglomerative', 'dbscan', 'kmeans', 'random', 'tap', 'uniform']
    >>> TAPCalibration(clusters=5, size=20).name
    'tap_calibration'
"""
from .pool import CalibrationPool, collect_pool
from .select import (SELECTORS, AgglomerativeCalibration, CalibrationSelector, DBSCANCalibration,
                     KMeansCalibration, RandomCalibration, TAPCalibration, UniformCalibration, register_selector)
from .tap import draw_per_cluster, tap_clusters

__all__ = [
    "CalibrationPool", "collect_pool", "SELECTORS", "register_selector", "CalibrationSelector",
    "UniformCalibration", "RandomCalibration", "KMeansCalibration", "DBSCANCalibration",
    "AgglomerativeCalibration", "TAPCalibration", "tap_clusters", "draw_per_cluster",
]
