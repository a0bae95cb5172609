"""The public entry points: ``compile``, ``compile_pipeline``, ``load_model`` and ``load_compiled``.

``compile`` does everything in one direction: validate (passes, order, backend limits), pick the
model adapter from the model's class, capture, run the passes, lower. Nothing expensive starts until
every option has been checked.

Example:
    >>> import qc_compiler as qc
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> fast = qc.compile(model, passes=[], sampler=qc.DDPM(steps=10))
    >>> fast.sampler_spec["steps"], fast.build["adapter"]
    (10, 'dit')
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import weakref
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .backends import get_backend
from .capture import CAPTURE_MODES, capture
from .diffusion.conditions import ConditionBank
from .diffusion.samplers import DDPM, Sampler, sampler_from_spec
from .errors import ArtifactError, QCError
from .io import check_finite, tensor_digest
from .models import Geometry, ModelAdapter, adapter_for, get_adapter
from .models.diffusers_model import set_loader
from .models.zoo import load_model, load_state_strict
from .options import check_int
from .persist import load_artifact, split_schedules
from .pipeline import PASS_REGISTRY, Pass, PassContext, PassManager, ProgressInstrument, passes_from_specs
from .runtime import CompiledModel
from .schedules import CompiledSchedules
from .step import StepTable

__all__ = ["compile", "compile_pipeline", "bind_pipeline", "load_model", "load_compiled"]

log = logging.getLogger(__name__)


def compile(  # noqa: A001 - the verb users expect
    model: nn.Module,
    passes: Sequence[Pass] = (),
    sampler: Union[None, Sampler, Sequence[Sampler]] = None,
    *,
    backend: str = "torch",
    seed: int = 0,
    example_inputs: Optional[Tuple[torch.Tensor, ...]] = None,
    fitted: Union[None, Dict[str, Any], Sequence[Dict[str, Any]]] = None,
    capture_mode: Optional[str] = None,
    adapter: Optional[ModelAdapter] = None,
    conditions: Optional[ConditionBank] = None,
    geometry: Optional[Geometry] = None,
    progress: bool = False,
) -> Union[CompiledModel, CompiledSchedules]:
    """Capture ``model``, run ``passes`` over its graph, and lower it with ``backend``.

    The model's family is recognised from its class (``qc_compiler.models``; pass ``adapter`` to
    choose one). Before anything runs, the pass order is checked (``PassOrderError``) and the backend
    refuses what it cannot lower. ``sampler`` fixes the timesteps the compiled model serves (default:
    50-step DDPM). ``fitted`` restores what passes fitted earlier (``load_compiled`` uses it), so
    calibration is not repeated; it must come from the same schedule, sampler, seed and weights (its
    ``schedule.digest`` says which), or it is refused. ``capture_mode`` overrides the adapter's
    (``"fx"`` tries symbolic tracing and falls back to ``torch.export``; ``"export"`` goes straight to
    it). ``progress`` reports each pass and draws a bar for calibration runs (on stderr). The user's
    model is never modified; non-finite weights are refused.

    ``conditions``: for a text-conditioned family (PixArt, SD3, Flux, Sana, Wan), the prompts that
    calibration samples with (a :class:`~qc_compiler.diffusion.ConditionBank` of their embeddings and
    the negative prompt's); passes that sample trajectories need it. ``geometry``: the latent and
    prompt size such a model is compiled for (:class:`~qc_compiler.models.Geometry`; default: the
    family's, e.g. the config's ``sample_size``).

    Several samplers (``sampler=[DDIM(steps=20), DDIM(steps=50)]``) give a
    :class:`~qc_compiler.schedules.CompiledSchedules`: calibration and VC are fitted per step table,
    the weights are shared, and each sampling run is served by its own table. When no pass reads the
    step (no cache, VC or per-step ranges), one compiled model serves every schedule and is returned.
    """
    if isinstance(sampler, (list, tuple)):
        return _compile_schedules(model, passes, list(sampler), fitted, backend=backend, seed=seed,
                                  example_inputs=example_inputs, capture_mode=capture_mode, adapter=adapter,
                                  conditions=conditions, geometry=geometry, progress=progress)
    if sampler is not None and not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a qc sampler (DDPM, DDIM, FlowMatchEuler, ...) or a list of them, "
                        f"got {type(sampler).__name__}")
    if fitted is not None and not isinstance(fitted, dict):
        raise TypeError("fitted must be a dict (one sampler) or a list of dicts (one per sampler)")
    manager = PassManager(list(passes))
    manager.check_order()
    lowering = get_backend(backend)
    lowering.check_passes(manager.passes)
    seed = check_int("seed", seed, lo=0)
    if capture_mode is not None and capture_mode not in CAPTURE_MODES:
        raise ValueError(f"capture_mode must be one of {list(CAPTURE_MODES)}, got {capture_mode!r}")
    if sampler is None:
        sampler = DDPM(steps=50)
        log.info("no sampler given: compiling for %s", sampler.spec()["name"])
    if geometry is not None and not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a qc.Geometry, got {type(geometry).__name__}")
    adapter = (adapter if adapter is not None else adapter_for(model)).for_model(model, geometry)
    info = adapter.info(model)
    inputs = tuple(example_inputs) if example_inputs is not None else adapter.example_inputs(info)
    _check_conditions(conditions, adapter, inputs, manager.passes)
    weights = {k: v.detach() for k, v in adapter.source(model).state_dict().items()}
    check_finite(weights, f"{type(model).__name__} weights")
    specs = [{"name": p.name, "options": p.options()} for p in manager.passes]
    schedule = _schedule_digest(specs, sampler.spec(), seed, weights, conditions)
    fitted = dict(fitted or {})
    if fitted and fitted.get(SCHEDULE_KEY) != schedule:
        raise ArtifactError("the fitted state given to compile() was fitted with other passes, options, sampler, seed "
                            "or weights (its schedule.digest differs), so it cannot be reused; compile without it")
    fitted[SCHEDULE_KEY] = schedule
    if conditions is not None:  # saved with the fitted state: load_compiled rebuilds the bank from it
        fitted.update(conditions.to_tensors())
    wrapped = adapter.wrap(model)
    mode = capture_mode or adapter.capture_mode
    take = lambda: capture(wrapped, example_inputs=inputs, leaf_modules=adapter.leaf_modules, prefer=mode)  # noqa: E731
    gm = take()
    ctx = PassContext(adapter=adapter, info=info, sampler=sampler, reference=None if passes else gm,
                      reference_factory=take if passes else None, seed=seed,
                      fitted=fitted, progress=progress, conditions=conditions)
    if progress:
        ctx.instruments.append(ProgressInstrument(len(manager.passes)))
    gm = manager.run(gm, ctx)
    lowered = lowering.lower(gm, ctx)
    config = adapter.config(model)
    build = {
        "adapter": adapter.name,
        "model_config": config,
        "passes": specs,
        "unsaveable": [f"pass {p.name!r} is not registered (use @register_pass), so it cannot be reloaded"
                       for p in manager.passes if p.name not in PASS_REGISTRY],
        "backend": backend,
        "seed": seed,
        "capture_mode": mode,
        "geometry": adapter.geometry_json,
        "fitted": ctx.fitted,
        "weights": {k: v.clone() for k, v in weights.items()} if config else {},
    }

    def recompile(*, device: torch.device, dtype: torch.dtype) -> CompiledModel:
        # the source model is held by this closure only: a compiled model that can move keeps its
        # FP weights alive, as a pipeline's original transformer would be
        moved = copy.deepcopy(model).to(device=device, dtype=dtype)
        return compile(moved, passes=manager.passes, sampler=sampler, backend=backend, seed=seed,
                       capture_mode=capture_mode, adapter=adapter, progress=progress,
                       conditions=conditions.like(adapter.example_inputs(adapter.info(moved))[2:])
                       if conditions is not None else None)

    return CompiledModel(lowered, sampler.spec(), info, records=ctx.artifacts.get("pass_report", []), build=build,
                         inputs=adapter.inputs, recompile=recompile)


SCHEDULE_KEY = "schedule.digest"


def _compile_schedules(model: nn.Module, passes: Sequence[Pass], samplers: list, fitted, **options: Any
                       ) -> Union[CompiledModel, CompiledSchedules]:
    """``compile`` for each sampler, weights shared (see ``compile``)."""
    if not samplers or not all(isinstance(s, Sampler) for s in samplers):
        raise TypeError("sampler must be a qc sampler or a non-empty list of them")
    tables = [StepTable(s.timesteps) for s in samplers]
    for i, table in enumerate(tables):
        if table in tables[:i]:
            raise ValueError(f"sampler {i} repeats an earlier sampler's timesteps ({table}); give each table once")
    fits = list(fitted) if fitted is not None else [None] * len(samplers)
    if isinstance(fitted, dict) or len(fits) != len(samplers):
        raise TypeError(f"with {len(samplers)} samplers, fitted is a list of {len(samplers)} dicts (one per sampler)")
    first = compile(model, passes, samplers[0], fitted=fits[0], **options)
    if len(samplers) == 1:
        return first
    if not first.uses_steps:
        log.info("no pass reads the step: one compiled model serves all %d schedules", len(samplers))
        return first
    variants = [first] + [compile(model, passes, s, fitted=f, **options) for s, f in zip(samplers[1:], fits[1:])]
    for v in variants[1:]:  # the source weights are the same: keep one copy for save()
        v.build["weights"] = first.build["weights"]
    return CompiledSchedules(variants)


def _schedule_digest(specs, sampler_spec: Dict[str, Any], seed: int, weights: Dict[str, torch.Tensor],
                     conditions: Optional[ConditionBank] = None) -> str:
    """What fitted state depends on: the passes and their options, the sampler, the seed, the weights,
    and the prompts calibration sampled with."""
    body = json.dumps({"passes": specs, "sampler": sampler_spec, "seed": seed}, sort_keys=True)
    if conditions is not None:
        body += conditions.digest()
    return hashlib.sha256((body + tensor_digest(weights)).encode()).hexdigest()


def _check_conditions(conditions: Optional[ConditionBank], adapter: ModelAdapter, inputs, passes) -> None:
    """A bank must name exactly the model's condition inputs, in their dtypes and row shapes; a
    text-conditioned model whose passes sample trajectories needs one. Checked before any work."""
    names = adapter.inputs.conditions
    if conditions is None:
        sampling = [p.name for p in passes if getattr(p, "samples", False)]
        if adapter.text_conditioned and sampling:
            raise QCError(f"passes {sampling} sample calibration trajectories, and a {adapter.name!r} model is "
                          f"conditioned on {list(names)}: pass conditions=qc.ConditionBank({list(names)}, ...) "
                          "with your prompts' embeddings (qc.compile_pipeline encodes prompts for you)")
        return
    if not isinstance(conditions, ConditionBank):
        raise TypeError(f"conditions must be a qc.ConditionBank, got {type(conditions).__name__}")
    if tuple(conditions.names) != tuple(names):
        raise QCError(f"the condition bank names {list(conditions.names)}, but a {adapter.name!r} model takes "
                      f"{list(names)} (in that order)")
    for name, example in zip(names, inputs[2:]):
        row = conditions.tensors[name]
        if row.dtype != example.dtype or tuple(row.shape[1:]) != tuple(example.shape[1:]):
            raise QCError(f"condition {name!r} is {row.dtype} {tuple(row.shape[1:])} per prompt, but this model "
                          f"takes {example.dtype} {tuple(example.shape[1:])}")


def compile_pipeline(pipe: Any, passes: Sequence[Pass] = (), *, num_inference_steps: Union[int, Sequence[int]],
                     guidance_scale: float = 1.0, backend: str = "torch", seed: int = 0, height: Optional[int] = None,
                     width: Optional[int] = None, num_frames: Optional[int] = None, progress: bool = False,
                     **prompt_embeds: torch.Tensor) -> Union[CompiledModel, CompiledSchedules]:
    """Compile ``pipe.transformer`` for the pipeline's scheduler at ``num_inference_steps`` and put it
    back into ``pipe`` (its adapter says how). Returns the compiled model; call ``pipe(...)`` as before,
    with the same step count, guidance and size.

    Several step counts (``num_inference_steps=[20, 28, 50]``) compile one table each (calibration
    and VC fitted per table, weights shared); the pipeline then serves any of them, and the model asks
    the pipeline's scheduler which one a run uses (``bind_pipeline``).

    A text-to-image (or video) pipeline is compiled for one size, ``height`` x ``width`` pixels (and
    ``num_frames``), as its call takes them; its calibration prompts are the pipeline's own keyword
    arguments, e.g. ``prompt_embeds=``, ``pooled_prompt_embeds=`` and, under guidance,
    ``negative_prompt_embeds=`` (encode them with ``pipe.encode_prompt``)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise QCError(f"{type(pipe).__name__} has no transformer to compile")
    counts = list(num_inference_steps) if isinstance(num_inference_steps, (list, tuple)) else [num_inference_steps]
    if not counts:
        raise ValueError("num_inference_steps is an int or a non-empty list of ints")
    counts = [check_int("num_inference_steps", n, lo=1) for n in counts]
    if len(set(counts)) != len(counts):
        raise ValueError(f"num_inference_steps repeats a step count: {counts}")
    adapter = adapter_for(transformer)
    geometry, conditions = None, None
    if adapter.text_conditioned:
        geometry = adapter.pipeline_geometry(pipe, prompt_embeds, height=height, width=width, num_frames=num_frames)
        conditions = adapter.pipeline_conditions(prompt_embeds, float(guidance_scale))
    elif prompt_embeds or height or width or num_frames:
        given = sorted(prompt_embeds) + [k for k, v in (("height", height), ("width", width), ("num_frames", num_frames)) if v]
        raise QCError(f"{type(pipe).__name__} is class-conditional at a fixed size: it takes no {given}")
    adapter = adapter.for_model(transformer, geometry)
    samplers = [adapter.pipeline_sampler(pipe, n, guidance_scale) for n in counts]
    compiled = compile(transformer, passes, samplers if len(samplers) > 1 else samplers[0], backend=backend, seed=seed,
                       adapter=adapter, geometry=geometry, conditions=conditions, progress=progress)
    pipe.transformer = adapter.to_pipeline(compiled, transformer)
    bind_pipeline(pipe)
    return compiled


def bind_pipeline(pipe: Any) -> Any:
    """Let a compiled transformer with several step tables ask ``pipe``'s scheduler which table a run
    uses, when tables share their first timestep (flow-matching schedules all start at t = 1000).
    ``compile_pipeline`` calls it; call it once after ``Pipeline.from_pretrained`` of a saved one. The
    pipeline is held weakly. Returns ``pipe``."""
    model = getattr(getattr(pipe, "transformer", None), "compiled", None)
    if isinstance(model, CompiledSchedules):
        ref = weakref.ref(pipe)

        def scheduler_timesteps():
            owner = ref()
            if owner is None or getattr(owner.scheduler, "timesteps", None) is None:
                return []
            return [float(t) for t in owner.scheduler.timesteps]

        model.__dict__["schedule_source"] = scheduler_timesteps
    return pipe


def load_compiled(folder) -> CompiledModel:
    """Rebuild a compiled model saved by ``CompiledModel.save``: every file is checked first
    (``ArtifactError`` names the file), then the schedule is replayed with the fitted state restored."""
    folder = Path(folder)
    manifest, weights, fitted = load_artifact(folder)
    try:
        adapter = get_adapter(manifest["adapter"])
        model = adapter.build(manifest["model_config"])
        tables = split_schedules(manifest, fitted)
        samplers = [sampler_from_spec(spec) for spec, _ in tables]
        specs = list(manifest["passes"])
        backend, seed, capture_mode = manifest["backend"], manifest["seed"], manifest["capture_mode"]
        geometry = Geometry(**manifest["geometry"]) if manifest.get("geometry") else None
    except KeyError as e:
        raise ArtifactError(f"{folder}/manifest.json has no {e} entry; recompile the model") from None
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{folder}/manifest.json does not describe a model this version can build: {e}") from None
    _match_dtypes(model, weights)  # a float16/bfloat16 model is rebuilt in the dtypes it was saved in
    load_state_strict(model, weights, f"{folder}/weights.safetensors")
    fits = [part for _, part in tables]
    conditions = (ConditionBank.from_tensors(adapter.inputs.conditions, fits[0])
                  if ConditionBank.has_tensors(fits[0]) else None)
    passes = passes_from_specs(specs, str(folder), ArtifactError)
    return compile(model.eval(), passes=passes, sampler=samplers if len(samplers) > 1 else samplers[0],
                   backend=backend, seed=seed, fitted=fits if len(fits) > 1 else fits[0],
                   capture_mode=capture_mode, adapter=adapter, conditions=conditions, geometry=geometry)


def _match_dtypes(model: nn.Module, weights: Dict[str, torch.Tensor]) -> None:
    """Give a freshly built model the dtypes it was saved in: the whole model cast to its saved weights'
    most common floating dtype first (as ``model.to(dtype)`` cast it before it was compiled, non-persistent
    buffers included), then each tensor to its own saved dtype (a model may keep modules in float32)."""
    counts: Dict[torch.dtype, int] = {}
    for t in weights.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if counts:
        model.to(max(counts, key=counts.get))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        saved = weights.get(name)
        if saved is not None and tensor.is_floating_point() and saved.dtype != tensor.dtype:
            tensor.data = tensor.data.to(saved.dtype)


set_loader(load_compiled)  # lets a diffusers pipeline's from_pretrained rebuild a saved compiled transformer
