"""Ready-made pass schedules.

Example:
    >>> [p.name for p in qandc(bits="w8a8", cache=2)]
    ['step_cache', 'tap_calibration', 'quantize', 'variance_compensation']
"""
from __future__ import annotations

from typing import List, Union

from .passes import Quantize, StepCache, TAPCalibration, VarianceCompensation

__all__ = ["qandc"]


def qandc(bits: str = "w8a8", cache: Union[int, str, None] = 2, placement: str = "sample", clusters: int = 100,
          size: int = 800, pool_labels: int = 32, vc_batch: int = 32, threshold: float = 0.1,
          vc_form: str = "variance") -> List:
    """The Q&C schedule: step cache, TAP calibration on the cached model, quantization, then VC.

    ``cache`` is an interval (int), ``"adaptive"`` (with ``threshold``), or None for no cache.
    ``vc_form`` picks VC's K: ``"variance"`` (spread ratio, the default: it measured best, see
    docs/RESULTS.md) or ``"exact"`` (the least-squares minimiser of docs/method.md 5).
    """
    passes: List = []
    if isinstance(cache, int):
        passes.append(StepCache(interval=cache))
    elif cache == "adaptive":
        passes.append(StepCache(policy="adaptive", threshold=threshold))
    elif cache is not None:
        raise ValueError(f"cache must be an interval, 'adaptive' or None, got {cache!r}")
    passes += [TAPCalibration(clusters=clusters, size=size, pool_labels=pool_labels), Quantize(preset=bits),
               VarianceCompensation(placement=placement, batch=vc_batch, form=vc_form)]
    return passes
