"""The step context and the compiled model: a drop-in denoiser that knows its sampler's timesteps.

A compiled model maps each call's timestep to a step index of the schedule it was compiled for. The
first step of the schedule starts a new sampling run and resets every stateful part of the graph
(cache lookups, ...). Step-aware modules in the graph read the current index from one
:class:`StepState`, owned here, never from call counts.

Example:
    >>> from qc_compiler.models.dit import DiT_models
    >>> from qc_compiler.capture import capture
    >>> from qc_compiler.diffusion import DDPM
    >>> model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10).eval()
    >>> cm = CompiledModel(capture(model), DDPM(steps=10).spec(), {"input_size": 16, "in_channels": 1, "num_classes": 10})
    >>> cm.step_of(999), cm.step_of(0)
    (0, 9)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .errors import StepError

__all__ = ["StepState", "StepAware", "CompiledModel"]

log = logging.getLogger(__name__)


class StepState:
    """The one owner of per-run state: the current step index, a run counter, and per-run stores.

    Stateful graph modules keep their tensors in ``store(owner)`` (keyed by their own name), which
    ``reset()`` clears at the start of every sampling run.
    """

    def __init__(self):
        self.step: int = -1
        self.timestep: int = -1
        self.run: int = 0
        self.num_steps: int = 0
        self._stores: Dict[str, Dict[str, Any]] = {}

    def reset(self) -> None:
        """Start over: no current step (step-aware modules then act like the plain graph), empty stores."""
        self.step, self.timestep = -1, -1
        self.run += 1
        self._stores.clear()

    def store(self, owner: str) -> Dict[str, Any]:
        return self._stores.setdefault(owner, {})


class StepAware:
    """Mixin for graph modules that read the step context: the compiled model binds its state."""

    step_state: Optional[StepState] = None

    def bind_step_state(self, state: StepState) -> None:
        self.step_state = state

    def report_section(self) -> str:
        """Lines this module adds to ``CompiledModel.report()`` (override)."""
        return ""


class CompiledModel(nn.Module):
    """A compiled DiT: ``forward(x, t, y)`` like the original, plus the step context and a report.

    ``step_hooks`` (callables ``(step, t, x) -> x | None``) are run by our samplers after each update,
    which is how sample-space corrections travel with the model.
    """

    def __init__(self, graph_module: nn.Module, sampler_spec: Dict[str, Any], model_info: Dict[str, Any],
                 records: Sequence[Any] = (), build: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.graph_module = graph_module
        self.sampler_spec = dict(sampler_spec)
        self.model_info = dict(model_info)
        self.records = list(records)
        self.build = build or {}  # what save() needs to rebuild: config, passes, fitted, backend, weights
        # Sample-space corrections (e.g. VC's "sample" placement) that passes attached to the graph.
        self.step_hooks: List[Callable] = list(getattr(graph_module, "meta", {}).get("qc.sample_hooks", []))
        self.step_state = StepState()
        timesteps = [int(t) for t in self.sampler_spec.get("timesteps", [])]
        if not timesteps:
            raise ValueError("sampler_spec has no timesteps")
        self._index = {t: i for i, t in enumerate(timesteps)}
        self.step_state.num_steps = len(timesteps)
        self._stable_batch = False  # set when a module reuses tensors across steps (a cache)
        for module in self.graph_module.modules():
            if isinstance(module, StepAware):
                module.bind_step_state(self.step_state)
                self._stable_batch |= bool(getattr(module, "needs_stable_batch", False))

    # Samplers read these off a denoiser.
    @property
    def num_classes(self) -> int:
        return self.model_info["num_classes"]

    @property
    def input_size(self) -> int:
        return self.model_info["input_size"]

    @property
    def in_channels(self) -> int:
        return self.model_info["in_channels"]

    @property
    def timesteps(self) -> List[int]:
        return list(self._index)

    def step_of(self, t: int) -> int:
        """Step index of original timestep ``t``; ``StepError`` when the schedule has no such step."""
        if t not in self._index:
            ts = self.timesteps
            raise StepError(
                f"timestep {t} is not in the compiled schedule ({self.sampler_spec.get('name')}, "
                f"{len(ts)} steps: {ts[0]}, {ts[1] if len(ts) > 1 else ''}, ..., {ts[-1]}); "
                "sample with the sampler the model was compiled for, or compile again for yours"
            )
        return self._index[t]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        flat = t.reshape(-1)
        t0 = int(flat[0])
        if flat.numel() > 1 and not bool((flat == t0).all()):
            raise StepError(f"a batch must carry one timestep, got {sorted(set(flat.tolist()))}")
        step = self.step_of(t0)
        if step == 0:
            self.step_state.reset()  # the first step begins a new sampling run
            if self._stable_batch:
                self.step_state.store("run")["labels"] = y.detach().clone()
        elif self._stable_batch:
            self._check_same_batch(y, step)
        self.step_state.step, self.step_state.timestep = step, t0
        if flat.numel() == 1 and x.shape[0] > 1:
            t = flat.expand(x.shape[0])
        return self.graph_module(x, t, y)

    def _check_same_batch(self, y: torch.Tensor, step: int) -> None:
        # Reused tensors belong to the run's batch: new labels mid-run would silently mix samples.
        labels = self.step_state.store("run").get("labels")
        if labels is not None and (labels.shape != y.shape or not torch.equal(labels, y)):
            raise StepError(f"the batch (size or labels) changed inside a sampling run at step {step}; "
                            "cached tensors belong to the first batch: start a new run at the first step")

    def reset(self) -> None:
        """Forget the current run (its cached tensors); the next call must be the first step."""
        self.step_state.reset()

    def report(self) -> str:
        """A printable report: the passes (time, nodes before/after, notes) and module sections."""
        lines = [f"CompiledModel: {self.sampler_spec.get('name')} {len(self._index)} steps, "
                 f"backend {self.build.get('backend', 'torch')}"]
        if self.records:
            lines.append(f"{'pass':<24}{'seconds':>9}{'nodes':>14}  notes")
            for r in self.records:
                lines.append(f"{r.name:<24}{r.seconds:>9.2f}{f'{r.nodes_before}->{r.nodes_after}':>14}  {r.notes}")
        else:
            lines.append("no passes")
        for name, module in self.graph_module.named_modules():
            section = module.report_section() if hasattr(module, "report_section") else ""
            if section:  # step-aware nodes, and lowered layers that describe themselves
                lines.append(section)
        return "\n".join(lines)

    def export_onnx(self, path, opset: int = 17):
        """Write an INT8 QDQ ONNX graph that onnxruntime runs (see ``qc_compiler.backends.onnx``)."""
        from .backends.onnx import export_onnx

        return export_onnx(self, path, opset)

    # --- persistence --------------------------------------------------------------------------
    def save(self, folder) -> None:
        """Write a folder of safetensors + JSON (no pickles) from which ``load_compiled`` rebuilds it."""
        from .persist import save_compiled

        save_compiled(self, Path(folder))
