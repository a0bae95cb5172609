"""Backends lower a pass-rewritten graph to something that runs fast. Each registers itself by name.

A backend is ``lower(graph_module, ctx) -> nn.Module`` plus an optional ``check(passes)`` that
refuses, before any pass runs, a schedule the backend cannot lower (it reads the passes' typed
configs, never their code).

Example:
    >>> sorted(BACKENDS)
    ['fakequant', 'inductor', 'onnx', 'torch']
"""
from .registry import BACKENDS, Backend, get_backend, register_backend
from . import inductor, onnx, torch_int8  # noqa: E402,F401  (register "torch", "fakequant", "inductor", "onnx")

__all__ = ["Backend", "BACKENDS", "register_backend", "get_backend"]
