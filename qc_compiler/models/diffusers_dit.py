"""diffusers' ``DiTTransformer2DModel`` and ``DiTPipeline``, in and out of qc-compiler.

In: :class:`DiffusersDiT` gives a diffusers transformer our denoiser signature ``(x, t, y) -> out``
and the attributes our samplers read, so ``qc.compile`` captures it (through ``torch.export``:
symbolic tracing fails on its PatchEmbed and attention processors) and every pass finds its blocks.

Out: :func:`pipeline_transformer` wraps a compiled model so it plugs back into a ``DiTPipeline``
(same call signature and output type), and :func:`sampler_for_scheduler` builds the sampler whose
timestep table is the pipeline scheduler's, so the compiled step context follows the pipeline.

Loading is local only: :func:`load_diffusers_transformer` reads ``config.json`` and the weights
(safetensors) from a folder; nothing is fetched.

Example:
    >>> from diffusers import DiTTransformer2DModel                         # doctest: +SKIP
    >>> model = DiffusersDiT(DiTTransformer2DModel(sample_size=16, num_layers=2))  # doctest: +SKIP
    >>> fast = qc.compile(model, passes=[...], sampler=sampler_for_scheduler(pipe.scheduler, 25, 4.0))
    >>> pipe.transformer = pipeline_transformer(fast, pipe.transformer)      # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..diffusion.samplers import DDPM
from ..diffusion.schedule import Schedule
from ..errors import ArtifactError

__all__ = ["DiffusersDiT", "pipeline_transformer", "sampler_for_scheduler", "load_diffusers_transformer"]


class DiffusersDiT(nn.Module):
    """A ``DiTTransformer2DModel`` with our denoiser signature and attributes."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        cfg = transformer.config
        self.transformer = transformer.eval()
        self.input_size, self.in_channels = int(cfg.sample_size), int(cfg.in_channels)
        self.num_classes = int(cfg.num_embeds_ada_norm)  # the null label is num_classes, as in DiT
        self.out_channels = int(cfg.out_channels or cfg.in_channels)
        self.learn_sigma = self.out_channels == 2 * self.in_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]


class _PipelineTransformer(nn.Module):
    """What ``DiTPipeline`` calls: ``transformer(x, timestep=, class_labels=).sample`` plus config/dtype."""

    def __init__(self, compiled: nn.Module, original: nn.Module):
        super().__init__()
        self.compiled = compiled
        self.config = original.config
        self._dtype = original.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:  # DiffusionPipeline reads its components' devices
        return next(self.compiled.parameters(), torch.empty(0)).device

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        out = self.compiled(hidden_states, timestep, class_labels)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def pipeline_transformer(compiled: nn.Module, original: nn.Module) -> nn.Module:
    """Wrap a compiled model so ``pipe.transformer = pipeline_transformer(compiled, pipe.transformer)`` works."""
    return _PipelineTransformer(compiled, original)


def sampler_for_scheduler(scheduler: Any, num_inference_steps: int, guidance_scale: float = 1.0) -> DDPM:
    """A DDPM sampler over exactly the scheduler's timesteps (for calibration runs and the step table).

    The betas are the scheduler's own ``alphas_cumprod``, respaced to the timesteps it will call, so
    the compiled model's step context matches the pipeline's calls one for one.
    """
    scheduler.set_timesteps(num_inference_steps)
    kept = sorted(int(t) for t in scheduler.timesteps)
    if len(set(kept)) != len(kept):
        raise ValueError("the scheduler repeats timesteps; its steps cannot be a step table")
    abar = scheduler.alphas_cumprod.double().numpy()
    last, betas = 1.0, []
    for t in kept:
        betas.append(1 - abar[t] / last)
        last = abar[t]
    sampler = DDPM(steps=len(kept), cfg_scale=max(1.0, guidance_scale), base_timesteps=len(abar))
    sampler.schedule = Schedule(np.array(betas), np.array(kept))
    return sampler


def load_diffusers_transformer(folder) -> DiffusersDiT:
    """A DiT transformer from a local diffusers folder (``config.json`` + safetensors weights), offline."""
    from diffusers import DiTTransformer2DModel
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "transformer").is_dir():  # a whole pipeline folder
        folder = folder / "transformer"
    config_path, weights = folder / "config.json", sorted(folder.glob("*.safetensors"))
    if not config_path.is_file() or not weights:
        raise ArtifactError(f"{folder} is not a diffusers transformer folder (config.json and *.safetensors)")
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
    model = DiTTransformer2DModel.from_config(config)
    state = {}
    for w in weights:
        state.update(load_file(str(w)))
    model.load_state_dict(state, strict=True)
    return DiffusersDiT(model)
