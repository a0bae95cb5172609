"""``VarianceCompensation``: per-step, per-channel rescale nodes that undo variance drift (docs/method.md 5).

Quantization plus caching widens the per-sample variance of x_t late in sampling while its mean
stays put. VC rescales around the per-sample, per-channel mean:

    x_tilde = mu + K[step, c] * (x_hat - mu),   mu = spatial mean of x_hat per sample and channel

K (steps x channels) is fitted offline, training-free, from paired trajectories that start from the
same noise and labels: the FP graph without cache gives x', the current (quantized, cached) graph
gives x_hat. It is fitted step by step with the earlier factors already applied, using the spread
ratio std(x') / std(x_hat) (``form="variance"``, the default), the exact minimiser of
rQNSR(x_tilde, x')^2 + MSE(x_tilde, x') (``form="exact"``, docs/method.md 5), or the paper's printed
form (``form="paper"``). Why the default departs from the paper: the two least-squares forms are
regression slopes, so they also shrink x_tilde's variance by the squared correlation of x_hat with
x'; when trajectories decorrelate (W4A8 with a cache) they over-correct, and measured FID got worse
than without VC (docs/RESULTS.md), while the ratio sets the variance to FP's whatever the
correlation. 1/x' terms are masked where |x'| < ``mask_eps`` x RMS(x') (choice), and K
is clamped to ``k_range`` (default 0.5..2; choice: a safety net against degenerate fits, e.g. when
few-step trajectories have diverged; ``None`` turns it off).

Two placements (choice: ``sample``, the paper's, is the default; on short trajectories that have
drifted apart, ``eps`` fits collapse K towards 0, which wrecks the x0 prediction):
- ``eps``: a rescale node on the model's predicted-noise channels, inside the graph (the learned-sigma
  channels are left alone), so any denoiser loop gets it:

      x, t, y --> [ DiT graph ] --> out --> VCRescale(K[step]) on out[:, :C] --> out

- ``sample`` (the paper's): a step hook on x_t after each sampler update, carried by the compiled
  model in ``step_hooks`` (our samplers run them).

The rescale itself is :func:`qc_compiler.specs.rescale`, through the :class:`~qc_compiler.specs.VCTable`
that both nodes give as their ``export_spec()``: the torch graph, the ONNX graph and the onnxruntime
runner apply the one formula.

Example:
    >>> import qc_compiler as qc
    >>> from qc_compiler.passes import StepCache, UniformCalibration
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> passes = [StepCache(interval=2), UniformCalibration(size=16, pool_labels=4), VarianceCompensation(batch=4)]
    >>> fast = qc.compile(model, passes=passes, sampler=qc.DDPM(steps=4))
    >>> fast.step_hooks[0].export_spec().k.shape     # (steps, channels)
    torch.Size([4, 1])
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import CalibrationError, PassError
from ..options import config_or_keywords
from ..pipeline import Pass, PassResult, register_pass
from ..specs import OUTPUT_PLACEMENTS, VC_FORMS, VCConfig, VCTable
from ..step import StepAware

__all__ = ["VarianceCompensation", "VCRescale", "VCSampleHook", "fit_k"]


def fit_k(x_hat: torch.Tensor, x_ref: torch.Tensor, form: str = "exact", *, mask_eps: float = 0.1,
          k_range: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Closed-form K per channel minimising mean(((x~ - x')/x')^2) + mean((x~ - x')^2). Shapes (N, C, H, W).

    exact: K = [sum d (x'-mu) + sum d (x'-mu) / x'^2] / [sum d^2 + sum d^2 / x'^2],  d = x_hat - mu
    paper: the second numerator term is sum d / x' (as printed; equal to exact when mu = 0).
    variance: K = sqrt(sum (x' - mu')^2 / sum d^2), mu' the per-sample, per-channel mean of x': the
    rescaled x_hat has x''s spread (the least-squares forms return corr * that ratio).
    Sums run over batch and spatial positions of one channel. The 1/x' terms are masked where
    |x'| < mask_eps * RMS(x') of the channel (choice: relative, because near-zero x' give weights of
    1/x'^2 that otherwise decide K alone). ``k_range`` clamps the result (None: no clamp).
    """
    if form not in VC_FORMS:
        raise ValueError(f"form must be one of {list(VC_FORMS)}, got {form!r}")
    x_hat, x_ref = x_hat.double(), x_ref.double()
    spatial = tuple(range(2, x_hat.dim()))
    dims = (0, *spatial)
    mu = x_hat.mean(dim=spatial, keepdim=True)
    d, r = x_hat - mu, x_ref - mu
    if form == "variance":
        spread_ref = (x_ref - x_ref.mean(dim=spatial, keepdim=True)).pow(2).sum(dims)
        spread_hat = d.pow(2).sum(dims)
        k = torch.where(spread_hat > 0, (spread_ref / spread_hat.clamp_min(1e-30)).sqrt(), torch.ones_like(spread_hat))
        return _clamp(k, k_range).float()
    threshold = mask_eps * x_ref.pow(2).mean(dims, keepdim=True).sqrt()  # (1, C, 1, 1)
    inv = torch.where(x_ref.abs() >= threshold, 1.0 / x_ref, torch.zeros_like(x_ref))
    second = (d * r * inv ** 2).sum(dims) if form == "exact" else (d * inv).sum(dims)
    num = (d * r).sum(dims) + second
    den = (d * d).sum(dims) + (d * d * inv ** 2).sum(dims)
    k = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))
    return _clamp(k, k_range).float()


