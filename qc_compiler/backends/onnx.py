"""The ONNX backend: INT8 QDQ graphs that onnxruntime fuses into integer kernels, and their runner.

Three ways in, one graph:
- ``compiled.export_onnx(path)`` writes any compiled model (fake-quant or torch INT8) as a file;
- ``qc.compile(model, passes, backend="onnx")`` lowers straight to an onnxruntime session and returns
  a drop-in denoiser (what the ONNX path cannot express is refused before any pass runs);
- :class:`OrtDenoiser` runs a file written earlier, as a drop-in denoiser for our samplers.

onnxruntime fuses only its own QDQ shape, so the exporter writes that shape itself from **our**
calibrated scales, never from a re-calibration:

    x --QuantizeLinear(u8, s_x, z_x)--DequantizeLinear--> MatMul --> Add(bias)
    W_int8 (K, N) initializer --DequantizeLinear(s_w per column, axis=1)--^

The weight is stored pre-transposed (K, N) as int8 codes, so no Transpose sits between its
DequantizeLinear and the MatMul (that Transpose stops the fusion). Inputs are the model adapter's
(``x, t, y`` for DiT) and an int64 ``step`` (the index in the compiled timestep table), which VC
tables (initializers) are gathered by. The batch dimension is dynamic.

The step cache becomes one ONNX ``If`` per cached region, with explicit inputs and outputs:

    compute_r (bool) --> If --then--> [ the region's nodes ] --> cache_out_r --> rest of the graph
    cache_in_r ---------------else--> Identity ---------------^   (and a graph output)

``If`` (rather than inputs/outputs alone) is what lets a reuse step skip the region's FLOPs:
onnxruntime runs only the taken branch. The runner keeps the cache in the compiled model's step
state and decides ``compute_r`` with the same :class:`~qc_compiler.specs.CacheSchedule` ``decide``
as the torch lookups, from the schedule stored in the file.

What is exported is read from the modules' ``export_spec()`` (quantized linears and activations,
cache lookups, VC tables), never from a pass's fields. Not exported, each refused with
``ExportError``: the adaptive cache policy (its decision needs the probe region's output mid-graph),
per-step-group activation ranges (QuantizeLinear fuses only with constant scales), and activations
below 8 bits.

The file's metadata carries the timestep table, the model info, the cache schedule, the VC table
and ``qc.digest``, a SHA-256 of the graph, its weights and that metadata; :class:`OrtDenoiser`
refuses a file whose digest does not match (``verify=False`` loads a file edited on purpose).

Example:
    >>> compiled.export_onnx("dit_int8.onnx")                          # doctest: +SKIP
    >>> denoiser = OrtDenoiser("dit_int8.onnx", provider="cpu")         # doctest: +SKIP
    >>> images = qc.DDPM(steps=50).sample(denoiser, labels=[1, 2], seed=0)   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import ArtifactError, ExportError, StepError
from ..graph import iter_graph_modules
from ..io import atomic_write_bytes
from ..models import ForwardInputs, ModelInfo, adapter_of
from ..options import check_int
from ..quant.spec import QuantizedActSpec, QuantizedLinearSpec
from ..runtime import CompiledModel, register_exporter
from ..specs import (OUTPUT_PLACEMENTS, AttentionConfig, CacheLookupSpec, CacheSchedule, StepCacheConfig, VCTable,
                     low_precision_attention)
from ..step import StepAware
from .registry import SATURATING_WEIGHT_CODE, check_constant_uint8_activations, cpu_has_vnni, register_backend

__all__ = ["export_onnx", "onnx_bytes", "onnx_model", "write_model", "OrtGraph", "OrtDenoiser", "PROVIDERS", "optimized_op_counts",
           "session_options", "check_onnx_passes", "OPSETS"]

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
OPSETS = (13, 20)  # per-axis DequantizeLinear needs 13; the TorchScript exporter writes up to 20
_WEIGHT_SUFFIX = "qc_w_t"
_DIGEST = "qc.digest"


# --- what ONNX can express, checked before any work ----------------------------------------------

def _refuse_activation(act: Optional[QuantizedActSpec], where: str) -> None:
    if act is None:
        return
    if act.per_token:
        raise ExportError(f"{where}: per-token activations (ranges taken at run time) are not exported to ONNX "
                          "(QuantizeLinear fuses only with constant scales); compile with act_granularity='tensor'")
    if act.num_groups > 1:
        raise ExportError(f"{where}: per-step-group activation ranges cannot be exported to ONNX "
                          "(QuantizeLinear fuses only with constant scales); compile with act_step_groups=1")
    if act.act_bits != 8:
        raise ExportError(f"{where}: {act.act_bits}-bit activations cannot be expressed with ONNX uint8 "
                          "QuantizeLinear; use W*A8 (e.g. preset w8a8 or w4a8)")
    if act.channel_scale is not None:
        raise ExportError(f"{where}: a salience-balanced input needs a per-channel activation scale, which ONNX "
                          "QuantizeLinear does not fuse; compile without balance (it gains little at A8)")


LOW_PRECISION_ATTENTION = ("attention in bf16/fp16 (the attention_precision pass) has no onnxruntime CPU kernel; "
                           "compile without that pass for ONNX")


def check_onnx_passes(passes: Sequence[Any]) -> None:
    """Refuse, from the passes' typed configs, a schedule the ONNX backend cannot lower."""
    for p in passes:
        cfg = getattr(p, "config", None)
        if isinstance(cfg, AttentionConfig):
            raise ExportError(f"the onnx backend cannot run {LOW_PRECISION_ATTENTION}")
        if isinstance(cfg, StepCacheConfig) and cfg.policy in ("adaptive", "first_block"):
            raise ExportError(f"the onnx backend cannot run the {cfg.policy} cache policy (its decision needs the probe "
                              "region's output mid-graph); use policy interval or static")
    check_constant_uint8_activations(passes, "onnx", "ONNX QuantizeLinear")


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """``aten::rms_norm`` (qk norms of SD3, Flux and Wan) for the TorchScript exporter, which has no
    symbolic for it: x / sqrt(mean(x^2 over the normalized dims) + eps) * weight, in x's dtype."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    eps_value = sh._maybe_get_const(eps, "f")
    if sh._is_none(eps) or not isinstance(eps_value, float):
        eps_value = float(torch.finfo(torch.float32).eps)  # torch's default for a float32 input
    axes = g.op("Constant", value_t=torch.tensor(list(range(-len(dims), 0)), dtype=torch.long))
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes, keepdims_i=1) if g.opset >= 18 else \
        g.op("ReduceMean", g.op("Mul", x, x), axes_i=list(range(-len(dims), 0)), keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
    out = g.op("Div", x, denom)
    return out if sh._is_none(weight) else g.op("Mul", out, weight)


def _register_symbolics() -> None:
    from torch.onnx import register_custom_op_symbolic

    for opset in range(OPSETS[0], OPSETS[1] + 1):
        register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)


def check_opset(opset: int) -> int:
    return check_int("opset", opset, lo=OPSETS[0], hi=OPSETS[1])


def check_output_path(path) -> Path:
    """Refuse, before the export runs, a path that cannot take the file."""
    path = Path(path)
    if str(path) in ("", ".") or path.is_dir():
        raise ExportError(f"{path} is a folder; give a file path such as out/model.onnx")
    if path.parent.exists() and not path.parent.is_dir():
        raise ExportError(f"{path.parent} is not a folder")
    return path


# --- export stand-ins ------------------------------------------------------------------------------

class _StepHolder:
    """Carries the exported ``step`` input to the VC nodes during tracing (tracing follows tensors),
    and collects cache-region outputs in call order."""

    value: Optional[torch.Tensor] = None
    cache_outputs: List[torch.Tensor] = []


class _QDQLinear(nn.Module):
    """Export stand-in for a quantized linear: Q/DQ on the input (none for a weight-only layer),
    matmul with the dequantized weight. The weight buffer is swapped for int8 codes + DequantizeLinear
    after export."""

    def __init__(self, spec: QuantizedLinearSpec):
        super().__init__()
        self.post_op = spec.post_op  # the torch backend may have folded fc1's GELU into the linear
        self.codes, self.w_scale = spec.codes.t().contiguous().cpu(), spec.w_scale.float().cpu()  # (K, N) int8, (N,)
        self.register_buffer(_WEIGHT_SUFFIX, self.codes.float() * self.w_scale[None, :])
        bias = spec.bias.detach().float().cpu() if spec.bias is not None else torch.zeros(len(self.w_scale))
        self.register_buffer("qc_bias", bias)
        _refuse_activation(spec.act, spec.path)
        if spec.low_rank is not None:
            raise ExportError(f"{spec.path}: the low-rank float branch is not exported to ONNX; compile without low_rank")
        self.act = None if spec.act is None else spec.act.act_qparams()  # the all-steps (only) range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = x if self.act is None else torch.fake_quantize_per_tensor_affine(x, self.act[0], self.act[1], 0, 255)
        out = torch.matmul(xq, getattr(self, _WEIGHT_SUFFIX)) + self.qc_bias
        return torch.nn.functional.gelu(out, approximate="tanh") if self.post_op == "gelu_tanh" else out


class _QDQAct(nn.Module):
    def __init__(self, spec: QuantizedActSpec):
        super().__init__()
        _refuse_activation(spec, spec.path)
        self.scale, self.zero = spec.act_qparams()

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, 0, 255)


class _VCExport(nn.Module):
    """VC eps rescale with its K table as an initializer, gathered by the ``step`` input."""

    def __init__(self, table: VCTable, holder: _StepHolder):
        super().__init__()
        self.register_buffer("qc_vc_k", table.k.detach().float().clone())
        self.placement, self.channels_last, self.holder = table.placement, table.channels_last, holder

    def forward(self, out):
        return VCTable(self.placement, self.qc_vc_k, self.channels_last).apply(out, self.holder.value)  # K[step]: a Gather


class _CacheExport(nn.Module):
    """Export stand-in for a cache lookup: always runs its region and hands the output to the wrapper,
    which makes it a graph output; the region's nodes are moved under an ``If`` afterwards."""

    def __init__(self, region: nn.Module, holder: _StepHolder):
        super().__init__()
        self.region, self.holder = region, holder

    def forward(self, *args):
        out = self.region(*args)
        self.holder.cache_outputs.append(out)
        return out


