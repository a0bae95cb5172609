"""The PyTorch backend: runs the rewritten fx graph in PyTorch.

Lowering fake-quant linears to real INT8 kernels (``torch._int_mm`` on CUDA, the CPU's INT8 path) is
the job of this file; until a quantization pass has inserted fake-quant nodes there is nothing to
lower, and the graph runs as it is (cache and VC nodes are ordinary modules of the graph).

Example:
    >>> from qc_compiler.backends import get_backend
    >>> lower = get_backend("torch")
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from . import register_backend

__all__ = ["lower_torch"]


@register_backend("torch")
def lower_torch(gm: fx.GraphModule, ctx) -> nn.Module:
    """Lower to a PyTorch module. Graph nodes that know how to lower themselves are asked to."""
    for name, module in list(gm.named_modules()):
        lower = getattr(module, "lower_torch", None)
        if callable(lower) and name:
            parent_name, _, child = name.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            setattr(parent, child, lower())
    return gm
