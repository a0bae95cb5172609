"""Block reconstruction (BRECQ): learn each weight's rounding so that a whole block's output matches float.

GPTQ chooses codes one linear at a time against that linear's own output. BRECQ (Li et al., 2021), as
Q-Diffusion and PTQ4DiT use it, chooses them for a whole transformer block at once: the codes of
every linear in the block are learned together against the float block's output, so the error of
qkv is judged after the softmax and proj, and fc1's after the GELU and fc2. The rounding is learned
as in AdaRound (Nagel et al., 2020): each weight is rounded down or up, floor(w / s) + h(V), with
h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) a rectified sigmoid, and a regulariser
sum(1 - |2 h - 1|^beta) that, as beta falls from 20 to 2, drives every h to 0 or 1. Only V is
learned: the grid (the observer's scales) and so every backend stay as they are; the result is
integer codes, as GPTQ's are.

What is fixed here, and why:
- The reconstruction target is the *float* model's block output, the input the quantized model's
  (every block before already rounded): each block also corrects what came before, as GPTQ's
  ``target="float"`` does for one layer.
- Activations are fake-quantized in the loop with a straight-through estimator, so the rounding is
  learned for the inputs the INT8 kernels will see, and gradients still reach the linears before a
  quantized matmul.
- The loss is BRECQ's: the squared error of the block's outputs, summed over the last (feature) axis
  and averaged over the rest, plus ``reg_weight`` times the regulariser summed over every weight, off
  for the first ``warmup`` fraction. The sum makes the regulariser strong: measured on the embedded
  model, the per-weight mean at the same weight leaves h soft until the end, and the final hard
  rounding then lands 2.3x further from float (first block, relative error 0.022 against 0.0097).
- V starts at the rounding to nearest's side (AdaRound's initialisation), the batches are drawn by a
  seeded generator: the same calibration set gives the same codes.

Three options for 4-bit activations, off by default (at A8 the activation grid is fine enough):
- ``act_lr`` learns each activation's step size with the rounding, as BRECQ does at A4, by LSQ's
  estimator (Esser et al., 2020; :func:`lsq_fake_quantize`). A log-multiplier per step group is
  learned, so the step stays positive; the zero point stays the observer's. The result is new
  ``a_scale`` values: the backends' formats are unchanged.
- ``drop`` is QDrop's probability (Wei et al., 2022) that an activation element stays float in the
  learning loop, so the weights are not fitted to one draw of activation rounding noise.
- ``branch_lr`` learns SVDQuant's low-rank float branch (``Quantize(low_rank=r)``) with the rounding,
  starting from the SVD's factors: the branch then absorbs what the 4-bit grid gets wrong, for the
  block's output, not just the weight's top singular directions. The residual the grid holds is
  fixed when learning starts (the codes stay floor or ceil of it).

Example:
    >>> w, s = torch.tensor([[0.26, -0.74]]), torch.tensor([[0.5]])
    >>> v = init_v(w, s)
    >>> codes(w, s, v, bits=4).tolist(), [round(x, 4) for x in soft_weight(w, s, v, bits=4)[0].tolist()]
    ([[1, -1]], [0.26, -0.74])
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..options import check_float, check_int
from .qparams import qrange

__all__ = ["BRECQConfig", "init_v", "soft_weight", "codes", "rounding_regularizer", "lsq_fake_quantize"]

_LATER = ("act_lr", "drop", "branch_lr")  # options added after the first release
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly


@dataclass(frozen=True)
class BRECQConfig:
    """BRECQ's options (see the module docstring). Checked when built."""

    iters: int = 2000  # optimiser steps per block
    lr: float = 1e-2  # Adam's learning rate on V
    reg_weight: float = 0.01
    warmup: float = 0.2  # fraction of iters with the regulariser off
    beta_start: float = 20.0
    beta_end: float = 2.0
    batch_size: int = 32  # calibration items per step
    seed: int = 0
    act_lr: float = 0.0  # Adam's learning rate on each activation step size's log (LSQ); 0: the observers' steps
    drop: float = 0.0  # QDrop: probability that an activation element stays float while learning
    branch_lr: float = 0.0  # Adam's learning rate on the low-rank float branch (needs low_rank); 0: SVD's

    def __post_init__(self) -> None:
        check_int("iters", self.iters, lo=1)
        check_float("lr", self.lr, lo=0.0, lo_open=True)
        check_float("reg_weight", self.reg_weight, lo=0.0)
        if check_float("warmup", self.warmup, lo=0.0, hi=1.0) == 1.0:
            raise ValueError("warmup must be below 1: the regulariser has to run for the codes to settle")
        check_float("beta_start", self.beta_start, lo=1.0)
        check_float("beta_end", self.beta_end, lo=1.0)
        if self.beta_end > self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must not exceed beta_start ({self.beta_start}): beta anneals down")
        check_int("batch_size", self.batch_size, lo=1)
        check_int("seed", self.seed, lo=0)
        check_float("act_lr", self.act_lr, lo=0.0)
        check_float("branch_lr", self.branch_lr, lo=0.0)
        if check_float("drop", self.drop, lo=0.0, hi=1.0) == 1.0:
            raise ValueError("drop must be below 1: with every activation float nothing learns the activation grid")

    def options(self) -> dict:
        # the 4-bit options are left out when off, so artefacts saved before they existed read the same
        return {k: v for k, v in asdict(self).items() if k not in _LATER or v}

    def beta(self, it: int) -> float:
        """The regulariser's exponent at step ``it``, or 0 while it is off (warm-up)."""
        frac = it / self.iters
        if frac < self.warmup:
            return 0.0
        return self.beta_end + (self.beta_start - self.beta_end) * (1 - (frac - self.warmup) / (1 - self.warmup))


