"""Find structure in a captured graph: linear layers, and the residual branches of transformer blocks.

Two flavours of graph come out of capture, and every helper here works on both:
- ``"fx"`` (symbolic tracing): leaf modules (``nn.Linear``, ``nn.LayerNorm``) are ``call_module`` nodes;
- ``"export"`` (``torch.export``): ops are ATen ``call_function`` nodes, and the module each came from
  is in ``node.meta["nn_module_stack"]``.

Where the blocks and their branches are is a family fact: a model adapter's :class:`BlockLayout`
(``qc_compiler.models``) says it, and :func:`find_branch_regions` finds it.

Example:
    >>> from qc_compiler.capture import capture
    >>> from qc_compiler.models.dit import DiT_models
    >>> gm = capture(DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10))
    >>> layout = BlockLayout(r"^blocks\\.\\d+$", (BranchSpec("attn", "norm1", "attn.proj"),))
    >>> graph_flavour(gm), len(find_linears(gm)), len(find_branch_regions(gm, layout))
    ('fx', 14, 2)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import CaptureError

__all__ = ["graph_flavour", "node_module_path", "LinearSite", "find_linears", "BranchSpec", "BlockLayout",
           "BranchRegion", "find_branch_regions", "block_of", "iter_graph_modules", "writes_in_place"]


def graph_flavour(gm: fx.GraphModule) -> str:
    """``"fx"`` or ``"export"``: which capture made the graph."""
    return gm.meta.get("qc.flavour", "fx")


def node_module_path(node: fx.Node) -> str:
    """Qualified name of the module a node belongs to (``""`` for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def iter_graph_modules(module: nn.Module, prefix: str = "") -> Iterator[Tuple[str, fx.GraphModule]]:
    """``(qualified name, GraphModule)`` for ``module`` and every GraphModule nested in it."""
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, fx.GraphModule):
            yield name, sub


@dataclass
class LinearSite:
    """One linear layer in a graph: its node, module path, and parameters."""

    node: fx.Node
    path: str
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def _get_attr_tensor(gm: fx.GraphModule, node) -> Optional[torch.Tensor]:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise CaptureError(f"expected a parameter (get_attr) node, got {node}")
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def find_linears(gm: fx.GraphModule) -> List[LinearSite]:
    """Every linear layer, in graph order: ``call_module`` nn.Linear or ATen/functional linear."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
            mod = gm.get_submodule(node.target)
            sites.append(LinearSite(node, str(node.target), mod.weight, mod.bias))
        elif node.op == "call_function" and node.target in (torch.ops.aten.linear.default, torch.nn.functional.linear):
            weight = _get_attr_tensor(gm, node.args[1])
            bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            sites.append(LinearSite(node, node_module_path(node), weight, _get_attr_tensor(gm, bias_arg)))
    return sites


@dataclass(frozen=True)
class BranchSpec:
    """How to find one residual branch in each block: the module that opens it, the layer(s) that close it.

    ``norm`` names the opening module relative to the block: a norm (``"norm1"``: the region starts at
    its normalisation, so the modulation after it is inside), or any other module (``"attn2"``: the
    region starts at that module's first ops, e.g. a cross-attention's q, k and v projections).
    ``output`` is one layer, or a tuple of layers for a branch with several outputs (a joint
    attention returns the image and the text stream); a block that lacks some of them (SD3's last
    block has no text output) gets a region over those it has.
    """

    name: str  # e.g. "attn"
    norm: str  # module name relative to the block, e.g. "norm1"
    output: Union[str, Tuple[str, ...]]  # e.g. "attn.proj", or ("attn.to_out.0", "attn.to_add_out")

    @property
    def outputs(self) -> Tuple[str, ...]:
        return (self.output,) if isinstance(self.output, str) else tuple(self.output)


@dataclass(frozen=True)
class BlockLayout:
    """Where a family's transformer blocks are (a regex over module paths) and their branches."""

    pattern: str
    branches: Tuple[BranchSpec, ...]

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        object.__setattr__(self, "branches", tuple(self.branches))


