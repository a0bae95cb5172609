"""The Inductor backend: our calibrated graph lowered through ``torch.compile``, as PT2E's INT8 graphs are.

Each fake-quant linear is lowered from its ``export_spec()`` to the quantize/dequantize form that
Inductor's x86 INT8 passes match (the form torchao's PT2E ``convert_pt2e`` writes), carrying **our**
calibration: ``quantize_per_tensor`` / ``dequantize_per_tensor`` of the input with its calibrated
uint8 scale and zero point, ``dequantize_per_channel`` of the int8 weight codes, then ``linear``. With
``freezing`` on, Inductor folds each pattern into one oneDNN INT8 GEMM (AMX where the CPU has it)
with the weights prepacked, fuses the activation's quantization into the LayerNorm/modulate before
it, a following GELU into the GEMM, and fc1's output straight into fc2's uint8 input. A weight-only
linear (the conditioning layers) is constant-folded to a float GEMM.

What reads the step stays outside the compiled code: every step-aware node (cache lookups, VC's
rescales, fake-quant activations of attention matmuls) runs eagerly, as a graph break, and a cache
lookup's region is compiled on its own, so the compute-or-reuse decision never enters a guard. Each
region compiles once; a sampling run recompiles nothing (tested with ``torch._dynamo`` counters).

On CUDA the x86 patterns do not apply, so the INT8 layers are the torch backend's (``torch._int_mm``,
taken through the backend registry) and Inductor compiles around them: it fuses the activation's
quantization into the op before each GEMM and the dequantize, bias and GELU after it. A layer whose
range is one constant (one step group) reads no step state, so it is compiled in, not kept eager.
Freezing stays off there (no weight prepacking to gain), so the cache's block regions, alike but for
their weights, share one FX-graph-cache entry.

Compile time is paid on the first call (reported by ``report()``), and Inductor's FX graph cache
(on by default, ``TORCHINDUCTOR_CACHE_DIR``) keeps it across processes. Per-step-group activation
ranges and activations below 8 bits are refused before any pass runs: the INT8 patterns need one
constant uint8 scale per tensor. On a CPU without VNNI, W8A8 is refused too: the oneDNN GEMM Inductor
picks saturates there (``registry.cpu_has_vnni``), and Inductor's patterns leave no room for the split
the torch backend makes. ``export_onnx`` is refused: export from the ``torch`` backend, whose
INT8 graph is the same.

Example:
    >>> from qc_compiler.backends import get_backend
    >>> get_backend("inductor").name
    'inductor'
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion.samplers import model_device
from ..errors import ExportError
from ..quant.spec import QuantizedLinearSpec
from ..step import StepAware
from ..quant.config import QuantConfig
from .registry import check_constant_uint8_activations, cpu_has_vnni, get_backend, register_backend

__all__ = ["QDQLinear", "InductorModule", "lower_inductor", "check_inductor_passes", "freezing"]

_QD = None  # torch.ops.quantized_decomposed, registered on first use


def _qd():
    global _QD
    if _QD is None:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

        _QD = torch.ops.quantized_decomposed
    return _QD


def check_inductor_passes(passes: Sequence[Any]) -> None:
    """Refuse, from the passes' typed configs, what the INT8 patterns cannot take."""
    check_constant_uint8_activations(passes, "inductor", "Inductor's INT8 GEMM", ", or backend='torch'")
    if not cpu_has_vnni():  # its oneDNN GEMM would saturate 8-bit x 8-bit codes (see registry); torch splits them
        for p in passes:
            cfg = getattr(p, "config", None)
            if not isinstance(cfg, QuantConfig):
                continue
            if any(s.weight_bits == 8 and s.act_bits == 8 for s in cfg.specs):
                raise ExportError("the inductor backend's INT8 GEMM saturates W8A8 on this CPU (no VNNI: int16 pair "
                                  "sums); use backend='torch', which runs it exactly, or 4-bit weights (w4a8)")


