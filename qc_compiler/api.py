"""The public entry points: ``compile``, ``load_model`` and ``load_compiled``.

Example:
    >>> import qc_compiler as qc
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> fast = qc.compile(model, passes=[], sampler=qc.DDPM(steps=10))
    >>> fast.sampler_spec["steps"]
    10
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

from .backends import get_backend
from .capture import capture
from .diffusion.samplers import DDPM, Sampler
from .models.zoo import load_model
from .persist import load_compiled
from .pipeline import Pass, PassContext, PassManager
from .runtime import CompiledModel

__all__ = ["compile", "load_model", "load_compiled"]

log = logging.getLogger(__name__)

_MODEL_INFO = ("input_size", "in_channels", "num_classes", "learn_sigma", "out_channels")


def compile(  # noqa: A001 - the verb users expect
    model: nn.Module,
    passes: Sequence[Pass] = (),
    sampler: Optional[Sampler] = None,
    backend: str = "torch",
    seed: int = 0,
    example_inputs: Optional[Tuple[torch.Tensor, ...]] = None,
    leaf_modules: Sequence[Type[nn.Module]] = (),
    fitted: Optional[Dict[str, Any]] = None,
    capture_mode: str = "fx",
) -> CompiledModel:
    """Capture ``model``, run ``passes`` over its graph, and lower it with ``backend``.

    The schedule is checked before anything runs (``PassOrderError``). ``sampler`` fixes the
    timesteps the compiled model serves (default: 50-step DDPM). ``fitted`` restores what passes
    fitted earlier (``load_compiled`` uses it), so calibration is not repeated. ``capture_mode``
    ``"fx"`` tries symbolic tracing and falls back to ``torch.export``; ``"export"`` goes straight
    to ``torch.export``. The user's model is never modified.
    """
    manager = PassManager(list(passes))
    manager.check_order()
    lower = get_backend(backend)
    if sampler is None:
        sampler = DDPM(steps=50)
        log.info("no sampler given: compiling for %s", sampler.spec()["name"])
    model_info = {k: getattr(model, k) for k in _MODEL_INFO if hasattr(model, k)}
    gm = capture(model, example_inputs=example_inputs, leaf_modules=leaf_modules, prefer=capture_mode)
    reference = capture(model, example_inputs=example_inputs, leaf_modules=leaf_modules, prefer=capture_mode) if passes else gm
    ctx = PassContext(sampler=sampler, reference=reference, seed=seed, fitted=dict(fitted or {}), model_info=model_info)
    gm = manager.run(gm, ctx)
    lowered = lower(gm, ctx)
    config = getattr(model, "config", None)
    build = {
        "model_config": {k: v for k, v in config.items() if k != "fused_attn"} if isinstance(config, dict) else None,
        "passes": [{"name": p.name, "options": p.options() if hasattr(p, "options") else {}} for p in passes],
        "backend": backend,
        "seed": seed,
        "capture_mode": capture_mode,
        "fitted": ctx.fitted,
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()} if config else {},
    }
    return CompiledModel(lowered, sampler.spec(), model_info, records=ctx.artifacts.get("pass_report", []), build=build)
