"""Attention kernels that a pass can swap in for ``scaled_dot_product_attention``.

Once the linears run on INT8 kernels, FP32 attention is the next-largest share of a DiT forward
(21% of DiT-B/2's on our backend, docs/RESULTS.md). bfloat16 halves its cost on hardware with
bf16 dot products (AVX512-BF16, AMX, tensor cores) for a relative error of about 0.5%.

Example:
    >>> q = k = v = torch.randn(1, 2, 16, 8)
    >>> out = bf16_attention(q, k, v)
    >>> out.dtype, bool((out - F.scaled_dot_product_attention(q, k, v)).abs().max() < 0.05)
    (torch.float32, True)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.profiler import record_function

__all__ = ["bf16_attention"]


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with bfloat16 operands; returns q's dtype.

    On CUDA this is the fused kernel in bf16. On CPU, PyTorch's fused (flash) kernel gains nothing
    from bf16, while two bf16 matmuls go to oneDNN's bf16 GEMM: DiT-B/2, batch 8, 2 Zen 4 cores,
    12 layers: 171 ms FP32 fused, 194 ms bf16 fused, 134 ms bf16 matmuls (softmax in bf16, which
    PyTorch accumulates in float). Under ONNX export the FP32 fused op is written instead:
    onnxruntime's CPU provider has no bf16 MatMul.
    """
    if torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    bf = torch.bfloat16
    with record_function("qc::bf16_attention"):  # a profiler label (benchmarks/profile_forward.py); free otherwise
        if q.is_cuda:
            return F.scaled_dot_product_attention(q.to(bf), k.to(bf), v.to(bf), scale=scale).to(q.dtype)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul((q * scale).to(bf), k.to(bf).transpose(-2, -1))
        return torch.matmul(scores.softmax(dim=-1), v.to(bf)).to(q.dtype)
