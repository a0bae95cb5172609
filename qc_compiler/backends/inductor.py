"""The Inductor backend: our calibrated graph lowered through ``torch.compile``, as PT2E's INT8 graphs are.

Each fake-quant linear is lowered from its ``export_spec()`` to the quantize/dequantize form that
Inductor's x86 INT8 passes match (the form torchao's PT2E ``convert_pt2e`` writes), carrying **our**
calibration: ``quantize_per_tensor`` / ``dequantize_per_tensor`` of the input with its calibrated
uint8 scale and zero point, ``dequantize_per_channel`` of the int8 weight codes, then ``linear``. With
``freezing`` on, Inductor folds each pattern into one oneDNN INT8 GEMM (AMX where the CPU has it)
with the weights prepacked, fuses the activation's quantization into the LayerNorm/modulate before
it, a following GELU into the GEMM, and fc1's output straight into fc2's uint8 input. A weight-only
linear (the conditioning layers) runs :func:`~qc_compiler.quant.weight_only.weight_only_int8_linear`
where the CPU has VNNI: its float input written exactly as three int8 rows, one ``_int_mm``
reading the int8 codes (these GEMMs are bound by reading the weight). Inductor fuses the splitting into
one kernel. Without VNNI it runs a float GEMM on the dequantized codes (Inductor does not fold that
dequantization; it fuses it into a neighbouring kernel).

What reads the step stays outside the compiled code. When the only step-dependent nodes are cache
lookups whose schedule is a function of the step alone (``interval``, or a ``static`` table with few
distinct rows) and VC's output rescales, the whole graph is compiled once per **cache pattern** (which
regions compute): a reuse step's graph takes the stored outputs as inputs and never holds the regions;
a compute step's graph returns the regions' outputs beside the model's, to be stored; a VC rescale
takes its step's K row as an input, so one graph serves every step. No graph breaks, so Inductor
fuses across the block boundaries as it does without a cache, and a reuse step runs no Python per
region. A data-dependent cache (``adaptive``, ``first_block``) decides from its probe region, so its
graph is cut once, after the probe: one graph up to it, one per pattern after it. Otherwise (a static
table with many patterns, a VC rescale before the probe) every step-aware node runs eagerly, as a graph
break, and a cache lookup's region is compiled on its own, so the compute-or-reuse decision never
enters a guard. Either way each graph compiles once; a sampling
run recompiles nothing (tested with ``torch._dynamo`` counters).

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
import operator
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion.samplers import model_device
from ..errors import ExportError
from ..passes.cache import CacheLookup
from ..passes.vc import VCRescale
from ..quant.spec import QuantizedLinearSpec
from ..quant.weight_only import weight_only_int8_linear
from ..step import StepAware
from ..quant.config import QuantConfig
from ..specs import VCTable, apply_vc_row
from .registry import check_constant_uint8_activations, cpu_has_vnni, get_backend, register_backend

__all__ = ["QDQLinear", "InductorModule", "CachePatternModule", "lower_inductor", "check_inductor_passes",
           "freezing"]

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
        _qd()  # registered now: a first registration inside a traced call would guard on it and recompile

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
        self.int8_gemm = spec.act is None and cpu_has_vnni()

    def export_spec(self) -> QuantizedLinearSpec:
        return self.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_gemm:  # weight-only, on the codes (see the module docstring)
            return weight_only_int8_linear(x, self.w_int8.t(), self.w_scale, self.bias)
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
        self.__dict__["_called"] = set()  # ids of the compiled functions called once (compiled) already
        self.first_call_s: Optional[float] = None  # every compiled function's first call, summed

    def _call(self, fn, *args: torch.Tensor) -> Any:
        """``fn(*args)`` with freezing on and autograd off; a first call's time is compile time."""
        with torch.no_grad(), (freezing() if self.freeze else contextlib.nullcontext()):
            if id(fn) in self._called:
                return fn(*args)
            t0 = time.perf_counter()
            out = fn(*args)
            self._called.add(id(fn))
            self.first_call_s = (self.first_call_s or 0.0) + time.perf_counter() - t0
            return out

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self._call(self.compiled, *args)

    def report_section(self) -> str:
        first = "not called yet" if self.first_call_s is None else f"first call (compile) {self.first_call_s:.1f} s"
        how = "freezing" if self.freeze else "CUDA, torch._int_mm layers"
        return f"  Inductor (torch.compile, {how}): {first}"


