"""Export a compiled model as an INT8 ONNX graph (QDQ) that onnxruntime fuses into integer kernels.

onnxruntime fuses only its own QDQ shape, so the exporter writes that shape itself from **our**
calibrated scales, never from a re-calibration:

    x --QuantizeLinear(u8, s_x, z_x)--DequantizeLinear--> MatMul --> Add(bias)
    W_int8 (K, N) initializer --DequantizeLinear(s_w per column, axis=1)--^

The weight is stored pre-transposed (K, N) as int8 codes, so no Transpose sits between its
DequantizeLinear and the MatMul (that Transpose stops the fusion). Inputs are ``x, t, y`` and an
int64 ``step`` (the index in the compiled timestep table), which VC tables (initializers) are
gathered by. The batch dimension is dynamic.

The step cache becomes one ONNX ``If`` per cached region, with explicit inputs and outputs:

    compute_r (bool) --> If --then--> [ the region's nodes ] --> cache_out_r --> rest of the graph
    cache_in_r ---------------else--> Identity ---------------^   (and a graph output)

``If`` (rather than inputs/outputs alone) is what lets a reuse step skip the region's FLOPs:
onnxruntime runs only the taken branch. The caller keeps the cache: ``OrtDenoiser`` stores each
``cache_out_r`` at compute steps and feeds it back as ``cache_in_r``, deciding ``compute_r`` from the
interval or static schedule stored in the file, exactly as the torch model does.

Not exported yet, each refused with ``ExportError``: the adaptive cache policy (its decision needs
the probe region's output mid-graph), per-step-group activation ranges (QuantizeLinear fuses only
with constant scales), and activations below 8 bits.

Example:
    >>> compiled.export_onnx("dit_int8.onnx")                          # doctest: +SKIP
    >>> denoiser = OrtDenoiser("dit_int8.onnx", provider="cpu")         # doctest: +SKIP
    >>> images = qc.DDPM(steps=50).sample(denoiser, labels=[1, 2], seed=0)   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import ExportError, StepError
from ..io import atomic_write_bytes
from ..quant.fake_quant import ActQuant, QuantLinear
from ..quant.qparams import quantize

__all__ = ["export_onnx", "OrtDenoiser", "PROVIDERS", "optimized_op_counts", "session_options"]

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_WEIGHT_SUFFIX = "qc_w_t"


class _StepHolder:
    """Carries the exported ``step`` input to the VC nodes during tracing (tracing follows tensors),
    and collects cache-region outputs in call order."""

    value: Optional[torch.Tensor] = None
    cache_outputs: List[torch.Tensor] = []


class _QDQLinear(nn.Module):
    """Export stand-in for a quantized linear: Q/DQ on the input (none for a weight-only layer,
    ``a_scale=None``), matmul with the dequantized weight. The weight buffer is swapped for int8
    codes + DequantizeLinear after export."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 a_scale: Optional[float], a_zero: Optional[int], post_op: str = "none"):
        super().__init__()
        self.post_op = post_op  # the torch backend may have folded fc1's GELU into the linear
        self.codes, self.w_scale = codes.t().contiguous(), w_scale.float()  # (K, N) int8, (N,)
        self.register_buffer(_WEIGHT_SUFFIX, self.codes.float() * self.w_scale[None, :])
        self.register_buffer("qc_bias", bias.detach().float() if bias is not None else torch.zeros(len(w_scale)))
        self.a_scale, self.a_zero = a_scale, a_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = x if self.a_scale is None else torch.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zero, 0, 255)
        out = torch.matmul(xq, getattr(self, _WEIGHT_SUFFIX)) + self.qc_bias
        return torch.nn.functional.gelu(out, approximate="tanh") if self.post_op == "gelu_tanh" else out


class _QDQAct(nn.Module):
    def __init__(self, scale: float, zero: int):
        super().__init__()
        self.scale, self.zero = scale, zero

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, 0, 255)


class _VCExport(nn.Module):
    """VC eps rescale with its K table as an initializer, gathered by the ``step`` input."""

    def __init__(self, k: torch.Tensor, channels: int, holder: _StepHolder):
        super().__init__()
        self.register_buffer("qc_vc_k", k.detach().float().clone())
        self.channels, self.holder = channels, holder

    def forward(self, out):
        k = self.qc_vc_k[self.holder.value].view(1, -1, 1, 1)  # (1, C, 1, 1)
        eps = out[:, : self.channels]
        mu = eps.mean(dim=(2, 3), keepdim=True)
        return torch.cat([mu + k * (eps - mu), out[:, self.channels:]], dim=1)


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

    def forward(self, x, t, y, step):
        self.holder.value, self.holder.cache_outputs = step, []
        out = self.gm(x, t, y)
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
    import torch.fx as fx

    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        changed = False
        for node in sub.graph.nodes:
            if node.op == "call_function" and node.target in _SIZED:
                node.target, changed = _SIZED[node.target], True
        if changed:
            sub.recompile()


