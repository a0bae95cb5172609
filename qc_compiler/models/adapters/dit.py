"""Our reference DiT (``qc_compiler.models.dit``), which also serves official facebookresearch/DiT
checkpoints (they load into it with ``strict=True``) and the embedded ``dit-mnist``.

Example:
    >>> from qc_compiler.models import adapter_for
    >>> from qc_compiler.models.dit import DiT_models
    >>> adapter = adapter_for(DiT_models["DiT-T/4"]())
    >>> adapter.name, [b.name for b in adapter.blocks.branches]
    ('dit', ['attn', 'mlp'])
"""
from __future__ import annotations

from typing import Any, Dict

import torch.nn as nn

from ...graph import BlockLayout, BranchSpec
from ..adapter import ForwardInputs, ModelAdapter, register_adapter
from ..dit import DiT

__all__ = ["DiTAdapter", "DIT"]


class DiTAdapter(ModelAdapter):
    """Saves the constructor config (``model.config``) and rebuilds ``DiT(**config)``."""

    def config(self, model: nn.Module) -> Dict[str, Any]:
        return {k: v for k, v in model.config.items() if k != "fused_attn"}

    def build(self, config: Dict[str, Any]) -> nn.Module:
        return DiT(**config)


DIT = register_adapter(DiTAdapter(
    name="dit",
    classes=("DiT",),
    # Each block: x + gate * attn(modulate(norm1(x))), then x + gate * mlp(modulate(norm2(x))).
    blocks=BlockLayout(r"^blocks\.\d+$", (BranchSpec("attn", "norm1", "attn.proj"), BranchSpec("mlp", "norm2", "mlp.fc2"))),
    quantizable=("blocks.*", "final_layer.*"),
    # adaLN maps the conditioning embedding (one row per sample) to shift/scale/gate: weight-only.
    conditioning_linears=("*adaLN_modulation*",),
    capture_mode="fx",
    inputs=ForwardInputs(timestep_dtype="float32"),  # its sinusoidal embedding takes fractional timesteps
))