# A static schedule with more distinct rows than this keeps the per-region graph breaks: each pattern
# is a whole-graph compile (half a minute for DiT-B/2 on 2 cores).
MAX_CACHE_PATTERNS = 4


def _region_outputs(region: nn.Module) -> Optional[int]:
    """How many tensors a cached region returns (a joint attention's two streams: 2); None if unknown."""
    if not isinstance(region, fx.GraphModule):
        return None
    out = next(n for n in reversed(region.graph.nodes) if n.op == "output").args[0]
    return len(out) if isinstance(out, (tuple, list)) else 1


def _cache_patterns(lookups: Sequence[CacheLookup]) -> Optional[List[Tuple[bool, ...]]]:
    """Every compute/reuse pattern the schedule can produce (the first step's all-compute one first), or
    None when a static table has too many. A data-dependent schedule (adaptive, first_block) decides
    after its probe region has run, so its graph is cut there (see ``CachePatternModule``)."""
    schedule = lookups[0].schedule
    if any(m.schedule != schedule for m in lookups):
        return None
    if schedule.policy in ("adaptive", "first_block"):  # after the probe: all the others compute, or none
        return [tuple(True for _ in lookups), tuple(m.index < schedule.probe_regions for m in lookups)]
    steps = range(schedule.interval) if schedule.policy == "interval" else range(len(schedule.table))
    patterns = [tuple(True for _ in lookups)]
    for step in steps:
        pattern = tuple(schedule.decide(step, m.index, True, {}) for m in lookups)
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns if len(patterns) <= MAX_CACHE_PATTERNS else None


