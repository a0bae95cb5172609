"""``Quantize``: fake-quant nodes for linear layers (and optionally the attention matmuls), calibrated.

Decide, then emit: the pass first annotates every linear (and matmul) node with what the
``QuantConfig`` says (``node.meta["qc.quant"]``), then replaces the annotated ops with fake-quant
modules, calibrates their observers on the context's ``calibration_set``, and measures how much
error each layer adds on its own (relative L2 against float), so sensitive layers can be found.

    x --> linear(W, b) -->            becomes        x --> QuantLinear[ Q/DQ(x) @ Q/DQ(W)^T + b ] -->
    a, b --> matmul -->               becomes        a --> ActQuant --> matmul <-- ActQuant <-- b

It walks nested graphs too, so linears inside cache regions are quantized where they are.

Example:
    >>> import qc_compiler as qc
    >>> from qc_compiler.passes import Quantize, UniformCalibration        # doctest: +SKIP
    >>> fast = qc.compile(model, passes=[UniformCalibration(size=64), Quantize(weight_bits=8, act_bits=8)],
    ...                   sampler=qc.DDPM(steps=50))                        # doctest: +SKIP
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch
import torch.fx as fx

from ..capture import find_linears, node_module_path
from ..errors import PassError
from ..pipeline import Pass, PassResult, register_pass
from ..quant.config import LayerQuant, QuantConfig
from ..quant.fake_quant import ActQuant, QuantLinear, set_mode
from ..regions import iter_graph_modules

__all__ = ["Quantize", "QuantAnnotation"]

_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


@dataclass(frozen=True)
class QuantAnnotation:
    """What the pass decided for one node (stored as ``node.meta["qc.quant"]``)."""

    path: str
    op: str
    spec: LayerQuant


@register_pass
class Quantize(Pass):
    """Insert calibrated fake-quant modules. ``preset`` ("w8a8", "w4a8", "w4a4") or bits, or a full config."""

    name = "quantize"
    requires = frozenset({"calibration_set"})
    provides = frozenset({"quantized"})

    def __init__(self, weight_bits: int = 8, act_bits: int = 8, preset: Optional[str] = None,
                 config: Union[QuantConfig, Dict[str, Any], None] = None, batch_size: int = 64,
                 compare_batches: int = 6):
        if isinstance(config, dict):
            config = QuantConfig.from_json(config)
        elif config is None:
            config = QuantConfig.preset(preset) if preset else QuantConfig(default=LayerQuant(weight_bits, act_bits))
        self.config, self.batch_size, self.compare_batches = config, int(batch_size), int(compare_batches)

    def options(self) -> Dict[str, Any]:
        return {"config": self.config.to_json(), "batch_size": self.batch_size, "compare_batches": self.compare_batches}

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        num_steps = ctx.sampler.steps if ctx.sampler else 1
        modules = self._insert(gm, num_steps)
        if not modules:
            raise PassError(self.name, "the config selects no layer to quantize (check include/overrides)")
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
        d = self.config.default
        note = (f"{linears} linears W{d.weight_bits}A{d.act_bits}, {len(modules) - linears} matmul operands; "
                f"largest error {worst.path} ({worst.rel_error:.4f})")
        return PassResult(gm, modified=True, notes=note)

    # --- annotate and insert --------------------------------------------------------------------
    def _insert(self, gm: fx.GraphModule, num_steps: int) -> List[Any]:
        groups = self.config.act_step_groups
        modules = []
        for _, owner in list(iter_graph_modules(gm)):
            for site in find_linears(owner):
                spec = self.config.for_op(site.path, "linear")
                if spec is None:
                    continue
                site.node.meta["qc.quant"] = QuantAnnotation(site.path, "linear", spec)
                module = QuantLinear(site.weight, site.bias, site.path, spec, groups, num_steps)
                self._replace(owner, site.node, module, "q_" + site.path, (site.node.args[0],))
                modules.append(module)
            if self.config.attn_matmuls:
                modules += self._insert_matmul_operands(owner, groups, num_steps)
            owner.graph.eliminate_dead_code()
            owner.delete_all_unused_submodules()
            owner.recompile()
        return modules

    def _insert_matmul_operands(self, owner: fx.GraphModule, groups: int, num_steps: int) -> List[ActQuant]:
        out = []
        matmuls = [n for n in owner.graph.nodes if n.op == "call_function" and n.target in _MATMULS]
        for i, node in enumerate(matmuls):
            path = node_module_path(node)
            spec = self.config.for_op(path, "matmul")
            if spec is None:
                continue
            node.meta["qc.quant"] = QuantAnnotation(path, "matmul", spec)
            for k, operand in enumerate(node.args[:2]):
                module = ActQuant(f"{path}.matmul{i}.in{k}", spec, groups, num_steps)
                name = _unique(owner, f"q_{path}_matmul{i}_in{k}")
                owner.add_submodule(name, module)
                with owner.graph.inserting_before(node):
                    q = owner.graph.call_module(name, (operand,))
                node.replace_input_with(operand, q)
                out.append(module)
        return out

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
        pool = ctx.artifacts["calibration_set"]
        step_of = {t: i for i, t in enumerate(ctx.sampler.timesteps)} if ctx.sampler else {}
        set_mode(modules, "observe")
        with torch.no_grad():
            batches = list(pool.batches(self.batch_size))
            for x, t, y in batches:
                for m in modules:
                    m.calib_step = step_of.get(int(t[0]))
                gm(x, t, y)
            for m in modules:
                m.finish_calibration()
            # Per-layer sensitivity: each op quantized alone, on batches spread over the steps.
            set_mode(modules, "compare")
            stride = max(1, len(batches) // max(1, self.compare_batches))
            for x, t, y in batches[::stride][: self.compare_batches]:
                for m in modules:
                    m.calib_step = step_of.get(int(t[0]))
                gm(x, t, y)
        for m in modules:
            m.calib_step = None


def _unique(owner: fx.GraphModule, name: str) -> str:
    base = name.replace(".", "_")
    candidate, i = base, 1
    while hasattr(owner, candidate):
        candidate, i = f"{base}_{i}", i + 1
    return candidate