@dataclass
class BranchRegion:
    """The nodes of one branch of one block, in topological order, from its norm to its output(s).
    ``exits`` are the nodes read outside the region (one for most branches; empty means the last node)."""

    block: str
    name: str
    nodes: List[fx.Node] = field(default_factory=list)
    exits: List[fx.Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.exits and self.nodes:
            self.exits = [self.nodes[-1]]

    @property
    def qualname(self) -> str:
        return f"{self.block}.{self.name}"

    @property
    def entry(self) -> fx.Node:
        return self.nodes[0]

    @property
    def exit(self) -> fx.Node:
        """The single output of a one-output region."""
        if len(self.exits) != 1:
            raise CaptureError(f"region {self.qualname} has {len(self.exits)} outputs")
        return self.exits[0]

    def inputs(self) -> List[fx.Node]:
        """Nodes outside the region that it reads (the block input, the adaLN shift/scale, ...)."""
        inside, seen, out = set(self.nodes), set(), []
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in seen:
                    seen.add(a)
                    out.append(a)
        return out


_NORM_OPS = (torch.ops.aten.layer_norm.default, torch.nn.functional.layer_norm)


def _is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.LayerNorm, nn.GroupNorm))
    return node.op == "call_function" and node.target in _NORM_OPS


def find_branch_regions(gm: fx.GraphModule, layout: BlockLayout) -> List[BranchRegion]:
    """The residual branches of every block that ``layout`` describes, in graph order.

    A branch region is every node that both depends on the branch's norm and feeds its output layer:
    norm -> modulate -> ... -> output. The adaLN modulation, gates and residual adds lie outside it.
    """
    block_re = re.compile(layout.pattern)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_path: Dict[str, List[fx.Node]] = {}
    for node in gm.graph.nodes:
        by_path.setdefault(node_module_path(node), []).append(node)
    first: Dict[str, int] = {}
    for path, nodes in by_path.items():
        block = block_of(path, block_re)
        if block is not None:
            first[block] = min(first.get(block, len(order)), min(order[n] for n in nodes))
    regions = []
    for block in sorted(first, key=first.get):
        for spec in layout.branches:
            entries = _entries(gm, by_path, f"{block}.{spec.norm}")
            exits = [max(by_path[p], key=order.get) for p in (f"{block}.{o}" for o in spec.outputs) if by_path.get(p)]
            if not entries or not exits:
                continue
            nodes = set().union(*(_between(entries, e, order) for e in exits))
            regions.append(BranchRegion(block, spec.name, sorted(nodes, key=order.get), exits=exits))
    return regions


def _entries(gm: fx.GraphModule, by_path: Dict[str, List[fx.Node]], path: str) -> List[fx.Node]:
    """Where a branch opens: the first norm op of the module at ``path`` if it has one, else the ops of
    that module (and its children) that read nothing computed inside it."""
    norms = [n for n in by_path.get(path, []) if _is_norm(gm, n)]
    if norms:
        return norms[:1]
    inside = [n for p, nodes in by_path.items() if p == path or p.startswith(path + ".") for n in nodes]
    members = set(inside)
    return [n for n in inside if n.op in ("call_function", "call_module") and _is_tensor_op(n)
            if not any(a in members for a in n.all_input_nodes)]


def _is_tensor_op(node: fx.Node) -> bool:
    """Not a size computation (torch.export shares ``batch * heads`` between blocks: not a branch's)."""
    val = node.meta.get("val")
    return val is None or isinstance(val, torch.Tensor)


def block_of(path: str, block_re: "re.Pattern") -> Optional[str]:
    """The block (the longest prefix of ``path`` that ``block_re`` matches) a module path lies in, or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        if block_re.match(".".join(parts[:i])):
            return ".".join(parts[:i])
    return None


def _between(entries: List[fx.Node], exit_: fx.Node, order: Dict[fx.Node, int]) -> set:
    """Nodes that are descendants of any of ``entries`` and ancestors of ``exit_`` (both included)."""
    first = min(order[e] for e in entries)
    down, stack = set(entries), list(entries)
    while stack:
        for user in stack.pop().users:
            if user not in down and order[user] <= order[exit_]:
                down.add(user)
                stack.append(user)
    up, stack = {exit_}, [exit_]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in up and order[a] >= first:
                up.add(a)
                stack.append(a)
    region = down & up
    # In-place writes (torch.export keeps ``out = empty_like(x); out[..., 0::2] = ...`` of a rotary
    # embedding as view + copy_ nodes) feed the exit through mutation, not through edges: take in
    # every descendant whose uses all stay inside the region, until none is left.
    grown = True
    while grown:
        grown = False
        for n in sorted(down - region, key=order.get, reverse=True):
            if (n.users and all(u in region for u in n.users)) or (not n.users and writes_in_place(n)):
                region.add(n)
                grown = True
    return region


def writes_in_place(node: fx.Node) -> bool:
    """An in-place op (``copy_``, ``mul_``): it has effects without users."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
