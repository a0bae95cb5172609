"""``Quantize``: fake-quant nodes for linear layers (and optionally the attention matmuls), calibrated.

Decide, then emit. The pass first walks every graph (nested cache regions included) and annotates
each linear and matmul node with what the ``QuantConfig`` (resolved against the model adapter) says,
as a :class:`QuantAnnotation` in ``node.meta["qc.quant"]``. Only then does it emit: every annotated
node is replaced by reading its annotation, never by deciding again. Then it calibrates the
observers on the context's ``calibration_set`` (each batch at its own step, set through the step
state), and measures how much error each layer adds on its own (relative L2 against float), so
sensitive layers can be found.

    x --> linear(W, b) -->            becomes        x --> QuantLinear[ Q/DQ(x) @ Q/DQ(W)^T + b ] -->
    a, b --> matmul -->               becomes        a --> ActQuant --> matmul <-- ActQuant <-- b

Example:
    >>> import qc_compiler as qc
    >>> from qc_compiler.passes import Quantize, UniformCalibration        # doctest: +SKIP
    >>> fast = qc.compile(model, passes=[UniformCalibration(size=64), Quantize(weight_bits=8, act_bits=8)],
    ...                   sampler=qc.DDPM(steps=50))                        # doctest: +SKIP
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx

from ..diffusion.samplers import model_timestep
from ..errors import PassError
from ..graph import LinearSite, find_linears, iter_graph_modules, node_module_path
from ..options import check_int, config_or_keywords
from ..pipeline import Pass, PassResult, register_pass
from ..quant.config import LayerQuant, QuantConfig
from ..quant.fake_quant import ActQuant, QuantLinear, set_mode
from ..quant.balance import BalanceConfig
from ..quant.gptq import GPTQConfig
from ..step import StepState, StepTable, bind_step_state

__all__ = ["Quantize", "QuantAnnotation"]

ROUNDINGS = ("nearest", "gptq")
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


@dataclass(frozen=True)
class QuantAnnotation:
    """What the pass decided for one node (``node.meta["qc.quant"]``): the op's module path, its kind
    (``"linear"`` or ``"matmul"``) and how it is quantized."""

    path: str
    op: str
    spec: LayerQuant


@register_pass
class Quantize(Pass):
    """Insert calibrated fake-quant modules.

    Give at most one of: bits (``weight_bits``/``act_bits``), a ``preset`` ("w8a8", "w4a8", "w4a4"),
    or a full ``config`` (a :class:`QuantConfig`). With none, W8A8.

    ``rounding``: how weights become codes, ``"nearest"`` (round to nearest on the observer's grid) or
    ``"gptq"`` (GPTQ against the calibration inputs, :mod:`qc_compiler.quant.gptq`; its options as
    ``gptq=GPTQConfig(...)`` or a dict of its fields). The grid, and so every backend, is the same.

    ``balance``: salience balancing per input channel for every linear whose input is quantized
    (:mod:`qc_compiler.quant.balance`: ``"search"``, ``"smoothquant"``, ``"ptq4dit"``, or a
    ``BalanceConfig``/dict); None for none. It runs on the torch INT8 backend (and fake-quant).

    ``low_rank``: rank r of SVDQuant's float branch beside every quantized linear (0: none); the 4-bit
    grid then holds only the residual weight. Torch INT8 backend (and fake-quant) only; its cost is
    two thin float GEMMs per layer (measured in docs/RESULTS.md).
    """

    name = "quantize"
    requires = frozenset({"calibration_set"})
    provides = frozenset({"quantized"})

    def __init__(self, *, weight_bits: Optional[int] = None, act_bits: Optional[int] = None,
                 preset: Optional[str] = None, config: Union[QuantConfig, Dict[str, Any], None] = None,
                 batch_size: int = 64, compare_batches: int = 6, rounding: str = "nearest",
                 gptq: Union[GPTQConfig, Dict[str, Any], None] = None,
                 balance: Union[BalanceConfig, Dict[str, Any], str, None] = None, low_rank: int = 0):
        given = [name for name, v in (("bits", weight_bits if weight_bits is not None else act_bits),
                                      ("preset", preset), ("config", config)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"Quantize takes one of bits, preset or config; got {' and '.join(given)}")
        if isinstance(config, dict):
            config = QuantConfig.from_json(config)
        elif config is not None and not isinstance(config, QuantConfig):
            raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
        elif preset is not None:
            config = QuantConfig.preset(preset)
        elif config is None:
            config = QuantConfig(default=LayerQuant(8 if weight_bits is None else weight_bits,
                                                    8 if act_bits is None else act_bits))
        self.config = config
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
        if gptq is not None and rounding != "gptq":
            raise ValueError("gptq options were given, but rounding is not 'gptq': set rounding='gptq' or drop them")
        if isinstance(gptq, dict):
            gptq = config_or_keywords("gptq", GPTQConfig, None, gptq)
        elif gptq is not None and not isinstance(gptq, GPTQConfig):
            raise ValueError(f"gptq must be a GPTQConfig or a dict of its fields, got {type(gptq).__name__}")
        self.rounding = rounding
        self.gptq = (gptq or GPTQConfig()) if rounding == "gptq" else None
        if isinstance(balance, str):
            balance = BalanceConfig(method=balance)
        elif isinstance(balance, dict):
            balance = config_or_keywords("balance", BalanceConfig, None, balance)
        elif balance is not None and not isinstance(balance, BalanceConfig):
            raise ValueError(f"balance must be a method name, a BalanceConfig or a dict of its fields, "
                             f"got {type(balance).__name__}")
        self.balance = balance
        self.low_rank = check_int("low_rank", low_rank, lo=0)
        self.batch_size = check_int("batch_size", batch_size, lo=1)
        self.compare_batches = check_int("compare_batches", compare_batches, lo=1)

    def options(self) -> Dict[str, Any]:
        out = {"config": self.config.to_json(), "batch_size": self.batch_size, "compare_batches": self.compare_batches}
        if self.gptq is not None:  # left out when off, so artefacts saved before GPTQ existed read the same
            out.update(rounding=self.rounding, gptq=self.gptq.options())
        if self.balance is not None:
            out["balance"] = self.balance.options()
        if self.low_rank:
            out["low_rank"] = self.low_rank
        return out

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        config = self.config.resolve(ctx.need("adapter", self.name))
        sampler = ctx.need("sampler", self.name)
        annotated = self._annotate(gm, config)
        if not annotated:
            raise PassError(self.name, "the config selects no layer to quantize (check include/overrides)")
        modules = self._emit(annotated, config.act_step_groups, sampler.steps)
        keys = {m.path: {k: f"quant.{m.path}.{k}" for k in m.fitted_state()} for m in modules}
        if all(key in ctx.fitted for ks in keys.values() for key in ks.values()):
            for m in modules:
                m.load_fitted({k: ctx.fitted[key] for k, key in keys[m.path].items()})
        else:
            self._calibrate(gm, modules, ctx)
            for m in modules:
                ctx.fitted.update({keys[m.path][k]: v.detach().clone() for k, v in m.fitted_state().items()})
        set_mode(modules, "quant")
        worst = max(modules, key=lambda m: m.rel_error if m.rel_error == m.rel_error else -1)
        ctx.artifacts["quantized"] = [{"path": m.path, "rel_error": m.rel_error} for m in modules]
        linears = sum(isinstance(m, QuantLinear) for m in modules)
        extras = [t for t, on in (("GPTQ", self.gptq), (f"balance {self.balance and self.balance.method}", self.balance),
                                              (f"low rank {self.low_rank}", self.low_rank)) if on]
        note = (f"{linears} linears {config.bits.upper()}" + (f" ({', '.join(extras)})" if extras else "") +
                f", {len(modules) - linears} matmul operands; "
                f"largest error {worst.path} ({worst.rel_error:.4f})")
        return PassResult(gm, modified=True, notes=note)

    # --- decide ---------------------------------------------------------------------------------
    @staticmethod
    def _annotate(gm: fx.GraphModule, config: QuantConfig) -> List[Tuple[fx.GraphModule, fx.Node, Optional[LinearSite]]]:
        """Annotate every node the config quantizes; nothing is changed yet."""
        out = []
        for _, owner in list(iter_graph_modules(gm)):
            for site in find_linears(owner):
                spec = config.for_op(site.path, "linear")
                if spec is not None:
                    site.node.meta["qc.quant"] = QuantAnnotation(site.path, "linear", spec)
                    out.append((owner, site.node, site))
            for node in owner.graph.nodes:
                if node.op == "call_function" and node.target in _MATMULS:
                    path = node_module_path(node)
                    spec = config.for_op(path, "matmul")
                    if spec is not None:
                        node.meta["qc.quant"] = QuantAnnotation(path, "matmul", spec)
                        out.append((owner, node, None))
        return out

    # --- emit -----------------------------------------------------------------------------------
    def _emit(self, annotated, groups: int, num_steps: int) -> List[Any]:
        """Replace each annotated node by the fake-quant module its annotation describes."""
        modules, owners, matmul_index = [], [], {}
        for owner, node, site in annotated:
            note: QuantAnnotation = node.meta["qc.quant"]
            if note.op == "linear":
                module = QuantLinear(site.weight, site.bias, note.path, note.spec, num_groups=groups,
                                     num_steps=num_steps, gptq=self.gptq,
                                     balance=(self.balance if note.spec.act_bits is not None and self.balance
                                              and self.balance.applies_to(note.path) else None),
                                     low_rank=min(self.low_rank, *site.weight.shape))
                self._replace(owner, node, module, "q_" + note.path, (node.args[0],))
                modules.append(module)
            else:
                i = matmul_index.setdefault((id(owner), note.path), [0])
                for k, operand in enumerate(node.args[:2]):
                    module = ActQuant(f"{note.path}.matmul{i[0]}.in{k}", note.spec, groups, num_steps)
                    name = _unique(owner, f"q_{note.path}_matmul{i[0]}_in{k}")
                    owner.add_submodule(name, module)
                    with owner.graph.inserting_before(node):
                        q = owner.graph.call_module(name, (operand,))
                    node.replace_input_with(operand, q)
                    modules.append(module)
                i[0] += 1
            if owner not in owners:
                owners.append(owner)
        for owner in owners:
            owner.graph.eliminate_dead_code()
            owner.delete_all_unused_submodules()
            owner.recompile()
        return modules

    @staticmethod
    def _replace(owner: fx.GraphModule, node: fx.Node, module, name: str, args: tuple) -> None:
        name = _unique(owner, name)
        owner.add_submodule(name, module)
        with owner.graph.inserting_before(node):
            new = owner.graph.call_module(name, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        owner.graph.erase_node(node)

    # --- calibrate ------------------------------------------------------------------------------
    def _calibrate(self, gm: fx.GraphModule, modules: List[Any], ctx) -> None:
        """Observe every batch at its own step (the one step table, through the one step state)."""
        pool = ctx.artifacts["calibration_set"]
        dtype, t_dtype = ctx.info.torch_dtype, ctx.adapter.inputs.torch_timestep_dtype  # as the graph was captured
        table = StepTable(ctx.sampler.timesteps)
        state = StepState(num_steps=len(table))
        bind_step_state(gm, state)

        def run(mode: str, batches, only: Optional[Dict[int, str]] = None) -> None:
            """Every batch at its own step, every module in `mode` (or in its mode from `only`, by id)."""
            set_mode(modules, mode)
            for m in modules:
                m.mode = (only or {}).get(id(m), mode)
            for step, inputs in batches:
                with state.calibrating(step):
                    gm(*inputs)

        with torch.no_grad():
            divisor = ctx.adapter.inputs.timestep_divisor
            batches = [(table.index(t[0]), ctx.graph_inputs(x.to(dtype), model_timestep(t[0].item(), len(t), divisor=divisor)
                                                           .to(t_dtype), y))
                       for x, t, y in pool.batches(self.batch_size)]
            balanced = [m for m in modules if getattr(m, "balance", None) is not None]
            if balanced:  # salience first: the observers must see the balanced inputs
                run("stats", batches)
                for m in balanced:
                    m.fit_balance()
            run("observe", batches)
            for m in modules:
                m.finish_calibration()
            if self.gptq is not None and self.gptq.sequential:
                self._sequential_gptq(modules, batches, run)
            # Per-layer sensitivity: each op quantized alone, on batches spread over the steps.
            stride = max(1, len(batches) // self.compare_batches)
            run("compare", batches[::stride][: self.compare_batches])

    @staticmethod
    def _sequential_gptq(modules: List[Any], batches, run) -> None:
        """GPTQ one layer after another, in the order the model runs them: each layer's Hessian is
        gathered with every op before it quantized, so its codes correct the input it will really get.
        One calibration pass per linear (two when fitted to the float model's output); ops after the
        current one run in float (they do not matter to its input)."""
        order: List[Any] = []
        hooks = [m.register_forward_pre_hook(lambda mod, _a: None if any(mod is o for o in order) else order.append(mod))
                 for m in modules]
        try:
            run("float", batches[:1])
        finally:
            for h in hooks:
                h.remove()
        order += [m for m in modules if not any(m is o for o in order)]  # never reached: nothing depends on it
        for i, m in enumerate(order):
            if getattr(m, "gptq", None) is None:
                continue
            m.begin_hessian()
            if m.gptq.target == "float":  # the float model's input to this layer, batch by batch
                run("float", batches, only={id(m): "target"})
            run("float", batches, only={id(m): "hessian", **{id(o): "quant" for o in order[:i]}})
            m.refit_gptq()


def _unique(owner: fx.GraphModule, name: str) -> str:
    base = name.replace(".", "_")
    candidate, i = base, 1
    while hasattr(owner, candidate):
        candidate, i = f"{base}_{i}", i + 1
    return candidate
