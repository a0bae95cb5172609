"""The compiled model: a drop-in denoiser that knows its sampler's timesteps.

A compiled model maps each call's timestep to a step index through its :class:`~qc_compiler.step.StepTable`
(0 is the first call of a sampling run). Step 0 starts a new run and resets the one
:class:`~qc_compiler.step.StepState` that every step-aware module of the graph reads (cache lookups,
VC tables, per-step quantization ranges).

Saving and exporting are formats other layers provide: ``save`` writes the artefact folder
(``qc_compiler.persist``), and ``export_onnx`` calls the exporter that a backend registered with
:func:`register_exporter`, so this module imports no backend.

Example:
    >>> from qc_compiler.models.dit import DiT_models
    >>> from qc_compiler.models import adapter_for
    >>> from qc_compiler.capture import capture
    >>> from qc_compiler.diffusion import DDPM
    >>> model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10).eval()
    >>> cm = CompiledModel(capture(model), DDPM(steps=10).spec(), adapter_for(model).info(model))
    >>> cm.step_of(999), cm.step_of(0)
    (0, 9)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from .errors import ExportError, QCError, StepError
from .io import tensor_digest
from .diffusion.samplers import model_timestep
from .models.adapter import ForwardInputs, ModelInfo
from .persist import save_compiled
from .step import StepState, StepTable, bind_step_state

__all__ = ["CompiledModel", "EXPORTERS", "register_exporter"]

log = logging.getLogger(__name__)

# format name -> export(compiled_model, path, **options) -> Path; backends register theirs
EXPORTERS: Dict[str, Callable[..., Path]] = {}


def register_exporter(fmt: str):
    """Decorator: make ``export(compiled, path, **options)`` the writer of format ``fmt``."""

    def wrap(fn: Callable[..., Path]) -> Callable[..., Path]:
        EXPORTERS[fmt] = fn
        return fn

    return wrap


class CompiledModel(nn.Module):
    """A compiled denoiser: ``forward(x, t, y)`` like the original, plus the step context and a report.

    ``step_hooks`` (callables ``(step, t, x) -> x | None``) are run by our samplers after each update,
    which is how sample-space corrections (VC's ``sample`` placement) travel with the model.
    """

    def __init__(self, graph_module: nn.Module, sampler_spec: Dict[str, Any], info: ModelInfo,
                 *, records: Sequence[Any] = (), build: Optional[Dict[str, Any]] = None,
                 inputs: Optional[ForwardInputs] = None, recompile: Optional[Callable[..., "CompiledModel"]] = None):
        super().__init__()
        if not isinstance(info, ModelInfo):
            raise TypeError(f"info must be a ModelInfo, got {type(info).__name__}")
        self.graph_module = graph_module
        self.inputs = inputs or ForwardInputs()
        # compile(...) again for another dtype or device (given by qc.compile; None: cannot move)
        self.__dict__["_recompile"] = recompile
        self.sampler_spec = dict(sampler_spec)
        self.info = info
        self.records = list(records)
        self.build = build or {}  # what save() needs to rebuild: adapter, config, passes, fitted, backend, weights
        # the timesteps the model sees: the sampler's, divided as its pipeline divides them (Flux: / 1000)
        divisor = self.inputs.timestep_divisor
        self.table = StepTable([model_timestep(t, 1, divisor=divisor)[0] for t in self.sampler_spec.get("timesteps", [])],
                               name=self.sampler_spec.get("name", ""))
        # Sample-space corrections (e.g. VC's "sample" placement) that passes attached to the graph.
        self.step_hooks: List[Callable] = list(getattr(graph_module, "meta", {}).get("qc.sample_hooks", []))
        self.step_state = StepState(num_steps=len(self.table))
        bound = bind_step_state(self.graph_module, self.step_state, extra=self.step_hooks)
        # a module that reuses tensors across steps (a cache) needs the same batch all run long
        self._stable_batch = any(getattr(m, "needs_stable_batch", False) for m in bound)
        # nothing reads the step (no cache, no VC, no per-step ranges): any timestep will do
        self.uses_steps = bool(self.step_hooks) or any(getattr(m, "uses_step", True) for m in bound)

    # Samplers read these off a denoiser.
    @property
    def num_classes(self) -> Optional[int]:
        return self.info.num_classes

    @property
    def input_size(self) -> int:
        return self.info.input_size

    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def sample_shape(self):
        return self.info.sample_shape

    @property
    def timestep_divisor(self) -> int:
        return self.inputs.timestep_divisor

    @property
    def timesteps(self) -> List[float]:
        return self.table.timesteps

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs are cast to and outputs come in: the source model's weights'."""
        return self.info.torch_dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters()), next(iter(self.buffers()), torch.empty(0))).device

    # --- an inference module ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "CompiledModel":
        """``eval()`` / ``train(False)`` are no-ops (a compiled model is in inference mode already);
        ``train(True)`` is refused: train the source model and compile again."""
        if mode:
            raise QCError("a compiled model is for inference and cannot be trained; train the source model, "
                          "then compile it again")
        self.training = False  # the captured graphs are eval-mode already (torch.export's refuse train())
        return self

    def to(self, *args: Any, **kwargs: Any) -> "CompiledModel":
        """Move or cast by compiling again: INT8 kernels, prepacked weights and calibrated scales belong
        to one device and dtype, so another one gets its own compiled model (same passes and options,
        calibrated again; the original is unchanged). The same device and dtype return ``self``."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        want_device = torch.device(device) if device is not None else self.device
        want_dtype = dtype if dtype is not None else self.dtype
        if want_device.type == self.device.type and want_dtype == self.dtype:
            return self
        if self.__dict__.get("_recompile") is None:
            raise QCError(f"this compiled model cannot move to {want_device}/{want_dtype} (it was not made by "
                          "qc.compile); compile the source model there")
        return self.__dict__["_recompile"](device=want_device, dtype=want_dtype)

    def expect(self, timesteps: Sequence[float]) -> None:
        """A sampler is about to call these timesteps (our samplers say so when they start): refuse,
        before any step runs, a schedule this model was not compiled for."""
        if self.uses_steps and StepTable(list(timesteps)) != StepTable(self.sampler_spec.get("timesteps", [])):
            raise StepError(f"this model was compiled for {self.sampler_spec.get('name')} with {len(self.table)} steps "
                            f"({self.table}), and the sampler calls {StepTable(list(timesteps))}: sample with the "
                            "sampler it was compiled for, or compile for several (qc.compile(..., sampler=[...]))")

    @contextlib.contextmanager
    def stream(self, name: str) -> Iterator[None]:
        """Calls inside are the stream ``name`` (a pipeline's "cond"/"uncond" calls keep their own cache)."""
        saved, self.step_state.stream = self.step_state.stream, str(name)
        try:
            yield
        finally:
            self.step_state.stream = saved

    def step_of(self, t: int) -> int:
        """Step index of timestep ``t``; ``StepError`` when the schedule has no such step."""
        return self.table.index(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """``x`` the latent, ``t`` the timestep, then the conditions in the adapter's ``inputs`` order:
        class labels ``y`` for a DiT; ``encoder_hidden_states`` and the family's extra inputs
        (pooled projections, guidance, ...) for a text-conditioned transformer."""
        if not bool(torch.isfinite(x).all()):
            # An FP32 model would return NaN; INT8 kernels would clamp NaN to a finite code and hide it.
            raise QCError("the input x holds NaN or inf; a compiled model refuses it rather than return finite garbage")
        t = torch.as_tensor(t, device=x.device)
        flat = t.reshape(-1)
        t0 = flat[0].item()
        if self.uses_steps and flat.numel() > 1 and not bool((flat == flat[0]).all()):
            # a step-dependent model (cache, VC, per-step ranges) runs one step of one run per call
            raise StepError(f"a batch must carry one timestep, got {sorted(set(flat.tolist()))}")
        if self.uses_steps:
            step = self.table.index(t0)
            self.step_state.enter(step, t0)
        else:  # a step-independent model serves every schedule; its modules see no step
            step = -1
            self.step_state.step, self.step_state.timestep = -1, t0
        # the graph was captured with a latent in the weights' dtype and timesteps of the adapter's
        # dtype: casting here lets integer and fractional schedules, and float32 noise, all in
        if self._stable_batch:
            self._check_same_batch(y, step)
        if flat.numel() == 1 and x.shape[0] > 1:
            t = flat.expand(x.shape[0])
        return self.graph_module(x.to(self.dtype), t.to(self.inputs.torch_timestep_dtype), y, *extra)

    def _check_same_batch(self, y: torch.Tensor, step: int) -> None:
        # Reused tensors belong to the run's batch: new labels (or prompts) mid-run would silently mix samples.
        run = self.step_state.store("run")
        if step == 0:
            run["labels"] = y.detach().clone()
            return
        labels = run.get("labels")
        if labels is not None and (labels.shape != y.shape or labels.device != y.device or not torch.equal(labels, y)):
            raise StepError(f"the batch (size or labels) changed inside a sampling run at step {step}; "
                            "cached tensors belong to the first batch: start a new run at the first step")

    def reset(self) -> None:
        """Forget the current run (its cached tensors); the next call must be the first step."""
        self.step_state.reset()

    def report(self) -> str:
        """A printable report: the passes (time, nodes before/after, notes) and module sections."""
        lines = [f"CompiledModel: {self.sampler_spec.get('name')} {len(self.table)} steps, "
                 f"backend {self.build.get('backend', 'torch')}"]
        if self.records:
            lines.append(f"{'pass':<24}{'seconds':>9}{'nodes':>14}  notes")
            for r in self.records:
                lines.append(f"{r.name:<24}{r.seconds:>9.2f}{f'{r.nodes_before}->{r.nodes_after}':>14}  {r.notes}")
        else:
            lines.append("no passes")
        modules = list(self.graph_module.modules()) + [h for h in self.step_hooks if isinstance(h, nn.Module)]
        seen = set()
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            section = module.report_section() if hasattr(module, "report_section") else ""
            if section:  # step-aware nodes, and lowered layers that describe themselves
                lines.append(section)
        return "\n".join(lines)

    def content_digest(self) -> str:
        """SHA-256 of what decides this model's outputs: every tensor it holds (weights, int8 codes,
        scales, VC tables), its graph's code, its schedule and sampler, and a runtime's own bytes (an
        ONNX session's model). Keys distributed sample shards."""
        h = hashlib.sha256(tensor_digest(self.state_dict()).encode())
        for _, sub in self.named_modules():
            code = getattr(sub, "code", None)
            if isinstance(code, str):  # fx GraphModules, nested ones included
                h.update(code.encode())
        h.update(json.dumps({"sampler": self.sampler_spec, "passes": self.build.get("passes"),
                             "backend": self.build.get("backend")}, sort_keys=True, default=str).encode())
        h.update(getattr(self.graph_module, "model_bytes", b""))
        return h.hexdigest()

    # --- formats --------------------------------------------------------------------------------
    def export_onnx(self, path, opset: int = 17, external_data: Optional[bool] = None) -> Path:
        """Write an INT8 QDQ ONNX graph that onnxruntime runs (see ``qc_compiler.backends.onnx``);
        ``external_data`` puts the tensors in ``<path>.data`` (default: past 1 GB of weights)."""
        if "onnx" not in EXPORTERS:
            raise ExportError("no ONNX exporter is registered: import qc_compiler (it loads qc_compiler.backends)")
        return EXPORTERS["onnx"](self, path, opset=opset, external_data=external_data)

    def save(self, folder) -> None:
        """Write a folder of safetensors + JSON (no pickles) from which ``qc.load_compiled`` rebuilds it."""
        save_compiled(self, Path(folder))