def _pattern_graph(gm: fx.GraphModule, nodes: Sequence[fx.Node], outs: Sequence[int], pattern: Sequence[bool],
                   vcs: Dict[fx.Node, VCTable], vc_on: bool, body: Optional[Sequence[fx.Node]] = None,
                   given: Sequence[fx.Node] = (), give: Optional[Sequence[fx.Node]] = None) -> fx.GraphModule:
    """``gm`` with each cache-lookup node replaced: by a call of its region (whose outputs are appended
    to the graph's) where ``pattern`` computes, by new inputs holding the stored outputs where it reuses;
    and each VC rescale by ``apply_vc_row`` of a new input, the step's K row (by nothing when not
    ``vc_on``, outside a sampling run). The region modules are shared with ``gm``, not copied.

    A piece of the graph: ``body``, the nodes to copy (default: all); ``given``, nodes of an earlier
    piece whose values come in after the graph's own inputs; ``give``, nodes whose values go out in
    place of the graph's output (for a later piece)."""
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")] if body is None else body
    inside = set(body)
    g, env = fx.Graph(), {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.node_copy(n, env.__getitem__)
    for n in given:
        env[n] = g.placeholder(f"qc_given_{n.name}")
    reused = {n: [g.placeholder(f"qc_cached_{n.name}_{i}") for i in range(k)]
              for n, k, compute in zip(nodes, outs, pattern) if not compute and n in inside}
    rows = {n: g.placeholder(f"qc_vc_{n.name}") for n in vcs if n in inside} if vc_on else {}
    lookup_outs = dict(zip(nodes, outs))
    extras: List[fx.Node] = []
    for n in body:
        if n in reused:
            env[n] = reused[n][0] if lookup_outs[n] == 1 else tuple(reused[n])
        elif n in lookup_outs:
            env[n] = g.call_module(f"{n.target}.region", fx.map_arg(n.args, env.__getitem__),
                                   fx.map_arg(n.kwargs, env.__getitem__))
            extras.extend([env[n]] if lookup_outs[n] == 1 else
                          [g.call_function(operator.getitem, (env[n], i)) for i in range(lookup_outs[n])])
        elif n in vcs:
            x = env[n.args[0]]
            env[n] = g.call_function(apply_vc_row, (x, rows[n], vcs[n].placement, vcs[n].channels_last)) if vc_on else x
        else:
            env[n] = g.node_copy(n, env.__getitem__)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    result = tuple(env[n] for n in give) if give is not None else fx.map_arg(out, env.__getitem__)
    g.output((result, *extras))
    return fx.GraphModule(gm, g)


def _cut_after(gm: fx.GraphModule, node: fx.Node) -> Tuple[List[fx.Node], List[fx.Node], List[fx.Node]]:
    """The graph's nodes up to and including ``node``, those after it, and the values of the first
    part the second reads (its inputs, in graph order)."""
    order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut = order.index(node) + 1
    while cut < len(order) and order[cut].target is operator.getitem and order[cut].args[0] is node:
        cut += 1  # a multi-output region's items go with it: tensors cross the cut, not a tuple
    first, rest = order[:cut], order[cut:]
    later = set(rest) | {n for n in gm.graph.nodes if n.op == "output"}
    return first, rest, [n for n in first if any(u in later for u in n.users)]


class CachePatternModule(InductorModule):
    """The whole graph compiled once per cache pattern (see the module docstring); VC's rescales take
    their step's K row as an input. A data-dependent cache (adaptive, first_block) decides from its probe
    region, so its graph is cut after that region's lookup: the first piece (the probe included) is one
    graph, the rest one per pattern, two compiled calls a step instead of a graph break per region. The
    step state and the cache's store are the lookups' own, so reports, batch checks and the run log
    read as before."""

    def __init__(self, graph: fx.GraphModule, lookups: Dict[str, CacheLookup], vcs: Dict[str, VCRescale],
                 freeze: bool = True):
        super().__init__(graph, freeze)
        del self.__dict__["compiled"]  # each pattern has its own
        by_target = {n.target: n for n in graph.graph.nodes if n.op == "call_module"}
        order = sorted(lookups.items(), key=lambda kv: kv[1].index)
        self.lookups = [m for _, m in order]
        self.vcs = list(vcs.values())
        self._nodes = [by_target[t] for t, _ in order]
        self._outs = [_region_outputs(m.region) for m in self.lookups]
        self._vc_nodes = {by_target[t]: m.export_spec() for t, m in vcs.items()}
        self.probe = bool(self.lookups) and self.lookups[0].schedule.policy in ("adaptive", "first_block")
        self._cut = _cut_after(graph, self._nodes[0]) if self.probe else None
        self.__dict__["patterns"] = {}  # (piece, pattern, VC on) -> compiled graph, built on first use

    def _compiled(self, pattern: Tuple[bool, ...], vc_on: bool, piece: str = "whole"):
        key = (piece, pattern, vc_on)
        if key not in self.patterns:
            parts = (self.graph, self._nodes, self._outs, pattern, self._vc_nodes, vc_on)
            if piece == "probe":
                first, _, crossing = self._cut
                gm = _pattern_graph(*parts, body=first, give=crossing)
            elif piece == "rest":
                _, rest, crossing = self._cut
                gm = _pattern_graph(*parts, body=rest, given=crossing)
            else:
                gm = _pattern_graph(*parts)
            self.patterns[key] = torch.compile(gm)
        return self.patterns[key]

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        # A graph from torch.export flattens its inputs and rebuilds its output's structure in its codegen;
        # the pattern graphs take and return flat values, so both ends are the original graph's.
        graph = self.graph.graph
        args = tuple(graph.process_inputs(*args))
        state = (self.lookups or self.vcs)[0].step_state
        stepping = state is not None and state.step >= 0
        vc_on = bool(self.vcs) and stepping  # as VCRescale: off outside a sampling run
        rows = [m.k[state.step] for m in self.vcs] if vc_on else []  # every rescale is after the cut
        if not stepping or state.fresh:  # no sampling run: every region computes, nothing kept
            everything = self._compiled(tuple(True for _ in self.lookups), vc_on)
            return graph.process_outputs(self._call(everything, *args, *rows)[0])
        store = state.store("cache")
        outputs = store.setdefault("outputs", {})
        batch = args[0].shape[0]
        given: Tuple[torch.Tensor, ...] = ()
        first = 0
        if self.probe:  # the probe always computes; what it saw decides for the others
            crossing, *probe = self._call(self._compiled((True,), False, "probe"), *args)
            m, k = self.lookups[0], self._outs[0]
            m.keep(state.step, probe[0] if k == 1 else tuple(probe), store)
            m.schedule.observe(state.step, m.index, probe[0], store)
            given, first = tuple(crossing), 1
        pattern, cached = [], []
        for m, k in zip(self.lookups[first:], self._outs[first:]):
            have = outputs.get(m.key)
            m.check_batch(have, batch)
            compute = m.schedule.decide(state.step, m.index, have is not None, store)
            pattern.append(compute)
            if not compute:
                cached.extend([have] if k == 1 else have)
        full = (True,) * first + tuple(pattern)  # the probe's slot: computed already, in its own piece
        fn = self._compiled(full, vc_on, "rest" if self.probe else "whole")
        result = self._call(fn, *args, *given, *cached, *rows)
        fresh = iter(result[1:])
        for m, k, compute in zip(self.lookups[first:], self._outs[first:], pattern):
            if compute:
                m.keep(state.step, next(fresh) if k == 1 else tuple(next(fresh) for _ in range(k)), store)
        return graph.process_outputs(result[0])

    def report_section(self) -> str:
        how = "cut after the probe region, " if self.probe else ""
        return (super().report_section() + f"; the whole graph per cache pattern ({how}{len(self.patterns)} "
                "compiled, no graph break per region)")


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
    step_aware = [(name, m) for name, m in gm.named_modules()
                  # a lowered linear with one constant range reads no step: compiled in (the CUDA route)
                  if isinstance(m, StepAware) and (m.uses_step or not hasattr(m, "export_spec"))]
    plan = _whole_graph_plan(gm, step_aware)
    if plan is not None:
        return CachePatternModule(gm, *plan, freeze=not cuda)
    for _, module in step_aware:
        _eager(module)
        region = getattr(module, "region", None)
        if isinstance(region, nn.Module):  # a cache lookup: its region is compute, compiled on its own
            module.region = torch.compile(region)
    return InductorModule(gm, freeze=not cuda)


def _whole_graph_plan(gm: fx.GraphModule, step_aware) -> Optional[Tuple[Dict[str, CacheLookup], Dict[str, VCRescale]]]:
    """The cache lookups and VC rescales by graph target, when they are the only step-aware nodes the
    graph calls, both from its top level, and the cache follows a step-only schedule with few patterns;
    None otherwise (every step-aware node then a graph break)."""
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    # what the graph calls (a sampler hook such as sample-placement VC is a submodule the graph never calls)
    called = [(name, m) for name, m in step_aware if any(name == t or name.startswith(t + ".") for t in targets)]
    if not called or not all(isinstance(m, (CacheLookup, VCRescale)) for _, m in called):
        return None
    if not {name for name, _ in called} <= targets:
        return None
    lookups = {name: m for name, m in called if isinstance(m, CacheLookup)}
    vcs = {name: m for name, m in called if isinstance(m, VCRescale)}
    if any(_region_outputs(m.region) is None for m in lookups.values()):
        return None
    if lookups and _cache_patterns(list(lookups.values())) is None:
        return None
    probe = min(lookups.values(), key=lambda m: m.index) if lookups else None
    if probe is not None and probe.schedule.policy in ("adaptive", "first_block"):
        by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        first, _, _ = _cut_after(gm, by_target[next(t for t, m in lookups.items() if m is probe)])
        if any(by_target[t] in first for t in vcs):  # a rescale before the probe: not worth a third piece
            return None
    return lookups, vcs
