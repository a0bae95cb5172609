"""DDPM and DDIM samplers over a respaced schedule, with CFG, fixed-seed noise, hooks and trajectories.

A sampler calls any denoiser ``model(x, t, y) -> out`` with **original** (1000-step) timesteps, as DiT
does, where ``out`` has C channels of predicted noise and, for a learned-sigma model, C more channels
of variance interpolation values. Compiled models are drop-in denoisers.

Two indices, never confused: ``step`` counts the calls of a run (0 is the first, noisiest call, as
everywhere in qc-compiler), and ``t_index`` is the position in the respaced schedule's arrays
(counting down: the last call has ``t_index`` 0). Hooks and records carry ``step``; the update
formulas take ``t_index``.

Noise is drawn from one generator per sample, seeded by (seed, sample index), so a sample does not
depend on the batch it was drawn in: the same seed gives the same digits in any batch split, in any
variant, on any number of processes.

Example:
    >>> from qc_compiler.models.dit import DiT_models
    >>> model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10).eval()
    >>> images = DDPM(steps=5, cfg_scale=1.5).sample(model, labels=[0, 1], seed=0)
    >>> images.shape
    torch.Size([2, 1, 16, 16])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..options import check_float, check_int
from .schedule import Schedule, extract

__all__ = ["Sampler", "DDPM", "DDIM", "StepRecord", "Trajectory", "sample_noise", "StepHook", "SAMPLERS",
           "check_labels", "start", "run_hooks", "finish", "model_timestep", "model_sample_shape", "model_device", "noise_generators"]

# callback(step_index, t, x) -> replacement x or None; called after each sampler update.
StepHook = Callable[[int, int, torch.Tensor], Optional[torch.Tensor]]


@dataclass
class StepRecord:
    """What the denoiser saw and said at one step: x_t (N, C, H, W), original t, labels, guided output."""

    step: int
    t: int
    x_t: torch.Tensor
    y: torch.Tensor
    model_output: torch.Tensor


@dataclass
class Trajectory:
    """The steps of one sampling run, first (noisiest) to last, and the final samples."""

    steps: List[StepRecord] = field(default_factory=list)
    samples: Optional[torch.Tensor] = None


def noise_generators(seed: int, n: int, offset: int = 0) -> List[torch.Generator]:
    # SeedSequence keeps the streams of (seed, i) independent, unlike seed + i.
    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence([seed, offset + i]).generate_state(1, np.uint64)[0] >> 1))
        for i in range(n)
    ]


def sample_noise(seed: int, n: int, shape: Sequence[int], offset: int = 0) -> torch.Tensor:
    """The initial noise of samples ``offset .. offset+n-1`` for ``seed``: (n, *shape)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in noise_generators(seed, n, offset)])


