"""Sana: diffusers' ``SanaTransformer2DModel`` and ``SanaPipeline``.

Each block is linear self-attention, cross-attention to the Gemma tokens, and a GLU MB-conv
feed-forward (1x1 and depthwise 3x3 convolutions on the token grid). The linears are quantized; the
convolutions stay in floating point (our INT8 kernels are GEMMs), which the compile report shows.

Example:
    >>> [b.name for b in SANA.blocks.branches]
    ['attn', 'cross', 'mlp']
"""
from __future__ import annotations

from typing import Any, List

from ...errors import QCError
from ...graph import BlockLayout, BranchSpec
from ..adapter import ForwardInputs, Geometry, register_adapter
from ..diffusers_text import ConditionRow, DiffusersTextAdapter

__all__ = ["SanaAdapter", "SANA"]


class SanaAdapter(DiffusersTextAdapter):
    def default_geometry(self, cfg: Any) -> Geometry:
        if getattr(cfg, "guidance_embeds", False):
            raise QCError("Sana-Sprint's guidance embedding is not compiled yet; Sana is")
        return Geometry(height=int(cfg.sample_size), width=int(cfg.sample_size), text_tokens=300)

    def condition_rows(self, cfg: Any, geo: Geometry) -> List[ConditionRow]:
        return [ConditionRow("encoder_hidden_states", (geo.text_tokens, self.text_width(cfg))),
                ConditionRow("encoder_attention_mask", (geo.text_tokens,), "int64")]


SANA = register_adapter(SanaAdapter(
    name="sana",
    classes=("SanaTransformer2DModel",),
    blocks=BlockLayout(r"^(?:.*\.)?transformer_blocks\.\d+$",
                       (BranchSpec("attn", "norm1", "attn1.to_out.0"), BranchSpec("cross", "attn2", "attn2.to_out.0"),
                        BranchSpec("mlp", "norm2", "ff.conv_point"))),
    quantizable=("*transformer_blocks.*", "*caption_projection.*", "*proj_out", "*time_embed.*"),
    conditioning_linears=("*time_embed.*",),
    capture_mode="export",
    conditioning="text",
    prompt_inputs=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),
                   ("encoder_attention_mask", "prompt_attention_mask", "negative_prompt_attention_mask")),
    inputs=ForwardInputs(condition="encoder_hidden_states", extra=("encoder_attention_mask",), timestep_dtype="float32"),
))
