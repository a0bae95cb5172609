"""One compiled model for several sampling schedules: a compiled model per step table, one run each.

Calibration ranges per step group, VC's per-step tables and a static cache schedule all belong to
one step table (20 DDIM steps, 28 flow-matching steps, ...). A user who samples at 20 *and* 50
steps therefore needs each fitted for its table. :class:`CompiledSchedules` holds one
:class:`~qc_compiler.runtime.CompiledModel` per table and routes each sampling run to its own:

- a call at a timestep that only one table starts with starts a run on that table; the calls after
  it stay on that table until a run starts again;
- a first timestep that several tables share (flow-matching schedules all start at t = 1000) is
  resolved by what the caller said: our samplers announce their timesteps (:meth:`expect`), a
  diffusers pipeline bound with ``qc.bind_pipeline`` is asked for its scheduler's, and
  :meth:`select` pins one table; otherwise it is a ``StepError`` that says how to choose;
- a timestep in no table is a ``StepError`` that names the tables and how to add one.

Tensors of equal content (the int8 weight codes and scales, which do not depend on the table) are
shared between the tables' models, so a second table costs its fitted state, not a second copy of
the weights. ``qc.compile(model, passes, sampler=[s1, s2])`` builds one; ``save`` writes one
artefact (the weights once) that ``qc.load_compiled`` reads back.

Example:
    >>> import qc_compiler as qc
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> fast = qc.compile(model, [qc.passes.StepCache(interval=2)], sampler=[qc.DDIM(steps=5), qc.DDIM(steps=8)])
    >>> [len(t) for t in fast.tables], fast.select(8).sampler_spec["steps"]
    ([5, 8], 8)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .diffusion.samplers import run_hooks
from .errors import ExportError, QCError, StepError
from .persist import save_schedules
from .runtime import CompiledModel
from .step import StepTable

__all__ = ["CompiledSchedules", "share_equal_tensors"]

_HOW = ("qc.compile(model, passes, sampler=[...]), compile_pipeline(num_inference_steps=[...]) or "
        "qc compile --steps 20,50")
ScheduleKey = Union[int, Sequence[float], Any]  # a step count, the timesteps, or a sampler


class CompiledSchedules(nn.Module):
    """Compiled models of one source model, one per step table, called as one denoiser."""

    def __init__(self, variants: Sequence[CompiledModel]):
        super().__init__()
        variants = list(variants)
        if len(variants) < 2:
            raise ValueError("CompiledSchedules needs two or more compiled models; use the one CompiledModel")
        first = variants[0]
        for v in variants[1:]:
            if v.build.get("passes") != first.build.get("passes") or v.build.get("backend") != first.build.get("backend") \
                    or v.info != first.info:
                raise ValueError("the compiled models of a CompiledSchedules must come from one model, passes and backend")
        for i, v in enumerate(variants):
            for w in variants[:i]:
                if v.table == w.table:
                    raise ValueError(f"two schedules have the same step table ({_describe(v)}); give each table once")
        self.variants = nn.ModuleList(variants)
        share_equal_tensors(variants)
        self._active: Optional[int] = None  # the table of the current run
        self._pinned: Optional[int] = None  # select(): every run, until select(None)
        self._expected: Optional[int] = None  # expect(): the next run that starts
        # a callable giving the caller's timesteps (a pipeline's scheduler; qc.bind_pipeline sets it)
        self.__dict__["schedule_source"] = None

    # --- which table ------------------------------------------------------------------------------
    @property
    def tables(self) -> List[StepTable]:
        return [v.table for v in self.variants]

    def index_of(self, key: ScheduleKey) -> int:
        """The position of the table ``key`` names: a step count (when one table has it), the
        timesteps a sampler calls, or a sampler. ``StepError`` names the tables when none matches."""
        if isinstance(key, bool):
            raise TypeError("a schedule is a step count, a list of timesteps or a sampler, not a bool")
        if isinstance(key, int):
            hits = [i for i, v in enumerate(self.variants) if len(v.table) == key]
            if len(hits) > 1:
                raise StepError(f"{len(hits)} compiled schedules have {key} steps: name one by its sampler or timesteps")
        else:
            timesteps = list(getattr(key, "timesteps", key))
            want = StepTable(timesteps)
            hits = [i for i, v in enumerate(self.variants) if StepTable(v.sampler_spec.get("timesteps", [])) == want]
        if not hits:
            what = f"{key} steps" if isinstance(key, int) else f"the schedule {StepTable(list(getattr(key, 'timesteps', key)))}"
            raise StepError(f"{what} is not one this model was compiled for ({self._names()}); compile with that sampler "
                            f"too: {_HOW}")
        return hits[0]

    def select(self, key: Optional[ScheduleKey]) -> CompiledModel:
        """Serve every run from the table ``key`` names (``None``: choose by timestep again). Returns
        that table's compiled model (``fast.select(50).export_onnx(...)`` exports one table)."""
        if key is None:
            self._pinned = None
            return self.variants[self._active or 0]
        self._pinned = self.index_of(key)
        return self.variants[self._pinned]

    def expect(self, timesteps: Sequence[float]) -> None:
        """The next run calls these timesteps (our samplers say so when they start): check that a table
        has them, and start that run on it."""
        self._expected = self.index_of(list(timesteps))

    @contextlib.contextmanager
    def stream(self, name: str) -> Iterator[None]:
        """Calls inside are the stream ``name`` (a pipeline's "cond"/"uncond" calls): each table's state."""
        with contextlib.ExitStack() as stack:
            for v in self.variants:
                stack.enter_context(v.stream(name))
            yield

    def _route(self, t: float) -> int:
        tables = self.tables
        if self._pinned is not None:
            self._expected = None  # a pinned table serves every run; a sampler's announcement is not kept
            return self._pinned  # its table refuses a timestep it does not have
        if self._expected is not None:  # a sampler said which table this run is on
            said, self._expected = self._expected, None
            if _find(tables[said], t, -1) != 0:
                raise StepError(f"timestep {t} is not the first step of the schedule this run announced "
                                f"({_describe(self.variants[said])}); start the run at its first step")
            return said
        active = self._active
        if active is not None:
            index, now = _find(tables[active], t, -1), self.variants[active].step_state.step
            if index > 0 and index >= now >= 0:
                return active  # the current run's next step (or another stream's call at this step)
        starts = [i for i, table in enumerate(tables) if _find(table, t, -1) == 0]
        if active in starts and self.variants[active].step_state.step == 0:
            return active  # another stream's call at this run's first step
        if len(starts) == 1:
            return starts[0]
        if len(starts) > 1 and self.schedule_source is not None:
            said = self.index_of(list(self.schedule_source()))
            if said in starts:
                return said
        if starts:
            names = ", ".join(_describe(self.variants[i]) for i in starts)
            raise StepError(f"timestep {t} starts {len(starts)} compiled schedules ({names}): say which; in a diffusers "
                            "pipeline call qc.bind_pipeline(pipe) once (compile_pipeline does), or call "
                            "model.select(num_steps)")
        raise StepError(f"timestep {t} does not start a run of any compiled schedule ({self._names()}); start at a "
                        f"table's first step, or compile for your sampler too: {_HOW}")

    def _names(self) -> str:
        return "; ".join(_describe(v) for v in self.variants)

    # --- a denoiser -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        first = torch.as_tensor(t).reshape(-1)[0].item()
        self._active = self._route(first)
        return self.variants[self._active](x, t, y, *extra)

    @property
    def current(self) -> CompiledModel:
        """The table's model of the current (or last) run; the first table's before any run."""
        return self.variants[self._active if self._active is not None else (self._pinned or 0)]

    @property
    def step_hooks(self) -> List[Callable]:
        """One hook that runs the current run's table's hooks (VC's sample placement is per table)."""
        if not any(v.step_hooks for v in self.variants):
            return []
        return [lambda step, t, x: run_hooks(self.current.step_hooks, step, t, x)]

    # what samplers, pipelines and tools read off a compiled model: the same for every table
    info = property(lambda self: self.variants[0].info)
    inputs = property(lambda self: self.variants[0].inputs)
    build = property(lambda self: self.variants[0].build)
    num_classes = property(lambda self: self.variants[0].num_classes)
    input_size = property(lambda self: self.variants[0].input_size)
    in_channels = property(lambda self: self.variants[0].in_channels)
    sample_shape = property(lambda self: self.variants[0].sample_shape)
    timestep_divisor = property(lambda self: self.variants[0].timestep_divisor)
    dtype = property(lambda self: self.variants[0].dtype)
    device = property(lambda self: self.variants[0].device)
    # ... and the current table's
    sampler_spec = property(lambda self: self.current.sampler_spec)
    timesteps = property(lambda self: self.current.timesteps)
    step_state = property(lambda self: self.current.step_state)
    records = property(lambda self: self.current.records)
    uses_steps = True

    @property
    def sampler_specs(self) -> List[Dict[str, Any]]:
        return [v.sampler_spec for v in self.variants]

    def train(self, mode: bool = True) -> "CompiledSchedules":
        for v in self.variants:
            v.train(mode)  # refuses train(True)
        self.training = False
        return self

    def to(self, *args: Any, **kwargs: Any) -> "CompiledSchedules":
        """Each table's model compiled again for the device/dtype (see ``CompiledModel.to``)."""
        moved = [v.to(*args, **kwargs) for v in self.variants]
        if all(m is v for m, v in zip(moved, self.variants)):
            return self
        out = CompiledSchedules(moved)
        out.__dict__["schedule_source"] = self.schedule_source
        return out

    def reset(self) -> None:
        for v in self.variants:
            v.reset()
        self._active = None

    def report(self) -> str:
        return "\n".join([f"CompiledSchedules: {len(self.variants)} step tables"] + [v.report() for v in self.variants])

    def content_digest(self) -> str:
        return hashlib.sha256("".join(v.content_digest() for v in self.variants).encode()).hexdigest()

    def export_onnx(self, path, opset: int = 17, external_data: Optional[bool] = None) -> Path:
        raise ExportError(f"an ONNX file holds one step table, and this model has {len(self.variants)} "
                          f"({self._names()}): export one, e.g. model.select({len(self.variants[0].table)}).export_onnx(path)")

    def save(self, folder) -> None:
        """One artefact folder: the weights once, each table's sampler and fitted state."""
        save_schedules(self.variants, Path(folder))


