"""Fake-quant graph modules: the float reference of what the INT8 backends compute.

``QuantLinear`` quantizes its input per tensor (asymmetric, uint) and its weight per output channel
(symmetric, int), then runs a float linear on the dequantized values; with ``act_bits=None`` (a
weight-only layer) the input stays float. ``ActQuant`` quantizes one
activation (the operands of the attention matmuls). Both have three modes:

- ``observe``: float forward, observers record the input range (per step group if configured);
- ``quant``: fake-quantized forward;
- ``compare``: float forward, but also accumulates the relative L2 error that quantizing this one
  op adds, for the per-layer sensitivity report.

Activation ranges may differ per group of sampling steps; the group comes from the step context
(``step_state.step``, which calibration sets too, see ``StepState.calibrating``). With no step
known, the range fitted over all steps is used. What backends lower is ``export_spec()``.

Example:
    >>> lin = torch.nn.Linear(4, 3)
    >>> q = QuantLinear(lin.weight, lin.bias, "fc", LayerQuant(), num_groups=1, num_steps=1)
    >>> _ = q(torch.randn(5, 4)); q.finish_calibration(); q.mode = "quant"
    >>> q(torch.randn(5, 4)).shape
    torch.Size([5, 3])
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..step import StepAware
from .config import LayerQuant
from .observers import make_observer
from .qparams import QParams, fake_quantize, quantize
from .spec import QuantizedActSpec, QuantizedLinearSpec, step_group

__all__ = ["QuantLinear", "ActQuant", "set_mode"]

MODES = ("observe", "quant", "compare", "float")


class _ActRanges(StepAware, nn.Module):
    """Per-group activation observers and their qparams; the last slot is the all-steps range."""

    def __init__(self, path: str, spec: LayerQuant, num_groups: int, num_steps: int):
        super().__init__()
        self.path, self.spec, self.num_groups, self.num_steps = path, spec, num_groups, max(1, num_steps)
        self.mode = "observe"
        self.observers = [] if self.weight_only else [
            make_observer(spec.act_observer, spec.act_bits, symmetric=False) for _ in range(num_groups + 1)]
        self.register_buffer("a_scale", torch.ones(num_groups + 1))
        self.register_buffer("a_zero", torch.zeros(num_groups + 1, dtype=torch.int32))
        self.register_buffer("a_lo", torch.zeros(num_groups + 1))
        self.register_buffer("a_hi", torch.zeros(num_groups + 1))
        self.err_sq, self.ref_sq = 0.0, 0.0

    @property
    def weight_only(self) -> bool:
        """True when the input is not quantized (``act_bits=None``)."""
        return self.spec.act_bits is None

    @property
    def uses_step(self) -> bool:  # one range for every step: the output does not depend on it
        return self.num_groups > 1

    def group(self) -> int:
        step = self.step_state.step if self.step_state is not None else -1
        return step_group(step, self.num_groups, self.num_steps)

    def act_spec(self) -> Optional[QuantizedActSpec]:
        """The activation quantization as backends see it (None for a weight-only layer)."""
        if self.weight_only:
            return None
        return QuantizedActSpec(self.path, self.spec.act_bits, self.a_scale.detach().clone(),
                                self.a_zero.detach().clone(), self.num_steps)

    def observe(self, x: torch.Tensor) -> None:
        if self.weight_only:
            return
        self.observers[self.num_groups].update(x)
        if self.num_groups > 1:
            g = self.group()
            if g < self.num_groups:
                self.observers[g].update(x)

    def act_qparams(self) -> QParams:
        g = self.group()
        return QParams(self.a_scale[g], self.a_zero[g], self.spec.act_bits, symmetric=False)

    def finish_activations(self) -> None:
        """Turn observations into qparams; groups that saw nothing take the all-steps range."""
        if self.weight_only:
            return
        overall = self.observers[self.num_groups].compute()
        for g, obs in enumerate(self.observers):
            qp = obs.compute() if obs.lo is not None else overall
            self.a_scale[g], self.a_zero[g] = qp.scale, qp.zero_point
            self.a_lo[g] = (qp.qmin - qp.zero_point) * qp.scale
            self.a_hi[g] = (qp.qmax - qp.zero_point) * qp.scale
        self.observers = []  # free the samples

    def fitted_state(self) -> Dict[str, torch.Tensor]:
        return {"a_scale": self.a_scale, "a_zero": self.a_zero, "a_lo": self.a_lo, "a_hi": self.a_hi}

    def load_fitted(self, state: Dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            getattr(self, k).copy_(v)
        self.observers = []

    def _track(self, q: torch.Tensor, ref: torch.Tensor) -> None:
        self.err_sq += float(((q - ref) ** 2).sum())
        self.ref_sq += float((ref ** 2).sum())

    def report_section(self) -> str:
        return self.report_line()

    @property
    def rel_error(self) -> float:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else float("nan")


class QuantLinear(_ActRanges):
    """A linear layer with fake-quantized input (per tensor) and weight (per output channel)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], path: str, spec: LayerQuant,
                 *, num_groups: int, num_steps: int):
        super().__init__(path, spec, num_groups, num_steps)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        out = weight.shape[0]
        self.register_buffer("w_scale", torch.ones(out))
        self.register_buffer("w_fq", torch.empty(0))

    def weight_qparams(self) -> QParams:
        return QParams(self.w_scale, torch.zeros_like(self.w_scale, dtype=torch.int32), self.spec.weight_bits,
                       symmetric=True, axis=0)

    def finish_calibration(self) -> None:
        obs = make_observer(self.spec.weight_observer, self.spec.weight_bits, symmetric=True, axis=0)
        obs.update(self.weight)
        self.w_scale.copy_(obs.compute().scale)
        self.finish_activations()
        self._cache_weight()

    def _cache_weight(self) -> None:
        self.w_fq = fake_quantize(self.weight.detach(), self.weight_qparams())

    def fitted_state(self) -> Dict[str, torch.Tensor]:
        return {**super().fitted_state(), "w_scale": self.w_scale}

    def export_spec(self) -> QuantizedLinearSpec:
        codes = quantize(self.weight.detach(), self.weight_qparams()).to(torch.int8)  # (N, K)
        bias = None if self.bias is None else self.bias.detach().clone()
        return QuantizedLinearSpec(self.path, self.spec.weight_bits, codes, self.w_scale.detach().clone().float(),
                                   bias, self.act_spec())

    def load_fitted(self, state: Dict[str, torch.Tensor]) -> None:
        super().load_fitted(state)
        self._cache_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observe(x)
        if self.mode in ("observe", "float"):
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x if self.weight_only else fake_quantize(x, self.act_qparams()), self.w_fq, self.bias)
        if self.mode == "compare":
            ref = F.linear(x, self.weight, self.bias)
            self._track(out, ref)
            return ref
        return out

    def report_line(self) -> str:
        g = self.num_groups
        act = "act float" if self.weight_only else f"act [{float(self.a_lo[g]):+.3g}, {float(self.a_hi[g]):+.3g}]"
        return (f"  {self.path:<30} W{self.spec.weight_bits}A{self.spec.act_bits or '-'}  {act}  |w|max {float(self.weight.detach().abs().max()):.3g}  "
                f"rel.err {self.rel_error:.4f}")


class ActQuant(_ActRanges):
    """Fake-quantizes one activation tensor (e.g. an operand of an attention matmul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observe(x)
        if self.mode in ("observe", "float"):
            return x
        out = fake_quantize(x, self.act_qparams())
        if self.mode == "compare":
            self._track(out, x)
            return x
        return out

    def finish_calibration(self) -> None:
        self.finish_activations()

    def export_spec(self) -> QuantizedActSpec:
        return self.act_spec()

    def report_line(self) -> str:
        g = self.num_groups
        return (f"  {self.path:<30} A{self.spec.act_bits}    act [{float(self.a_lo[g]):+.3g}, {float(self.a_hi[g]):+.3g}]"
                f"  rel.err {self.rel_error:.4f}")



def set_mode(modules: List[_ActRanges], mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    for m in modules:
        m.mode = mode
