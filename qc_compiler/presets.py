"""Ready-made pass schedules.

Example:
    >>> [p.name for p in qandc(bits="w8a8", cache=StepCacheConfig(interval=2))]
    ['step_cache', 'tap_calibration', 'quantize', 'variance_compensation']
    >>> [p.name for p in qandc(cache=None, vc=None)]
    ['tap_calibration', 'quantize']
"""
from __future__ import annotations

from typing import List, Optional

from .calibration import TAPConfig
from .passes import Quantize, StepCache, TAPCalibration, VarianceCompensation
from .pipeline import Pass
from .specs import StepCacheConfig, VCConfig

__all__ = ["qandc"]


def qandc(*, bits: str = "w8a8", cache: Optional[StepCacheConfig] = StepCacheConfig(interval=2),
          tap: Optional[TAPConfig] = None, size: int = 800, pool_labels: int = 32,
          vc: Optional[VCConfig] = VCConfig()) -> List[Pass]:
    """The Q&C schedule: step cache, TAP calibration on the cached model, quantization, then VC.

    ``cache`` is a :class:`StepCacheConfig` (interval, static or adaptive), or None for no cache.
    ``tap`` TAP's options (default ``TAPConfig()``); ``size``/``pool_labels`` the calibration set and
    the pool it is drawn from. ``vc`` is a :class:`VCConfig`, or None for no VC; its default form is
    the variance ratio (it measured best, docs/RESULTS.md), ``VCConfig(form="exact")`` is the paper's
    least squares.
    """
    passes: List[Pass] = [StepCache(cache)] if cache is not None else []
    passes += [TAPCalibration(size=size, pool_labels=pool_labels, config=tap or TAPConfig()), Quantize(preset=bits)]
    if vc is not None:
        passes.append(VarianceCompensation(vc))
    return passes