class _Wrapper(nn.Module):
    def __init__(self, gm: nn.Module, holder: _StepHolder):
        super().__init__()
        self.gm, self.holder = gm, holder

    def forward(self, *args):
        *inputs, step = args
        self.holder.value, self.holder.cache_outputs = step, []
        out = self.gm(*inputs)
        return (out, *self.holder.cache_outputs) if self.holder.cache_outputs else out


def _size(x: torch.Tensor, dim: int):
    return x.size(dim)  # traced as a dynamic Shape op, where aten.sym_size.int would freeze a constant


def _view(x, size):
    return x.view(size)


def _reshape(x, size):
    return x.reshape(size)


def _expand(x, size, implicit=False):
    return x.expand(size)


# ATen overloads that take sizes, and Tensor-method stand-ins the TorchScript tracer keeps dynamic
_SIZED = {torch.ops.aten.sym_size.int: _size, torch.ops.aten.view.default: _view,
          torch.ops.aten.reshape.default: _reshape, torch.ops.aten._unsafe_view.default: _view,
          torch.ops.aten.expand.default: _expand}


def _unfreeze_sizes(gm: nn.Module) -> None:
    """torch.export graphs read sizes with ``aten.sym_size.int`` and pass them to ATen overloads;
    the TorchScript tracer would bake the example's batch into the file. Use ``Tensor`` methods
    instead, which it traces as Shape ops."""

    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        changed = False
        for node in sub.graph.nodes:
            if node.op == "call_function" and node.target in _SIZED:
                node.target, changed = _SIZED[node.target], True
        if changed:
            sub.recompile()


