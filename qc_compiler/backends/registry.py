"""The backend registry: each backend file registers ``lower`` (and a ``check``) under its name."""
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
