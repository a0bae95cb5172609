"""The backend registry: each backend file registers ``lower`` (and a ``check``) under its name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

from ..errors import ExportError
from ..quant.config import QuantConfig

__all__ = ["Backend", "BACKENDS", "register_backend", "get_backend", "check_constant_uint8_activations"]


@dataclass(frozen=True)
class Backend:
    name: str
    lower: Callable
    check: Optional[Callable[[Sequence], None]] = None

    def check_passes(self, passes: Sequence) -> None:
        if self.check is not None:
            self.check(passes)


BACKENDS: Dict[str, Backend] = {}


def register_backend(name: str, check: Optional[Callable[[Sequence], None]] = None):
    """Decorator: make ``lower(gm, ctx) -> nn.Module`` available as ``compile(..., backend=name)``;
    ``check(passes)`` raises for a schedule it cannot lower."""

    def wrap(fn: Callable) -> Callable:
        BACKENDS[name] = Backend(name, fn, check)
        return fn

    return wrap


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]


def check_constant_uint8_activations(passes: Sequence[Any], backend: str, op: str, alternative: str = "") -> None:
    """Refuse, from the Quantize passes' typed configs, what a backend whose INT8 ``op`` takes one
    constant uint8 scale per tensor cannot run: per-step-group activation ranges and activations
    below 8 bits. ``alternative`` ends each message (e.g. ", or backend='torch'")."""
    for p in passes:
        cfg = getattr(p, "config", None)
        if not isinstance(cfg, QuantConfig):
            continue
        if getattr(p, "low_rank", 0):
            raise ExportError(f"the {backend} backend cannot run a low-rank float branch beside its INT8 op: drop "
                              f"low_rank{alternative}")
        if getattr(p, "balance", None) is not None:
            raise ExportError(f"the {backend} backend cannot run salience balancing ({op} takes one scale per "
                              f"tensor; balancing needs one per input channel): drop balance{alternative}")
        if cfg.act_step_groups > 1:
            raise ExportError(f"the {backend} backend cannot run per-step-group activation ranges ({op} takes one "
                              f"constant scale); use act_step_groups=1{alternative}")
        specs = [cfg.default] + [s for _, s in cfg.overrides if s is not None]
        low = sorted({s.act_bits for s in specs if s.act_bits is not None and s.act_bits != 8})
        if low:
            raise ExportError(f"the {backend} backend cannot run {low[0]}-bit activations ({op} takes uint8); use "
                              f"W*A8, e.g. preset w8a8 or w4a8{alternative}")
