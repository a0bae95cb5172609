"""Fake-quant graph modules: the float reference of what the INT8 backends compute.

``QuantLinear`` quantizes its input per tensor (asymmetric, uint; per token at run time with
``act_granularity="token"``) and its weight per output channel (symmetric, int), then runs a float
linear on the dequantized values; with ``act_bits=None`` (a weight-only layer) the input stays float. ``ActQuant`` quantizes one
activation (the operands of the attention matmuls). Both have three modes:

- ``observe``: float forward, observers record the input range (per step group if configured);
- ``quant``: fake-quantized forward;
- ``compare``: float forward, but also accumulates the relative L2 error that quantizing this one
  op adds, for the per-layer sensitivity report;
- ``hessian`` (sequential GPTQ, linears only): float forward, while the GPTQ Hessian gathers the
  input as the INT8 GEMM will see it (on the activation grid);
- ``target`` (sequential GPTQ with ``target="float"``, linears only): float forward, keeping the
  float model's input batch by batch for the ``hessian`` pass that follows;
- ``soft`` (block reconstruction, :mod:`~qc_compiler.quant.brecq`): fake-quantized forward that
  gradients pass: activations through a straight-through estimator (and, when learned, to their
  step sizes by LSQ's; with QDrop, a random share of elements float), weights on their learned soft
  rounding.

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

import math
from collections import deque
from dataclasses import replace
from typing import Deque, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CalibrationError
from ..step import StepAware
from .balance import BalanceConfig, ChannelStats, balance_scales
from .brecq import codes as brecq_codes, init_v, lsq_fake_quantize, soft_weight
from .config import LayerQuant
from .gptq import GPTQConfig, HessianAccumulator, float_target_weight, gptq_codes
from .observers import make_observer
from .qparams import QParams, dequantize, fake_quantize, fake_quantize_per_token, qrange, quantize
from .spec import QuantizedActSpec, QuantizedLinearSpec, step_group

__all__ = ["QuantLinear", "ActQuant", "set_mode"]

LOG_STEP_BOUND = math.log(16.0)  # how far block reconstruction may move an activation step size
MODES = ("stats", "observe", "quant", "compare", "float", "hessian", "target", "soft")


class _ActRanges(StepAware, nn.Module):
    """Per-group activation observers and their qparams; the last slot is the all-steps range."""

    def __init__(self, path: str, spec: LayerQuant, num_groups: int, num_steps: int):
        super().__init__()
        self.path, self.spec, self.num_groups, self.num_steps = path, spec, num_groups, max(1, num_steps)
        self.mode = "observe"
        self.observers = [] if self.weight_only or self.per_token else [
            make_observer(spec.act_observer, spec.act_bits, symmetric=False) for _ in range(num_groups + 1)]
        self.register_buffer("a_scale", torch.ones(num_groups + 1))
        self.register_buffer("a_zero", torch.zeros(num_groups + 1, dtype=torch.int32))
        self.register_buffer("a_lo", torch.zeros(num_groups + 1))
        self.register_buffer("a_hi", torch.zeros(num_groups + 1))
        self.err_sq, self.ref_sq = 0.0, 0.0
        # soft mode (block reconstruction): the learned log step multiplier, QDrop's rate and generator
        self._log_a: Optional[torch.Tensor] = None
        self._drop, self._drop_gen = 0.0, None

    @property
    def weight_only(self) -> bool:
        """True when the input is not quantized (``act_bits=None``)."""
        return self.spec.act_bits is None

    @property
    def per_token(self) -> bool:
        """True when the input is quantized per token at run time (no calibrated range)."""
        return self.spec.per_token  # LayerQuant refuses per token on a weight-only layer

    @property
    def uses_step(self) -> bool:  # one range for every step (or per token): the output does not depend on it
        return self.num_groups > 1 and not self.per_token

    def current_step(self) -> int:
        """The sampling step the step state holds, or -1 when none is known."""
        return self.step_state.step if self.step_state is not None else -1

    def group(self) -> int:
        return step_group(self.current_step(), self.num_groups, self.num_steps)

    def act_spec(self) -> Optional[QuantizedActSpec]:
        """The activation quantization as backends see it (None for a weight-only layer)."""
        if self.weight_only:
            return None
        return QuantizedActSpec(self.path, self.spec.act_bits, self.a_scale.detach().clone(),
                                self.a_zero.detach().clone(), self.num_steps, per_token=self.per_token)

    def observe(self, x: torch.Tensor) -> None:
        if self.weight_only or self.per_token:
            return
        self.observers[self.num_groups].update(x)
        if self.num_groups > 1:
            g = self.group()
            if g < self.num_groups:
                self.observers[g].update(x)

    def act_qparams(self) -> QParams:
        if self.per_token:
            raise CalibrationError(f"{self.path}: per-token activations have no calibrated scale")
        g = self.group()
        return QParams(self.a_scale[g], self.a_zero[g], self.spec.act_bits, symmetric=False)

    def finish_activations(self) -> None:
        """Turn observations into qparams; groups that saw nothing take the all-steps range."""
        if self.weight_only or self.per_token:
            return
        overall = self.observers[self.num_groups].compute()
        for g, obs in enumerate(self.observers):
            qp = obs.compute() if obs.lo is not None else overall
            self.a_scale[g], self.a_zero[g] = qp.scale, qp.zero_point
        self._set_range()
        self.observers = []  # free the samples

    def _set_range(self) -> None:
        """a_lo and a_hi from a_scale and a_zero (the grid's ends, in float)."""
        qmin, qmax = qrange(self.spec.act_bits, symmetric=False)
        self.a_lo.copy_((qmin - self.a_zero) * self.a_scale)
        self.a_hi.copy_((qmax - self.a_zero) * self.a_scale)

    def set_act_scale(self, scale: torch.Tensor) -> None:
        """Replace the step sizes (a reconstruction that measured worse goes back to the observers')."""
        self.a_scale.copy_(scale)
        if not self.weight_only and not self.per_token:  # per token: a_scale is a placeholder
            self._set_range()

    def begin_soft_acts(self, learn_scale: bool, drop: float, generator: torch.Generator) -> Optional[torch.Tensor]:
        """Block reconstruction's activation options for soft mode: with ``learn_scale``, returns a log
        multiplier of every group's step size to optimise (None for a weight-only layer); ``drop`` is
        QDrop's probability that an element stays float, drawn from ``generator``."""
        self._drop, self._drop_gen = drop, generator
        self._log_a = None
        if learn_scale and not self.weight_only and not self.per_token:
            self._log_a = torch.zeros_like(self.a_scale, requires_grad=True)
        return self._log_a

    def end_soft_acts(self) -> None:
        """Keep the learned step sizes (a_scale times the multiplier; the zero points stay)."""
        if self._log_a is not None:
            with torch.no_grad():
                self.a_scale.mul_(self._step_multiplier().detach())
                self._set_range()
        self._log_a, self._drop, self._drop_gen = None, 0.0, None

    def _step_multiplier(self) -> torch.Tensor:
        """exp of the learned log multiplier, kept within [1/16, 16] of the observer's step: beyond
        that the grid covers a 16th of the observed range, or spends one level on all of it."""
        return self._log_a.clamp(-LOG_STEP_BOUND, LOG_STEP_BOUND).exp()

    def _soft(self, x: torch.Tensor, xq: torch.Tensor, channel_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Soft mode: ``xq`` (x fake-quantized, in the grid's units: x / s when balanced) as the value,
        gradients to x straight through, to the step size by LSQ's estimator when it is learned (then
        the value is recomputed on the learned step); with QDrop, some elements are x (/ s) itself."""
        xs = x if channel_scale is None else x / channel_scale.to(x.dtype)
        if self._log_a is not None:
            g = self.group()
            xq = lsq_fake_quantize(xs, self.a_scale[g] * self._step_multiplier()[g], self.a_zero[g], self.spec.act_bits)
            out = xq.to(x.dtype) + (xs - xs.detach())
        elif channel_scale is None:
            out = x + (xq - x).detach()
        else:
            out = xq.detach() + (xs - xs.detach())
        if self._drop:
            keep = torch.rand(x.shape, generator=self._drop_gen) < self._drop
            out = torch.where(keep, xs, out)
        return out

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
    """A linear layer with fake-quantized input (per tensor) and weight (per output channel).

    ``gptq``: a :class:`GPTQConfig` to choose the weight codes by GPTQ against the calibration inputs
    (their Hessian is gathered while observing); None rounds to nearest. GPTQ's codes are fitted state.

    ``balance``: a :class:`BalanceConfig` to balance salience per input channel (s, fitted state
    ``in_scale``, chosen in a ``stats`` pass before observing): the weight quantized is W s, the input
    is quantized as round(x / (s a)) + z. Only for layers whose input is quantized.

    ``brecq``: the codes are learned by block reconstruction (the Quantize pass runs it, through
    :meth:`begin_soft` and :meth:`end_soft`); until then they are round to nearest's. Fitted state.

    ``low_rank``: SVDQuant's low-rank float branch, rank r > 0. The top r singular directions of the
    (balanced) weight stay in float, y = Q(x) Q(W - U V)^T + (x V^T) U^T, so the 4-bit grid only
    has to hold the residual, whose range is smaller. ``lr_up`` (N, r) and ``lr_down`` (r, K), with
    1/s folded into ``lr_down`` so the branch reads the raw input, are fitted state.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], path: str, spec: LayerQuant,
                 *, num_groups: int, num_steps: int, gptq: Optional[GPTQConfig] = None,
                 balance: Optional[BalanceConfig] = None, low_rank: int = 0, brecq: bool = False):
        super().__init__(path, spec, num_groups, num_steps)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        out = weight.shape[0]
        self.register_buffer("w_scale", torch.ones(out))
        self.register_buffer("w_fq", torch.empty(0))
        self.gptq = gptq
        if gptq is not None and brecq:
            raise ValueError(f"{path}: GPTQ and block reconstruction both choose the codes; take one")
        self.brecq = brecq
        self._v: Optional[torch.Tensor] = None
        self._soft_base: Optional[torch.Tensor] = None
        if gptq is not None or brecq:
            self.register_buffer("w_codes", torch.zeros(weight.shape, dtype=torch.int8))
        if gptq is not None:
            self._hessian: Optional[HessianAccumulator] = HessianAccumulator(weight.shape[1])
        if balance is not None and spec.act_bits is None:
            raise ValueError(f"{path}: balancing needs a quantized input; this layer is weight-only")
        self.balance = balance
        if balance is not None:
            self.register_buffer("in_scale", torch.ones(weight.shape[1]))
            self._stats: Optional[ChannelStats] = ChannelStats(weight.shape[1], balance.max_rows)
        if not 0 <= low_rank <= min(weight.shape):
            raise ValueError(f"{path}: low_rank must be in 0..{min(weight.shape)}, got {low_rank}")
        self.low_rank = low_rank
        if low_rank:
            self.register_buffer("lr_up", torch.zeros(weight.shape[0], low_rank))
            self.register_buffer("lr_down", torch.zeros(low_rank, weight.shape[1]))

    def weight_qparams(self) -> QParams:
        return QParams(self.w_scale, torch.zeros_like(self.w_scale, dtype=torch.int32), self.spec.weight_bits,
                       symmetric=True, axis=0)

    def fit_balance(self) -> None:
        """Choose s from what the ``stats`` pass saw (called once, before observing)."""
        self.in_scale.copy_(balance_scales(self._stats, self.weight, self.balance, act_bits=self.spec.act_bits,
                                           weight_bits=self.spec.weight_bits,
                                           weight_observer=self.spec.weight_observer, per_token=self.per_token))
        self._stats = None

    def _grid_weight(self) -> torch.Tensor:
        """The weight that is quantized: (W - U V) s, with s when balanced (it folds into the weights)
        and U V the low-rank branch's part when there is one."""
        w = self.weight.detach()
        if self.low_rank:
            w = w - (self.lr_up @ self.lr_down).to(w.dtype)
        return w * self.in_scale.to(w.dtype) if self.balance is not None else w

    def _fit_low_rank(self) -> None:
        """The top singular directions of the balanced weight W s = U S V^T go to the float branch:
        lr_up = U_r S_r, lr_down = V_r^T / s (so the branch reads x, not x / s)."""
        w = self.weight.detach().double()
        s = self.in_scale.double() if self.balance is not None else torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
        u, sv, vh = torch.linalg.svd(w * s, full_matrices=False)
        r = self.low_rank
        self.lr_up.copy_((u[:, :r] * sv[:r]).float())
        self.lr_down.copy_((vh[:r] / s).float())

    def finish_calibration(self) -> None:
        if self.low_rank:
            self._fit_low_rank()
        w = self._grid_weight()
        obs = make_observer(self.spec.weight_observer, self.spec.weight_bits, symmetric=True, axis=0)
        obs.update(w)
        self.w_scale.copy_(obs.compute().scale)
        self.finish_activations()
        if self.gptq is not None:  # the same grid (the observer's scales), codes chosen against the inputs
            self.w_codes.copy_(gptq_codes(w, self._hessian.hessian(), self.w_scale,
                                          self.spec.weight_bits, self.gptq))
            self._hessian = None
        if self.brecq:  # round to nearest until the reconstruction learns better
            self.w_codes.copy_(quantize(w, self.weight_qparams()).to(torch.int8))
        self._cache_weight()

    def begin_soft(self, learn_branch: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Block reconstruction: start the soft rounding V (AdaRound's init) and return what to
        optimise: V, and with ``learn_branch`` the low-rank branch's factors (else none). The weight
        the grid rounds is fixed here, so a branch that moves does not move the codes' floor and ceil."""
        self._soft_base = self._grid_weight().clone()
        self._v = init_v(self._soft_base, self.w_scale[:, None]).requires_grad_(True)
        if not learn_branch or not self.low_rank:
            return self._v, []
        return self._v, [self.lr_up.requires_grad_(True), self.lr_down.requires_grad_(True)]

    def end_soft(self) -> None:
        """Block reconstruction: keep the rounding V learned, as integer codes on the same grid."""
        self.w_codes.copy_(brecq_codes(self._soft_base, self.w_scale[:, None], self._v, self.spec.weight_bits))
        self._v = self._soft_base = None
        if self.low_rank:
            self.lr_up.requires_grad_(False)
            self.lr_down.requires_grad_(False)
        self._cache_weight()

    def set_branch(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Replace the low-rank branch's factors (a reconstruction that measured worse goes back)."""
        self.lr_up.copy_(up)
        self.lr_down.copy_(down)

    def set_codes(self, codes: torch.Tensor) -> None:
        """Replace the fitted codes (a reconstruction that measured worse goes back to its start)."""
        self.w_codes.copy_(codes)
        self._cache_weight()

    def begin_hessian(self) -> None:
        """Sequential GPTQ: start an empty Hessian, to be gathered in ``hessian`` mode (after a ``target``
        pass over the same batches when the target is the float model)."""
        self._hessian = HessianAccumulator(self.weight.shape[1])
        self._targets: Optional[Deque[torch.Tensor]] = deque() if self.gptq.target == "float" else None

    def refit_gptq(self) -> None:
        """Sequential GPTQ: choose the codes again, on the same grid, against the Hessian just gathered
        (for ``target="float"``, GPTQ of the least-squares weight W' that maps the quantized model's
        inputs onto the float model's output)."""
        w = self._grid_weight()
        h = self._hessian.hessian()
        if self._targets is not None:
            if self._targets:
                raise CalibrationError(f"{self.path}: the float and quantized calibration passes saw different batches")
            w = float_target_weight(w, self._hessian.cross(), h, self.gptq.damp)
        self.w_codes.copy_(gptq_codes(w, h, self.w_scale, self.spec.weight_bits, self.gptq))
        self._hessian = self._targets = None
        self._cache_weight()

    def _balanced(self, x: torch.Tensor) -> torch.Tensor:
        """x / s when balanced (the input the grid weight W s multiplies), else x."""
        return x / self.in_scale.to(x.dtype) if self.balance is not None else x

    def weight_codes(self) -> torch.Tensor:
        """The int8 weight codes (N, K): GPTQ's where fitted so, else round to nearest (of W s when balanced)."""
        if self.gptq is not None or self.brecq:
            return self.w_codes
        return quantize(self._grid_weight(), self.weight_qparams()).to(torch.int8)

    def _cache_weight(self) -> None:
        self.w_fq = dequantize(self.weight_codes(), self.weight_qparams()).to(self.weight.dtype)

    def fitted_state(self) -> Dict[str, torch.Tensor]:
        gptq = {"w_codes": self.w_codes} if self.gptq is not None or self.brecq else {}
        balance = {"in_scale": self.in_scale} if self.balance is not None else {}
        low_rank = {"lr_up": self.lr_up, "lr_down": self.lr_down} if self.low_rank else {}
        return {**super().fitted_state(), "w_scale": self.w_scale, **gptq, **balance, **low_rank}

    def export_spec(self) -> QuantizedLinearSpec:
        codes = self.weight_codes().clone()  # (N, K)
        bias = None if self.bias is None else self.bias.detach().clone()
        act = self.act_spec()
        if self.balance is not None:
            act = replace(act, channel_scale=self.in_scale.detach().clone().float())
        lr = (self.lr_up.detach().clone(), self.lr_down.detach().clone()) if self.low_rank else None
        return QuantizedLinearSpec(self.path, self.spec.weight_bits, codes, self.w_scale.detach().clone().float(),
                                   bias, act, low_rank=lr)

    def load_fitted(self, state: Dict[str, torch.Tensor]) -> None:
        super().load_fitted(state)
        self._hessian = self._stats = None
        self._cache_weight()

    def _quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the INT8 GEMM sees it (dequantized): x / s on the activation grid when balanced."""
        if self.weight_only:
            return x
        if self.per_token:  # each token's own range, of x / s when balanced (in those units, as below),
            # divided in float32 as the INT8 kernel does, so half-precision models get the same codes
            xs = x.float() / self.in_scale if self.balance is not None else x
            return fake_quantize_per_token(xs, self.spec.act_bits).to(x.dtype)
        qp = self.act_qparams()
        if self.balance is None:
            return fake_quantize(x, qp)
        # round(x / (s a)) + z: one per-channel scale, exactly as the INT8 backends quantize it
        codes = quantize(x, QParams(self.in_scale * qp.scale, qp.zero_point.expand_as(self.in_scale), qp.bits,
                                    symmetric=False, axis=-1))
        return ((codes.float() - qp.zero_point) * qp.scale).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "stats":
            if self.balance is not None:
                self._stats.update(x, self.current_step())
            return F.linear(x, self.weight, self.bias)
        if self.mode == "observe":
            xb = self._balanced(x)
            self.observe(xb)
            if self.gptq is not None:
                self._hessian.update(xb)
        if self.mode == "target":  # the float model's input, for the hessian pass over the same batches
            self._targets.append(self._balanced(x).detach().clone())
        if self.mode == "hessian":  # what the GEMM multiplies: x (/ s when balanced) on the activation grid
            target = None
            if self._targets is not None:
                if not self._targets:
                    raise CalibrationError(f"{self.path}: the quantized calibration pass saw more batches than the float one")
                target = self._targets.popleft()
            self._hessian.update(self._quantized_input(x), target)
        if self.mode in ("observe", "float", "hessian", "target"):
            return F.linear(x, self.weight, self.bias)
        if self.mode == "soft":
            xq = x if self.weight_only else self._soft(x, self._quantized_input(x), self.in_scale if self.balance is not None else None)
            weight = soft_weight(self._soft_base, self.w_scale[:, None], self._v, self.spec.weight_bits)
            out = F.linear(xq, weight, self.bias)
        else:
            out = F.linear(self._quantized_input(x), self.w_fq, self.bias)
        if self.low_rank:
            out = out + F.linear(F.linear(x, self.lr_down.to(x.dtype)), self.lr_up.to(x.dtype))
        if self.mode == "compare":
            ref = F.linear(x, self.weight, self.bias)
            self._track(out, ref)
            return ref
        return out

    def report_line(self) -> str:
        g = self.num_groups
        act = ("act float" if self.weight_only else "act per token" if self.per_token
               else f"act [{float(self.a_lo[g]):+.3g}, {float(self.a_hi[g]):+.3g}]")
        return (f"  {self.path:<30} W{self.spec.weight_bits}A{self.spec.act_bits or '-'}  {act}  |w|max {float(self.weight.detach().abs().max()):.3g}  "
                f"rel.err {self.rel_error:.4f}")


class ActQuant(_ActRanges):
    """Fake-quantizes one activation tensor (e.g. an operand of an attention matmul)."""

    def __init__(self, path: str, spec: LayerQuant, num_groups: int, num_steps: int):
        if spec.per_token:  # k^T's rows are channels, v's scale would vary along the sum
            raise ValueError(f"{path}: per-token ranges are for linear inputs; quantize the attention matmuls per "
                             "tensor (an override for 'op:matmul' with act_granularity='tensor') or set attn_matmuls=False")
        super().__init__(path, spec, num_groups, num_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observe(x)
        if self.mode in ("stats", "observe", "float", "hessian", "target"):
            return x
        out = fake_quantize(x, self.act_qparams())
        if self.mode == "soft":  # straight through: block reconstruction's gradients pass
            return self._soft(x, out)
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
