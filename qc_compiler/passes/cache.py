"""``StepCache``: step-conditional cache-lookup nodes that reuse DiT branch outputs across steps.

In every block, the attention branch ``attn(modulate(norm1(x)))`` and the MLP branch
``mlp(modulate(norm2(x)))`` are outlined into submodules and wrapped in a :class:`CacheLookup`:

    x, shift, scale --> CacheLookup[ region: norm -> modulate -> attn/mlp ] --> gate * . + x
                            |  compute step: run the region, store its output
                            |  reuse step:   return the stored tensor; the region is not called

The adaLN modulation, the gates and the residual adds stay outside and run every step. Which regions
compute at which step is a policy read from the step context:

- ``interval`` (FORA): compute when ``step % interval == 0``;
- ``static``: a (steps x regions) 0/1 schedule, given, or derived training-free from the measured
  change of each region's output on a few calibration runs (Learning-to-Cache-like);
- ``adaptive`` (First-Block-Cache / TeaCache-like): the first block's attention branch always runs,
  and the accumulated relative L1 change of its output since the last full step decides, at run time,
  whether the other regions compute (change >= threshold) or reuse.

The first step always computes; a new sampling run (step 0) clears the cache; a batch-size change
inside a run raises ``StepError`` (the compiled model also refuses changed labels).

Example:
    >>> import qc_compiler as qc
    >>> from qc_compiler.passes import StepCache
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> fast = qc.compile(model, passes=[StepCache(interval=2)], sampler=qc.DDPM(steps=10))
    >>> fast.step_state.num_steps
    10
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import find_branch_regions
from ..errors import PassError, StepError
from ..flops import region_flops
from ..pipeline import Pass, PassResult, register_pass
from ..regions import outline_region
from ..runtime import StepAware

__all__ = ["StepCache", "CacheLookup", "CachePolicy", "skipped_flops_fraction"]

POLICIES = ("interval", "static", "adaptive")


class CachePolicy:
    """Decides, per (step, region), whether a region computes. Shared by all lookups of one graph."""

    def __init__(self, kind: str, num_regions: int, interval: int = 1,
                 schedule: Optional[Sequence[Sequence[int]]] = None, threshold: float = 0.1,
                 region_flops: Sequence[int] = (), block_flops: int = 0, names: Sequence[str] = ()):
        self.kind, self.num_regions, self.interval, self.threshold = kind, num_regions, interval, threshold
        self.schedule = [list(map(int, row)) for row in schedule] if schedule is not None else None
        self.region_flops, self.block_flops, self.names = list(region_flops), block_flops, list(names)

    def computes(self, state, index: int, store: Dict[str, Any]) -> bool:
        step = state.step
        if step == 0:
            return True
        if self.kind == "interval":
            return step % self.interval == 0
        if self.kind == "static":
            if step >= len(self.schedule):
                raise StepError(f"the static cache schedule has {len(self.schedule)} steps; step {step} is past it")
            return bool(self.schedule[step][index])
        # adaptive: region 0 is the probe and always runs; the others follow this step's decision
        return index == 0 or store.get("decision", {}).get(step, True)

    def observe(self, state, index: int, output: torch.Tensor, store: Dict[str, Any]) -> None:
        """Adaptive only: after the probe region runs, decide for the rest of this step."""
        if self.kind != "adaptive" or index != 0:
            return
        prev = store.get("probe")
        decision = store.setdefault("decision", {})
        if prev is None or state.step == 0:
            store["acc"], decision[state.step] = 0.0, True
        else:
            rel = float((output - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
            store["acc"] = store.get("acc", 0.0) + rel
            decision[state.step] = store["acc"] >= self.threshold
            if decision[state.step]:
                store["acc"] = 0.0
        store["probe"] = output


class CacheLookup(StepAware, nn.Module):
    """Runs its region at compute steps and stores the output; returns the stored output otherwise."""

    needs_stable_batch = True

    def __init__(self, region: fx.GraphModule, key: str, index: int, policy: CachePolicy, flops: int = 0):
        super().__init__()
        self.region, self.key, self.index, self.policy, self.flops = region, key, index, policy, flops

    def forward(self, *args):
        state = self.step_state
        if state is None or state.step < 0:  # not inside a compiled model: behave like the plain graph
            return self.region(*args)
        store = state.store("cache")
        outputs, log = store.setdefault("outputs", {}), store.setdefault("computed", {})
        cached = outputs.get(self.key)
        batch = args[0].shape[0]
        if cached is not None and cached.shape[0] != batch:
            raise StepError(f"batch size changed inside a sampling run ({cached.shape[0]} -> {batch}) at "
                            f"{self.key}; start a new run at the first step")
        if cached is None or self.policy.computes(state, self.index, store):
            cached = self.region(*args)
            outputs[self.key] = cached
            self.policy.observe(state, self.index, cached, store)
            log.setdefault(state.step, set()).add(self.index)
        return cached

    def report_section(self) -> str:
        # One summary for the whole cache, written by the first lookup from the last run's log.
        if self.index != 0 or self.step_state is None:
            return ""
        return cache_report(self.policy, self.step_state.store("cache").get("computed", {}), self.step_state.num_steps)


def skipped_flops_fraction(model) -> float:
    """Share of block FLOPs a compiled model skipped in its last sampling run (0 without a cache)."""
    lookups = [m for m in model.modules() if isinstance(m, CacheLookup)]
    if not lookups or not lookups[0].policy.block_flops:
        return 0.0
    policy, state = lookups[0].policy, lookups[0].step_state
    computed = state.store("cache").get("computed", {})
    skipped = sum(f for step in range(state.num_steps) for i, f in enumerate(policy.region_flops)
                  if i not in computed.get(step, set()))
    return skipped / (policy.block_flops * state.num_steps)


def cache_report(policy: CachePolicy, computed: Dict[int, set], num_steps: int) -> str:
    """The schedule of the last run (C = computed, . = reused, per region) and the FLOPs skipped."""
    if not computed:
        return f"step cache ({policy.kind}): no sampling run yet"
    lines = [f"step cache ({policy.kind}), last run; columns = {policy.num_regions} regions "
             f"({policy.names[0]} .. {policy.names[-1]}), C = computed, . = reused"]
    skipped = 0
    for step in range(num_steps):
        done = computed.get(step, set())
        lines.append(f"  step {step:>3}: " + "".join("C" if i in done else "." for i in range(policy.num_regions)))
        skipped += sum(f for i, f in enumerate(policy.region_flops) if i not in done)
    total = policy.block_flops * num_steps
    if total:
        lines.append(f"  block FLOPs skipped: {skipped / total:.1%} "
                     f"({skipped / 1e9:.2f} of {total / 1e9:.2f} GFLOP per sample)")
    return "\n".join(lines)


@register_pass
class StepCache(Pass):
    """Insert cache-lookup nodes around every DiT branch (see the module docstring for policies)."""

    name = "step_cache"
    provides = frozenset({"cache"})

    def __init__(self, interval: int = 2, policy: str = "interval", schedule: Optional[List[List[int]]] = None,
                 threshold: float = 0.1, calibration_labels: int = 4, branches: Sequence[str] = ("attn", "mlp")):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.interval, self.policy, self.schedule = int(interval), policy, schedule
        self.threshold, self.calibration_labels, self.branches = float(threshold), int(calibration_labels), tuple(branches)

    def options(self) -> Dict[str, Any]:
        return {"interval": self.interval, "policy": self.policy, "schedule": self.schedule,
                "threshold": self.threshold, "calibration_labels": self.calibration_labels,
                "branches": list(self.branches)}

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        regions = [r for r in find_branch_regions(gm) if r.name in self.branches]
        if not regions:
            raise PassError(self.name, "found no DiT branch regions (norm -> attn/mlp) to cache")
        flops, block_flops = region_flops(gm, regions, ctx.model_info)
        policy = CachePolicy(self.policy, len(regions), self.interval, None, self.threshold, flops, block_flops,
                             [r.qualname for r in regions])
        lookups = []
        for i, r in enumerate(regions):
            name = "cache_" + r.qualname.replace(".", "_")
            outline_region(gm, r, name, lambda sub, i=i, r=r: CacheLookup(sub, r.qualname, i, policy, flops[i]), self.name)
            lookups.append(gm.get_submodule(name))
        if self.policy == "static":
            policy.schedule = self._static_schedule(gm, ctx, len(regions), policy)
        ctx.artifacts["cache"] = {"policy": self.policy, "regions": [r.qualname for r in regions],
                                  "region_flops": flops, "block_flops": block_flops}
        gm.meta["qc.cache"] = ctx.artifacts["cache"]
        note = f"{len(regions)} lookups, policy {self.policy}" + (f" every {self.interval}" if self.policy == "interval" else "")
        return PassResult(gm, modified=True, notes=note)

    def _static_schedule(self, gm, ctx, num_regions: int, policy: CachePolicy) -> List[List[int]]:
        if self.schedule is not None:
            steps = ctx.sampler.steps if ctx.sampler else len(self.schedule)
            if len(self.schedule) != steps or any(len(row) != num_regions for row in self.schedule):
                raise PassError(self.name, f"schedule must be {steps} steps x {num_regions} regions")
            return [list(map(int, row)) for row in self.schedule]
        return ctx.fit("cache.schedule", lambda: derive_schedule(gm, ctx, policy, self.threshold, self.calibration_labels))


def derive_schedule(gm: fx.GraphModule, ctx, policy: CachePolicy, threshold: float, n_labels: int) -> List[List[int]]:
    """Training-free static schedule: run the FP graph (computing everything) on a few labels, and
    let a region reuse at a step when its output changed by less than ``threshold`` (relative L1,
    accumulated since its last compute) in the majority of those runs."""
    steps = ctx.sampler.steps
    policy.schedule = [[1] * policy.num_regions for _ in range(steps)]  # compute everything while measuring
    lookups = [m for m in gm.modules() if isinstance(m, CacheLookup)]
    votes = torch.zeros(steps, len(lookups))
    num_classes = ctx.model_info.get("num_classes", 1)
    for run in range(2):
        outputs: Dict[int, List[torch.Tensor]] = {i: [] for i in range(len(lookups))}
        hooks = [m.region.register_forward_hook(lambda mod, a, out, i=i: outputs[i].append(out.detach()))
                 for i, m in enumerate(lookups)]
        try:
            ctx.collect(gm, labels=[(run * n_labels + k) % num_classes for k in range(n_labels)], seed=ctx.seed + run)
        finally:
            for h in hooks:
                h.remove()
        for i, outs in outputs.items():
            acc = 0.0
            for s in range(1, steps):
                acc += float((outs[s] - outs[s - 1]).abs().mean() / outs[s - 1].abs().mean().clamp_min(1e-12))
                if acc < threshold:
                    votes[s, i] += 1
                else:
                    acc = 0.0
    return [[0 if (s > 0 and votes[s, i] >= 2) else 1 for i in range(len(lookups))] for s in range(steps)]
