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
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..diffusion.samplers import model_device, model_timestep
from ..errors import PassError
from ..graph import LinearSite, block_slices, find_linears, free_after, iter_graph_modules, node_module_path, placeholders, run_slice
from ..options import check_int, config_or_keywords
from ..pipeline import Pass, PassResult, register_pass
from ..quant.config import LayerQuant, QuantConfig
from ..quant.fake_quant import ActQuant, QuantLinear, set_mode
from ..quant.balance import BalanceConfig
from ..quant.brecq import BRECQConfig, rounding_regularizer
from ..quant.gptq import GPTQConfig
from ..step import StepState, StepTable, bind_step_state

__all__ = ["Quantize", "QuantAnnotation"]

ROUNDINGS = ("nearest", "gptq", "brecq")
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
    ``gptq=GPTQConfig(...)`` or a dict of its fields), or ``"brecq"`` (block reconstruction: the
    rounding of every linear in a block learned against the float block's output,
    :mod:`qc_compiler.quant.brecq`; options as ``brecq=BRECQConfig(...)`` or a dict). The grid, and so
    every backend, is the same.

    ``balance``: salience balancing per input channel for every linear whose input is quantized
    (:mod:`qc_compiler.quant.balance`: ``"search"``, ``"smoothquant"``, ``"ptq4dit"``, or a
    ``BalanceConfig``/dict); None for none. It runs on the torch INT8 backend (and fake-quant).

    ``act_observer``/``act_granularity``: the default layer's activation observer (``"minmax"``,
    ``"mse"``, ``"percentile"``) and granularity (``"tensor"``, or ``"token"``: each token's range at
    run time), for a preset or bits; a full ``config`` sets them in its ``LayerQuant``.

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
                 balance: Union[BalanceConfig, Dict[str, Any], str, None] = None, low_rank: int = 0,
                 brecq: Union[BRECQConfig, Dict[str, Any], None] = None,
                 act_observer: Optional[str] = None, act_granularity: Optional[str] = None):
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
        layer = {k: v for k, v in (("act_observer", act_observer), ("act_granularity", act_granularity)) if v is not None}
        if layer:  # recorded in the config itself, so options() (and artefacts saved before) are unchanged
            if "config" in given:
                raise ValueError(f"{' and '.join(layer)} change the default of a preset or of bits; with a full "
                                 "config, set them in its LayerQuant")
            config = replace(config, default=replace(config.default, **layer))
        self.config = config
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
        self.rounding = rounding
        self.gptq = _rounding_options("gptq", GPTQConfig, gptq, rounding)
        self.brecq = _rounding_options("brecq", BRECQConfig, brecq, rounding)
        if isinstance(balance, str):
            balance = BalanceConfig(method=balance)
        elif isinstance(balance, dict):
            balance = config_or_keywords("balance", BalanceConfig, None, balance)
        elif balance is not None and not isinstance(balance, BalanceConfig):
            raise ValueError(f"balance must be a method name, a BalanceConfig or a dict of its fields, "
                             f"got {type(balance).__name__}")
        self.balance = balance
        self.low_rank = check_int("low_rank", low_rank, lo=0)
        if self.brecq is not None and self.brecq.act_lr and config.all_per_token:
            raise ValueError("brecq act_lr learns the activations' step sizes, but every quantized activation is "
                             "act_granularity='token' (taken at run time): drop act_lr or use act_granularity='tensor'")
        if self.brecq is not None and self.brecq.branch_lr and not self.low_rank:
            raise ValueError("brecq branch_lr learns the low-rank branch, but low_rank is 0: set low_rank=r or drop branch_lr")
        self.batch_size = check_int("batch_size", batch_size, lo=1)
        self.compare_batches = check_int("compare_batches", compare_batches, lo=1)

    def options(self) -> Dict[str, Any]:
        out = {"config": self.config.to_json(), "batch_size": self.batch_size, "compare_batches": self.compare_batches}
        if self.gptq is not None:  # left out when off, so artefacts saved before GPTQ existed read the same
            out.update(rounding=self.rounding, gptq=self.gptq.options())
        if self.brecq is not None:
            out.update(rounding=self.rounding, brecq=self.brecq.options())
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
        extras = [t for t, on in (("GPTQ", self.gptq), ("BRECQ", self.brecq), (f"balance {self.balance and self.balance.method}", self.balance),
                                              (f"low rank {self.low_rank}", self.low_rank)) if on]
        note = (f"{linears} linears {config.bits.upper()}" + (f" ({', '.join(extras)})" if extras else "") +
                f", {len(modules) - linears} matmul operands; "
                f"largest error {worst.path} ({worst.rel_error:.4f})")
        blocks = ctx.artifacts.get("brecq") if self.brecq is not None else None
        if blocks:  # fitted now (not loaded): how much the learned rounding moved each block toward float
            note += ("; BRECQ block error vs float " + ", ".join(
                f"{b['nearest']:.3f}->{b['learned']:.3f}" + ("" if b["kept"] == "learned" else " (kept nearest)")
                for b in blocks))
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
                                     low_rank=min(self.low_rank, *site.weight.shape), brecq=self.brecq is not None)
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
        # the pool lives on the CPU; the graph (and the modules just emitted, made on the CPU) on the model's
        device = model_device(gm)
        gm.to(device)

        def run(mode: str, batches, only: Optional[Dict[int, str]] = None) -> None:
            """Every batch at its own step, every module in `mode` (or in its mode from `only`, by id)."""
            set_mode(modules, mode)
            for m in modules:
                m.mode = (only or {}).get(id(m), mode)
            for step, inputs in batches:
                with state.calibrating(step):
                    gm(*inputs)

        divisor = ctx.adapter.inputs.timestep_divisor

        def batches_of(size: int):
            """The calibration set in batches of ``size`` items: (step index, graph inputs)."""
            return [(table.index(t[0]), tuple(v.to(device) for v in ctx.graph_inputs(
                        x.to(dtype), model_timestep(t[0].item(), len(t), divisor=divisor).to(t_dtype), y)))
                    for x, t, y in pool.batches(size)]

        with torch.no_grad():
            batches = batches_of(self.batch_size)
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
            if self.brecq is not None:
                ctx.artifacts["brecq"] = self._reconstruct(gm, modules, batches_of(self.brecq.batch_size), state,
                                                           ctx.adapter.blocks.pattern, progress=ctx.progress)
            # Per-layer sensitivity: each op quantized alone, on batches spread over the steps.
            stride = max(1, len(batches) // self.compare_batches)
            run("compare", batches[::stride][: self.compare_batches])

    def _reconstruct(self, gm: fx.GraphModule, modules: List[Any], batches, state: StepState,
                     block_pattern: str, progress: bool = False) -> List[Dict[str, Any]]:
        """BRECQ, block after block in graph order: each block's float output on the float model's
        inputs is the target; the quantized model's inputs (every block before already rounded) go in;
        the soft rounding of the block's linears is learned (activations straight through); then the
        block runs hard-rounded to give the next block its inputs. A block whose learned codes measure
        worse on the calibration set than round to nearest's, or whose loss diverged, keeps round to
        nearest's (and the observers' step sizes, and the SVD's branches). Returns, per
        block with linears, the relative error of its output against float before (round to nearest)
        and after learning, and which codes it kept."""
        cfg = self.brecq
        slices = block_slices(gm, block_pattern)
        holders = placeholders(gm)
        env_f = [dict(zip(holders, inputs)) for _, inputs in batches]
        env_q = [dict(e) for e in env_f]
        gen = torch.Generator().manual_seed(cfg.seed)
        report: List[Dict[str, Any]] = []

        def run_all(s, envs, mode: str) -> None:
            set_mode(modules, mode)
            for (step, _), env in zip(batches, envs):
                with state.calibrating(step):
                    run_slice(gm, s, env)

        for i, s in enumerate(slices):
            mods = _slice_modules(gm, s)
            learn = [m for m in mods if isinstance(m, QuantLinear) and m.brecq]
            run_all(s, env_f, "float")
            if learn:
                start = _learned_state(mods, learn)
                trial = [{n: e[n] for n in s.inputs} for e in env_q]  # round to nearest's error
                run_all(s, trial, "quant")
                before = _rel_error(trial, env_f, s.outputs)
                if not self._learn(gm, s, mods, learn, batches, env_f, env_q, state, gen, progress):
                    _restore(mods, learn, start)  # the loss diverged: nothing learned is kept
            run_all(s, env_q, "quant")
            if learn:
                after = _rel_error(env_q, env_f, s.outputs)
                if not after < before:  # hard rounding can undo what the soft one learned: never keep worse
                    _restore(mods, learn, start)
                    run_all(s, env_q, "quant")
                report.append({"block": s.name, "linears": len(learn), "nearest": before, "learned": after,
                               "kept": "learned" if after < before else "nearest"})
            for e in env_f + env_q:
                free_after(slices, i, e)
        return report

    def _learn(self, gm: fx.GraphModule, s, mods: List[Any], learn: List[QuantLinear], batches, env_f, env_q,
               state: StepState, gen: torch.Generator, progress: bool = False) -> bool:
        """Optimise the soft rounding of ``learn`` (the linears of slice ``s``) against the float targets,
        on minibatches that mix timesteps (:func:`_minibatches`); with ``act_lr``, the step sizes of the
        slice's activations too (LSQ), with ``branch_lr`` the low-rank branches, and with ``drop``,
        QDrop's float elements. False when the loss or what was learned went non-finite."""
        cfg = self.brecq
        draw = _minibatches(s, mods, batches, env_f, env_q, gen)
        vs, branch = [], []
        for m in learn:
            v, factors = m.begin_soft(cfg.branch_lr > 0)
            vs.append(v)
            branch += factors
        drops = torch.Generator().manual_seed(cfg.seed + 1)
        steps = [a for a in (m.begin_soft_acts(cfg.act_lr > 0, cfg.drop, drops) for m in mods) if a is not None]
        set_mode(mods, "soft")
        groups = [(vs, cfg.lr), (steps, cfg.act_lr), (branch, cfg.branch_lr)]
        opt = torch.optim.Adam([{"params": p, "lr": lr} for p, lr in groups if p])
        with torch.enable_grad():
            for it in tqdm(range(cfg.iters), desc=f"brecq {s.name}", disable=not progress, leave=False):
                step, env, target = draw()
                with state.calibrating(step):
                    run_slice(gm, s, env)
                loss = _rec_loss(env, target, s.outputs)
                if not torch.isfinite(loss):
                    break
                beta = cfg.beta(it)
                if beta:
                    loss = loss + cfg.reg_weight * sum(rounding_regularizer(v, beta) for v in vs)
                opt.zero_grad()
                loss.backward()
                opt.step()
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p).all()) for params, _ in groups for p in params)
        for m in learn:
            m.end_soft()
        for m in mods:
            m.end_soft_acts()
        set_mode(mods, "quant")
        return finite

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


