"""Backends lower a pass-rewritten graph to something that runs fast. Each registers itself by name.

Example:
    >>> sorted(BACKENDS)[:1]
    ['torch']
"""
from __future__ import annotations

from typing import Callable, Dict

__all__ = ["BACKENDS", "register_backend", "get_backend"]

# name -> lower(graph_module, ctx) -> nn.Module
BACKENDS: Dict[str, Callable] = {}


def register_backend(name: str):
    """Decorator: make ``lower(gm, ctx) -> nn.Module`` available as ``compile(..., backend=name)``."""

    def wrap(fn: Callable) -> Callable:
        BACKENDS[name] = fn
        return fn

    return wrap


def get_backend(name: str) -> Callable:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]


from . import torch_int8  # noqa: E402,F401  (registers "torch")
