"""``AttentionPrecision``: attention's softmax and two matmuls in bf16 (or fp16); nothing else changes.

Why: once W8A8 puts the token linears on INT8 GEMMs, attention is the largest cost left in float. Through
Inductor on DiT-B/2 (batch 8, 2 threads, Zen 4), ``scaled_dot_product_attention`` in FP32 took 24% of
a forward and the INT8 GEMMs 65%; where INT8 GEMMs are several times faster (AMX), FP32 attention is the
bigger part. PyTorch's CPU flash attention takes bf16 (oneDNN's bf16 GEMMs under it: AMX-BF16 or
AVX-512 BF16), and on CUDA it is the usual flash kernel. The numerics are those of compiled bf16's
attention, which the speed tables measure as the lowest-error fast baseline.

Each ``scaled_dot_product_attention`` call in the graph (cache regions included) becomes
:func:`qc_compiler.specs.low_precision_attention`: q, k, v (and an additive float mask) cast to the
dtype, the output cast back. ``kernel`` says how it runs: ``"sdpa"``, PyTorch's fused kernel, or
``"matmul"``, two matmuls around a softmax (every score at once up to 32 MiB a call, which Inductor
fuses best, and one cache-sized block at a time past it: :mod:`qc_compiler.blocked_attention`). Without
AMX, PyTorch's CPU flash attention gains nothing from bf16 while oneDNN's bf16 GEMMs use AVX-512 BF16,
so the matmuls beat the fused kernel in FP32 and in bf16, at DiT-B/2's 256 tokens and at an SD3 image's
4096 (``benchmarks/kernel_probe.py``; docs/RESULTS.md, "Blocked bf16 attention"); with AMX (and on CUDA)
the fused kernel runs on the bf16 tiles. ``"auto"`` (the default) picks ``"matmul"`` on a CPU without
AMX-BF16 and ``"sdpa"`` elsewhere, and the pass's notes say which. The pass fits nothing, so its place in the pass list does not matter; it refuses a
graph with no such call (a model that spells attention out as matmuls), rather than doing nothing
silently.

The ONNX backend and ``export_onnx`` refuse it: onnxruntime's CPU provider has no bf16 attention.

Example:
    >>> import qc_compiler as qc
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> fast = qc.compile(model, passes=[AttentionPrecision(dtype="bf16")], sampler=qc.DDPM(steps=4))
    >>> fast.records[0].notes["calls"]     # one call per block
    2
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..cpu import cpu_has_amx_bf16
from ..diffusion.samplers import model_device
from ..errors import PassError
from ..graph import iter_graph_modules
from ..options import config_or_keywords
from ..pipeline import Pass, PassResult, register_pass
from ..specs import AttentionConfig, low_precision_attention

__all__ = ["AttentionPrecision"]

# how a captured graph spells attention: the functional (symbolic trace) or the ATen op (export)
SDPA_TARGETS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


@register_pass
class AttentionPrecision(Pass):
    """Run every ``scaled_dot_product_attention`` in ``dtype`` (see module docstring).

    Options come as ``config=AttentionConfig(...)`` or as its fields by keyword, not both.
    """

    name = "attention_precision"

    def __init__(self, config: Optional[AttentionConfig] = None, **options: Any):
        self.config = config_or_keywords(self.name, AttentionConfig, config, options)

    def options(self) -> Dict[str, Any]:
        return self.config.to_json()

    def kernel(self, gm: fx.GraphModule) -> str:
        """The kernel this graph's attention runs on (``"auto"`` resolved for the model's device and CPU)."""
        if self.config.kernel != "auto":
            return self.config.kernel
        return "matmul" if model_device(gm).type == "cpu" and not cpu_has_amx_bf16() else "sdpa"

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        calls, kernel = 0, self.kernel(gm)
        for _, module in iter_graph_modules(gm):  # the root graph and each cache region's
            found = [n for n in module.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
            for node in found:
                node.target = low_precision_attention
                node.kwargs = {**node.kwargs, "dtype": self.config.dtype, "kernel": kernel}
            if found:
                module.recompile()
            calls += len(found)
        if not calls:
            raise PassError(self.name, "found no scaled_dot_product_attention call in the graph (this model "
                                       "spells attention out as matmuls); drop the pass, or build the model with "
                                       "fused attention")
        return PassResult(gm, modified=True, notes={"calls": calls, "dtype": self.config.dtype, "kernel": kernel})
