"""A diffusers pipeline's own denoising loop, over its own scheduler, as one of our samplers.

Calibration runs and the compiled step table must see exactly what a pipeline will call: the same
timesteps (integer, fractional, shifted, or Flux's dynamically shifted ``mu``), the same
``scale_model_input`` and ``scheduler.step``, the same guidance. :class:`PipelineSampler` runs that
loop for any scheduler (DDIM, DDPM, Euler, DPM++, UniPC, flow-matching Euler), with the keyword
arguments the pipeline gives ``set_timesteps`` (``sigmas``, ``mu``).

Initial noise comes from our per-sample streams (so a sample does not depend on its batch); the
scheduler's own noise (ancestral schedulers) from one generator seeded by ``seed``. Sample-space step
hooks run after each update here, but a diffusers pipeline does not run them: use VC's ``eps``
placement for a model that goes back into a pipeline.

diffusers is needed only to rebuild a saved sampler (``from_spec``).

Example (``pipe`` a local pipeline):
    >>> sampler = PipelineSampler(pipe.scheduler, 28, 4.0)                       # doctest: +SKIP
    >>> sampler.timesteps[:2]                                                    # doctest: +SKIP
    [1000.0, 964.28...]
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import ArtifactError
from .samplers import SAMPLERS, Sampler, StepRecord, Trajectory, finish, run_hooks, start

__all__ = ["PipelineSampler"]


def _jsonable(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, (np.ndarray, torch.Tensor)):
            v = [float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1)]
        elif isinstance(v, (np.floating, np.integer)):
            v = v.item()
        out[k] = v
    return out


class PipelineSampler(Sampler):
    """A pipeline's loop over ``scheduler`` at ``num_inference_steps``, ``set_timesteps(**timestep_kwargs)``."""

    name = "diffusers"

    def __init__(self, scheduler: Any, num_inference_steps: int, guidance_scale: float = 1.0,
                 timestep_kwargs: Optional[Dict[str, Any]] = None):
        self.timestep_kwargs = _jsonable(dict(timestep_kwargs or {}))
        self.scheduler = copy.deepcopy(scheduler)
        self._set_timesteps(self.scheduler, int(num_inference_steps))
        ts = [t.item() for t in self.scheduler.timesteps]
        if len(set(ts)) != len(ts):
            raise ValueError("the scheduler repeats timesteps (a second-order scheduler?): its calls cannot be one "
                             "step table")
        super().__init__(steps=len(ts), cfg_scale=max(1.0, float(guidance_scale)),
                         base_timesteps=max(len(ts), int(self.scheduler.config.num_train_timesteps)))
        self._timesteps = ts
        self.num_inference_steps = int(num_inference_steps)

    def _make_schedule(self):
        return None  # the scheduler is the schedule

    def _set_timesteps(self, scheduler: Any, steps: int) -> None:
        kwargs = dict(self.timestep_kwargs)
        if "sigmas" in kwargs:
            scheduler.set_timesteps(sigmas=np.array(kwargs.pop("sigmas"), dtype=np.float32), **kwargs)
        else:
            scheduler.set_timesteps(steps, **kwargs)

    @property
    def timesteps(self) -> List[float]:
        return list(self._timesteps)

    def spec(self) -> dict:
        return {"name": self.name, "steps": self.steps, "cfg_scale": self.cfg_scale,
                "base_timesteps": self.base_timesteps, "timesteps": self.timesteps,
                "num_inference_steps": self.num_inference_steps, "timestep_kwargs": self.timestep_kwargs,
                "scheduler": {"class": type(self.scheduler).__name__,
                              "config": {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}}}

    @classmethod
    def from_spec(cls, spec: dict) -> "PipelineSampler":
        import diffusers

        scheduler_cls = getattr(diffusers, spec["scheduler"]["class"], None)
        if scheduler_cls is None:
            raise ArtifactError(f"diffusers here has no scheduler {spec['scheduler']['class']!r}")
        sampler = cls(scheduler_cls.from_config(spec["scheduler"]["config"]), spec["num_inference_steps"],
                      spec["cfg_scale"], spec.get("timestep_kwargs"))
        if sampler.timesteps != spec["timesteps"]:
            raise ArtifactError("the saved scheduler gives other timesteps here (another diffusers version?); "
                                "compile again")
        return sampler

    @torch.no_grad()
    def sample(self, model, labels, *, seed: int = 0, callback=None, record: bool = False, progress: bool = False,
               noise=None, null_label=None, shape=None, sample_offset: int = 0):
        from tqdm.auto import tqdm

        x, y, null_label, shape, _, hooks = start(model, labels, seed=seed, noise=noise, null_label=null_label,
                                                  shape=shape, sample_offset=sample_offset, callback=callback,
                                                  timesteps=self.timesteps)
        scheduler = copy.deepcopy(self.scheduler)  # schedulers keep a step counter: one per run
        self._set_timesteps(scheduler, self.num_inference_steps)
        # ancestral schedulers draw noise from a generator; deterministic ones (UniPC) take none
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": torch.Generator(device="cpu").manual_seed(int(seed))} if takes_generator else {}
        traj = Trajectory()
        c = shape[0]
        for step, t_tensor in enumerate(tqdm(scheduler.timesteps, desc=self.name, disable=not progress, leave=False)):
            t = t_tensor.item()
            x_in = scheduler.scale_model_input(x, t_tensor) if hasattr(scheduler, "scale_model_input") else x
            out = self.guided_output(model, x_in, t, y, null_label=null_label)
            if record:
                traj.steps.append(StepRecord(step, t, x_in.detach().cpu(), y.detach().cpu(), out.detach().cpu()))
            model_output = out[:, :c] if out.shape[1] == 2 * c else out  # the learned sigma is not the scheduler's
            x = scheduler.step(model_output, t_tensor, x, **step_kwargs, return_dict=False)[0]
            x = run_hooks(hooks, step, t, x)
        return finish(traj, x, record)


SAMPLERS[PipelineSampler.name] = PipelineSampler
SAMPLERS["diffusers-dit"] = PipelineSampler  # the name artefacts saved before the text families carry
