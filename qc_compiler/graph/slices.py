"""Cut a graph into consecutive slices, one per transformer block, and run one slice at a time.

Block reconstruction needs each block as a function of its inputs: run it on stored inputs many
times without running the blocks before it. The graph stays as it is: a :class:`GraphSlice` is the
nodes of one block in graph order (with whatever a pass outlined into it, such as a cache wrapper),
the values it reads from before it, and the values read after it. :func:`run_slice` evaluates those
nodes with ``torch.fx.Interpreter`` on an environment of node values, so the modules called are the
graph's own (quantized modules included).

    head (embedders) | blocks.0 | blocks.1 | ... | blocks.N-1 | tail (final layer, output)

Example:
    >>> from qc_compiler.capture import capture
    >>> from qc_compiler.models.dit import DiT_models
    >>> model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10).eval()
    >>> gm = capture(model)
    >>> slices = block_slices(gm, r"^blocks\\.\\d+$")
    >>> [s.name for s in slices]
    ['head', 'blocks.0', 'blocks.1', 'tail']
    >>> x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 3]), torch.tensor([1, 2])
    >>> env = dict(zip(placeholders(gm), (x, t, y)))
    >>> for s in slices:
    ...     run_slice(gm, s, env)
    >>> bool(torch.equal(env[slices[-1].outputs[0]], model(x, t, y)))
    True
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.fx as fx

from ..errors import CaptureError
from .finders import block_of, node_module_path

__all__ = ["GraphSlice", "block_slices", "placeholders", "run_slice", "free_after"]


@dataclass
class GraphSlice:
    """Consecutive nodes of a graph: ``inputs`` are the values from before it that they read,
    ``outputs`` the values of its own that nodes after it (or the graph's output) read."""

    name: str
    nodes: List[fx.Node] = field(default_factory=list)
    inputs: List[fx.Node] = field(default_factory=list)
    outputs: List[fx.Node] = field(default_factory=list)


def placeholders(gm: fx.GraphModule) -> List[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def block_slices(gm: fx.GraphModule, block_pattern: str) -> List[GraphSlice]:
    """The graph cut at the first node of each block (``block_pattern``: a regex over module paths, a
    model adapter's ``BlockLayout.pattern``) and after the last block's last node. Empty slices are
    left out; placeholders and the output node belong to none."""
    block_re = re.compile(block_pattern)
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    owner = [block_of(node_module_path(n), block_re) for n in body]
    starts: Dict[str, int] = {}
    last = -1
    for i, b in enumerate(owner):
        if b is not None:
            starts.setdefault(b, i)
            last = i
    if not starts:
        raise CaptureError(f"no node of the graph lies in a block matching {block_pattern!r}")
    bounds = sorted(starts.values()) + [last + 1]
    names = ["head"] + sorted(starts, key=starts.get) + ["tail"]
    cuts = [0] + bounds + [len(body)]
    slices = [GraphSlice(name, body[lo:hi]) for name, lo, hi in zip(names, cuts[:-1], cuts[1:]) if hi > lo]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    where = {n: i for i, s in enumerate(slices) for n in s.nodes}
    for i, s in enumerate(slices):
        inside = set(s.nodes)
        for n in s.nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in s.inputs:
                    s.inputs.append(a)
            if any(u is output or where.get(u, i) > i for u in n.users):
                s.outputs.append(n)
    return slices


def run_slice(gm: fx.GraphModule, s: GraphSlice, env: Dict[fx.Node, object]) -> None:
    """Evaluate the nodes of ``s`` on ``env`` (node -> value; it must hold ``s.inputs``), writing each
    node's value into it. Gradients flow where the modules let them."""
    interp = fx.Interpreter(gm)
    interp.env = env
    for n in s.nodes:
        env[n] = interp.run_node(n)


def free_after(slices: List[GraphSlice], done: int, env: Dict[fx.Node, object]) -> None:
    """Drop from ``env`` every value no slice after ``done`` reads (bounded memory in a slice loop)."""
    needed = {a for s in slices[done + 1:] for a in s.inputs} | set(slices[-1].outputs)
    for n in [n for n in env if n not in needed]:
        del env[n]