def _activation(module) -> Tuple[Optional[float], Optional[int]]:
    """The constant input scale and zero point of a quantized op; (None, None) for a weight-only one."""
    if module.spec.act_bits is None:
        return None, None
    if getattr(module, "num_groups", 1) > 1:
        raise ExportError(f"{module.path}: per-step-group activation ranges cannot be exported yet "
                          "(QuantizeLinear fuses only with constant scales); compile with act_step_groups=1")
    if module.spec.act_bits != 8:
        raise ExportError(f"{module.path}: {module.spec.act_bits}-bit activations cannot be expressed with "
                          "ONNX uint8 QuantizeLinear; export W*A8 models")
    return float(module.a_scale[-1]), int(module.a_zero[-1])


def _stand_in(module, holder: _StepHolder) -> Optional[nn.Module]:
    """The export module replacing a quantized or step-aware node, or None to keep it."""
    from ..passes.cache import CacheLookup
    from ..backends.torch_int8 import Int8Linear, WeightOnlyLinear

    if isinstance(module, CacheLookup):
        if module.policy.kind == "adaptive":
            raise ExportError("the adaptive cache policy cannot be exported: its decision needs the probe "
                              "region's output mid-graph; export an interval or static schedule")
        return _CacheExport(module.region, holder)
    if isinstance(module, QuantLinear):
        codes = quantize(module.weight.detach(), module.weight_qparams()).to(torch.int8)
        return _QDQLinear(codes, module.w_scale, module.bias, *_activation(module))
    if isinstance(module, Int8Linear):
        return _QDQLinear(module.w_int8, module.w_scale, module.bias, *_activation(module), module.post_op)
    if isinstance(module, WeightOnlyLinear):
        return _QDQLinear(module.w_int8, module.w_scale, module.bias, None, None)
    if isinstance(module, ActQuant):
        return _QDQAct(*_activation(module))
    return None


def _swap_for_export(gm: nn.Module, holder: _StepHolder, prefix: str = "gm") -> Tuple[Dict[str, _QDQLinear], List[str]]:
    """Replace quantized, cache and VC modules by export stand-ins; returns the weight initializer
    names of the quantized linears, and the module names of the cache regions (in graph order)."""
    from ..passes.vc import VCRescale

    linears, caches = {}, []
    for name, module in list(gm.named_modules()):
        if not name or any(name.startswith(c + ".") for c in caches):
            continue
        new = _stand_in(module, holder)
        if new is None and isinstance(module, VCRescale):
            new = _VCExport(module.k, module.channels, holder)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, new)
        if isinstance(new, _QDQLinear):
            linears[f"{prefix}.{name}.{_WEIGHT_SUFFIX}"] = new
        if isinstance(new, _CacheExport):
            caches.append(name)
            inner, _ = _swap_for_export(new.region, holder, f"{prefix}.{name}.region")  # linears inside it
            linears.update(inner)
    return linears, caches


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
                raise ExportError(f"the exporter renamed weight {name}; cannot place its int8 codes")
            model.graph.node.remove(alias)
        model.graph.initializer.extend([
            numpy_helper.from_array(layer.codes.numpy().astype(np.int8), name + "_int8"),
            numpy_helper.from_array(layer.w_scale.numpy().astype(np.float32), name + "_scale"),
            numpy_helper.from_array(np.zeros(layer.codes.shape[1], dtype=np.int8), name + "_zero"),
        ])
        dq = helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale", name + "_zero"], [name],
                              name=name + "_dq", axis=1)
        model.graph.node.insert(0, dq)
        done += 1
    return done


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
        dims = [f"batch_{r}", f"tokens_{r}", f"width_{r}"]  # (N, T, D), symbolic
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


def export_onnx(compiled, path, opset: int = 17) -> Path:
    """Write ``compiled`` (a CompiledModel) as INT8 QDQ ONNX to ``path``, checked with the full checker."""
    import onnx

    path = Path(path)
    info = compiled.model_info
    holder = _StepHolder()
    for m in compiled.graph_module.modules():
        if getattr(m, "packed", None) is not None:
            m.packed = None  # oneDNN's opaque prepacked weight cannot be copied; it is rebuilt on next use
    gm = copy.deepcopy(compiled.graph_module)
    _unfreeze_sizes(gm)
    linears, caches = _swap_for_export(gm, holder)
    wrapper = _Wrapper(gm, holder).eval()
    b, c, s = 2, info["in_channels"], info["input_size"]
    example = (torch.randn(b, c, s, s), torch.full((b,), compiled.timesteps[0], dtype=torch.long),
               torch.zeros(b, dtype=torch.long), torch.tensor(0, dtype=torch.long))
    buf = io.BytesIO()
    names = ["x", "t", "y", "step"]
    try:
        # The TorchScript exporter is the one that writes QuantizeLinear/DequantizeLinear from
        # fake_quantize ops; its deprecation notice is for us, not the user.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(wrapper, example, buf, dynamo=False, input_names=names,
                              output_names=["out"] + [f"cache_out_{r}" for r in range(len(caches))],
                              dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "y": {0: "batch"}, "out": {0: "batch"},
                                            **{f"cache_out_{r}": {0: "batch"} for r in range(len(caches))}},
                              opset_version=opset)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}".splitlines()[0]) from e
    model = onnx.load_from_string(buf.getvalue())
    n_int8 = _int8_weights(model, linears)
    _cache_to_if(model, caches)
    hooks = [h for h in compiled.step_hooks if hasattr(h, "k")]
    meta = {"qc.timesteps": json.dumps(compiled.timesteps), "qc.model_info": json.dumps(_jsonable(info)),
            "qc.sampler": json.dumps(compiled.sampler_spec), "qc.int8_linears": str(n_int8),
            "qc.vc_sample_k": json.dumps(hooks[0].k.tolist()) if hooks else "",
            "qc.cache": json.dumps(_cache_meta(compiled, len(caches)))}
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported graph fails onnx.checker: {e}".replace("\n", " ")[:400]) from e
    atomic_write_bytes(path, model.SerializeToString())
    log.info("wrote %s: %d int8 linears", path, n_int8)
    return path