class QDQLinear(nn.Module):
    """A quantized linear in PT2E's quantize/dequantize form, with the spec's codes and scales."""

    def __init__(self, spec: QuantizedLinearSpec):
        super().__init__()
        self.spec, self.path = spec, spec.path

        def constant(t: torch.Tensor) -> nn.Parameter:  # parameters: what freezing folds into constants
            return nn.Parameter(t, requires_grad=False)

        self.w_int8 = constant(spec.codes.to(torch.int8))
        self.w_scale = constant(spec.w_scale.float())
        self.w_zero = constant(torch.zeros_like(spec.w_scale, dtype=torch.long))
        self.bias = None if spec.bias is None else constant(spec.bias.detach().clone())
        if spec.low_rank is not None:
            raise ExportError(f"{spec.path}: the inductor backend has no low-rank float branch: compile without "
                              "low_rank, or backend='torch'")
        if spec.act is not None and spec.act.channel_scale is not None:
            raise ExportError(f"{spec.path}: the inductor backend takes one activation scale per tensor; a "
                              "salience-balanced input needs one per channel: compile without balance, or backend='torch'")
        if spec.act is not None and spec.act.per_token:
            raise ExportError(f"{spec.path}: the inductor backend takes one constant activation scale per tensor; "
                              "per-token ranges are taken at run time: compile with act_granularity='tensor', or backend='torch'")
        # one group (checked before the passes ran): the step-0 slot is the all-steps range
        self.act_qparams = None if spec.act is None else spec.act.act_qparams(0)

    def export_spec(self) -> QuantizedLinearSpec:
        return self.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _qd()
        w = qd.dequantize_per_channel.default(self.w_int8, self.w_scale, self.w_zero, 0, -128, 127, torch.int8)
        if self.act_qparams is not None:
            scale, zero = self.act_qparams
            q = qd.quantize_per_tensor.default(x, scale, zero, 0, 255, torch.uint8)
            x = qd.dequantize_per_tensor.default(q, scale, zero, 0, 255, torch.uint8)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@contextlib.contextmanager
def freezing() -> Iterator[None]:
    """Inductor's ``freezing`` on inside (constant weights, oneDNN prepacking, the x86 INT8 fusions)."""
    import torch._inductor.config as inductor_config

    saved, inductor_config.freezing = inductor_config.freezing, True
    try:
        yield
    finally:
        inductor_config.freezing = saved


class InductorModule(nn.Module):
    """Runs its graph through ``torch.compile`` (freezing on, no autograd). The graph stays a submodule,
    so the compiled model binds its step state to the graph's step-aware nodes as for any backend."""

    def __init__(self, graph: fx.GraphModule, freeze: bool = True):
        super().__init__()
        self.graph, self.freeze = graph, freeze
        # what CompiledModel reads its sampler hooks from (sample-placement VC): dropping it would run
        # the model without VC, silently
        self.meta = {"qc.sample_hooks": list(graph.meta.get("qc.sample_hooks", []))}
        self.__dict__["compiled"] = torch.compile(graph)
        self.first_call_s: Optional[float] = None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), (freezing() if self.freeze else contextlib.nullcontext()):
            if self.first_call_s is None:
                t0 = time.perf_counter()
                out = self.compiled(*args)
                self.first_call_s = time.perf_counter() - t0
                return out
            return self.compiled(*args)

    def report_section(self) -> str:
        first = "not called yet" if self.first_call_s is None else f"first call (compile) {self.first_call_s:.1f} s"
        how = "freezing" if self.freeze else "CUDA, torch._int_mm layers"
        return f"  Inductor (torch.compile, {how}): {first}"


def _eager(module: nn.Module) -> None:
    """Keep ``module``'s own Python out of the compiled code: a graph break around each call."""
    module.forward = torch._dynamo.disable(module.forward)


def _int_mm_route(gm: fx.GraphModule) -> bool:
    """Whether the graph lives on CUDA, where the INT8 layers are ``_int_mm`` ones (tests force it on CPU)."""
    return model_device(gm).type == "cuda"


@register_backend("inductor", check=check_inductor_passes)
def lower_inductor(gm: fx.GraphModule, ctx) -> nn.Module:
    """Swap every fake-quant linear for a QDQLinear (on CUDA: the torch backend's ``_int_mm`` layers),
    keep step-aware nodes eager (a cache lookup's region compiled on its own), and compile the graph
    with Inductor on its first call."""
    cuda = _int_mm_route(gm)
    if cuda:
        gm = get_backend("torch").lower(gm, ctx, kernel="int_mm")
    for name, module in list(gm.named_modules()):
        spec = module.export_spec() if hasattr(module, "export_spec") and not cuda else None
        if not isinstance(spec, QuantizedLinearSpec):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, QDQLinear(spec))
    for module in list(gm.modules()):
        # a lowered linear with one constant range reads no step: compiled in (the CUDA route)
        if isinstance(module, StepAware) and (module.uses_step or not hasattr(module, "export_spec")):
            _eager(module)
            region = getattr(module, "region", None)
            if isinstance(region, nn.Module):  # a cache lookup: its region is compute, compiled on its own
                module.region = torch.compile(region)
    return InductorModule(gm, freeze=not cuda)
