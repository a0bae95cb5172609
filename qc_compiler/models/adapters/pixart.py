"""PixArt-α/Σ: diffusers' ``PixArtTransformer2DModel`` and ``PixArtSigmaPipeline``.

Each block (``BasicTransformerBlock`` with ``ada_norm_single``) is self-attention, cross-attention to
the T5 tokens, and an MLP; the timestep's shift/scale/gate come from one ``adaln_single`` for the whole
model. The cross-attention has no norm in front of it, so its cached region opens at its own q, k
and v projections (the text K/V are then reused with it).

Example:
    >>> from qc_compiler.models import adapter_for
    >>> [b.name for b in PIXART.blocks.branches]
    ['attn', 'cross', 'mlp']
"""
from __future__ import annotations

from typing import Any, Dict, List

from ...graph import BlockLayout, BranchSpec
from ..adapter import ForwardInputs, Geometry, register_adapter
from ..diffusers_text import ConditionRow, DiffusersTextAdapter
from ...errors import QCError

__all__ = ["PixArtAdapter", "PIXART"]


class PixArtAdapter(DiffusersTextAdapter):
    def default_geometry(self, cfg: Any) -> Geometry:
        if getattr(cfg, "use_additional_conditions", None):
            raise QCError("PixArt-α's resolution/aspect-ratio micro-conditions are not compiled yet; PixArt-Σ "
                          "(use_additional_conditions false) is")
        return Geometry(height=int(cfg.sample_size), width=int(cfg.sample_size), text_tokens=300)

    def condition_rows(self, cfg: Any, geo: Geometry) -> List[ConditionRow]:
        return [ConditionRow("encoder_hidden_states", (geo.text_tokens, self.text_width(cfg))),
                ConditionRow("encoder_attention_mask", (geo.text_tokens,), "int64")]

    def fixed_kwargs(self, cfg: Any) -> Dict[str, Any]:
        return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


PIXART = register_adapter(PixArtAdapter(
    name="pixart",
    classes=("PixArtTransformer2DModel",),
    blocks=BlockLayout(r"^(?:.*\.)?transformer_blocks\.\d+$",
                       (BranchSpec("attn", "norm1", "attn1.to_out.0"), BranchSpec("cross", "attn2", "attn2.to_out.0"),
                        BranchSpec("mlp", "norm2", "ff.net.2"))),
    # every token linear: the blocks, the caption projection (the text stream's embedder), the output
    quantizable=("*transformer_blocks.*", "*caption_projection.*", "*proj_out", "*adaln_single.*"),
    conditioning_linears=("*adaln_single.*",),  # the timestep embedding: one row per sample, weight-only
    capture_mode="export",
    conditioning="text",
    prompt_inputs=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),
                   ("encoder_attention_mask", "prompt_attention_mask", "negative_prompt_attention_mask")),
    inputs=ForwardInputs(condition="encoder_hidden_states", extra=("encoder_attention_mask",),
                         timestep_dtype="float32"),
))