def _h(v: torch.Tensor) -> torch.Tensor:
    """The rectified sigmoid: how far up from floor(w / s) each weight is rounded, in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """V with h(V) = w / s - floor(w / s): the soft weight starts at the float weight (inside the grid)."""
    x = weight.detach().float() / scale.float()
    rest = (x - torch.floor(x)).clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def soft_weight(weight: torch.Tensor, scale: torch.Tensor, v: torch.Tensor, bits: int) -> torch.Tensor:
    """s * clamp(floor(w / s) + h(V)): differentiable in V. ``scale`` broadcasts against ``weight``."""
    qmin, qmax = qrange(bits, symmetric=True)
    base = torch.floor(weight.detach().float() / scale.float())
    return (torch.clamp(base + _h(v), qmin, qmax) * scale.float()).to(weight.dtype)


def codes(weight: torch.Tensor, scale: torch.Tensor, v: torch.Tensor, bits: int) -> torch.Tensor:
    """The learned integer codes (int8): floor(w / s), plus one where h(V) ended above one half."""
    qmin, qmax = qrange(bits, symmetric=True)
    base = torch.floor(weight.detach().float() / scale.float())
    return torch.clamp(base + (_h(v.detach()) > 0.5).float(), qmin, qmax).to(torch.int8)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """Sum of 1 - |2 h(V) - 1|^beta: zero once every h is 0 or 1."""
    return (1 - (2 * _h(v) - 1).abs().pow(beta)).sum()


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric fake quantization (clamp(round(x / scale) + zero) - zero) * scale whose gradient
    reaches ``scale`` by LSQ's estimator: round(x / s) - x / s inside the grid, qmin - zero or
    qmax - zero where clamped (the rounding passes straight through). ``x`` gets no gradient here:
    callers add their own straight-through path for it.

    Example:
        >>> s = torch.tensor(0.5, requires_grad=True)
        >>> y = lsq_fake_quantize(torch.tensor([0.3, 0.6, 9.0]), s, torch.tensor(0), bits=4)
        >>> y.tolist(), round(torch.autograd.grad(y.sum(), s)[0].item(), 4)  # 9.0 clamps at 15: (1 - 0.6) + (1 - 1.2) + 15
        ([0.5, 0.5, 7.5], 15.2)
    """
    qmin, qmax = qrange(bits, symmetric=False)
    t = x.detach() / scale
    t = t + (torch.round(t) - t).detach()
    return (torch.clamp(t + zero, qmin, qmax) - zero) * scale
