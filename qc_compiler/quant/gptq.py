"""GPTQ weight rounding: choose each weight code knowing what the layer's inputs look like.

Round-to-nearest picks every code on its own. GPTQ (Frantar et al., 2023) quantizes one input column
at a time and moves the rounding error of that column onto the columns not yet quantized, weighted by
the inverse Hessian of the layer's output error, H = 2 X^T X over calibration inputs X. Columns the
inputs rarely use absorb the error of those they use a lot, so the layer's *output* error drops even
where the *weight* error grows. With 4-bit weights that is most of the difference between a usable
model and a broken one.

What is fixed here, and why:
- The per-output-channel scales come from the layer's weight observer (MSE-searched clipping) before
  GPTQ runs, so codes stay ``clamp(round(w / s), -qmax, qmax)`` on the same grid every backend lowers.
- ``damp`` adds that fraction of H's mean diagonal before the factorisation, as the paper does: a
  calibration set rarely spans every input direction.
- ``act_order`` quantizes the columns with the largest Hessian diagonal first (the paper's "act-order"),
  so the columns that matter most are rounded while there is the most freedom left to compensate.
- ``block_size`` columns are updated lazily, then the rest of the matrix once per block: the same
  result as column by column, in fewer, larger matmuls.
- ``sequential`` gathers each layer's Hessian from the inputs it will see at run time: every layer
  that runs before it already quantized (its GPTQ codes fitted), its own input on the activation
  grid. That is the paper's order (one layer after another through the network), as against one
  float pass for every layer at once; the quantize pass runs it (one calibration pass per layer).
- ``target="float"`` (sequential only) fits the layer to the *float model's* output, not to its own
  weights applied to the input it gets: min ||X_f W^T - X_q Q^T||, with X_f the float model's input
  to the layer and X_q the quantized model's, so each layer also corrects the error of the layers
  before it (the asymmetric calibration of GPTAQ, Li et al., 2025). Undamped, it splits exactly into
  two parts: the least-squares weight W' = W C H^-1 (C = X_f^T X_q, H = X_q^T X_q), whose residual
  is orthogonal to X_q, and GPTQ of W' against H. We damp W' towards W with GPTQ's own damping
  (:func:`float_target_weight`). It costs one more calibration pass per layer, which holds that
  layer's float inputs for the calibration set in memory.

All factorisations are torch.linalg's (Cholesky); there is nothing hand-written here.

Example:
    >>> _ = torch.manual_seed(0); w = torch.randn(8, 16); x = torch.randn(256, 16) * torch.linspace(0.1, 3, 16)
    >>> h = HessianAccumulator(16); h.update(x)
    >>> scale = w.abs().amax(dim=1) / 7
    >>> codes = gptq_codes(w, h.hessian(), scale, bits=4)
    >>> rtn = torch.clamp(torch.round(w / scale[:, None]), -7, 7)
    >>> err = lambda q: float(((x @ (q * scale[:, None]).T - x @ w.T) ** 2).mean())
    >>> err(codes.float()) < err(rtn)
    True
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..errors import CalibrationError
from ..options import check_bool, check_choice, check_float, check_int
from .qparams import qrange

__all__ = ["GPTQConfig", "HessianAccumulator", "gptq_codes", "float_target_weight"]

#: What each layer's codes are fitted to: its own weights on the inputs it gets, or the float model.
TARGETS = ("quantized", "float")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's options (see the module docstring). Checked when built."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    sequential: bool = False
    target: str = "quantized"

    def __post_init__(self) -> None:
        check_float("damp", self.damp, lo=0.0, hi=1.0, lo_open=True)
        check_int("block_size", self.block_size, lo=1)
        check_bool("act_order", self.act_order)
        check_bool("sequential", self.sequential)
        check_choice("target", self.target, TARGETS)
        if self.target == "float" and not self.sequential:
            raise ValueError("GPTQ target='float' needs sequential=True: the quantized model's inputs exist "
                             "only once the layers before are quantized")

    def options(self) -> dict:
        """The fields as saved; ``sequential`` and ``target`` only when not their defaults, so artefacts
        saved before them read the same."""
        out = asdict(self)
        for name, default in (("sequential", False), ("target", "quantized")):
            if out[name] == default:
                del out[name]
        return out


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over the rows of every input seen (the input's last axis is K).
    With ``target`` given to :meth:`update` (the float model's input for the same rows), it also
    gathers C = 2/n * sum x_target x^T for ``target="float"``."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.c: Optional[torch.Tensor] = None
        self.rows = 0

    def update(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        self.h += flat.T @ flat
        if target is not None:
            if target.shape != x.shape:
                raise CalibrationError(f"GPTQ: the float model's input {tuple(target.shape)} does not match the "
                                       f"quantized model's {tuple(x.shape)}; the calibration passes differ")
            self.c = (self.c if self.c is not None else torch.zeros_like(self.h))
            self.c += target.detach().reshape(-1, x.shape[-1]).double().T @ flat
        self.rows += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise CalibrationError("GPTQ saw no calibration input: the calibration set never reached this layer")
        return (2.0 / self.rows) * self.h

    def cross(self) -> torch.Tensor:
        if self.c is None or self.rows == 0:
            raise CalibrationError("GPTQ target='float' saw no float inputs for this layer")
        return (2.0 / self.rows) * self.c


def _damping(h: torch.Tensor, damp: float) -> torch.Tensor:
    """damp * mean diag(H) * I: the paper's dampening, shared by GPTQ and the float-target weight."""
    return damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def float_target_weight(weight: torch.Tensor, cross: torch.Tensor, hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """W' = W (C + d I)(H + d I)^-1, d = damp * mean diag(H): the weight that, applied to the quantized
    model's inputs X_q, best reproduces W applied to the float model's X_f (C = X_f^T X_q,
    H = X_q^T X_q), kept near W by a ridge of GPTQ's own damping. It is the minimiser of
    ||X_f W^T - X_q W'^T||^2 + d' ||W' - W||^2, so where the inputs agree (X_q = X_f) W' = W exactly."""
    h = hessian.double()
    eye = _damping(h, damp)
    w = weight.detach().double()
    # W' (H + d I) = W (C + d I), solved as (H + d I) W'^T = (C + d I)^T W^T (H symmetric)
    return torch.linalg.solve(h + eye, (cross.double() + eye).T @ w.T).T.to(weight.dtype)


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: int,
               config: GPTQConfig = GPTQConfig()) -> torch.Tensor:
    """Symmetric integer codes (int8, shape of ``weight``) for ``weight`` (N, K) on the per-row grid
    ``scale`` (N,), chosen by GPTQ against ``hessian`` (K, K)."""
    n, k = weight.shape
    if hessian.shape != (k, k) or scale.shape != (n,):
        raise ValueError(f"GPTQ: weight {tuple(weight.shape)} needs a ({k}, {k}) Hessian and ({n},) scales, "
                         f"got {tuple(hessian.shape)} and {tuple(scale.shape)}")
    qmin, qmax = qrange(bits, symmetric=True)
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    s = scale.detach().double().unsqueeze(1)
    dead = torch.diagonal(h) == 0  # inputs never seen: their weights cannot matter, code 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if config.act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += _damping(h, config.damp)
    try:
        # The upper Cholesky factor of H^-1: row i holds how column i's error spreads to columns > i.
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise CalibrationError(f"GPTQ: the calibration Hessian is not positive definite even with damp="
                               f"{config.damp}; raise damp or the calibration set size") from e
    codes = torch.zeros_like(w)
    for lo in range(0, k, config.block_size):
        hi = min(lo + config.block_size, k)
        block, errors, hblock = w[:, lo:hi].clone(), torch.zeros(n, hi - lo, dtype=w.dtype), hinv[lo:hi, lo:hi]
        for i in range(hi - lo):
            q = torch.clamp(torch.round(block[:, i:i + 1] / s), qmin, qmax)
            codes[:, lo + i] = q.squeeze(1)
            err = (block[:, i:i + 1] - q * s) / hblock[i, i]
            block[:, i:] -= err @ hblock[i:i + 1, i:]
            errors[:, i:i + 1] = err
        w[:, hi:] -= errors @ hinv[lo:hi, hi:]  # the lazy update of every column after the block
    return codes[:, torch.argsort(perm)].to(torch.int8)
