"""Wan 2.1 (text-to-video): diffusers' ``WanTransformer3DModel`` and ``WanPipeline``.

One sample is a video latent ``(C, F, H, W)``, patched into ``F * H/2 * W/2`` tokens. Each block is
self-attention (3D rotary), cross-attention to the UMT5 tokens and an MLP, with FP32 layer norms and
a per-block shift/scale/gate table added to the timestep projection.

``WanPipeline`` calls the transformer twice per step under guidance (prompt, then negative prompt).
A compiled model with a step cache holds one batch per run, so it refuses that second call with a
``StepError``; quantization alone (and a cache with ``guidance_scale`` 1) serves it.

Example:
    >>> [b.name for b in WAN.blocks.branches]
    ['attn', 'cross', 'ffn']
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ...graph import BlockLayout, BranchSpec
from ..adapter import ForwardInputs, Geometry, register_adapter
from ..diffusers_text import ConditionRow, DiffusersTextAdapter

__all__ = ["WanAdapter", "WAN"]


class WanAdapter(DiffusersTextAdapter):
    def default_geometry(self, cfg: Any) -> Geometry:
        # WanPipeline's defaults: 81 frames at 480 x 832, through the 4x temporal, 8x spatial VAE
        return Geometry(height=60, width=104, frames=21, text_tokens=512)

    def latent(self, cfg: Any, geo: Geometry) -> Tuple[int, int, int, Tuple[int, ...]]:
        c = int(cfg.in_channels)
        return geo.height, c, int(cfg.out_channels or c), (c, geo.frames, geo.height, geo.width)

    def pipeline_geometry(self, pipe: Any, embeds: Dict[str, torch.Tensor], *, height: Optional[int],
                          width: Optional[int], num_frames: Optional[int]) -> Geometry:
        s, t = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
        first = embeds.get("prompt_embeds")
        return Geometry(height=height // s if height else None, width=width // s if width else None,
                        frames=(num_frames - 1) // t + 1 if num_frames else None,
                        text_tokens=int(first.shape[1]) if first is not None else None)

    def condition_rows(self, cfg: Any, geo: Geometry) -> List[ConditionRow]:
        return [ConditionRow("encoder_hidden_states", (geo.text_tokens, int(cfg.text_dim)))]


WAN = register_adapter(WanAdapter(
    name="wan",
    classes=("WanTransformer3DModel",),
    blocks=BlockLayout(r"^(?:.*\.)?blocks\.\d+$",
                       (BranchSpec("attn", "norm1", "attn1.to_out.0"), BranchSpec("cross", "norm2", "attn2.to_out.0"),
                        BranchSpec("ffn", "norm3", "ffn.net.2"))),
    quantizable=("*blocks.*", "*condition_embedder.*", "*proj_out"),
    conditioning_linears=("*condition_embedder.time_*",),
    capture_mode="export",
    conditioning="text",
    prompt_inputs=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),),
    inputs=ForwardInputs(condition="encoder_hidden_states", timestep_dtype="float32"),
))
