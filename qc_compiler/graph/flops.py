"""Count the multiply-add FLOPs of graph regions, from shapes propagated on a batch-1 input.

Only the ops that dominate a DiT are counted: linear layers, matmuls and fused attention. The
count is per sample (batch 1), which is what the cache report needs for "fraction of FLOPs skipped".

Example:
    >>> from qc_compiler.capture import capture
    >>> from qc_compiler.graph import find_branch_regions
    >>> from qc_compiler.models import adapter_for
    >>> from qc_compiler.models.dit import DiT_models
    >>> m = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10)
    >>> adapter, gm = adapter_for(m), capture(m)
    >>> inputs = adapter.example_inputs(adapter.info(m), batch=1)
    >>> per_region, blocks = region_flops(gm, find_branch_regions(gm, adapter.blocks), inputs, adapter.blocks.pattern)
    >>> per_region[1] == 2 * 16 * (64 * 256 + 256 * 64)   # MLP branch: 16 tokens, fc1 + fc2
    True
"""
from __future__ import annotations

import operator
import re
from typing import List, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .finders import BranchRegion, block_of, node_module_path

__all__ = ["node_flops", "region_flops"]

_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}
_LINEARS = {torch.nn.functional.linear, torch.ops.aten.linear.default}
_SDPA = {torch.nn.functional.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}


def _shape(node) -> Tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def node_flops(gm: fx.GraphModule, node: fx.Node) -> int:
    """FLOPs (2 x multiply-adds) of one node, 0 for ops that are not counted."""
    out = _shape(node)
    if not out:
        return 0
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
        lin = gm.get_submodule(node.target)
        return 2 * _numel(out) * lin.in_features
    if node.op == "call_function" and node.target in _LINEARS:
        return 2 * _numel(out) * _shape(node.args[0])[-1]
    if node.op == "call_function" and node.target in _MATMULS:
        return 2 * _numel(out) * _shape(node.args[0])[-1]
    if node.op == "call_function" and node.target in _SDPA:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        return 2 * 2 * _numel(q[:-1]) * k[-2] * q[-1]  # q k^T and attn v
    return 0


def region_flops(gm: fx.GraphModule, regions: Sequence[BranchRegion], example_inputs: Sequence[torch.Tensor],
                 block_pattern: str) -> Tuple[List[int], int]:
    """(FLOPs of each region, FLOPs of all blocks matching ``block_pattern``) for one sample.

    ``example_inputs`` are a batch-1 forward's inputs (the model adapter builds them)."""
    ShapeProp(gm).propagate(*example_inputs)
    per_region = [sum(node_flops(gm, n) for n in r.nodes) for r in regions]
    block_re = re.compile(block_pattern)
    blocks = sum(node_flops(gm, n) for n in gm.graph.nodes if block_of(node_module_path(n), block_re) is not None)
    return per_region, blocks
