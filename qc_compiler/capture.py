"""Capture a model as a ``torch.fx.GraphModule``, and find DiT structure in the graph.

Two flavours of graph come out of capture, and every helper here works on both:
- ``"fx"``: ``torch.fx.symbolic_trace`` with :class:`DiTTracer`; leaf modules (``nn.Linear``,
  ``nn.LayerNorm``) are ``call_module`` nodes.
- ``"export"``: ``torch.export.export(strict=False)`` with a dynamic batch dimension, used where
  symbolic tracing fails (e.g. diffusers' DiT); ops are ATen ``call_function`` nodes and the module
  they came from is in ``node.meta["nn_module_stack"]``.

Capture works on a deep copy, so passes that edit parameters never touch the user's model.

Example:
    >>> from qc_compiler.models.dit import DiT_models
    >>> model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10).eval()
    >>> gm = capture(model)
    >>> graph_flavour(gm), len(find_linears(gm)), len(find_branch_regions(gm))
    ('fx', 15, 4)
"""
from __future__ import annotations

import copy
import logging
import re
import traceback
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import CaptureError

__all__ = [
    "capture", "DiTTracer", "graph_flavour", "node_module_path", "find_linears", "LinearSite",
    "BranchSpec", "BranchRegion", "DIT_BRANCHES", "DIFFUSERS_BRANCHES", "BLOCK_LAYOUTS", "find_branch_regions",
]

log = logging.getLogger(__name__)

_TORCH_INTERNALS = re.compile(r"[/\\](torch|functorch|contextlib|typing)[/\\]|<frozen|[/\\]qc_compiler[/\\]capture\.py")


class DiTTracer(fx.Tracer):
    """A symbolic tracer that remembers which module it is in, to name it when tracing fails.

    ``leaf_modules`` are extra module types kept whole as ``call_module`` nodes (a custom attention,
    for example), in addition to torch.nn's own layers.
    """

    def __init__(self, leaf_modules: Sequence[Type[nn.Module]] = ()):
        super().__init__()
        self.leaf_types = tuple(leaf_modules)
        self.current_path = ""
        self.failed_path: Optional[str] = None  # the innermost module active when tracing raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        outer = self.current_path
        self.current_path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self.current_path
            raise
        finally:
            self.current_path = outer


def capture(
    model: nn.Module,
    example_inputs: Optional[Tuple[torch.Tensor, ...]] = None,
    leaf_modules: Sequence[Type[nn.Module]] = (),
    prefer: str = "fx",
) -> fx.GraphModule:
    """Turn ``model`` into a GraphModule that computes exactly what it computes.

    Tries symbolic tracing first (``prefer="fx"``), then ``torch.export`` with ``example_inputs``
    (built from ``input_size``/``in_channels`` when the model has them). Raises ``CaptureError``
    naming the module and source line where both fail.
    """
    if prefer not in ("fx", "export"):
        raise ValueError(f"prefer must be 'fx' or 'export', got {prefer!r}")
    model = copy.deepcopy(model).eval()
    fx_error: Optional[CaptureError] = None
    if prefer == "fx":
        try:
            return _symbolic_trace(model, leaf_modules)
        except CaptureError as e:
            fx_error = e
            log.info("symbolic tracing failed (%s); falling back to torch.export", e)
    try:
        return _export(model, example_inputs)
    except Exception as e:
        export_msg = f"torch.export also failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if fx_error is not None:
            raise CaptureError(f"{fx_error}\n{export_msg}") from e
        raise CaptureError(export_msg) from e


def _symbolic_trace(model: nn.Module, leaf_modules) -> fx.GraphModule:
    tracer = DiTTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise CaptureError(_describe_trace_failure(model, tracer, e)) from e
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    gm.meta["qc.flavour"] = "fx"
    _copy_model_attributes(model, gm)
    return gm


def _describe_trace_failure(model: nn.Module, tracer: DiTTracer, error: Exception) -> str:
    path = tracer.failed_path or ""
    module = model.get_submodule(path) if path else model
    path = path or "<root>"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not _TORCH_INTERNALS.search(f.filename)]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: `{(frames[-1].line or '').strip()}`" if frames else "unknown line"
    return (
        f"torch.fx could not trace module {path!r} ({type(module).__name__}) at {where}: "
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
        "Fix: avoid Python control flow and int() on tensor shapes or values in forward (compute sizes "
        "in __init__), or keep that module whole with capture(..., leaf_modules=[ItsClass]), "
        "or pass example_inputs so torch.export can capture it."
    )


def _default_example_inputs(model: nn.Module) -> Tuple[torch.Tensor, ...]:
    size, channels = getattr(model, "input_size", None), getattr(model, "in_channels", None)
    if size is None or channels is None:
        raise CaptureError(
            f"{type(model).__name__} cannot be traced symbolically and has no input_size/in_channels: "
            "pass example_inputs=(x, t, y) to capture it with torch.export"
        )
    batch = 2  # >1 so that export does not specialise the batch dimension to 1
    return (torch.randn(batch, channels, size, size), torch.full((batch,), 500, dtype=torch.long),
            torch.zeros(batch, dtype=torch.long))


