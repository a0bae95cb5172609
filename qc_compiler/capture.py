"""Capture a model as a ``torch.fx.GraphModule`` that computes exactly what the model computes.

Two flavours of graph come out:
- ``"fx"``: ``torch.fx.symbolic_trace`` with :class:`DiTTracer`; leaf modules (``nn.Linear``,
  ``nn.LayerNorm``) are ``call_module`` nodes.
- ``"export"``: ``torch.export.export(strict=False)`` with a dynamic batch dimension, used where
  symbolic tracing fails (e.g. diffusers' transformers); ops are ATen ``call_function`` nodes and the
  module they came from is in ``node.meta["nn_module_stack"]``.

Which flavour a family wants, and the example inputs ``torch.export`` needs, are facts of its model
adapter (``qc_compiler.models``); ``qc.compile`` passes them here. The helpers that find structure
in either flavour live in ``qc_compiler.graph``.

Capture works on a deep copy, so passes that edit parameters never touch the user's model.

Example:
    >>> from qc_compiler.models.dit import DiT_models
    >>> model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10).eval()
    >>> gm = capture(model)
    >>> gm.meta["qc.flavour"]
    'fx'
"""
from __future__ import annotations

import copy
import inspect
import logging
import re
import traceback
from typing import Optional, Sequence, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import CaptureError

__all__ = ["capture", "DiTTracer", "CAPTURE_MODES"]

CAPTURE_MODES = ("fx", "export")

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
    (a batch of at least 2, so that the batch dimension stays dynamic). Raises ``CaptureError``
    naming the module and source line where both fail.
    """
    if prefer not in CAPTURE_MODES:
        raise ValueError(f"prefer must be one of {list(CAPTURE_MODES)}, got {prefer!r}")
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


def _export(model: nn.Module, example_inputs) -> fx.GraphModule:
    if example_inputs is None:
        raise CaptureError(
            f"{type(model).__name__} cannot be traced symbolically: pass example_inputs (a batch of at least 2) "
            "so that torch.export can capture it, or register a model adapter that builds them (qc_compiler.models)"
        )
    inputs = tuple(example_inputs)
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = tuple({0: batch} if torch.is_tensor(a) and a.ndim > 0 else None for a in inputs)
    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):  # forward(x, t, *conditions)
        named = sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                    for p in params)
        dynamic = (*dynamic[:named], dynamic[named:])
    ep = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)
    gm = ep.module()
    gm.meta["qc.flavour"] = "export"
    return gm
