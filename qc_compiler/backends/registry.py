"""The backend registry: each backend file registers ``lower`` (and a ``check``) under its name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

from ..cpu import cpu_flags
from ..errors import ExportError
from ..quant.config import QuantConfig

__all__ = ["Backend", "BACKENDS", "register_backend", "get_backend", "check_constant_uint8_activations", "cpu_has_vnni",
           "SATURATING_WEIGHT_CODE"]

# Without VNNI (AVX2, AVX-512 before Cascade Lake), x86 INT8 GEMMs multiply u8 x s8 pairs with
# vpmaddubsw, which saturates each pair's sum to int16: 255 * (|w0| + |w1|) must stay <= 32767, so
# weight codes above 64 in magnitude with 8-bit activation codes can overflow (measured on AMD Zen 3:
# 9.5% relative error on random codes, docs/RESULTS.md). VNNI (vpdpbusd) and AMX accumulate in int32.
SATURATING_WEIGHT_CODE = 64


def cpu_has_vnni() -> bool:
    """Whether this CPU's INT8 instructions accumulate in int32 (AVX512-VNNI, AVX-VNNI or AMX-INT8).
    ``QC_CPU_VNNI=0|1`` overrides the detection (tests use it); unknown (not Linux) counts as no."""
    import os

    forced = os.environ.get("QC_CPU_VNNI")
    if forced in ("0", "1"):
        return forced == "1"
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


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
    constant uint8 scale per tensor cannot run: per-step-group activation ranges, per-token
    activations and activations below 8 bits. ``alternative`` ends each message (e.g. ", or backend='torch'")."""
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
        specs = cfg.specs
        if any(s.per_token for s in specs):
            raise ExportError(f"the {backend} backend cannot run per-token activations ({op} takes one constant "
                              f"scale per tensor; per-token ranges are taken at run time): use "
                              f"act_granularity='tensor'{alternative}")
        low = sorted({s.act_bits for s in specs if s.act_bits is not None and s.act_bits != 8})
        if low:
            raise ExportError(f"the {backend} backend cannot run {low[0]}-bit activations ({op} takes uint8); use "
                              f"W*A8, e.g. preset w8a8 or w4a8{alternative}")