def _prepare_for_tracing(gm: nn.Module) -> None:
    """Two things the TorchScript exporter gets wrong in torch.export graphs, settled first:

    - ``squeeze(dim)`` of a dimension whose size is not 1 (a no-op; PixArt has one): the exporter
      writes an If on the runtime size whose Squeeze branch fails shape inference; the node goes.
    - in-place writes into views (Wan's rotary embedding fills ``empty_like`` slices with ``copy_``):
      the exporter drops them, which would give a wrong file; refused."""

    from ..graph import writes_in_place

    for name, sub in gm.named_modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        changed = False
        for node in list(sub.graph.nodes):
            if writes_in_place(node):
                raise ExportError(f"the graph writes tensors in place ({node.target} in {name or 'the model'}), which "
                                  "the ONNX exporter would drop; this family cannot be exported yet")
            if node.op == "call_function" and node.target in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
                val = getattr(node.args[0], "meta", {}).get("val")
                dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
                if val is not None and all(isinstance(val.shape[d], int) and val.shape[d] != 1 for d in dims):
                    node.replace_all_uses_with(node.args[0])
                    sub.graph.erase_node(node)
                    changed = True
        if changed:
            sub.recompile()


def _stand_in(spec: Any, module: nn.Module, holder: _StepHolder) -> Optional[nn.Module]:
    """The export module replacing a module whose ``export_spec()`` is ``spec``, or None to keep it."""
    if isinstance(spec, CacheLookupSpec):
        if spec.schedule.policy in ("adaptive", "first_block"):
            raise ExportError(f"the {spec.schedule.policy} cache policy cannot be exported: its decision needs the probe "
                              "region's output mid-graph; export an interval or static schedule")
        outputs = [n for n in module.region.graph.nodes if n.op == "output"][0].args[0]
        if isinstance(outputs, (tuple, list)):
            raise ExportError(f"cache region {module.key} has {len(outputs)} outputs (a joint attention), which the "
                              "ONNX cache cannot hold yet; cache the other branches (StepCache(branches=[...])) or "
                              "export without the cache")
        return _CacheExport(module.region, holder)
    if isinstance(spec, QuantizedLinearSpec):
        return _QDQLinear(spec)
    if isinstance(spec, QuantizedActSpec):
        return _QDQAct(spec)
    if isinstance(spec, VCTable) and spec.placement in OUTPUT_PLACEMENTS:
        return _VCExport(spec, holder)
    return None


def _swap_for_export(gm: nn.Module, holder: _StepHolder, prefix: str = "gm"
                     ) -> Tuple[Dict[str, _QDQLinear], List[str], Optional[CacheSchedule]]:
    """Replace every module that has an ``export_spec()`` by its export stand-in. Returns the weight
    initializer names of the quantized linears, the module names of the cache regions (in graph
    order), and the cache schedule."""
    linears, caches, schedule = {}, [], None
    for name, module in list(gm.named_modules()):
        if not name or any(name.startswith(c + ".") for c in caches) or not hasattr(module, "export_spec"):
            continue
        spec = module.export_spec()
        new = _stand_in(spec, module, holder)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, new)
        if isinstance(new, _QDQLinear):
            linears[f"{prefix}.{name}.{_WEIGHT_SUFFIX}"] = new
        if isinstance(new, _CacheExport):
            caches.append(name)
            schedule = spec.schedule
            inner, _, _ = _swap_for_export(new.region, holder, f"{prefix}.{name}.region")  # linears inside it
            linears.update(inner)
    return linears, caches, schedule


