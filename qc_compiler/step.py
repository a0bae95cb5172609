"""The step context, on the ground floor: which call of a sampling run is running now.

Three small things every step-dependent part of the project shares:

- :class:`StepTable` maps a timestep to a **step index**. The index has one meaning everywhere: 0 is
  the first call of a sampling run (the noisiest timestep), ``len(table) - 1`` the last. A timestep
  the table does not know raises ``StepError``.
- :class:`StepState` is the one owner of per-run state: the current index and the tensors that
  stateful nodes keep between calls (cache stores). ``reset()`` starts a new run.
- :class:`StepAware` marks graph modules that read the state; :func:`bind_step_state` hands one
  state to every such module of a graph.

Calibration sets the step through the same state (:meth:`StepState.calibrating`): step-aware nodes
see the index of the batch they are fed, and nothing is carried between calls.

Example:
    >>> table = StepTable([999, 666, 333, 0])
    >>> table.index(999), table.index(0), len(table)
    (0, 3, 4)
    >>> state = StepState()
    >>> with state.calibrating(2):
    ...     state.step, state.fresh
    (2, True)
    >>> state.step
    -1
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch.nn as nn

from .errors import StepError

__all__ = ["StepTable", "StepState", "StepAware", "bind_step_state"]


class StepTable:
    """Timesteps in call order (noisiest first); ``index(t)`` is the step index of ``t``.

    Timesteps may be integers (DDPM, DDIM) or fractional (Euler and flow-matching schedulers); a call
    matches a step when its timestep equals the table's (999 and 999.0 are the same step). A table
    with fractional timesteps also matches a call that differs only by a half-precision cast (a
    bfloat16 pipeline casts its timesteps before the transformer sees them): within 2**-7 relative
    and a quarter of the gap to the neighbouring steps, so no other step can be mistaken for it.
    Integer tables match exactly."""

    def __init__(self, timesteps: Sequence[float], name: str = ""):
        ts = [_number(t) for t in timesteps]
        if not ts:
            raise ValueError("a step table needs at least one timestep")
        if len(set(ts)) != len(ts):
            raise ValueError(f"a step table's timesteps must be distinct, got {ts}")
        self.name = name
        self._timesteps = ts
        self._index = {t: i for i, t in enumerate(ts)}
        self._fractional = any(isinstance(t, float) for t in ts)

    @property
    def timesteps(self) -> List[int]:
        return list(self._timesteps)

    def __len__(self) -> int:
        return len(self._timesteps)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepTable) and other._timesteps == self._timesteps

    def __repr__(self) -> str:
        return f"StepTable({len(self)} steps: {self._summary()})"

    def _summary(self) -> str:
        ts = self._timesteps
        return ", ".join(map(str, ts)) if len(ts) <= 3 else f"{ts[0]}, {ts[1]}, ..., {ts[-1]}"

    def index(self, t: float) -> int:
        """Step index of timestep ``t``; ``StepError`` when the table has no such timestep."""
        key = _number(t)
        if key not in self._index and self._fractional:
            near = self._near(float(key))
            if near is not None:
                return near
        if key not in self._index:
            where = f" ({self.name})" if self.name else ""
            raise StepError(
                f"timestep {t} is not in the compiled schedule{where}, {len(self)} steps: {self._summary()}; "
                "sample with the sampler the model was compiled for, or compile again for yours"
            )
        return self._index[key]


    def _near(self, t: float) -> Optional[int]:
        ts = self._timesteps
        i = min(range(len(ts)), key=lambda k: abs(ts[k] - t))
        gaps = [abs(ts[i] - ts[k]) for k in (i - 1, i + 1) if 0 <= k < len(ts)]
        off = abs(ts[i] - t)
        if off <= 2 ** -7 * abs(ts[i]) and (not gaps or off < 0.25 * min(gaps)):
            return i
        return None


def _number(t) -> float:
    """A timestep as a plain Python number: an int stays an int, a float32 tensor element its exact value."""
    if hasattr(t, "item"):
        t = t.item()
    return int(t) if isinstance(t, int) or (isinstance(t, float) and t.is_integer()) else float(t)


class StepState:
    """The one owner of per-run state: the current step index, a run counter, and per-run stores.

    Stateful graph modules keep their tensors in ``store(owner)`` (keyed by their own name), which
    ``reset()`` clears at the start of every sampling run. ``fresh`` is True while calibrating:
    the step is set, but no tensor may be reused from an earlier call.

    ``stream`` names the call within a step when a loop makes several (diffusers pipelines that run
    the prompt and the negative prompt as separate calls say ``cache_context("cond")`` and
    ``("uncond")``): each stream has its own stores, and a run starts when a stream comes back to step 0.
    """

    def __init__(self, num_steps: int = 0):
        self.step: int = -1
        self.timestep: int = -1
        self.run: int = 0
        self.num_steps: int = int(num_steps)
        self.fresh: bool = False
        self.stream: str = ""
        self._stores: Dict[Any, Dict[str, Any]] = {}
        self._started: set = set()  # streams that have made their step-0 call in this run

    def reset(self) -> None:
        """Start over: no current step (step-aware modules then act like the plain graph), empty stores."""
        self.step, self.timestep = -1, -1
        self.run += 1
        self._stores.clear()
        self._started = set()

    def enter(self, step: int, timestep: float = -1) -> None:
        """Make ``step`` the current one; step 0 starts a new run (unless another stream of this step
        already started it)."""
        if step == 0:
            if self.step != 0 or self.stream in self._started:
                self.reset()
            self._started.add(self.stream)
        self.step, self.timestep = int(step), timestep

    def store(self, owner: str) -> Dict[str, Any]:
        return self._stores.setdefault((self.stream, owner), {})

    @contextlib.contextmanager
    def calibrating(self, step: int) -> Iterator["StepState"]:
        """Set ``step`` for one calibration call: step-aware nodes use its ranges and tables, caches
        compute (``fresh``). The previous step is restored afterwards, even on error."""
        saved = (self.step, self.fresh)
        self.step, self.fresh = int(step), True
        try:
            yield self
        finally:
            self.step, self.fresh = saved


class StepAware:
    """Mixin for graph modules that read the step context: the compiled model binds its state.

    ``uses_step`` is True when the module's output depends on the step index (a cache, a VC table,
    per-step-group ranges); a compiled model none of whose modules uses the step serves any timestep."""

    step_state: Optional[StepState] = None
    uses_step: bool = True

    def bind_step_state(self, state: StepState) -> None:
        self.step_state = state

    def report_section(self) -> str:
        """Lines this module adds to ``CompiledModel.report()`` (override)."""
        return ""


def bind_step_state(module: nn.Module, state: StepState, extra: Sequence[Any] = ()) -> List[StepAware]:
    """Bind ``state`` to every StepAware module inside ``module`` (and in ``extra``); returns them."""
    bound = []
    for m in list(module.modules()) + list(extra):
        if isinstance(m, StepAware):
            m.bind_step_state(state)
            bound.append(m)
    return bound
