"""Mixed precision from a sensitivity ranking: the layers whose low-bit error hurts most stay at high bits.

The ``Quantize`` pass already measures, on calibration batches spread over the sampling steps, how much
error each layer adds when it alone is quantized (relative L2 against float, the ``rel.err`` column of
a compiled model's report). :func:`mixed_precision` compiles the model once at the low bit width on the
fake-quant backend, ranks the layers by that error, and returns a :class:`QuantConfig` that keeps the
``keep`` worst at the high width, with the ranking, so the choice can be read and argued with.

Example:
    >>> import qc_compiler as qc
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> mp = mixed_precision(model, qc.DDPM(steps=4), keep=2, size=16, pool_labels=4)
    >>> len(mp.kept), [(path, spec.weight_bits) for path, spec in mp.config.overrides] == [(p, 8) for p in mp.kept]
    (2, True)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

from .api import compile as qc_compile
from .options import check_int
from .passes import Quantize, UniformCalibration
from .quant import QuantConfig, QuantLinear
from .quant.config import PRESETS

__all__ = ["MixedPrecision", "mixed_precision"]


@dataclass(frozen=True)
class MixedPrecision:
    """The chosen config, the ranking it came from (path, error alone at low bits; worst first), and
    the layers kept at high bits."""

    config: QuantConfig
    ranking: Tuple[Tuple[str, float], ...]
    kept: Tuple[str, ...]
    low: str
    high: str

    def report(self) -> str:
        lines = [f"mixed precision: {len(self.kept)} of {len(self.ranking)} linears at {self.high.upper()}, "
                 f"the rest {self.low.upper()} (ranked by their {self.low.upper()} error alone)"]
        for path, err in self.ranking:
            lines.append(f"  {path:<34} {err:.4f}  {self.high.upper() if path in self.kept else self.low.upper()}")
        return "\n".join(lines)


def mixed_precision(model: Any, sampler: Any, *, low: str = "w4a8", high: str = "w8a8", keep: int = 4,
                    size: int = 256, pool_labels: int = 16, seed: int = 0, rounding: str = "nearest",
                    first_passes: Sequence[Any] = (), conditions: Optional[Any] = None) -> MixedPrecision:
    """Rank the quantizable linears by their error alone at ``low`` (a preset name) and keep the ``keep``
    worst at ``high``. ``first_passes`` run before the calibration (e.g. the step cache, so the ranking
    sees the cached model); ``rounding`` is the Quantize pass's (rank under GPTQ if you will use it)."""
    for name, preset in (("low", low), ("high", high)):
        if not isinstance(preset, str) or preset.lower() not in PRESETS:
            raise ValueError(f"{name} must be one of {sorted(PRESETS)}, got {preset!r}")
    if low.lower() == high.lower():
        raise ValueError(f"low and high are both {low!r}: nothing to mix")
    check_int("keep", keep, lo=0)
    base = QuantConfig.preset(low)
    compiled = qc_compile(model, passes=[*first_passes, UniformCalibration(size=size, pool_labels=pool_labels, seed=seed),
                                         Quantize(config=base, rounding=rounding)],
                          sampler=sampler, backend="fakequant", seed=seed, conditions=conditions)
    layers: Dict[str, QuantLinear] = {m.path: m for m in compiled.graph_module.modules() if isinstance(m, QuantLinear)}
    if keep > len(layers):
        raise ValueError(f"keep={keep}, but the model has {len(layers)} quantized linears")
    ranking = tuple(sorted(((p, float(m.rel_error)) for p, m in layers.items()), key=lambda pe: -pe[1]))
    kept = tuple(p for p, _ in ranking[:keep])
    w, a = PRESETS[high.lower()]
    config = base
    for path in kept:
        spec = layers[path].spec  # keeps a weight-only layer weight-only
        config = config.override(path, replace(spec, weight_bits=w, act_bits=None if spec.act_bits is None else a))
    return MixedPrecision(config=config, ranking=ranking, kept=kept, low=low.lower(), high=high.lower())
