"""Stable Diffusion 3 and 3.5: diffusers' ``SD3Transformer2DModel`` and ``StableDiffusion3Pipeline``.

Each ``JointTransformerBlock`` runs one joint attention over the image and text streams, which
returns both (a two-output cached region), then an MLP per stream; SD3.5's dual-attention blocks add
an image-only ``attn2``, and qk RMS-norms sit inside the attention regions. The last block is
``context_pre_only``: its attention has no text output and there is no text MLP, so its regions hold
what it has.

Example:
    >>> [b.name for b in SD3.blocks.branches]
    ['attn', 'attn2', 'ff', 'ff_context']
"""
from __future__ import annotations

from typing import Any, Dict, List

from ...graph import BlockLayout, BranchSpec
from ..adapter import ForwardInputs, Geometry, register_adapter
from ..diffusers_text import ConditionRow, DiffusersTextAdapter, flow_shift_mu

__all__ = ["SD3Adapter", "SD3"]


class SD3Adapter(DiffusersTextAdapter):
    def default_geometry(self, cfg: Any) -> Geometry:
        # CLIP's 77 tokens and T5's 256, concatenated by the pipeline
        return Geometry(height=int(cfg.sample_size), width=int(cfg.sample_size), text_tokens=77 + 256)

    def condition_rows(self, cfg: Any, geo: Geometry) -> List[ConditionRow]:
        return [ConditionRow("encoder_hidden_states", (geo.text_tokens, int(cfg.joint_attention_dim))),
                ConditionRow("pooled_projections", (int(cfg.pooled_projection_dim),))]

    def timestep_kwargs(self, pipe: Any, steps: int) -> Dict[str, Any]:
        if not pipe.scheduler.config.get("use_dynamic_shifting", False):
            return {}
        p = int(pipe.transformer.config.patch_size)
        return {"mu": flow_shift_mu(pipe.scheduler.config, (self.geometry.height // p) * (self.geometry.width // p))}


SD3 = register_adapter(SD3Adapter(
    name="sd3",
    classes=("SD3Transformer2DModel",),
    blocks=BlockLayout(r"^(?:.*\.)?transformer_blocks\.\d+$",
                       (BranchSpec("attn", "attn", ("attn.to_out.0", "attn.to_add_out")),
                        BranchSpec("attn2", "attn2", "attn2.to_out.0"),
                        BranchSpec("ff", "norm2", "ff.net.2"), BranchSpec("ff_context", "norm2_context", "ff_context.net.2"))),
    quantizable=("*transformer_blocks.*", "*context_embedder", "*proj_out", "*time_text_embed.*", "*norm_out.linear"),
    # adaLN of both streams and the final norm, and the timestep/pooled-text embedder: weight-only
    conditioning_linears=("*norm1.linear", "*norm1_context.linear", "*time_text_embed.*", "*norm_out.linear"),
    capture_mode="export",
    conditioning="text",
    prompt_inputs=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),
                   ("pooled_projections", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")),
    inputs=ForwardInputs(condition="encoder_hidden_states", extra=("pooled_projections",), timestep_dtype="float32"),
))