def _int8_weights(model, linears: Dict[str, _QDQLinear]) -> int:
    """Replace each exported fp32 weight initializer by int8 codes + a per-column DequantizeLinear."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for name, layer in linears.items():
        if name in inits:
            model.graph.initializer.remove(inits[name])
        else:  # the exporter shares equal tensors: this weight is an Identity of another initializer
            alias = next((n for n in model.graph.node if n.op_type == "Identity" and list(n.output) == [name]), None)
            if alias is None:
                # or it merged two equal layers on the same input (the same codes, scales and bias:
                # one computation); the other keeps the int8 codes and serves both
                if any(other in inits and _same_layer(layer, linears[other]) for other in linears if other != name):
                    continue
                raise ExportError(f"the exporter renamed weight {name}; cannot place its int8 codes")
            model.graph.node.remove(alias)
        model.graph.initializer.extend([
            numpy_helper.from_array(layer.codes.cpu().numpy().astype(np.int8), name + "_int8"),
            numpy_helper.from_array(layer.w_scale.cpu().numpy().astype(np.float32), name + "_scale"),
            numpy_helper.from_array(np.zeros(layer.codes.shape[1], dtype=np.int8), name + "_zero"),
        ])
        dq = helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale", name + "_zero"], [name],
                              name=name + "_dq", axis=1)
        model.graph.node.insert(0, dq)
        done += 1
    return done


def _same_layer(a: "_QDQLinear", b: "_QDQLinear") -> bool:
    return (torch.equal(a.codes, b.codes) and torch.equal(a.w_scale, b.w_scale) and torch.equal(a.qc_bias, b.qc_bias)
            and a.act == b.act and a.post_op == b.post_op)


def _cache_to_if(model, caches: List[str]) -> None:
    """Move each cache region's nodes (named by module scope) under an If on ``compute_r``."""
    from onnx import TensorProto, helper

    graph = model.graph
    for r, name in enumerate(caches):
        scope, out_name, param_prefix = f"/gm/{name}/", f"cache_out_{r}", f"gm.{name}."
        # The region's nodes, and its int8 weights with their DequantizeLinear: onnxruntime fuses
        # QDQ into integer kernels only when the weights are constants of the same (sub)graph.
        nodes = [n for n in graph.node if n.name.startswith(scope) or n.name.startswith(param_prefix)]
        if out_name not in {o for n in nodes for o in n.output}:
            raise ExportError(f"cache region {name}: its output was not found under scope {scope}")
        # The exporter shares equal subexpressions (constants, the batch size) between a region and
        # the rest of the graph: such nodes stay outside (a branch can read outer-scope values).
        while True:
            inside = set(map(id, nodes))
            read_outside = {i for n in graph.node if id(n) not in inside for i in n.input}
            shared = [n for n in nodes if out_name not in n.output and set(n.output) & read_outside]
            if not shared:
                break
            nodes = [n for n in nodes if n not in shared]
        produced = {o for n in nodes for o in n.output}
        leaks = {i for n in graph.node if id(n) not in inside for i in n.input if i in produced and i != out_name}
        if leaks:
            raise ExportError(f"cache region {name} shares values with the rest of the graph: {sorted(leaks)[:3]}")
        # Initializers move in too, except those the exporter shares with other layers (equal tensors).
        params = [i for i in graph.initializer if i.name.startswith(param_prefix) and i.name not in read_outside]
        inner_out = out_name + "__computed"
        for n in nodes:
            n.output[:] = [inner_out if o == out_name else o for o in n.output]
        # symbolic dims of the region's output's rank: (N, T, D) tokens, or (N, C, H, W) from a conv (Sana)
        declared = next((o for o in graph.output if o.name == out_name), None)
        rank = len(declared.type.tensor_type.shape.dim) if declared is not None else 3
        dims = [f"batch_{r}"] + [f"d{k}_{r}" for k in range(1, rank)]
        then_g = helper.make_graph(nodes, f"compute_{r}", [], [helper.make_tensor_value_info(inner_out, TensorProto.FLOAT, dims)],
                                   initializer=params)
        else_g = helper.make_graph([helper.make_node("Identity", [f"cache_in_{r}"], [out_name + "__reused"])],
                                   f"reuse_{r}", [], [helper.make_tensor_value_info(out_name + "__reused", TensorProto.FLOAT, dims)])
        # The If goes where the region's last node was: every outer value the region reads is made
        # before that (unscoped constants can sit between region nodes), and its output is used after.
        order = list(graph.node)
        position = order.index(nodes[-1]) - (len(nodes) - 1)
        for n in nodes:
            graph.node.remove(n)
        for i in params:
            graph.initializer.remove(i)
        graph.node.insert(position, helper.make_node("If", [f"compute_{r}"], [out_name], name=f"cache_if_{r}",
                                                     then_branch=then_g, else_branch=else_g))
        graph.input.extend([helper.make_tensor_value_info(f"compute_{r}", TensorProto.BOOL, []),
                            helper.make_tensor_value_info(f"cache_in_{r}", TensorProto.FLOAT, dims)])


