"""``Bf16Attention``: run fused attention with bfloat16 operands (opt-in; not part of Q&C).

Every plain ``scaled_dot_product_attention`` node (no mask, no dropout, not causal), in the graph
and in regions other passes outlined, is retargeted to :func:`qc_compiler.attention.bf16_attention`:

    q, k, v --> scaled_dot_product_attention --> out
    q, k, v --> bf16_attention (bf16 matmuls, float32 out) --> out

Why a pass and not a backend flag: it changes the numbers (about 0.5% relative error on the
attention output), so calibration, VC fitting and the fake-quant reference must see it too, and the
compiled model's recipe must record it. Place it first, so that every later pass calibrates
against the attention the lowered model will run. ONNX export writes FP32 attention (see
``bf16_attention``).

Example:
    >>> import qc_compiler as qc
    >>> from qc_compiler.passes import Bf16Attention
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> fast = qc.compile(model, passes=[Bf16Attention()], sampler=qc.DDPM(steps=10))
    >>> "bf16_attention" in fast.report()
    True
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..attention import bf16_attention
from ..errors import PassError
from ..pipeline import Pass, PassResult, register_pass
from ..regions import iter_graph_modules

__all__ = ["Bf16Attention"]

_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_PLAIN_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False}


def _plain_sdpa(node: fx.Node) -> bool:
    """q, k, v (and at most ``scale``): nothing bf16_attention does not implement."""
    if node.op != "call_function" or node.target not in _SDPA or len(node.args) > 3:
        return False
    return all(node.kwargs.get(key, default) == default for key, default in _PLAIN_DEFAULTS.items()) \
        and set(node.kwargs) <= set(_PLAIN_DEFAULTS) | {"scale"}


@register_pass
class Bf16Attention(Pass):
    """Retarget plain fused attention to bfloat16 operands (see the module docstring)."""

    name = "bf16_attention"

    def options(self):
        return {}

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        rewritten, skipped = 0, 0
        for _, owner in iter_graph_modules(gm):
            changed = False
            for node in owner.graph.nodes:
                if node.op != "call_function" or node.target not in _SDPA:
                    continue
                if not _plain_sdpa(node):
                    skipped += 1
                    continue
                node.target = bf16_attention
                node.kwargs = {k: v for k, v in node.kwargs.items() if k == "scale"}
                rewritten += 1
                changed = True
            if changed:
                owner.graph.lint()
                owner.recompile()
        if not rewritten:
            raise PassError(self.name, "found no plain scaled_dot_product_attention node to rewrite "
                            f"({skipped} with a mask, dropout or is_causal); a model whose attention is "
                            "spelled out as matmuls (fused_attn=False) has none")
        note = f"{rewritten} attention nodes in bf16" + (f", {skipped} left in FP32 (mask/dropout/causal)" if skipped else "")
        return PassResult(gm, modified=True, notes=note)