def _clamp(k: torch.Tensor, k_range: Optional[Sequence[float]]) -> torch.Tensor:
    return k if k_range is None else k.clamp(float(k_range[0]), float(k_range[1]))


class _KTable(StepAware, nn.Module):
    """A (steps x channels) K table read at the current step; fits itself when given targets."""

    placement = "sample"

    def __init__(self, num_steps: int, channels: int, config: VCConfig, channels_last: bool = False):
        super().__init__()
        self.register_buffer("k", torch.ones(num_steps, channels))
        self.config = config
        self.channels, self.channels_last = channels, channels_last
        self.targets: Optional[List[torch.Tensor]] = None  # per step, while fitting

    def export_spec(self) -> VCTable:
        return VCTable(self.placement, self.k.detach().clone(), self.channels_last)

    def correct(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.targets is not None:  # fitting: K for this step from this step's (already corrected) input
            cfg = self.config
            hat, ref = x, self.targets[step].to(x.device)
            if self.channels_last:  # (N, L, C) tokens x channels: fit on (N, C, L)
                hat, ref = hat.transpose(1, -1), ref.transpose(1, -1)
            self.k[step] = fit_k(hat[:, : self.channels], ref[:, : self.channels], cfg.form,
                                 mask_eps=cfg.mask_eps, k_range=cfg.k_range)
        return VCTable(self.placement, self.k, self.channels_last).apply(x, step)

    def report_section(self) -> str:
        dev = (self.k - 1).abs().mean(dim=1)
        worst = int(dev.argmax())
        steps = ", ".join(f"{i}:{float(dev[i]):.3f}" for i in range(0, len(dev), max(1, len(dev) // 10)))
        return (f"variance compensation ({type(self).__name__}): mean |K-1| per step {steps}; "
                f"largest at step {worst} ({float(dev[worst]):.3f})")


class VCRescale(_KTable):
    """Graph node: rescales the predicted-noise channels of the model output at the current step."""

    placement = "eps"

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        state = self.step_state
        if state is None or state.step < 0:
            return out
        return self.correct(out, state.step)  # learned-sigma channels untouched


class VCSampleHook(_KTable):
    """Sampler step hook: rescales x_t after the update of step ``step`` (the paper's placement)."""

    placement = "sample"

    def __call__(self, step: int, t: int, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.correct(x, step)


@register_pass
class VarianceCompensation(Pass):
    """Fit K from paired FP / current trajectories and insert the rescale (see module docstring).

    Options come as ``config=VCConfig(...)`` or as its fields by keyword, not both.
    """

    name = "variance_compensation"
    requires = frozenset({"calibration_set"})
    provides = frozenset({"vc"})
    samples = True

    def __init__(self, config: Optional[VCConfig] = None, **options: Any):
        self.config = config_or_keywords(self.name, VCConfig, config, options)

    @property
    def placement(self) -> str:
        return self.config.placement

    @property
    def form(self) -> str:
        return self.config.form

    def options(self) -> Dict[str, Any]:
        return self.config.to_json()

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        sampler, info = ctx.need("sampler", self.name), ctx.need("info", self.name)
        if ctx.reference is None and ctx.reference_factory is None:
            raise PassError(self.name, "needs the FP reference graph for paired trajectories")
        cfg = self.config
        output = cfg.placement in OUTPUT_PLACEMENTS
        table = (VCRescale if output else VCSampleHook)(sampler.steps, info.in_channels, cfg, info.channels_last)
        if output:
            table.placement = cfg.placement
            _append_output_node(gm, "vc_rescale", table)
        else:
            gm.add_submodule("vc_sample_hook", table)  # for the report and the state dict
            gm.meta.setdefault("qc.sample_hooks", []).append(table)  # what CompiledModel runs
        key = f"vc.{cfg.placement}.K"
        if key in ctx.fitted:
            table.k.copy_(ctx.fitted[key])
        else:
            table.targets = self._reference_targets(ctx)
            try:
                self._run_current(gm, ctx, table)
            finally:
                table.targets = None
            ctx.fitted[key] = table.k.detach().clone()
        ctx.artifacts["vc"] = table.export_spec()
        dev = float((table.k - 1).abs().mean())
        return PassResult(gm, modified=True, notes=f"{cfg.placement} placement, {cfg.form} form, mean |K-1| {dev:.4f}")

    # --- paired trajectories ----------------------------------------------------------------------
    def _labels(self, ctx) -> List[int]:
        pool = ctx.artifacts.get("calibration_set")
        if pool is None or len(pool) == 0:
            raise CalibrationError("variance compensation needs a non-empty calibration_set for its labels")
        labels = pool.y.tolist()
        return [labels[i % len(labels)] for i in range(self.config.batch)]

    def _reference_targets(self, ctx) -> List[torch.Tensor]:
        """Per step: the FP model's raw output on its own trajectory (eps), or x_t after the update (sample)."""
        reference = ctx.denoiser(ctx.need("reference", self.name))
        outputs: List[torch.Tensor] = []
        handle = reference.register_forward_hook(lambda m, a, o: outputs.append(o.detach()))
        try:
            traj = ctx.sampler.sample(ctx.sampling_model(reference), self._labels(ctx), seed=ctx.seed, record=True,
                                      progress=ctx.progress)
        finally:
            handle.remove()
            reference.reset()
        if self.config.placement in OUTPUT_PLACEMENTS:
            return outputs  # the rescale and the fit take the first in_channels channels
        return [r.x_t for r in traj.steps[1:]] + [traj.samples]

    def _run_current(self, gm: fx.GraphModule, ctx, table: _KTable) -> None:
        """One pass of the current graph; each step fits its K on inputs already corrected before it."""
        current = ctx.denoiser(gm)  # carries the sample hook, if any
        try:
            ctx.sampler.sample(ctx.sampling_model(current), self._labels(ctx), seed=ctx.seed, progress=ctx.progress)
        finally:
            current.reset()


def _append_output_node(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    gm.add_submodule(name, module)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise PassError("variance_compensation", f"expected one model output, got {len(value)}")
        value = value[0]
    with gm.graph.inserting_before(output):
        node = gm.graph.call_module(name, (value,))
    output.args = (node,) if not isinstance(output.args[0], (tuple, list)) else ((node,),)
    gm.recompile()  # the fit runs this graph before the pass manager recompiles it