def _learned_state(mods: List[Any], learn: List[QuantLinear]) -> Dict[str, Dict[int, Any]]:
    """What block reconstruction may change in a slice, as it stands before learning: codes (round to
    nearest's), activation step sizes (the observers') and low-rank branches (the SVD's)."""
    return {"codes": {id(m): m.w_codes.clone() for m in learn},
            "steps": {id(m): m.a_scale.clone() for m in mods},
            "branch": {id(m): (m.lr_up.clone(), m.lr_down.clone()) for m in learn if m.low_rank}}


def _restore(mods: List[Any], learn: List[QuantLinear], start: Dict[str, Dict[int, Any]]) -> None:
    for m in learn:
        m.set_codes(start["codes"][id(m)])
        if m.low_rank:
            m.set_branch(*start["branch"][id(m)])
    for m in mods:
        m.set_act_scale(start["steps"][id(m)])


def _rounding_options(name: str, cls: type, value: Any, rounding: str) -> Any:
    """The options of rounding ``name`` (a ``cls``, or a dict of its fields; its defaults when None) if
    ``rounding`` is ``name``, else None; options for a rounding not chosen are refused."""
    if value is not None and rounding != name:
        raise ValueError(f"{name} options were given, but rounding is not '{name}': set rounding='{name}' or drop them")
    if isinstance(value, dict):
        value = config_or_keywords(name, cls, None, value)
    elif value is not None and not isinstance(value, cls):
        raise ValueError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    return (value or cls()) if rounding == name else None


