"""The pass protocol, the context passes share, and the manager that checks and runs a schedule.

A pass takes a GraphModule and the :class:`PassContext` and returns a GraphModule. It declares the
artefacts it ``requires`` from the context and those it ``provides``; the :class:`PassManager`
checks the whole schedule against those declarations before running anything, lints the graph after
every pass, and records a report through instruments.

Example, a custom pass in a few lines:
    >>> from qc_compiler.graph import find_linears
    >>> @graph_pass(name="count_linears", provides={"linear_count"})
    ... def count_linears(gm, ctx):
    ...     ctx.artifacts["linear_count"] = len(find_linears(gm))
    ...     return gm
    >>> PassManager([count_linears]).check_order(available=set())   # nothing required: fine
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .diffusion.conditions import ConditionBank
from .diffusion.samplers import model_device
from .errors import PassError, PassOrderError, QCError
from .models.adapter import ModelAdapter, ModelInfo
from .runtime import CompiledModel

__all__ = [
    "Pass", "PassResult", "graph_pass", "PassContext", "PassManager", "PassRecord", "PassInstrument",
    "register_pass", "PASS_REGISTRY", "ProgressInstrument", "passes_from_specs",
]

log = logging.getLogger(__name__)

PASS_REGISTRY: Dict[str, type] = {}


def register_pass(cls: type) -> type:
    """Class decorator: make a pass constructible by name (``qc compile --pass NAME``, loading)."""
    PASS_REGISTRY[cls.name] = cls
    return cls


def passes_from_specs(specs: Sequence[Dict[str, Any]], what: str, error: type = QCError) -> List["Pass"]:
    """Rebuild passes from the ``{"name", "options"}`` specs a manifest or recipe saved. An unknown pass,
    or options its typed config refuses, raise ``error`` naming ``what`` (the file they came from)."""
    passes = []
    for p in specs:
        name = p.get("name") if isinstance(p, dict) else None
        if name not in PASS_REGISTRY:
            raise error(f"{what} uses pass {name!r}, which this installation does not know")
        try:
            passes.append(PASS_REGISTRY[name](**p.get("options", {})))
        except (TypeError, ValueError) as e:
            raise error(f"{what}: pass {name!r} refuses its saved options: {e}") from None
    return passes


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    notes: str = ""


class Pass:
    """Base class of graph passes.

    Subclasses set ``name``, ``requires`` and ``provides`` and implement ``run``. Options are plain
    constructor arguments; ``options()`` returns them as JSON so a compiled model can be rebuilt.
    A pass keeps no state between calls: whatever it fits goes into ``ctx.fitted``.
    """

    name: str = "pass"
    requires: FrozenSet[str] = frozenset()
    provides: FrozenSet[str] = frozenset()
    samples: bool = False  # runs the sampler (calibration trajectories): a text model then needs its prompts

    def run(self, gm: fx.GraphModule, ctx: "PassContext") -> PassResult:
        raise NotImplementedError

    def options(self) -> Dict[str, Any]:
        """JSON-able constructor arguments (override when they are not simple attributes)."""
        return {}

    def __call__(self, gm: fx.GraphModule, ctx: "PassContext") -> fx.GraphModule:
        missing = sorted(set(self.requires) - set(ctx.artifacts))
        if missing:
            raise PassOrderError(f"pass {self.name!r} needs {missing}, which no earlier pass provided")
        result = self.run(gm, ctx)
        if not isinstance(result, PassResult):
            raise PassError(self.name, f"run() must return a PassResult, got {type(result).__name__}")
        out = result.graph_module
        try:
            out.graph.lint()
        except Exception as e:
            raise PassError(self.name, f"left an invalid graph: {e}") from e
        if result.modified:
            out.recompile()
        not_provided = sorted(set(self.provides) - set(ctx.artifacts))
        if not_provided:
            raise PassError(self.name, f"declared it provides {not_provided} but did not set them in ctx.artifacts")
        ctx.notes[self.name] = result.notes
        return out

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class _FunctionPass(Pass):
    def __init__(self, fn: Callable, name: str, requires: Iterable[str], provides: Iterable[str]):
        self.fn, self.name = fn, name
        self.requires, self.provides = frozenset(requires), frozenset(provides)

    def run(self, gm, ctx):
        nodes_before = _node_signature(gm)
        out = self.fn(gm, ctx)
        out = gm if out is None else out
        return PassResult(out, modified=_node_signature(out) != nodes_before)


def graph_pass(name: Optional[str] = None, requires: Iterable[str] = (), provides: Iterable[str] = ()):
    """Decorator: turn ``fn(gm, ctx) -> gm | None`` into a :class:`Pass`."""

    def wrap(fn: Callable) -> Pass:
        return _FunctionPass(fn, name or fn.__name__, requires, provides)

    return wrap


def _node_signature(gm: fx.GraphModule) -> tuple:
    return tuple((n.op, str(n.target), n.name, tuple(map(str, n.args))) for n in gm.graph.nodes)


@dataclass
class PassRecord:
    """What one pass did: wall time, node counts, and its notes."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    notes: str = ""