def _metadata_digest(model) -> str:
    """SHA-256 of the graph (nodes and every tensor's bytes, If branches included), the opsets and
    every qc metadata entry but the digest. Tensor bytes are hashed one by one and the graph without
    them, so the digest is the same whether the tensors sit in the file or in external data, and no
    step serialises more than the graph's structure (a file past 2 GB cannot be)."""
    from onnx.external_data_helper import _get_all_tensors

    tensors = list(_get_all_tensors(model))
    saved = [(t.raw_data, list(t.external_data), t.data_location) for t in tensors]
    h = hashlib.sha256()
    try:
        for t in tensors:
            h.update(t.name.encode() + b"\0" + t.raw_data)
            t.raw_data = b""
            del t.external_data[:]
            t.data_location = 0  # TensorProto.DEFAULT
        h.update(model.graph.SerializeToString(deterministic=True))
    finally:
        for t, (raw, ext, loc) in zip(tensors, saved):
            t.raw_data, t.data_location = raw, loc
            t.external_data.extend(ext)
    h.update(json.dumps(sorted((o.domain, o.version) for o in model.opset_import)).encode())
    h.update(json.dumps(sorted((p.key, p.value) for p in model.metadata_props if p.key != _DIGEST)).encode())
    return h.hexdigest()


def _legacy_digest(model) -> str:
    """The digest of files exported before external data (the whole graph serialised); still accepted."""
    h = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    h.update(json.dumps(sorted((o.domain, o.version) for o in model.opset_import)).encode())
    h.update(json.dumps(sorted((p.key, p.value) for p in model.metadata_props if p.key != _DIGEST)).encode())
    return h.hexdigest()


def onnx_bytes(gm: nn.Module, **kwargs: Any) -> bytes:
    """The INT8 QDQ ONNX file of graph ``gm`` as bytes (a file under protobuf's 2 GB limit)."""
    return onnx_model(gm, **kwargs).SerializeToString()


def onnx_model(gm: nn.Module, *, adapter, info: ModelInfo, sampler_spec: Dict[str, Any],
               sample_vc: Optional[VCTable] = None, opset: int = 17):
    """The INT8 QDQ ONNX model of graph ``gm`` (fake-quant or torch INT8), checked with the full checker,
    its ``qc.digest`` set. In memory, of any size: :func:`write_model` decides how it is stored."""
    import onnx
    import tempfile

    check_opset(opset)
    _register_symbolics()
    holder = _StepHolder()
    for m in gm.modules():
        if getattr(m, "packed", None) is not None:
            m.packed = None  # oneDNN's opaque prepacked weight cannot be copied; it is rebuilt on next use
    # The file computes in float32 around its INT8 GEMMs, whatever the weights' dtype: float16/bfloat16
    # graphs are cast (onnxruntime's CPU kernels gain nothing from them).
    gm = copy.deepcopy(gm).cpu().float()
    info = dataclasses.replace(info, dtype="float32")
    _unfreeze_sizes(gm)
    _prepare_for_tracing(gm)
    linears, caches, schedule = _swap_for_export(gm, holder)
    wrapper = _Wrapper(gm, holder).eval()
    names = list(adapter.inputs.names)
    example = (*adapter.example_inputs(info, batch=2), torch.tensor(0, dtype=torch.long))
    outputs = ["out"] + [f"cache_out_{r}" for r in range(len(caches))]
    dynamic = {**{n: {0: "batch"} for n, x in zip(names, example) if x.dim() > 0}, **{o: {0: "batch"} for o in outputs}}
    workdir = tempfile.TemporaryDirectory()
    traced = Path(workdir.name) / "traced.onnx"  # a path, not a buffer: past 2 GB the exporter writes external data
    try:
        # The TorchScript exporter is the one that writes QuantizeLinear/DequantizeLinear from
        # fake_quantize ops; its deprecation notice is for us, not the user.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(wrapper, example, str(traced), dynamo=False, input_names=names + ["step"],
                              output_names=outputs, dynamic_axes=dynamic, opset_version=opset)
        model = onnx.load(str(traced))  # external data, if any, read in
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}".splitlines()[0]) from e
    finally:
        workdir.cleanup()
    n_int8 = _int8_weights(model, linears)
    _cache_to_if(model, caches)
    meta = {"qc.timesteps": json.dumps(sampler_spec["timesteps"]), "qc.model_info": json.dumps(info.to_json()),
            "qc.adapter": adapter.name, "qc.inputs": json.dumps(names), "qc.sampler": json.dumps(sampler_spec),
            "qc.timestep_dtype": adapter.inputs.timestep_dtype,
            "qc.timestep_divisor": str(adapter.inputs.timestep_divisor),
            "qc.int8_linears": str(n_int8), "qc.vc": json.dumps(sample_vc.to_json()) if sample_vc is not None else "",
            "qc.cache": json.dumps(schedule.to_json()) if schedule is not None else ""}
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    _check(model)
    model.metadata_props.append(onnx.StringStringEntryProto(key=_DIGEST, value=_metadata_digest(model)))
    log.info("exported %d int8 linears, %d cached regions", n_int8, len(caches))
    return model


