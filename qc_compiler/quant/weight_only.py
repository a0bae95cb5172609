"""The weight-only INT8 GEMM: a float input against int8 weight codes, on the CPU's INT8 instructions.

Why: a weight-only layer (the conditioning linears: DiT's adaLN modulation) runs on one row per
sample, so its GEMM is bound by reading the weight. A float GEMM reads four bytes per weight (a
dequantized copy); this one reads the int8 codes, one byte. DiT-B/2's twelve adaLN layers at batch 8,
2 threads, Zen 4, compiled: 22.1 ms as float GEMMs, 6.2 ms here (``benchmarks/kernel_probe.py``).

The input is not quantized in any sense that changes the layer: each row is written exactly as three
int8 rows, a coarse one and two levels of residual, ``x = s (q1 + q2 / 254 + q3 / 254^2)`` with
``s = max|x| / 127``: to 2^-23 of the row's range, float32's own precision. All three go through one
``torch._int_mm`` (one read of the weight; int32 sums are exact), so the layer computes what a float
GEMM on its dequantized codes does, to float rounding (3e-7 relative; two levels were 2^-16 and enough
to flip the odd activation code downstream, which set the torch and ONNX backends apart).

Only where the CPU's INT8 GEMM accumulates in int32 (VNNI or AMX; ``registry.cpu_has_vnni``): without
it, pairs of u8 x s8 products saturate at int16, so the backends keep the float GEMM there, and on CUDA,
where ``_int_mm`` wants more than 16 rows and bf16 GEMMs are not the bottleneck.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["LEVELS", "RESIDUAL_STEPS", "split_int8_rows", "weight_only_int8_linear"]

# each level codes the residual of the levels before it, which lies in [-step/2, step/2], on 2 * 127 steps
RESIDUAL_STEPS = 254.0
LEVELS = 3  # 8 + 2 x 7.99 bits: 2^-23 of each row's range, float32's own precision


def split_int8_rows(x: torch.Tensor):
    """(codes, scale) of ``x`` (M, K) float: codes (LEVELS * M, K) int8, the coarse rows, then each level's
    residual rows, and scale (M, 1) float32 with ``x ~= scale * sum_l codes[l M:(l + 1) M] / 254^l``. A row
    with a NaN gets a NaN scale (its codes are meaningless), so NaN reaches the output."""
    rest = x.float()
    scale = rest.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    levels, step = [], scale
    for _ in range(LEVELS):
        codes = torch.round(rest / step).clamp_(-127, 127)
        levels.append(codes)
        rest = rest - codes * step
        step = step / RESIDUAL_STEPS
    return torch.cat(levels).to(torch.int8), scale


def weight_only_int8_linear(x: torch.Tensor, w_codes_t: torch.Tensor, w_scale: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear(x, w_codes * w_scale[:, None], bias)`` for ``x`` (..., K) float and ``w_codes_t`` (K, N)
    int8 (the codes transposed), with one INT8 GEMM; returns x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    codes, scale = split_int8_rows(x.reshape(-1, k))
    m = scale.shape[0]
    acc = torch._int_mm(codes, w_codes_t).float()  # (LEVELS M, N), exact in int32
    out = acc[(LEVELS - 1) * m:]
    for level in range(LEVELS - 2, -1, -1):  # Horner, finest level first
        out = acc[level * m:(level + 1) * m] + out * (1.0 / RESIDUAL_STEPS)
    out = out * scale * w_scale
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, -1).to(x.dtype)
