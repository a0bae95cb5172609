"""The weight-only INT8 GEMM: a float input against int8 weight codes, on the CPU's INT8 instructions.

Why: a weight-only layer (the conditioning linears: DiT's adaLN modulation) runs on one row per
sample, so its GEMM is bound by reading the weight. A float GEMM reads four bytes per weight (a
dequantized copy); this one reads the int8 codes, one byte. DiT-B/2's twelve adaLN layers at batch 8,
2 threads, Zen 4: 19 ms as float GEMMs, about 4 ms here (docs/RESULTS.md).

The input is not quantized in any sense that changes the layer: each row is written exactly enough as
two int8 rows, a coarse one and its residual, ``x = s (q1 + q2 / 254)`` with ``s = max|x| / 127``, so
the error of the input is at most ``max|x| / 64516`` per row (2^-16 of its range, finer than bf16),
and both rows go through one ``torch._int_mm`` (one read of the weight). The layer's numerics stay
those of its fake-quant reference, int8 weights and a float input, to about 1e-5 relative.

Only where the CPU's INT8 GEMM accumulates in int32 (VNNI or AMX; ``registry.cpu_has_vnni``): without
it, pairs of u8 x s8 products saturate at int16, so the backends keep the float GEMM there, and on CUDA,
where ``_int_mm`` wants more than 16 rows and bf16 GEMMs are not the bottleneck.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["RESIDUAL_STEPS", "split_int8_rows", "weight_only_int8_linear"]

# q2 codes the residual x - s q1, which lies in [-s/2, s/2], on 2 * 127 steps of s / 254
RESIDUAL_STEPS = 254.0


def split_int8_rows(x: torch.Tensor):
    """(codes, scale) of ``x`` (M, K) float: codes (2M, K) int8, the coarse rows then the residual rows,
    and scale (M, 1) float32 with ``x ~= scale * (codes[:M] + codes[M:] / 254)``. A row with a NaN gets a
    NaN scale (its codes are meaningless), so NaN reaches the output."""
    xf = x.float()
    scale = xf.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    coarse = torch.round(xf / scale)  # |.| <= 127
    fine = torch.round((xf - coarse * scale) * (RESIDUAL_STEPS / scale)).clamp_(-127, 127)
    return torch.cat([coarse, fine]).to(torch.int8), scale


def weight_only_int8_linear(x: torch.Tensor, w_codes_t: torch.Tensor, w_scale: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear(x, w_codes * w_scale[:, None], bias)`` for ``x`` (..., K) float and ``w_codes_t`` (K, N)
    int8 (the codes transposed), with one INT8 GEMM; returns x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    codes, scale = split_int8_rows(x.reshape(-1, k))
    m = scale.shape[0]
    acc = torch._int_mm(codes, w_codes_t).float()  # (2M, N), exact in int32
    out = (acc[:m] + acc[m:] * (1.0 / RESIDUAL_STEPS)) * scale * w_scale
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, -1).to(x.dtype)