PROTOBUF_LIMIT = 2 ** 31 - 1  # bytes: one protobuf message, hence one .onnx file without external data


def _weight_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _check(model) -> None:
    import onnx

    try:
        if _weight_bytes(model) < PROTOBUF_LIMIT // 2:
            onnx.checker.check_model(model, full_check=True)
        else:  # the in-memory checker serialises the model: check through a file with external data
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                onnx.save_model(model, f"{d}/m.onnx", save_as_external_data=True, location="m.onnx.data")
                onnx.checker.check_model(f"{d}/m.onnx", full_check=True)
    except Exception as e:
        raise ExportError(f"the exported graph fails onnx.checker: {e}".replace("\n", " ")[:400]) from e


def write_model(model, path: Path, external_data: Optional[bool] = None) -> Path:
    """Write ``model`` to ``path`` atomically. With ``external_data`` (default: when its weights pass
    1 GB, well under protobuf's 2 GB limit) the tensors go to ``<name>.data`` beside it, which the
    file names and its ``qc.digest`` covers; the data file is written first, then the graph."""
    import onnx
    import tempfile

    if external_data is None:
        external_data = _weight_bytes(model) >= PROTOBUF_LIMIT // 2
    if not external_data:
        atomic_write_bytes(path, model.SerializeToString())
        return path
    # tensors under 1 KB (shape constants, which onnxruntime's shape inference must read) stay inline
    model = copy.deepcopy(model)
    data = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=path.parent) as d:
        staged = Path(d) / path.name
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024, convert_attribute=True)  # If branches too
        os.replace(Path(d) / data.name, data)
        os.replace(staged, path)
    return path


def _sample_vc(hooks: Sequence[Any]) -> Optional[VCTable]:
    tables = [h.export_spec() for h in hooks if hasattr(h, "export_spec")]
    tables = [t for t in tables if isinstance(t, VCTable) and t.placement == "sample"]
    if len(tables) > 1:
        raise ExportError("more than one sample-space VC table: the ONNX runner applies one")
    return tables[0] if tables else None


@register_exporter("onnx")
def export_onnx(compiled: CompiledModel, path, opset: int = 17, external_data: Optional[bool] = None) -> Path:
    """Write ``compiled`` as INT8 QDQ ONNX to ``path`` (checked first, written atomically).
    ``external_data``: tensors in ``<path>.data`` (default: when the weights pass 1 GB; FLUX.1's do)."""
    import onnx

    path = check_output_path(path)
    check_opset(opset)
    if external_data is not None and not isinstance(external_data, bool):
        raise TypeError(f"external_data must be True, False or None, got {external_data!r}")
    graph = compiled.graph_module
    if not isinstance(graph, (fx.GraphModule, OrtGraph)):
        raise ExportError(f"a model lowered by the {compiled.build.get('backend')!r} backend runs compiled code, not a "
                          "graph the exporter can read: compile with backend='torch' (the same INT8 graph) and export that")
    if isinstance(graph, fx.GraphModule) and any(
            n.target is low_precision_attention for _, m in iter_graph_modules(graph) for n in m.graph.nodes):
        raise ExportError(f"cannot export {LOW_PRECISION_ATTENTION}")
    if isinstance(graph, OrtGraph):  # compiled with backend="onnx": the file exists already
        if graph.opset != opset:
            raise ExportError(f"this model was compiled to ONNX opset {graph.opset}; export it with opset={graph.opset}")
        model = graph.model
    else:
        model = onnx_model(graph, adapter=adapter_of(compiled), info=compiled.info, sampler_spec=compiled.sampler_spec,
                           sample_vc=_sample_vc(compiled.step_hooks), opset=opset)
    write_model(model, path, external_data)
    log.info("wrote %s", path)
    return path


@register_backend("onnx", check=check_onnx_passes)
def lower_onnx(gm: nn.Module, ctx) -> nn.Module:
    """Export the calibrated graph and run it in an onnxruntime session (CPU, all threads)."""
    model = onnx_model(gm, adapter=ctx.need("adapter", "onnx"), info=ctx.need("info", "onnx"),
                       sampler_spec=ctx.need("sampler", "onnx").spec(),
                       sample_vc=_sample_vc(getattr(gm, "meta", {}).get("qc.sample_hooks", [])))
    return OrtGraph(model)


# --- running the file ------------------------------------------------------------------------------

def _read_metadata(model) -> Dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


