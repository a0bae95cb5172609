"""Graph passes, one per file. Each registers itself with ``@register_pass`` on import.

Example:
    >>> from qc_compiler.passes import PASS_REGISTRY
    >>> sorted(PASS_REGISTRY)[:3]
    ['agglomerative_calibration', 'attention_precision', 'dbscan_calibration']
"""
from ..calibration import TAPConfig
from ..pipeline import PASS_REGISTRY, Pass, PassResult, graph_pass, register_pass
from ..specs import AttentionConfig, StepCacheConfig, VCConfig
from .attention import AttentionPrecision
from .cache import StepCache
from .calibrate import (AgglomerativeCalibration, DBSCANCalibration, KMeansCalibration, RandomCalibration,
                        TAPCalibration, UniformCalibration)
from .quantize import Quantize
from .vc import VarianceCompensation

__all__ = [
    "PASS_REGISTRY", "Pass", "PassResult", "graph_pass", "register_pass", "AttentionPrecision", "AttentionConfig",
    "StepCache", "StepCacheConfig",
    "UniformCalibration", "RandomCalibration", "KMeansCalibration", "DBSCANCalibration", "AgglomerativeCalibration",
    "TAPCalibration", "TAPConfig", "Quantize", "VarianceCompensation", "VCConfig",
]
