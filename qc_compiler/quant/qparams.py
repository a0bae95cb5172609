"""Uniform affine quantization: parameters, quantize, dequantize, fake-quantize.

These are the reference semantics that every backend is tested against (docs/method.md section 2):

    asymmetric (activations, uint):  s = (max - min) / (2^b - 1),  z = clamp(round(-min / s), 0, 2^b - 1)
                                     q = clamp(round(x / s) + z, 0, 2^b - 1)
    symmetric (weights, int, narrow): s = max|x| / (2^(b-1) - 1), z = 0
                                     q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1)
    x_hat = s * (q - z)

Ranges are widened to include 0 so that zero (padding, ReLU/GELU outputs) is exact. Rounding is
half to even, as ``torch.round`` and ONNX ``QuantizeLinear`` both do.

Per-token (dynamic) activations take the asymmetric rule above per row of the last axis, from the
row's own min and max at run time (:func:`token_qparams`): no calibrated range, so neither the spread
across tokens nor the drift across timesteps has to fit one grid (ViDiT-Q's choice for DiTs).

Example:
    >>> qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), bits=8, symmetric=False)
    >>> round(float(qp.scale), 6), int(qp.zero_point)
    (0.015686, 64)
    >>> fake_quantize(torch.tensor([0.5]), qp)
    tensor([0.5020])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["QParams", "check_bits", "qrange", "qparams_from_range", "quantize", "dequantize", "fake_quantize",
           "token_qparams", "quantize_per_token", "fake_quantize_per_token"]


def check_bits(bits: int, what: str = "bits") -> int:
    """Bit widths 2..8 are supported; anything else is a clear error."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"{what} must be an integer in 2..8, got {bits!r}")
    return bits


def qrange(bits: int, symmetric: bool):
    """(qmin, qmax): unsigned [0, 2^b - 1] for asymmetric, narrow signed [-(2^(b-1)-1), 2^(b-1)-1] for symmetric."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


@dataclass(frozen=True)
class QParams:
    """Scale and zero point, per tensor (0-d) or per channel along ``axis``."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool
    axis: Optional[int] = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.scale.shape != self.zero_point.shape:
            raise ValueError("scale and zero_point must have the same shape")
        if bool((self.scale <= 0).any()) or not bool(torch.isfinite(self.scale).all()):
            raise ValueError("scales must be positive and finite")

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]

    def _view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return t
        shape = [1] * like.ndim
        shape[self.axis] = -1
        return t.reshape(shape)


_EPS = 1e-12


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                       *, axis: Optional[int] = None) -> QParams:
    """QParams covering [lo, hi] (tensors of equal shape: 0-d, or one value per channel)."""
    qmin, qmax = qrange(bits, symmetric)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(_EPS)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale, zero = _asymmetric(lo, hi, qmax)
        zero = zero.to(torch.int32)
    return QParams(scale, zero, bits, symmetric, axis)


def _asymmetric(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The asymmetric rule on a range already widened to include 0: (scale, zero point), both float
    (shared by calibrated ranges and per-token ones; no check, so NaN passes through)."""
    scale = ((hi - lo) / qmax).clamp_min(_EPS)
    return scale, torch.round(-lo / scale).clamp_(0, qmax)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes (int32) of x."""
    scale, zero = qp._view(qp.scale, x), qp._view(qp.zero_point, x)
    return torch.clamp(torch.round(x / scale) + zero, qp.qmin, qp.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    scale, zero = qp._view(qp.scale, q), qp._view(qp.zero_point, q)
    return (q.float() - zero) * scale


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """dequantize(quantize(x)): what the INT8 kernels compute, in float."""
    return dequantize(quantize(x, qp), qp).to(x.dtype)


def token_qparams(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token asymmetric (scale, zero point) of ``x`` (..., K), each (..., 1) float32: every row's
    own range, widened to include 0, on the uint grid 0..2^b - 1. A row holding NaN gets a NaN scale,
    so the NaN reaches the output (no check, no sync: this runs in every forward)."""
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).clamp_(max=0.0)
    hi = xf.amax(dim=-1, keepdim=True).clamp_(min=0.0)
    return _asymmetric(lo, hi, 2 ** bits - 1)


def quantize_per_token(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of ``x`` (..., K) quantized per token: codes are float integers in
    0..2^b - 1 (cast them for a kernel), scale and zero (..., 1). The one rule every backend follows."""
    scale, zero = token_qparams(x, bits)
    codes = x.float().div(scale).round_().add_(zero).clamp_(0, 2 ** bits - 1)
    return codes, scale, zero


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """dequantize(quantize_per_token(x)): what the INT8 kernels compute for a per-token input, in float.

    >>> fake_quantize_per_token(torch.tensor([[0.0, 1.5, 3.0], [-1.0, 0.0, 2.0]]), bits=2)
    tensor([[ 0.,  2.,  3.],
            [-1.,  0.,  2.]])
    """
    codes, scale, zero = quantize_per_token(x, bits)
    return ((codes - zero) * scale).to(x.dtype)