class OrtGraph(StepAware, nn.Module):
    """An onnxruntime session as the graph of a :class:`CompiledModel`: it reads the step from the step
    state, keeps the cache tensors in the state's store, and decides each region with the file's
    :class:`CacheSchedule`. The sample-space VC table runs as a sampler hook (``meta``)."""

    def __init__(self, model: Any, *, provider: str = "cpu", threads: Optional[int] = None, verify: bool = True,
                 source: str = "the exported graph", provider_options: Optional[Dict[str, str]] = None):
        super().__init__()
        import onnx
        import onnxruntime as ort
        from google.protobuf.message import DecodeError

        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise ExportError(f"onnxruntime here has no {PROVIDERS[provider]}; install onnxruntime-gpu for cuda/tensorrt")
        path = Path(model) if isinstance(model, (str, Path)) else None
        try:
            if path is not None:  # a file, with its external data (if any) beside it
                model = onnx.load(str(path))
            elif isinstance(model, (bytes, bytearray)):
                model = onnx.load_from_string(bytes(model))
        except (DecodeError, ValueError, OSError) as e:
            raise ArtifactError(f"{source} is not a readable ONNX file, or its external data is missing or truncated "
                                f"({type(e).__name__})") from e
        meta = _read_metadata(model)
        if "qc.timesteps" not in meta:
            raise ArtifactError(f"{source} was not written by qc-compiler's exporter (no timestep table)")
        if verify and meta.get(_DIGEST) != _metadata_digest(model) and (
                _weight_bytes(model) >= PROTOBUF_LIMIT // 2 or meta.get(_DIGEST) != _legacy_digest(model)):
            raise ArtifactError(f"{source} does not match its qc.digest: its graph, weights or metadata were edited; "
                                "export it again, or pass verify=False to load a file edited on purpose")
        self.model, self.meta_props = model, meta
        # what content_digest hashes: the whole file, or for a file past the protobuf limit its digest
        large = _weight_bytes(model) >= PROTOBUF_LIMIT // 2
        if large and path is None:
            raise ExportError("an ONNX model past 1 GB of weights runs from its file: export_onnx(path), then "
                              "OrtDenoiser(path)")
        self.model_bytes = meta.get(_DIGEST, "").encode() if large else model.SerializeToString()
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        session_source = str(path) if path is not None else self.model_bytes
        if provider == "cpu" and not cpu_has_vnni() and _full_range_int8_weights(model):
            # onnxruntime's u8 x s8 GEMM saturates int16 pair sums without VNNI; its u8 x u8 one does not.
            # The same weights as uint8 codes with zero point 128 dequantize to the same values.
            session_source = _as_uint8_weights(model).SerializeToString()
            log.info("%s: int8 weights run as uint8 (zero point 128) on this CPU (no VNNI)", source)
        self.session = ort.InferenceSession(session_source, session_options(threads),
                                            providers=_providers(provider, provider_options))
        self.feeds = {i.name for i in self.session.get_inputs()}  # "step" is dropped when nothing reads it
        kinds = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
        self.input_types = {i.name: kinds[i.type] for i in self.session.get_inputs() if i.type in kinds}
        self.input_names = json.loads(meta["qc.inputs"])
        # a placeholder of the right rank for cache inputs not computed yet (never read: compute is true)
        self.cache_placeholders = {i.name: np.zeros((1,) * len(i.shape), dtype=np.float32)
                                   for i in self.session.get_inputs() if i.name.startswith("cache_in_")}
        self.schedule = CacheSchedule.from_json(json.loads(meta["qc.cache"])) if meta.get("qc.cache") else None
        self.needs_stable_batch = self.schedule is not None
        # the file reads the step for a cache schedule or a VC table; without them any timestep will do
        self.uses_step = self.schedule is not None or "step" in self.feeds
        vc = VCTable.from_json(json.loads(meta["qc.vc"])) if meta.get("qc.vc") else None
        self.meta = {"qc.sample_hooks": [lambda step, t, x, vc=vc: vc.apply(x, step)] if vc is not None else []}

    @property
    def regions(self) -> int:
        return 0 if self.schedule is None else len(self.schedule.regions)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        state = self.step_state
        if self.uses_step and (state is None or state.step < 0):
            raise StepError("an ONNX graph runs inside a compiled model's sampling run: call the CompiledModel")
        store = state.store("onnx_cache")
        # the file takes float32 latents and its own timestep dtype, whatever the compiled model's
        feed = {name: (x.float() if x.is_floating_point() else x).detach().cpu().numpy()
                for name, x in zip(self.input_names, inputs)}
        for name, kind in self.input_types.items():  # as the file declares them (a float32 file, its t)
            if name in feed:
                feed[name] = feed[name].astype(kind)
        feed["step"] = np.array(max(state.step, 0) if state is not None else 0, dtype=np.int64)
        for r in range(self.regions):
            feed[f"compute_{r}"] = np.array(self.schedule.decide(state.step, r, r in store, store))
            feed[f"cache_in_{r}"] = store.get(r, self.cache_placeholders.get(f"cache_in_{r}"))
        feed = {k: v for k, v in feed.items() if k in self.feeds}
        outs = self.session.run(["out"] + [f"cache_out_{r}" for r in range(self.regions)], feed)
        for r in range(self.regions):
            store[r] = outs[1 + r]
        return torch.from_numpy(outs[0])

    def report_section(self) -> str:
        cache = f", cache {self.schedule.policy} over {self.regions} regions" if self.schedule else ""
        return (f"onnxruntime {self.session.get_providers()[0]}: {self.meta_props.get('qc.int8_linears', 0)} INT8 "
                f"linears{cache}")


class OrtDenoiser(CompiledModel):
    """An exported file in onnxruntime, as a drop-in denoiser for our samplers: ``model(x, t, y) -> out``.

    ``provider`` is ``"cpu"``, ``"cuda"`` (onnxruntime-gpu) or ``"tensorrt"``; an unavailable one is a
    clear error. ``provider_options`` go to it as they are (docs/onnx.md lists those worth setting). The timestep table stored in the file maps ``t`` to the ``step`` input; the cache
    and VC tables stored in it run as they did in the torch model. ``verify=False`` skips the digest
    check (for files edited on purpose).
    """

    def __init__(self, path, *, provider: str = "cpu", threads: Optional[int] = None, verify: bool = True,
                 provider_options: Optional[Dict[str, str]] = None):
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing")
        graph = OrtGraph(path, provider=provider, threads=threads, verify=verify, source=str(path),
                         provider_options=provider_options)
        meta = graph.meta_props
        super().__init__(graph, json.loads(meta["qc.sampler"]), ModelInfo.from_json(json.loads(meta["qc.model_info"])),
                         build={"backend": "onnx", "adapter": meta.get("qc.adapter")},
                         inputs=_forward_inputs(meta))
        self.path = path

    @property
    def session(self):
        return self.graph_module.session


def _providers(provider: str, options: Optional[Dict[str, str]]) -> List[Any]:
    """onnxruntime's provider list: the chosen one with its options, then the CUDA provider under
    TensorRT (nodes TensorRT does not take run there, not on the CPU), then nothing else."""
    if options is not None and (not isinstance(options, dict) or
                                not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items())):
        raise TypeError("provider_options must be a dict of strings, e.g. {'trt_fp16_enable': 'True'}")
    chosen = (PROVIDERS[provider], dict(options)) if options else PROVIDERS[provider]
    return [chosen, PROVIDERS["cuda"]] if provider == "tensorrt" else [chosen]