def _cache_meta(compiled, regions: int) -> Dict:
    from ..passes.cache import CacheLookup

    lookup = next((m for m in compiled.graph_module.modules() if isinstance(m, CacheLookup)), None)
    if lookup is None:
        return {"regions": 0}
    p = lookup.policy
    return {"regions": regions, "kind": p.kind, "interval": p.interval, "schedule": p.schedule}


def _jsonable(info: Dict) -> Dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}


class OrtDenoiser:
    """An onnxruntime session that is a drop-in denoiser for our samplers: ``model(x, t, y) -> out``.

    ``provider`` is ``"cpu"``, ``"cuda"`` (onnxruntime-gpu) or ``"tensorrt"``; an unavailable one is a
    clear error. The timestep table stored in the file maps ``t`` to the ``step`` input.
    """

    def __init__(self, path, provider: str = "cpu", threads: Optional[int] = None):
        import onnxruntime as ort
        import onnx

        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise ExportError(f"onnxruntime here has no {PROVIDERS[provider]}; install onnxruntime-gpu for cuda/tensorrt")
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "qc.timesteps" not in meta:
            raise ExportError(f"{path} was not written by qc-compiler's exporter (no timestep table)")
        opts = session_options(threads)
        self.session = ort.InferenceSession(str(path), opts, providers=[PROVIDERS[provider]])
        self._inputs = {i.name for i in self.session.get_inputs()}  # "step" is dropped when nothing reads it
        self.model_info = json.loads(meta["qc.model_info"])
        self.sampler_spec = json.loads(meta["qc.sampler"])
        self._index = {t: i for i, t in enumerate(json.loads(meta["qc.timesteps"]))}
        self.step_hooks: List = []
        self.cache = json.loads(meta.get("qc.cache") or '{"regions": 0}')
        self._store: Dict[int, np.ndarray] = {}
        self._labels: Optional[np.ndarray] = None
        if meta.get("qc.vc_sample_k"):
            from ..passes.vc import apply_k

            table = torch.tensor(json.loads(meta["qc.vc_sample_k"]))
            self.step_hooks.append(lambda step, t, x: apply_k(x, table[step]))

    num_classes = property(lambda self: self.model_info["num_classes"])
    input_size = property(lambda self: self.model_info["input_size"])
    in_channels = property(lambda self: self.model_info["in_channels"])

    def _computes(self, step: int, r: int) -> bool:
        if step == 0 or r not in self._store:
            return True
        if self.cache["kind"] == "interval":
            return step % self.cache["interval"] == 0
        return bool(self.cache["schedule"][step][r])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = int(torch.as_tensor(t).reshape(-1)[0])
        if t0 not in self._index:
            raise StepError(f"timestep {t0} is not in the exported schedule")
        step, labels = self._index[t0], y.detach().long().cpu().numpy()
        regions = self.cache["regions"]
        if step == 0:  # a new sampling run: the cache is the caller's, and it starts empty
            self._store, self._labels = {}, labels
        elif regions and (self._labels is None or not np.array_equal(self._labels, labels)):
            raise StepError(f"the batch (size or labels) changed inside a sampling run at step {step}")
        feed = {"x": x.detach().float().cpu().numpy(), "t": torch.as_tensor(t).expand(x.shape[0]).long().numpy(),
                "y": labels, "step": np.array(step, dtype=np.int64)}
        for r in range(regions):
            feed[f"compute_{r}"] = np.array(self._computes(step, r))
            feed[f"cache_in_{r}"] = self._store.get(r, np.zeros((1, 1, 1), dtype=np.float32))
        feed = {k: v for k, v in feed.items() if k in self._inputs}
        outs = self.session.run(["out"] + [f"cache_out_{r}" for r in range(regions)], feed)
        for r in range(regions):
            self._store[r] = outs[1 + r]
        return torch.from_numpy(outs[0])


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