def _slice_modules(gm: fx.GraphModule, s) -> List[Any]:
    """The fake-quant modules a slice runs (those nested in what it calls included), in call order."""
    out: List[Any] = []
    for n in s.nodes:
        if n.op == "call_module":
            out += [m for m in gm.get_submodule(n.target).modules() if isinstance(m, (QuantLinear, ActQuant))]
    return out


def _same(a: Any, b: Any) -> bool:
    """The same value: equal tensors (shape and content), or equal plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a is b or a == b


def _float_outputs(target: Dict, outputs) -> List[fx.Node]:
    """The outputs of a slice that are float tensors (the ones a reconstruction compares)."""
    return [o for o in outputs if isinstance(target[o], torch.Tensor) and target[o].is_floating_point()]


def _rec_loss(env: Dict, target: Dict, outputs) -> torch.Tensor:
    """BRECQ's reconstruction loss over a slice's tensor outputs: squared error summed over the last
    axis, averaged over the rest."""
    return sum(((env[o] - target[o]) ** 2).sum(-1).mean() for o in _float_outputs(target, outputs))


def _minibatches(s, mods, batches, env_f, env_q, gen):
    """A function that draws one training minibatch for slice ``s``: (step, inputs, float targets).

    Each calibration batch holds one timestep. Learning from one timestep at a time makes Adam chase
    whichever step it saw last (measured on the embedded model, W4A8, 1,000 steps a block: samples
    0.111 RMS from FP32's against 0.088 with mixed rows), so rows are drawn from every batch at once
    where the slice allows it: every input and output either the same in every batch (used as is) or
    a tensor with one row per item (rows gathered), and no op in the slice reading the step (per-step
    activation ranges). Otherwise whole batches are drawn. A minibatch has as many items as the
    largest calibration batch."""
    # items per batch: the leading size of each batch's first tensor graph input
    rows = [int(next(v for v in inputs if isinstance(v, torch.Tensor) and v.ndim > 0).shape[0]) for _, inputs in batches]
    size = max(rows)

    def pooled(envs, nodes):
        """node -> (rowwise, value): one value where every batch holds the same, else the batches' rows
        stacked; None where a value differs between batches but has no row axis (cannot be mixed)."""
        out = {}
        for n in nodes:
            vals = [env[n] for env in envs]
            if all(_same(v, vals[0]) for v in vals):
                out[n] = (False, vals[0])
            elif all(isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == r for v, r in zip(vals, rows)):
                out[n] = (True, torch.cat(vals))
            else:
                return None
        return out

    steps_read = any(getattr(m, "num_groups", 1) > 1 for m in mods)
    inputs = pooled(env_q, s.inputs) if len(batches) > 1 and not steps_read else None
    targets = pooled(env_f, s.outputs) if inputs is not None else None
    if targets is None:
        def whole():
            b = int(torch.randint(len(batches), (1,), generator=gen))
            return batches[b][0], {n: env_q[b][n] for n in s.inputs}, env_f[b]
        return whole
    total = sum(rows)

    def mixed():
        idx = torch.randperm(total, generator=gen)[:size]
        pick = lambda d: {n: v[idx] if rowwise else v for n, (rowwise, v) in d.items()}  # noqa: E731
        return batches[0][0], pick(inputs), pick(targets)
    return mixed


def _rel_error(envs: List[Dict], targets: List[Dict], outputs) -> float:
    """Relative L2 error of a slice's outputs in ``envs`` against ``targets``, over every batch."""
    err = ref = 0.0
    for env, target in zip(envs, targets):
        for o in _float_outputs(target, outputs):
            err += float(((env[o] - target[o]) ** 2).sum())
            ref += float((target[o] ** 2).sum())
    return (err / ref) ** 0.5 if ref > 0 else 0.0


def _unique(owner: fx.GraphModule, name: str) -> str:
    base = name.replace(".", "_")
    candidate, i = base, 1
    while hasattr(owner, candidate):
        candidate, i = f"{base}_{i}", i + 1
    return candidate
