"""Backends lower a pass-rewritten graph to something that runs fast. Each registers itself by name.

A backend is ``lower(graph_module, ctx) -> nn.Module`` plus an optional ``check(passes)`` that
refuses, before any pass runs, a schedule the backend cannot lower (it reads the passes' typed
configs, never their code).

Example:
    >>> sorted(BACKENDS)
    ['fakequant', 'onnx', 'torch']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

__all__ = ["Backend", "BACKENDS", "register_backend", "get_backend"]


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


from . import onnx, torch_int8  # noqa: E402,F401  (register "torch", "fakequant" and "onnx")