class PassInstrument:
    """Hook into every pass without touching passes (timing, dumps, the report)."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: "PassContext") -> None:  # noqa: D401
        pass

    def after_pass(self, p: Pass, gm: fx.GraphModule, ctx: "PassContext") -> None:
        pass


class ProgressInstrument(PassInstrument):
    """Says which pass runs (``[2/4] tap_calibration ...``) and how long it took, on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self._t0 = total, 0, 0.0

    def before_pass(self, p, gm, ctx):
        self.done += 1
        self._t0 = time.perf_counter()
        print(f"[{self.done}/{self.total}] {p.name} ...", file=sys.stderr, flush=True)

    def after_pass(self, p, gm, ctx):
        note = ctx.notes.get(p.name, "")
        print(f"[{self.done}/{self.total}] {p.name} done in {time.perf_counter() - self._t0:.1f} s"
              + (f": {note}" if note else ""), file=sys.stderr, flush=True)


class ReportInstrument(PassInstrument):
    """Times each pass and counts nodes before and after; the manager always installs one."""

    def __init__(self):
        self.records: List[PassRecord] = []
        self._start: Dict[str, tuple] = {}

    def before_pass(self, p, gm, ctx):
        self._start[p.name] = (time.perf_counter(), len(gm.graph.nodes))

    def after_pass(self, p, gm, ctx):
        t0, n0 = self._start.pop(p.name)
        self.records.append(PassRecord(p.name, time.perf_counter() - t0, n0, len(gm.graph.nodes), ctx.notes.get(p.name, "")))