class Sampler:
    """Base of the respaced samplers. Subclasses implement ``update(x, t_index, out, noise) -> x_prev``."""

    name = "sampler"

    def __init__(self, steps: int = 50, cfg_scale: float = 1.0, base_timesteps: int = 1000):
        self.base_timesteps = check_int("base_timesteps", base_timesteps, lo=1)
        self.steps = check_int("steps", steps, lo=1, hi=self.base_timesteps)
        # 1 disables guidance; NaN or inf would sample black images with exit code 0
        self.cfg_scale = check_float("cfg_scale", cfg_scale, lo=1.0)
        self.schedule = self._make_schedule()

    def _make_schedule(self) -> Schedule:
        return Schedule.respaced(self.steps, self.base_timesteps)

    @property
    def timesteps(self) -> List[int]:
        """Original timesteps in the order the model is called (noisiest first)."""
        return [int(t) for t in self.schedule.timestep_map[::-1]]

    def spec(self) -> dict:
        """A JSON-able description, stored with compiled models; with the schedule itself, so a
        sampler built over another schedule (``sampler_for_scheduler``) is rebuilt exactly."""
        return {"name": self.name, "steps": self.steps, "cfg_scale": self.cfg_scale,
                "base_timesteps": self.base_timesteps, "timesteps": self.timesteps,
                "schedule": {"betas": [float(b) for b in self.schedule.betas],
                             "timestep_map": [int(t) for t in self.schedule.timestep_map]}}

    # --- one step -------------------------------------------------------------------------------
    def guided_output(self, model: Callable, x: torch.Tensor, t: int, y: torch.Tensor, *, null_label: int) -> torch.Tensor:
        """Call the model once (a doubled cond/uncond batch under CFG) and combine the noise halves."""
        n, c = x.shape[0], x.shape[1]
        # integer or fractional (Euler, flow matching), divided as the model's pipeline does (Flux: /1000)
        divisor = getattr(model, "timestep_divisor", 1)
        if self.cfg_scale == 1.0:
            return model(x, model_timestep(t, n, divisor=divisor, device=x.device), y)
        x_in = torch.cat([x, x], dim=0)  # (2N, C, H, W): cond half then uncond half
        y_in = torch.cat([y, torch.full_like(y, null_label)], dim=0)
        out = model(x_in, model_timestep(t, 2 * n, divisor=divisor, device=x.device), y_in)
        cond, uncond = out[:n], out[n:]
        eps = uncond[:, :c] + self.cfg_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1)  # variance channels from the cond half, as DiT

    def predict(self, x: torch.Tensor, t_index: int, out: torch.Tensor):
        """(pred_x0, eps, log_variance) from a model output at schedule position ``t_index``."""
        c = x.shape[1]
        t = torch.full((x.shape[0],), t_index, dtype=torch.long, device=x.device)
        eps = out[:, :c]
        if out.shape[1] == 2 * c:
            log_var = self.schedule.learned_range_log_variance(out[:, c:], t)
        else:
            log_var = extract(self.schedule.posterior_log_variance_clipped, t, x).expand_as(x)
        return self.schedule.predict_xstart(x, t, eps), eps, log_var

    def update(self, x: torch.Tensor, t_index: int, out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- the loop -------------------------------------------------------------------------------
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
        """Draw one sample per label. Returns (N, C, H, W), or a ``Trajectory`` when ``record``.

        ``model`` may carry ``step_hooks`` (a list of StepHook, e.g. variance compensation on x_t);
        they run after each update, before ``callback``. ``sample_offset`` selects which per-sample
        noise streams of ``seed`` to use, so shards of a large run reproduce the whole run.
        """
        x, y, null_label, shape, gens, hooks = start(model, labels, seed=seed, noise=noise, null_label=null_label,
                                                     shape=shape, sample_offset=sample_offset, callback=callback,
                                                     timesteps=self.timesteps)
        device = x.device
        traj = Trajectory()
        t_indices = range(self.steps - 1, -1, -1)  # schedule positions, noisiest first
        for step, t_index in enumerate(tqdm(t_indices, desc=self.name, disable=not progress, leave=False)):
            t = int(self.schedule.timestep_map[t_index])
            out = self.guided_output(model, x, t, y, null_label=null_label)
            if record:
                traj.steps.append(StepRecord(step, t, x.detach().cpu(), y.detach().cpu(), out.detach().cpu()))
            step_noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
            x = self.update(x, t_index, out, step_noise)
            x = run_hooks(hooks, step, t, x)
        return finish(traj, x, record)


def start(model, labels, *, seed: int, noise: Optional[torch.Tensor], null_label: Optional[int],
          shape: Optional[Sequence[int]], sample_offset: int, callback: Optional[StepHook],
          timesteps: Sequence[float] = ()):
    """What every sampling loop begins with: (x_T on the model's device, labels there, the null label,
    one sample's shape, the per-sample noise generators, the step hooks then ``callback``). A compiled
    model is told the run's ``timesteps`` first (``expect``): it refuses a schedule it was not
    compiled for before any step runs, and one compiled for several tables picks this run's."""
    expect = getattr(model, "expect", None)
    if timesteps and callable(expect):
        expect(list(timesteps))
    y, null_label = check_labels(labels, model, null_label)
    shape = tuple(shape or model_sample_shape(model))
    gens = noise_generators(seed, y.shape[0], sample_offset)
    x = noise if noise is not None else torch.stack([torch.randn(shape, generator=g) for g in gens])
    device = model_device(model)
    hooks = list(getattr(model, "step_hooks", []) or []) + ([callback] if callback else [])
    return x.to(device), y.to(device), null_label, shape, gens, hooks


def run_hooks(hooks: Sequence[StepHook], step: int, t, x: torch.Tensor) -> torch.Tensor:
    """Each hook after a sampler update, in order; a hook returning a tensor replaces x."""
    for hook in hooks:
        replaced = hook(step, t, x)
        if replaced is not None:
            x = replaced
    return x


def finish(traj: Trajectory, x: torch.Tensor, record: bool) -> Union[torch.Tensor, Trajectory]:
    if record:
        traj.samples = x.detach().cpu()
        return traj
    return x


def model_timestep(t: float, n: int, *, divisor: int = 1, device=None) -> torch.Tensor:
    """The timestep tensor (n,) a model is called with at scheduler timestep ``t``: int64 for an integer
    schedule, float32 otherwise, divided by the model's ``timestep_divisor`` as its pipeline does
    (Flux: ``t / 1000`` in float32). Samplers call models through it; compiled step tables hold its values."""
    if isinstance(t, int) and divisor == 1:
        return torch.full((n,), t, dtype=torch.long, device=device)
    out = torch.full((n,), t, dtype=torch.float32, device=device)
    return out / divisor if divisor != 1 else out


def check_labels(labels, model, null_label: Optional[int] = None):
    """(labels as a long tensor, the null label): integers in 0..num_classes-1, or ``ValueError``."""
    y = torch.as_tensor(labels).reshape(-1)
    if y.shape[0] == 0:
        raise ValueError("labels is empty")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {y.dtype}")
    y = y.long()
    null_label = int(null_label if null_label is not None else getattr(model, "num_classes"))
    bad = y[(y < 0) | (y >= null_label)]
    if bad.numel():  # label num_classes is the null (unconditional) class: never a user's label
        raise ValueError(f"labels {sorted(set(bad.tolist()))[:5]} are out of range for a model with "
                         f"{null_label} classes (0..{null_label - 1})")
    return y, null_label


class DDPM(Sampler):
    """Ancestral DDPM sampling with the learned-range variance of Improved DDPM / DiT.

    Example:
        >>> DDPM(steps=50).timesteps[:3]
        [999, 979, 958]
    """

    name = "ddpm"

    def update(self, x, t_index, out, noise):
        pred_x0, _, log_var = self.predict(x, t_index, out)
        t = torch.full((x.shape[0],), t_index, dtype=torch.long, device=x.device)
        mean = self.schedule.posterior_mean(pred_x0, x, t)
        if t_index == 0:  # no noise at the last call
            return mean
        return mean + torch.exp(0.5 * log_var) * noise


class DDIM(Sampler):
    """DDIM sampling (eta = 0 is deterministic), on the same respaced schedule.

    Example:
        >>> DDIM(steps=10, eta=0.0).spec()["name"]
        'ddim'
    """

    name = "ddim"

    def __init__(self, steps: int = 50, cfg_scale: float = 1.0, eta: float = 0.0, base_timesteps: int = 1000):
        self.eta = check_float("eta", eta, lo=0.0)
        super().__init__(steps, cfg_scale, base_timesteps)

    def spec(self) -> dict:
        return {**super().spec(), "eta": self.eta}

    def update(self, x, t_index, out, noise):
        pred_x0, eps, _ = self.predict(x, t_index, out)
        t = torch.full((x.shape[0],), t_index, dtype=torch.long, device=x.device)
        ab = extract(self.schedule.alphas_cumprod, t, x)
        ab_prev = extract(self.schedule.alphas_cumprod_prev, t, x)
        sigma = self.eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = pred_x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
        if t_index == 0:
            return mean
        return mean + sigma * noise


SAMPLERS = {"ddpm": DDPM, "ddim": DDIM}


def sampler_from_spec(spec: dict) -> Sampler:
    """Rebuild a sampler from ``Sampler.spec()`` (used when loading compiled models). A sampler class
    registered in ``SAMPLERS`` with a ``from_spec`` classmethod rebuilds itself."""
    if spec.get("name") in SAMPLERS and hasattr(SAMPLERS[spec["name"]], "from_spec"):
        return SAMPLERS[spec["name"]].from_spec(spec)
    kwargs = {"steps": spec["steps"], "cfg_scale": spec["cfg_scale"], "base_timesteps": spec.get("base_timesteps", 1000)}
    if spec["name"] == "ddim":
        kwargs["eta"] = spec.get("eta", 0.0)
    if spec["name"] not in SAMPLERS:
        raise ValueError(f"unknown sampler {spec['name']!r}; known: {sorted(SAMPLERS)}")
    sampler = SAMPLERS[spec["name"]](**kwargs)
    if "schedule" in spec:  # the exact schedule it ran (respaced DiT betas, or a pipeline scheduler's)
        sched = spec["schedule"]
        sampler.schedule = Schedule(np.array(sched["betas"], dtype=np.float64), np.array(sched["timestep_map"]))
    if sampler.spec() != spec:
        raise ValueError("the sampler spec does not rebuild the sampler it describes (edited?)")
    return sampler


def model_sample_shape(model) -> tuple:
    shape = getattr(model, "sample_shape", None)
    if shape is not None:  # compiled models say it
        return tuple(shape)
    size, channels = getattr(model, "input_size", None), getattr(model, "in_channels", None)
    if size is None or channels is None:
        raise ValueError("the model has no sample_shape or input_size/in_channels; pass shape=(C, H, W) to sample()")
    return (channels, size, size)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
