"""What this CPU's instruction set offers the kernels: the flags of ``/proc/cpuinfo``, read once.

Kernel choices that depend on the ISA (the INT8 GEMMs' int32 accumulation, AMX's bf16 tiles) ask here,
so every backend and pass sees the same answer.
"""
from __future__ import annotations

import functools
from typing import FrozenSet

__all__ = ["cpu_flags", "cpu_has_amx_bf16"]


@functools.lru_cache(maxsize=None)
def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags (``avx512_vnni``, ``amx_bf16``, ...); empty where unknown (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 tiles, which PyTorch's CPU flash attention uses for bf16."""
    return "amx_bf16" in cpu_flags()
