"""Noise schedules: DiT's linear betas, respacing to fewer steps, and the derived posterior terms.

Everything is computed in float64 numpy, as in DiT's ``gaussian_diffusion.py``, and turned into
tensors only when a sampler indexes it, so that respaced schedules match the reference to the bit.

Example:
    >>> sched = Schedule.respaced(num_steps=50)
    >>> len(sched.betas), int(sched.timestep_map[0]), int(sched.timestep_map[-1])
    (50, 0, 999)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Set, Union

import numpy as np
import torch

__all__ = ["linear_betas", "space_timesteps", "Schedule", "extract"]


def linear_betas(num_diffusion_timesteps: int = 1000) -> np.ndarray:
    """DDPM's linear schedule, rescaled so that any step count spans the same noise range (as DiT)."""
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: Union[int, str, Sequence[int]]) -> Set[int]:
    """Which original timesteps a respaced process keeps (DiT's ``space_timesteps``).

    ``section_counts`` is an int or list (steps per equal section, strided evenly inside each), or
    ``"ddimN"`` for DDIM's fixed stride.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: List[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


@dataclass(frozen=True)
class Schedule:
    """A (possibly respaced) Gaussian diffusion schedule and its posterior q(x_{t-1} | x_t, x_0).

    ``timestep_map[i]`` is the original (1000-step) timestep of respaced step ``i``; the model is
    always called with original timesteps, as DiT's ``_WrappedModel`` does.
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    alphas_cumprod: np.ndarray = field(init=False)
    alphas_cumprod_prev: np.ndarray = field(init=False)
    posterior_variance: np.ndarray = field(init=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False)
    posterior_mean_coef1: np.ndarray = field(init=False)
    posterior_mean_coef2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0, so the log is clipped to the next value (as DiT).
        post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(betas)
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": prev,
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar,
            "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def linear(cls, num_timesteps: int = 1000) -> "Schedule":
        """The full, unrespaced linear schedule."""
        return cls(linear_betas(num_timesteps), np.arange(num_timesteps))

    @classmethod
    def respaced(cls, num_steps: Union[int, str, Sequence[int]], base_timesteps: int = 1000) -> "Schedule":
        """Keep ``space_timesteps(base, num_steps)`` of the linear schedule, with betas recomputed so
        that the kept steps have the same cumulative alphas as in the base process."""
        base = cls.linear(base_timesteps)
        keep = space_timesteps(base_timesteps, num_steps)
        last, betas, kept = 1.0, [], []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in keep:
                betas.append(1 - alpha_cumprod / last)
                last = alpha_cumprod
                kept.append(i)
        return cls(np.array(betas), np.array(kept))

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse x0 to step t: sqrt(a_bar) x0 + sqrt(1 - a_bar) noise."""
        return (extract(np.sqrt(self.alphas_cumprod), t, x0) * x0
                + extract(np.sqrt(1.0 - self.alphas_cumprod), t, x0) * noise)

    def predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (extract(np.sqrt(1.0 / self.alphas_cumprod), t, x_t) * x_t
                - extract(np.sqrt(1.0 / self.alphas_cumprod - 1), t, x_t) * eps)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t

    def learned_range_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Interpolate log variance between the posterior's and beta's (Improved DDPM's learned range)."""
        min_log = extract(self.posterior_log_variance_clipped, t, var_values)
        max_log = extract(np.log(self.betas), t, var_values)
        frac = (var_values + 1) / 2  # the model outputs [-1, 1]
        return frac * max_log + (1 - frac) * min_log


def extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as a float tensor broadcastable to ``like`` (N, 1, 1, ...)."""
    out = torch.from_numpy(arr).to(device=like.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))
