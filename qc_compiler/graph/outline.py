"""Outline a region of a graph into a submodule, and walk graphs nested in such submodules.

Outlining turns the nodes of a region (e.g. a DiT block's attention branch) into a GraphModule of
their own, called through one ``call_module`` node. A pass can wrap that submodule (a cache lookup
does), and later passes still see the region's nodes by walking nested graphs.

    before:   x, shift, scale --> norm1 -> modulate -> qkv -> ... -> proj --> gate * . + x
    after:    x, shift, scale --> [wrapper(region GraphModule)]      --> gate * . + x

Parameters are shared, not copied: the region's ``call_module``/``get_attr`` targets keep their
original qualified names inside the submodule.

Example:
    >>> from qc_compiler.capture import capture
    >>> from qc_compiler.graph import find_branch_regions
    >>> from qc_compiler.models import adapter_for
    >>> from qc_compiler.models.dit import DiT_models
    >>> model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10)
    >>> gm = capture(model)
    >>> region = find_branch_regions(gm, adapter_for(model).blocks)[0]
    >>> node = outline_region(gm, region, "attn0", wrap=lambda sub: sub)
    >>> node.op, node.target
    ('call_module', 'attn0')
"""
from __future__ import annotations

import operator
from typing import Callable, Dict

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PassError
from .finders import BranchRegion

__all__ = ["outline_region"]


def outline_region(gm: fx.GraphModule, region: BranchRegion, name: str,
                   wrap: Callable[[fx.GraphModule], nn.Module], *, pass_name: str = "outline") -> fx.Node:
    """Move ``region``'s nodes into a submodule ``name`` (built by ``wrap(region_gm)``); return its call node.

    A region with several exits returns their tuple; each outside use then reads its item."""
    inside, exits = set(region.nodes), list(region.exits)
    for n in region.nodes:
        if n in exits:
            continue
        for u in [u for u in n.users if u not in inside and _is_assertion(u)]:
            gm.graph.erase_node(u)  # torch.export's shape/dtype checks; they would pin values outside
        outside_users = [u for u in n.users if u not in inside]
        if outside_users:
            raise PassError(pass_name, f"region {region.qualname} cannot be outlined: {n.name} is also used by "
                            f"{[u.name for u in outside_users]} outside it", node=n.name)
    # Sizes read outside (torch.export's sym_size) are re-read inside from the tensor they measure:
    # a size passed across the boundary as a plain int would be frozen by tracers (ONNX export).
    sizes = [a for a in region.inputs() if _is_size(a)]
    inputs = []
    for a in region.inputs():
        candidate = a.args[0] if a in sizes else a
        if candidate.op != "get_attr" and candidate not in inputs:
            inputs.append(candidate)
    sub = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for a in sizes:
        env[a] = sub.node_copy(a, lambda n: env[n])

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:  # a parameter read (export graphs): re-read it inside the submodule
            env[a] = sub.get_attr(a.target)
            env[a].meta = dict(a.meta)
        return env[a]

    for n in region.nodes:
        env[n] = sub.node_copy(n, lookup)
    sub.output(env[exits[0]] if len(exits) == 1 else tuple(env[e] for e in exits))
    region_gm = fx.GraphModule(gm, sub, class_name="Region")
    region_gm.meta.update({k: v for k, v in gm.meta.items() if k.startswith("qc.")})
    gm.add_submodule(name, wrap(region_gm))
    last = region.nodes[-1]
    with gm.graph.inserting_after(last):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta["nn_module_stack"] = dict(exits[-1].meta.get("nn_module_stack", {}))
    if len(exits) == 1:
        exits[0].replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    else:
        anchor, items = call, set()
        for i, e in enumerate(exits):
            with gm.graph.inserting_after(anchor):
                item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta = dict(e.meta)
            e.replace_all_uses_with(item)
            anchor = item
            items.add(item)
        # an early output's users may sit before the last region node (a dropout after to_out, before
        # to_add_out): move them, and what depends on them, after the outputs, in their order
        nodes = list(gm.graph.nodes)
        start, stop = nodes.index(exits[0]), nodes.index(call)
        for n in nodes[start:stop]:
            if n not in inside and any(a in items for a in n.all_input_nodes):
                anchor.append(n)
                anchor = n
                items.add(n)
    for n in reversed(region.nodes):
        gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return call


def _is_size(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.ops.aten.sym_size.int
            and isinstance(node.args[0], fx.Node))


def _is_assertion(node: fx.Node) -> bool:
    return node.op == "call_function" and "_assert" in str(node.target) and not node.users
