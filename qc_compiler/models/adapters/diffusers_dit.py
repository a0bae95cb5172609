"""diffusers' ``DiTTransformer2DModel`` and ``DiTPipeline``, in and out of qc-compiler.

In: ``qc.compile`` takes the raw transformer; the :data:`DIFFUSERS_DIT` adapter wraps it in
:class:`DiffusersDiT`, which gives it our denoiser signature ``(x, t, y) -> out`` and the attributes
our samplers read, and captures it through ``torch.export`` (symbolic tracing fails on its PatchEmbed
and attention processors).

Out: :func:`pipeline_transformer` (the adapter's ``to_pipeline``) wraps a compiled model so it plugs
back into a ``DiTPipeline`` (same call signature and output type), and :func:`sampler_for_scheduler`
builds the sampler whose timestep table is the pipeline scheduler's, so the compiled step context
follows the pipeline.

Loading is local only: :func:`load_diffusers_transformer` reads ``config.json`` and the weights
(safetensors) from a folder; nothing is fetched. diffusers itself is imported only when needed.

Example (``pipe`` a local ``DiTPipeline``; ``qc.compile_pipeline`` does the last three lines):
    >>> import qc_compiler as qc                                                          # doctest: +SKIP
    >>> sampler = sampler_for_scheduler(pipe.scheduler, 25, 4.0)                          # doctest: +SKIP
    >>> fast = qc.compile(pipe.transformer, passes=qc.presets.qandc(), sampler=sampler)   # doctest: +SKIP
    >>> pipe.transformer = pipeline_transformer(fast, pipe.transformer)                   # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
import torch.nn as nn

from ...diffusion.samplers import DDPM
from ...diffusion.scheduler_sampler import PipelineSampler
from ...diffusion.schedule import Schedule
from ...errors import ArtifactError, QCError
from ...graph import BlockLayout, BranchSpec
from ..adapter import ForwardInputs, ModelAdapter, ModelInfo, register_adapter, weights_dtype
from ..diffusers_model import qc_transformer

__all__ = ["DiffusersDiT", "DiffusersDiTAdapter", "DIFFUSERS_DIT", "PipelineSampler", "pipeline_transformer", "sampler_for_scheduler",
           "load_diffusers_transformer"]


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


def _transformer(model: nn.Module) -> nn.Module:
    return model.transformer if isinstance(model, DiffusersDiT) else model


class DiffusersDiTAdapter(ModelAdapter):
    """diffusers' DiT: the raw ``DiTTransformer2DModel`` or our :class:`DiffusersDiT` around it."""

    def info(self, model: nn.Module) -> ModelInfo:
        cfg = _transformer(model).config
        return ModelInfo(input_size=int(cfg.sample_size), in_channels=int(cfg.in_channels),
                         out_channels=int(cfg.out_channels or cfg.in_channels), num_classes=int(cfg.num_embeds_ada_norm),
                         dtype=weights_dtype(_transformer(model)))

    def wrap(self, model: nn.Module) -> nn.Module:
        return model if isinstance(model, DiffusersDiT) else DiffusersDiT(model)

    def source(self, model: nn.Module) -> nn.Module:
        return _transformer(model)

    def config(self, model: nn.Module) -> Dict[str, Any]:
        return {k: v for k, v in dict(_transformer(model).config).items() if not k.startswith("_")}

    def build(self, config: Dict[str, Any]) -> nn.Module:
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel.from_config(config)

    def to_pipeline(self, compiled: nn.Module, original: nn.Module) -> nn.Module:
        return pipeline_transformer(compiled, original)

    def pipeline_forward(self, compiled: nn.Module, hidden_states, timestep=None, class_labels=None,
                         cross_attention_kwargs=None, return_dict: bool = True):
        """``DiTTransformer2DModel.forward``'s signature and output type."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if cross_attention_kwargs:
            raise QCError("cross_attention_kwargs change the attention, which is compiled into the graph")
        out = compiled(hidden_states, timestep, class_labels)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def pipeline_sampler(self, pipe: Any, num_inference_steps: int, guidance_scale: float) -> "PipelineSampler":
        return PipelineSampler(pipe.scheduler, num_inference_steps, guidance_scale)


DIFFUSERS_DIT = register_adapter(DiffusersDiTAdapter(
    name="diffusers-dit",
    classes=("DiTTransformer2DModel", "DiffusersDiT"),
    # BasicTransformerBlock with AdaLayerNormZero: norm1 modulates inside, the MLP branch opens at norm3.
    blocks=BlockLayout(r"^(?:.*\.)?transformer_blocks\.\d+$",
                       (BranchSpec("attn", "norm1.norm", "attn1.to_out.0"), BranchSpec("mlp", "norm3", "ff.net.2"))),
    quantizable=("*transformer_blocks.*", "*proj_out_*"),
    # AdaLayerNormZero's linear and its timestep/label embedder, and the final layer's proj_out_1.
    conditioning_linears=("*.norm1.linear", "*.norm1.emb.*", "*proj_out_1"),
    capture_mode="export",
    inputs=ForwardInputs(timestep_dtype="float32"),  # schedulers such as Euler call fractional timesteps
))


def pipeline_transformer(compiled: nn.Module, original: nn.Module) -> nn.Module:
    """``pipe.transformer = pipeline_transformer(compiled, pipe.transformer)``: a diffusers-shaped model
    (``QCTransformer``: config, dtype, ``save_pretrained``/``from_pretrained``) around the compiled one."""
    return qc_transformer(compiled, _transformer(original), DIFFUSERS_DIT)


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
