"""What a quantized op *is*, for whoever lowers it: a frozen spec, read through ``module.export_spec()``.

Backends never read the fields of a fake-quant module (or of each other's modules): the fake-quant
``QuantLinear``/``ActQuant`` and every lowered layer answer ``export_spec()`` with one of these, and the
torch INT8 backend and the ONNX exporter build their layers from it.

Activation ranges may differ per group of sampling steps: slot ``g`` of ``a_scale``/``a_zero`` is
group ``g``, and the last slot is the range fitted over all steps (used when no step is known).
:func:`step_group` is the one rule that picks the slot. A per-token activation (``per_token``) has no
calibrated range: each token's is taken at run time.

Example:
    >>> step_group(step=-1, num_groups=1, num_steps=50), step_group(step=30, num_groups=2, num_steps=50)
    (1, 1)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

__all__ = ["QuantizedLinearSpec", "QuantizedActSpec", "step_group"]


def step_group(step: int, num_groups: int, num_steps: int) -> int:
    """Which activation-range slot serves ``step``: its group, or the all-steps slot (``num_groups``)
    when no step is known (``step < 0``: outside a sampling run or calibration)."""
    if step < 0:
        return num_groups
    if num_groups == 1:
        return 0
    return min(num_groups - 1, step * num_groups // max(1, num_steps))


@dataclass(frozen=True)
class QuantizedActSpec:
    """One quantized activation: per-tensor uint codes, one (scale, zero) per step group + all steps."""

    path: str
    act_bits: int
    a_scale: torch.Tensor = field(compare=False)  # (groups + 1,)
    a_zero: torch.Tensor = field(compare=False)  # (groups + 1,) int32
    num_steps: int = 1
    # Salience balancing (quant/balance.py): the input is quantized as round(x / (channel_scale * a)) + z,
    # channel_scale (K,) per input channel; None: per tensor, round(x / a) + z.
    channel_scale: Optional[torch.Tensor] = field(default=None, compare=False)
    # Per token, at run time (qparams.quantize_per_token, after / channel_scale when balanced):
    # a_scale/a_zero are then placeholders, never read (act_qparams refuses).
    per_token: bool = False

    @property
    def num_groups(self) -> int:
        return int(self.a_scale.numel()) - 1

    def act_qparams(self, step: int = -1) -> Tuple[float, int]:
        if self.per_token:
            raise ValueError(f"{self.path}: per-token activations have no calibrated scale; quantize each row "
                             "with qparams.quantize_per_token")
        g = step_group(step, self.num_groups, self.num_steps)
        return float(self.a_scale[g]), int(self.a_zero[g])


@dataclass(frozen=True)
class QuantizedLinearSpec:
    """One quantized linear: int8 weight codes per output channel (symmetric), float bias, and the
    input's activation spec (None for a weight-only layer, whose input stays float). ``post_op`` is
    an elementwise op a lowering folded into the layer (``"gelu_tanh"``)."""

    path: str
    weight_bits: int
    codes: torch.Tensor = field(compare=False)  # (N, K) int8
    w_scale: torch.Tensor = field(compare=False)  # (N,) float32
    bias: Optional[torch.Tensor] = field(compare=False)  # (N,) or None
    act: Optional[QuantizedActSpec] = None
    post_op: str = "none"
    # SVDQuant's float branch, added to the INT8 GEMM's output: (lr_up (N, r), lr_down (r, K)),
    # y += (x lr_down^T) lr_up^T on the raw input x. None: no branch.
    low_rank: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, compare=False)

    @property
    def weight_only(self) -> bool:
        return self.act is None
