"""Calibration pools: candidate denoiser inputs (x_t, t, y) gathered by running the sampler.

The pool is gathered over the *current* graph, so when a cache pass ran earlier it holds the inputs
the cached model really sees (the deployment condition of Q&C). One item is one sample at one step;
under classifier-free guidance an item stands for its cond/uncond pair, which :meth:`batches`
always feeds together, as the sampler does. Inputs are stored in float16: memory grows linearly,
2 bytes per value.

Example:
    >>> import torch
    >>> pool = CalibrationPool(x=torch.zeros(4, 1, 2, 2), t=torch.tensor([999, 999, 0, 0]),
    ...                        step=torch.tensor([0, 0, 1, 1]), y=torch.tensor([1, 2, 1, 2]), null_label=10, cfg=True)
    >>> [(x.shape[0], int(t[0])) for x, t, y in pool.batches(batch_size=8)]
    [(4, 999), (4, 0)]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import CalibrationError

__all__ = ["CalibrationPool", "collect_pool"]


@dataclass
class CalibrationPool:
    """N candidates: x (N, C, H, W) float16, original timestep t (N,; int64, or float64 for a fractional
    schedule), step index (N,), label y (N,)."""

    x: torch.Tensor
    t: torch.Tensor
    step: torch.Tensor
    y: torch.Tensor
    null_label: int
    cfg: bool

    def __post_init__(self) -> None:
        self.x = self.x.to(torch.float16)
        n = self.x.shape[0]
        if not (self.t.shape == self.step.shape == self.y.shape == (n,)):
            raise CalibrationError(f"pool fields disagree in length: x {n}, t {tuple(self.t.shape)}, "
                                   f"step {tuple(self.step.shape)}, y {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, indices: Sequence[int]) -> "CalibrationPool":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return CalibrationPool(self.x[idx], self.t[idx], self.step[idx], self.y[idx], self.null_label, self.cfg)

    def features(self) -> np.ndarray:
        """Flattened x_t as float32 (N, C*H*W): the selectors' default features."""
        return self.x.reshape(len(self), -1).float().numpy()

    def check_finite(self) -> None:
        bad = ~torch.isfinite(self.x.reshape(len(self), -1)).all(dim=1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise CalibrationError(f"calibration data has NaN or inf in {int(bad.sum())} of {len(self)} items "
                                   f"(first: item {first}, step {int(self.step[first])}); "
                                   "check the model and sampler that produced it")

    def batches(self, batch_size: int = 64) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Model inputs (x, t, y), one timestep per batch (as a compiled model requires), in step
        order; under CFG each item is fed as its cond/uncond pair."""
        self.check_finite()
        for step in torch.unique(self.step).tolist():
            idx = (self.step == step).nonzero().flatten()
            for chunk in idx.split(batch_size):
                x, y, t = self.x[chunk].float(), self.y[chunk], self.t[chunk]
                if self.cfg:
                    x, y, t = torch.cat([x, x]), torch.cat([y, torch.full_like(y, self.null_label)]), torch.cat([t, t])
                yield x, t, y

    def to_tensors(self, prefix: str) -> dict:
        """For saving in ``ctx.fitted``/safetensors."""
        return {f"{prefix}.x": self.x, f"{prefix}.t": self.t, f"{prefix}.step": self.step, f"{prefix}.y": self.y,
                f"{prefix}.meta": torch.tensor([self.null_label, int(self.cfg)])}


def collect_pool(ctx, gm, labels: Sequence[int], *, seed: Optional[int] = None,
                 progress: Optional[bool] = None) -> CalibrationPool:
    """Run ``ctx.sampler`` over the current graph for ``labels`` and keep every (x_t, t, y) it saw."""
    if len(labels) == 0:
        raise CalibrationError("a calibration pool needs at least one label")
    traj = ctx.collect(gm, labels, seed=seed, progress=progress)
    n = len(labels)
    x = torch.cat([r.x_t.to(torch.float16) for r in traj.steps])  # (steps * n, C, H, W)
    # integer schedules keep integer timesteps; fractional ones (Euler) their exact float64 values
    t_dtype = torch.long if all(isinstance(r.t, int) for r in traj.steps) else torch.float64
    t = torch.cat([torch.full((n,), r.t, dtype=t_dtype) for r in traj.steps])
    step = torch.cat([torch.full((n,), r.step, dtype=torch.long) for r in traj.steps])
    y = torch.cat([r.y for r in traj.steps])
    null_label = ctx.null_label
    if null_label is None:
        raise CalibrationError("a calibration pool needs a class-conditional model (its null label for CFG)")
    pool = CalibrationPool(x, t, step, y, null_label=int(null_label), cfg=ctx.sampler.cfg_scale != 1.0)
    pool.check_finite()
    return pool