def _export(model: nn.Module, example_inputs) -> fx.GraphModule:
    inputs = tuple(example_inputs) if example_inputs is not None else _default_example_inputs(model)
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = tuple({0: batch} if torch.is_tensor(a) and a.ndim > 0 else None for a in inputs)
    ep = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)
    gm = ep.module()
    gm.meta["qc.flavour"] = "export"
    _copy_model_attributes(model, gm)
    return gm


def _copy_model_attributes(model: nn.Module, gm: fx.GraphModule) -> None:
    # Samplers read these off the denoiser; keep them on the graph so it stays a drop-in.
    for name in ("input_size", "in_channels", "num_classes", "learn_sigma", "out_channels", "config"):
        if hasattr(model, name):
            gm.meta[f"qc.model.{name}"] = getattr(model, name)


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
    path = list(stack.values())[-1][0]
    return path


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
    """How to find one residual branch in each block: the norm that opens it, the layer that closes it."""

    name: str  # e.g. "attn"
    norm: str  # module name relative to the block, e.g. "norm1"
    output: str  # e.g. "attn.proj"


@dataclass
class BranchRegion:
    """The nodes of one branch of one block, in topological order, from its norm to its output."""

    block: str
    name: str
    nodes: List[fx.Node] = field(default_factory=list)

    @property
    def qualname(self) -> str:
        return f"{self.block}.{self.name}"

    @property
    def entry(self) -> fx.Node:
        return self.nodes[0]

    @property
    def exit(self) -> fx.Node:
        return self.nodes[-1]

    def inputs(self) -> List[fx.Node]:
        """Nodes outside the region that it reads (the block input, the adaLN shift/scale, ...)."""
        inside, seen, out = set(self.nodes), set(), []
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in seen:
                    seen.add(a)
                    out.append(a)
        return out


DIT_BRANCHES = (BranchSpec("attn", "norm1", "attn.proj"), BranchSpec("mlp", "norm2", "mlp.fc2"))
# diffusers' DiTTransformer2DModel: AdaLayerNormZero modulates inside norm1; the MLP branch opens at norm3.
DIFFUSERS_BRANCHES = (BranchSpec("attn", "norm1.norm", "attn1.to_out.0"), BranchSpec("mlp", "norm3", "ff.net.2"))
# (block pattern, branches) per model family; the first that finds regions wins.
BLOCK_LAYOUTS = ((r"^blocks\.\d+$", DIT_BRANCHES), (r"^(?:.*\.)?transformer_blocks\.\d+$", DIFFUSERS_BRANCHES))
_NORM_OPS = (torch.ops.aten.layer_norm.default, torch.nn.functional.layer_norm)


def _is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.LayerNorm, nn.GroupNorm))
    return node.op == "call_function" and node.target in _NORM_OPS


def find_branch_regions(
    gm: fx.GraphModule, branches: Optional[Iterable[BranchSpec]] = None, block_pattern: Optional[str] = None
) -> List[BranchRegion]:
    """The residual branches of every transformer block, in graph order.

    A branch region is every node that both depends on the branch's norm and feeds its output layer:
    norm -> modulate -> ... -> output. The adaLN modulation, gates and residual adds lie outside it.
    Without ``branches``/``block_pattern``, the known layouts (our DiT, diffusers' DiT) are tried.
    """
    if branches is None and block_pattern is None:
        for pattern, layout in BLOCK_LAYOUTS:
            regions = find_branch_regions(gm, layout, pattern)
            if regions:
                return regions
        return []
    branches = DIT_BRANCHES if branches is None else branches
    block_pattern = BLOCK_LAYOUTS[0][0] if block_pattern is None else block_pattern
    block_re = re.compile(block_pattern)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_path: Dict[str, List[fx.Node]] = {}
    for node in gm.graph.nodes:
        by_path.setdefault(node_module_path(node), []).append(node)
    blocks = sorted({_block_of(p, block_re) for p in by_path} - {None}, key=lambda b: min(order[n] for p, ns in by_path.items() if _block_of(p, block_re) == b for n in ns))
    regions = []
    for block in blocks:
        for spec in branches:
            norms = [n for n in by_path.get(f"{block}.{spec.norm}", []) if _is_norm(gm, n)]
            outs = [n for p, ns in by_path.items() if p == f"{block}.{spec.output}" for n in ns]
            if not norms or not outs:
                continue
            entry, exit_ = norms[0], max(outs, key=order.get)
            nodes = _between(entry, exit_, order)
            regions.append(BranchRegion(block, spec.name, sorted(nodes, key=order.get)))
    return regions


def _block_of(path: str, block_re: re.Pattern) -> Optional[str]:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        if block_re.match(".".join(parts[:i])):
            return ".".join(parts[:i])
    return None


def _between(entry: fx.Node, exit_: fx.Node, order: Dict[fx.Node, int]) -> set:
    """Nodes that are descendants of ``entry`` and ancestors of ``exit_`` (both included)."""
    down, stack = {entry}, [entry]
    while stack:
        for user in stack.pop().users:
            if user not in down and order[user] <= order[exit_]:
                down.add(user)
                stack.append(user)
    up, stack = {exit_}, [exit_]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in up and order[a] >= order[entry]:
                up.add(a)
                stack.append(a)
    return down & up