@dataclass
class PassContext:
    """What passes share: the model adapter and info, the sampler, the FP reference graph (read it with
    ``need("reference", ...)``: it is captured on first use), artefacts, fitted state and seeds.

    ``adapter`` is the model family's :class:`~qc_compiler.models.ModelAdapter` (where the blocks are,
    the conditioning linears, example inputs); ``info`` what samplers read off the model.
    ``artifacts`` carries values between passes (``calibration_set``, ...). ``fitted`` holds what
    passes fit offline (quantization ranges, VC tables): it is saved with a compiled model, and when
    a model is loaded it is prefilled, so passes reuse it instead of calibrating again (see
    :meth:`fit`).
    """

    adapter: Optional[ModelAdapter] = None
    info: Optional[ModelInfo] = None
    sampler: Any = None
    conditions: Optional[ConditionBank] = None  # a text-conditioned model's prompts (None: class labels)
    reference: Optional[fx.GraphModule] = None
    # builds ``reference`` on first use (a second capture of the source model costs seconds, and only
    # passes that compare against the FP model read it); passes never modify the source model
    reference_factory: Optional[Callable[[], fx.GraphModule]] = None
    seed: int = 0
    artifacts: Dict[str, Any] = field(default_factory=dict)
    fitted: Dict[str, Any] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)
    instruments: List[PassInstrument] = field(default_factory=list)
    progress: bool = False  # calibration runs draw a bar

    def need(self, what: str, by: str) -> Any:
        """``self.<what>``, or a ``QCError`` saying that pass ``by`` needs it."""
        if what == "reference" and self.reference is None and self.reference_factory is not None:
            self.reference = self.reference_factory()
        value = getattr(self, what)
        if value is None:
            raise QCError(f"pass {by!r} needs ctx.{what}; compile through qc.compile(model, ...), which sets it")
        return value

    def denoiser(self, gm: fx.GraphModule) -> CompiledModel:
        """``gm`` inside a :class:`CompiledModel` for the context's sampler: step-conditional nodes
        (cache lookups, VC rescales) behave exactly as they will after compilation."""
        return CompiledModel(gm, self.need("sampler", "collect").spec(), self.need("info", "collect"),
                             inputs=self.adapter.inputs if self.adapter is not None else None)

    def sampling_model(self, model: Any) -> Any:
        """``model`` as our samplers call it, ``model(x, t, y)``: with integer labels for a
        class-conditional model, with condition indices into :attr:`conditions` otherwise."""
        return self.conditions.bind(model) if self.conditions is not None else model

    def graph_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The graph's inputs for a pool batch ``(x, t, y)``: the labels, or the conditions they index."""
        return (x, t, *self.conditions.take(y)) if self.conditions is not None else (x, t, y)

    @property
    def num_conditions(self) -> Optional[int]:
        """How many labels (classes, or prompts in :attr:`conditions`) calibration can cycle through."""
        return self.conditions.num_conditions if self.conditions is not None else (
            self.info.num_classes if self.info is not None else None)

    @property
    def null_label(self) -> Optional[int]:
        """The label CFG's unconditional half uses (the null class, or the bank's null condition)."""
        return self.conditions.null_label if self.conditions is not None else (
            self.info.null_label if self.info is not None else None)

    def fit(self, key: str, compute: Callable[[], Any]) -> Any:
        """Return ``fitted[key]``, computing and storing it first when absent (i.e. not restored)."""
        if key not in self.fitted:
            self.fitted[key] = compute()
        return self.fitted[key]

    def collect(self, gm: fx.GraphModule, labels: Sequence[int], *, seed: Optional[int] = None,
                step_hooks: Sequence[Callable] = (), progress: Optional[bool] = None):
        """Run the context's sampler over the *current* graph (see :meth:`denoiser`) and return its
        ``Trajectory``."""
        model = self.denoiser(gm)
        model.step_hooks = list(model.step_hooks) + list(step_hooks)
        try:
            return self.sampler.sample(self.sampling_model(model), labels, seed=self.seed if seed is None else seed,
                                       record=True,
                                       progress=self.progress if progress is None else progress)
        finally:
            model.reset()  # leave no cached tensors or step index behind in the graph's modules


class PassManager:
    """Checks a pass schedule, then runs it, with instruments around every pass.

    Example:
        >>> pm = PassManager([graph_pass(requires={"calibration_set"})(lambda gm, ctx: gm)])
        >>> try:
        ...     pm.check_order(available=set())
        ... except PassOrderError as e:
        ...     print("refused")
        refused
    """

    def __init__(self, passes: Sequence[Pass]):
        for p in passes:
            if not callable(p) or not hasattr(p, "requires") or not hasattr(p, "provides"):
                raise TypeError(f"{p!r} is not a pass: it needs name, requires, provides and __call__(gm, ctx)")
        names = [p.name for p in passes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PassOrderError(f"passes {dupes} appear more than once in the schedule")
        self.passes = list(passes)

    def check_order(self, available: Iterable[str] = ()) -> None:
        """Raise ``PassOrderError`` for the first pass whose ``requires`` no earlier pass provides."""
        have = set(available)
        for i, p in enumerate(self.passes):
            missing = sorted(set(p.requires) - have)
            if missing:
                later = [q.name for q in self.passes[i + 1:] if set(q.provides) & set(missing)]
                anywhere = sorted({name for name, cls in PASS_REGISTRY.items() if set(getattr(cls, "provides", ())) & set(missing)})
                hint = (f"move {later} before it" if later else
                        f"add a pass that provides it before {p.name!r}" + (f" (e.g. {anywhere})" if anywhere else ""))
                raise PassOrderError(f"pass {p.name!r} requires {missing}, which no earlier pass provides: {hint}")
            have |= set(p.provides)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        self.check_order(ctx.artifacts)
        report = ReportInstrument()
        instruments = [report] + list(ctx.instruments)
        device = model_device(gm)
        for p in self.passes:
            for ins in instruments:
                ins.before_pass(p, gm, ctx)
            try:
                gm = p(gm, ctx)
            except QCError:
                raise
            except Exception as e:
                raise PassError(p.name, f"{type(e).__name__}: {e}") from e
            gm.to(device)  # what a pass made on the CPU (buffers, tables) joins the model's device
            for ins in instruments:
                ins.after_pass(p, gm, ctx)
            log.info("pass %s done", p.name)
        ctx.artifacts["pass_report"] = report.records
        return gm