def _forward_inputs(meta: Dict[str, str]) -> ForwardInputs:
    """The forward's inputs as the file names them: latent, timestep, then the conditions."""
    names = json.loads(meta["qc.inputs"])
    return ForwardInputs(latent=names[0], timestep=names[1], condition=names[2], extra=tuple(names[3:]),
                         timestep_dtype=meta.get("qc.timestep_dtype", "int64"),
                         timestep_divisor=int(meta.get("qc.timestep_divisor", "1")))


def _graphs(graph) -> Iterator[Any]:
    """``graph`` and every subgraph under it (the cache's If branches hold their regions' weights)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _full_range_int8_weights(model) -> bool:
    """Whether any int8 weight initializer holds codes beyond what a non-VNNI u8 x s8 GEMM takes exactly."""
    from onnx import numpy_helper

    return any(int(np.abs(numpy_helper.to_array(t).astype(np.int16)).max(initial=0)) > SATURATING_WEIGHT_CODE
               for g in _graphs(model.graph) for t in g.initializer if t.name.endswith("_int8"))


def _as_uint8_weights(model):
    """A copy of ``model`` whose int8 weight codes are uint8 codes + 128 with zero point 128: the same
    dequantized weights, run by onnxruntime's u8 x u8 kernel, which accumulates without saturating."""
    import copy

    from onnx import numpy_helper

    out = copy.deepcopy(model)
    for graph in _graphs(out.graph):
        inits = {t.name: t for t in graph.initializer}
        for t in list(graph.initializer):
            zero = inits.get(t.name[:-5] + "_zero") if t.name.endswith("_int8") else None
            if zero is None:
                continue
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t).astype(np.int16) + 128).astype(np.uint8), t.name))
            zero.CopyFrom(numpy_helper.from_array(
                (numpy_helper.to_array(zero).astype(np.int16) + 128).astype(np.uint8), zero.name))
    return out


def session_options(threads: Optional[int] = None):
    """onnxruntime options for our files. Weight-only layers (int8 weights, float input) fuse into
    ``MatMulNBits``, whose default accuracy level 4 quantizes the float input to int8 on the fly;
    level 1 keeps it float, as the layer was calibrated (those layers are one row per sample)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return opts


def optimized_op_counts(path, threads: int = 1) -> Dict[str, int]:
    """Op types in onnxruntime's optimized graph: shows whether the QDQ pairs fused into INT8 kernels."""
    import onnx
    import onnxruntime as ort
    import tempfile

    opts = session_options(threads)
    out = Path(tempfile.mkdtemp()) / "optimized.onnx"
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    counts: Dict[str, int] = {}

    def walk(graph) -> None:  # If branches (the cache regions) are subgraphs: count inside them too
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(onnx.load(str(out)).graph)
    return counts
