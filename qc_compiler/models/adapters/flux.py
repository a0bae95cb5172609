"""FLUX.1: diffusers' ``FluxTransformer2DModel`` and ``FluxPipeline``.

Flux runs on packed latents: 2x2 latent patches become tokens of ``4 * C`` channels, so one sample
is ``(L, 64)`` with ``L = (H/2)(W/2)``, and the pipeline passes the timestep divided by 1000. Its
``img_ids``/``txt_ids`` (the rotary positions) depend only on the size, so the compiled model holds
them and checks the pipeline's against its own. FLUX.1-dev's distilled ``guidance`` is a per-sample
input (the pipeline does no CFG); FLUX.1-schnell has none, and its input is ignored.

Blocks: 19 double-stream blocks (a joint attention with two outputs, and an MLP per stream) and 38
single-stream blocks (one region from the norm through the fused attention+MLP to ``proj_out``).

Example:
    >>> [b.name for b in FLUX.blocks.branches]
    ['attn', 'ff', 'ff_context', 'single']
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ...graph import BlockLayout, BranchSpec
from ..adapter import ForwardInputs, Geometry, register_adapter
from ..diffusers_text import ConditionRow, DiffusersTextAdapter, flow_shift_mu

__all__ = ["FluxAdapter", "FLUX", "flux_image_ids"]


def flux_image_ids(height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rotary positions of a (height x width) grid of packed tokens: rows (0, i, j), as FluxPipeline."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(dtype)


class FluxAdapter(DiffusersTextAdapter):
    def default_geometry(self, cfg: Any) -> Geometry:
        return Geometry(height=128, width=128, text_tokens=512)  # 1024 px through the 8x VAE; T5's 512 tokens

    def latent(self, cfg: Any, geo: Geometry) -> Tuple[int, int, int, Tuple[int, ...]]:
        c = int(cfg.in_channels)
        return geo.height, c, int(cfg.out_channels or c), ((geo.height // 2) * (geo.width // 2), c)

    def condition_rows(self, cfg: Any, geo: Geometry) -> List[ConditionRow]:
        return [ConditionRow("encoder_hidden_states", (geo.text_tokens, int(cfg.joint_attention_dim))),
                ConditionRow("pooled_projections", (int(cfg.pooled_projection_dim),)),
                ConditionRow("guidance", (), "float32")]  # the pipeline makes it float32 at any model dtype

    def pipeline_geometry(self, pipe: Any, embeds: Dict[str, torch.Tensor], *, height: Optional[int],
                          width: Optional[int], num_frames: Optional[int]) -> Geometry:
        geo = super().pipeline_geometry(pipe, embeds, height=None, width=None, num_frames=num_frames)
        s = int(pipe.vae_scale_factor)
        # FluxPipeline rounds the size to whole 2x2 patches of latent pixels
        return Geometry(height=2 * (height // (s * 2)) if height else None, width=2 * (width // (s * 2)) if width else None,
                        text_tokens=geo.text_tokens)

    def extra_conditions(self, rows: Dict[str, torch.Tensor], guidance_scale: float) -> Dict[str, torch.Tensor]:
        k = rows["encoder_hidden_states"].shape[0]
        return {"guidance": torch.full((k,), float(guidance_scale), dtype=torch.float32)}

    def constants(self, geo: Geometry, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        return {"img_ids": flux_image_ids(geo.height // 2, geo.width // 2, dtype),
                "txt_ids": torch.zeros(geo.text_tokens, 3, dtype=dtype)}

    def unused(self, cfg: Any) -> Tuple[str, ...]:
        return () if cfg.guidance_embeds else ("guidance",)

    def timestep_kwargs(self, pipe: Any, steps: int) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"sigmas": np.linspace(1.0, 1 / steps, steps)}
        if pipe.scheduler.config.get("use_flow_sigmas", False):
            kwargs = {}
        if pipe.scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = flow_shift_mu(pipe.scheduler.config, (self.geometry.height // 2) * (self.geometry.width // 2))
        return kwargs

    def pipeline_sampler(self, pipe: Any, num_inference_steps: int, guidance_scale: float):
        from ...diffusion.scheduler_sampler import PipelineSampler

        # FLUX.1-dev's guidance is an input, not CFG: the sampler makes one call per step
        return PipelineSampler(pipe.scheduler, num_inference_steps, 1.0, self.timestep_kwargs(pipe, num_inference_steps))


FLUX = register_adapter(FluxAdapter(
    name="flux",
    classes=("FluxTransformer2DModel",),
    blocks=BlockLayout(r"^(?:.*\.)?(?:single_)?transformer_blocks\.\d+$",
                       (BranchSpec("attn", "attn", ("attn.to_out.0", "attn.to_add_out")),
                        BranchSpec("ff", "norm2", "ff.net.2"), BranchSpec("ff_context", "norm2_context", "ff_context.net.2"),
                        BranchSpec("single", "norm.norm", "proj_out"))),
    quantizable=("*transformer_blocks.*", "*x_embedder", "*context_embedder", "*proj_out", "*time_text_embed.*",
                 "*norm_out.linear"),
    conditioning_linears=("*norm1.linear", "*norm1_context.linear", "*.norm.linear", "*time_text_embed.*",
                          "*norm_out.linear"),
    capture_mode="export",
    conditioning="text",
    prompt_inputs=(("encoder_hidden_states", "prompt_embeds", None), ("pooled_projections", "pooled_prompt_embeds", None)),
    inputs=ForwardInputs(condition="encoder_hidden_states", extra=("pooled_projections", "guidance"),
                         timestep_dtype="float32", timestep_divisor=1000),
))
