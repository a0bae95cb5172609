"""Rectified-flow Euler sampling (SD3, Flux), equal to diffusers' ``FlowMatchEulerDiscreteScheduler``.

Flow-matching models predict a velocity ``v`` along the straight path from data (sigma 0) to noise
(sigma 1), and are sampled by Euler steps ``x <- x + (sigma_next - sigma) * v``: no beta schedule,
no noise after the first draw. A compiled flow model is checked against its original by running
both through the very schedule the diffusers pipeline would run, so the sigmas and timesteps here are
computed with diffusers' own operations in diffusers' own precisions (float32 where it uses float32,
float64 where its numpy math is float64), and equal the scheduler's bit for bit:

* static shift (SD3: ``shift=3.0``): ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``, applied,
  as diffusers does, both to the training sigmas (which set the schedule's ends) and to the inference
  sigmas spaced between those ends;
* dynamic shift (Flux: ``mu`` from the image size, diffusers' ``calculate_shift``):
  ``sigma' = e^mu / (e^mu + (1 / sigma - 1))``, with ``flux_sigmas=True`` for the sigmas
  ``linspace(1, 1/steps, steps)`` that ``FluxPipeline`` passes.

The model is called as every sampler here calls it, ``model(x, t, y)``, with ``t`` in the scheduler's
timestep units (``sigma * base_timesteps``, float32) through ``Sampler.guided_output``; ``FluxPipeline``
calls its transformer with ``t / 1000`` instead, which is the model wrapper's business, not the schedule's.
Labels, classifier-free guidance, the per-sample noise streams, hooks and trajectories are those of
``Sampler.sample``.

Example:
    >>> from qc_compiler.models.dit import DiT_models
    >>> model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10).eval()
    >>> sampler = FlowMatchEuler(steps=4, cfg_scale=1.5, shift=3.0)
    >>> [round(t, 1) for t in sampler.timesteps]
    [1000.0, 857.7, 602.2, 8.9]
    >>> sampler.sample(model, labels=[0, 1], seed=0).shape
    torch.Size([2, 1, 16, 16])
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..options import check_bool, check_float, check_int
from .samplers import SAMPLERS, Sampler, StepHook, StepRecord, Trajectory, finish, run_hooks, start

__all__ = ["FlowMatchEuler", "flow_sigmas"]


def flow_sigmas(steps: int, *, shift: float = 1.0, mu: Optional[float] = None, base_timesteps: int = 1000,
                flux_sigmas: bool = False) -> torch.Tensor:
    """The sigmas of ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=base_timesteps, shift=shift)``
    after ``set_timesteps(steps)`` (or with ``use_dynamic_shifting=True`` and ``mu=mu``; with
    ``sigmas=linspace(1, 1/steps, steps)`` when ``flux_sigmas``): float32, ``steps + 1`` values,
    noisiest first, ending in 0. Arguments are not validated here (``FlowMatchEuler`` does)."""
    n_train = base_timesteps
    # the scheduler's __init__: training sigmas 1..1/N, statically shifted unless dynamic; only their
    # ends (sigma_max, sigma_min) are used, but computed whole so every float32 operation is the same
    train_t = torch.from_numpy(np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy()).to(torch.float32)
    train_sigmas = train_t / n_train
    if mu is None:
        train_sigmas = shift * train_sigmas / (1 + (shift - 1) * train_sigmas)
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()

    with np.errstate(all="ignore"):  # a degenerate mu is refused by the caller, not warned about
        # set_timesteps: the pipeline's sigmas become float32 numpy; its own default spacing is float64
        if flux_sigmas:
            sigmas = np.array(np.linspace(1.0, 1 / steps, steps)).astype(np.float32)
        else:
            timesteps = np.linspace(sigma_max * n_train, sigma_min * n_train, steps)
            sigmas = timesteps / n_train
        if mu is not None:  # time_shift_type "exponential", time-shift sigma 1.0
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


class FlowMatchEuler(Sampler):
    """Deterministic Euler sampling of a velocity (rectified-flow) model on diffusers' flow-match schedule.

    Example:
        >>> s = FlowMatchEuler(steps=28, mu=1.15, flux_sigmas=True)
        >>> round(s.timesteps[1], 3), s.sigmas[-1].item()
        (988.409, 0.0)
    """

    name = "flow-euler"

    def __init__(self, steps: int = 28, cfg_scale: float = 1.0, *, shift: float = 1.0, mu: Optional[float] = None,
                 base_timesteps: int = 1000, flux_sigmas: bool = False):
        self.shift = check_float("shift", shift, lo=0.0, lo_open=True)
        self.mu = None if mu is None else check_float("mu", mu)
        self.flux_sigmas = check_bool("flux_sigmas", flux_sigmas)
        if self.mu is not None and self.shift != 1.0:
            # diffusers shifts either statically (shift) or dynamically (mu, use_dynamic_shifting), and
            # ignores shift when dynamic: accepting both would let the spec claim a shift never applied
            raise ValueError(f"shift={self.shift} and mu={self.mu} exclude each other: a static shift or a "
                             f"dynamic one through mu (diffusers ignores shift with use_dynamic_shifting); "
                             f"pass shift=1.0 with mu")
        super().__init__(steps, cfg_scale, base_timesteps)
        try:
            sigmas = flow_sigmas(self.steps, shift=self.shift, mu=self.mu, base_timesteps=self.base_timesteps,
                                 flux_sigmas=self.flux_sigmas)
        except OverflowError:  # math.exp(mu)
            sigmas = None
        if sigmas is None or not bool(torch.isfinite(sigmas).all()):
            raise ValueError(f"shift={self.shift}, mu={self.mu} give no finite sigma schedule for {self.steps} steps")
        self.sigmas = sigmas  # float32, steps + 1 values, noisiest first, then 0 (as the scheduler's)

    def _make_schedule(self):
        return None  # no DDPM betas: the flow schedule is self.sigmas

    @property
    def timesteps(self) -> List[float]:
        """The scheduler's timesteps (``sigma * base_timesteps`` in float32), noisiest first."""
        return [t.item() for t in self.sigmas[:-1] * self.base_timesteps]

    def spec(self) -> dict:
        return {"name": self.name, "steps": self.steps, "cfg_scale": self.cfg_scale,
                "base_timesteps": self.base_timesteps, "timesteps": self.timesteps,
                "shift": self.shift, "mu": self.mu, "flux_sigmas": self.flux_sigmas}

    @classmethod
    def from_spec(cls, spec: dict) -> "FlowMatchEuler":
        """Rebuild from ``spec()``; ``ValueError`` if the spec does not describe the sampler it builds."""
        if spec.get("name") != cls.name or "steps" not in spec:
            raise ValueError(f"not a {cls.name} sampler spec: {sorted(spec)}")
        sampler = cls(spec["steps"], spec.get("cfg_scale", 1.0), shift=spec.get("shift", 1.0), mu=spec.get("mu"),
                      base_timesteps=spec.get("base_timesteps", 1000), flux_sigmas=spec.get("flux_sigmas", False))
        if sampler.spec() != spec:
            raise ValueError("the sampler spec does not rebuild the sampler it describes (edited?)")
        return sampler

    def update(self, x: torch.Tensor, step: int, out: torch.Tensor, noise=None) -> torch.Tensor:
        """The Euler step of call ``step`` (0 the noisiest; the flow schedule has no ``t_index``, its
        arrays run in call order), as the scheduler's ``step``: in float32, then cast to the model
        output's dtype. ``noise`` is ignored."""
        v = out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out  # learned-sigma halves: velocity only
        sigmas = self.sigmas.to(v.device)
        dt = sigmas[step + 1] - sigmas[step]
        return (x.to(torch.float32) + dt * v).to(v.dtype)

    @torch.no_grad()
    def sample(
        self,
        model: Callable,
        labels: Union[Sequence[int], torch.Tensor],
        *,
        seed: int = 0,
        callback: Optional[StepHook] = None,
        record: bool = False,
        progress: bool = False,
        noise: Optional[torch.Tensor] = None,
        null_label: Optional[int] = None,
        shape: Optional[Sequence[int]] = None,
        sample_offset: int = 0,
    ) -> Union[torch.Tensor, Trajectory]:
        """Draw one sample per label, as ``Sampler.sample`` (same noise streams, hooks, records), with
        float timesteps; no noise is drawn after the initial one."""
        x, y, null_label, _, _, hooks = start(model, labels, seed=seed, noise=noise, null_label=null_label,
                                              shape=shape, sample_offset=sample_offset, callback=callback,
                                              timesteps=self.timesteps)
        traj = Trajectory()
        for step, t in enumerate(tqdm(self.timesteps, desc=self.name, disable=not progress, leave=False)):
            out = self.guided_output(model, x, t, y, null_label=null_label)
            if record:
                traj.steps.append(StepRecord(step, t, x.detach().cpu(), y.detach().cpu(), out.detach().cpu()))
            x = self.update(x, step, out)
            x = run_hooks(hooks, step, t, x)
        return finish(traj, x, record)


SAMPLERS["flow-euler"] = FlowMatchEuler