def _find(table: StepTable, t: float, default: int) -> int:
    try:
        return table.index(t)
    except StepError:
        return default


def _describe(model: CompiledModel) -> str:
    spec = model.sampler_spec
    return f"{spec.get('name', '?')} {len(model.table)} steps from t={model.table.timesteps[0]}"


def share_equal_tensors(models: Sequence[nn.Module]) -> int:
    """Make tensors of equal content (dtype, shape, bytes, device) one tensor across ``models``: their
    parameters, buffers and the tensors of dataclass specs that modules hold (lowered layers keep the
    spec they were built from). Returns the bytes freed. Only read-only inference models may share."""
    seen: Dict[Any, torch.Tensor] = {}
    freed = 0

    def canonical(t: torch.Tensor) -> torch.Tensor:
        nonlocal freed
        if t.is_meta or t.numel() == 0:
            return t
        raw = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()
        key = (t.dtype, tuple(t.shape), t.stride(), str(t.device), hashlib.sha256(raw).hexdigest())
        kept = seen.setdefault(key, t)
        if kept is not t and kept.data_ptr() != t.data_ptr():
            freed += t.numel() * t.element_size()
        return kept

    for model in models:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    kept = canonical(p)
                    if kept is not p:
                        module._parameters[name] = kept if isinstance(kept, nn.Parameter) else \
                            nn.Parameter(kept, requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = canonical(b)
            for name, value in list(vars(module).items()):
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
                    tied = {k: canonical(v) for k, v in fields.items() if torch.is_tensor(v)}
                    if any(tied[k] is not fields[k] for k in tied):
                        object.__setattr__(module, name, dataclasses.replace(value, **tied))
    return freed
