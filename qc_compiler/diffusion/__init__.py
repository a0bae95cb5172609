"""Diffusion: DiT's schedules, respacing, samplers, condition banks and training loss."""
from .conditions import BankedDenoiser, ConditionBank
from .flow import FlowMatchEuler
from .scheduler_sampler import PipelineSampler
from .losses import hybrid_loss
from .samplers import DDIM, DDPM, Sampler, StepRecord, Trajectory, sample_noise, sampler_from_spec
from .schedule import Schedule, linear_betas, space_timesteps

__all__ = [
    "DDIM", "DDPM", "Sampler", "StepRecord", "Trajectory", "sample_noise", "sampler_from_spec",
    "Schedule", "linear_betas", "space_timesteps", "hybrid_loss", "ConditionBank", "BankedDenoiser", "FlowMatchEuler", "PipelineSampler",
]
