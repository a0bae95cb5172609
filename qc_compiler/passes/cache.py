"""``StepCache``: step-conditional cache-lookup nodes that reuse DiT branch outputs across steps.

In every block, each branch the model adapter names (DiT: the attention branch
``attn(modulate(norm1(x)))`` and the MLP branch ``mlp(modulate(norm2(x)))``) is outlined into a
submodule and wrapped in a :class:`CacheLookup`:

    x, shift, scale --> CacheLookup[ region: norm -> modulate -> attn/mlp ] --> gate * . + x
                            |  compute step: run the region, store its output
                            |  reuse step:   return the stored tensor; the region is not called

The adaLN modulation, the gates and the residual adds stay outside and run every step. Which regions
compute at which step is a :class:`~qc_compiler.specs.CacheSchedule`, decided by its one ``decide``
function (the onnxruntime runner calls the same one):

- ``interval`` (FORA): compute when ``step % interval == 0``;
- ``static``: a (steps x regions) 0/1 schedule, given, or derived training-free from the measured
  change of each region's output on a few calibration runs (Learning-to-Cache-like);
- ``first_block`` (First-Block-Cache, what FLUX users run): every branch of the first block runs;
  when the first branch's output changed by less than the threshold (relative L1) since the last
  step that computed everything, the other blocks reuse their outputs;
- ``adaptive`` (TeaCache-like): the first block's first branch always runs, and
  the accumulated relative L1 change of its output since the last full step decides, at run time,
  whether the other regions compute (change >= threshold) or reuse.

The first step always computes; a new sampling run (step 0) clears the cache; a batch-size change
inside a run raises ``StepError`` (the compiled model also refuses changed labels).

Example:
    >>> import qc_compiler as qc
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> fast = qc.compile(model, passes=[StepCache(interval=2)], sampler=qc.DDPM(steps=10))
    >>> fast.step_state.num_steps
    10
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..diffusion.samplers import model_device
from ..errors import PassError, StepError
from ..graph import find_branch_regions, outline_region, region_flops
from ..options import config_or_keywords
from ..pipeline import Pass, PassResult, register_pass
from ..specs import CacheLookupSpec, CacheSchedule, StepCacheConfig
from ..step import StepAware

__all__ = ["StepCache", "CacheLookup", "skipped_flops_fraction", "cache_report"]


class CacheLookup(StepAware, nn.Module):
    """Runs its region at compute steps and stores the output; returns the stored output otherwise.

    Export protocol: ``export_spec()`` gives a :class:`CacheLookupSpec`; ``region`` is the wrapped module."""

    needs_stable_batch = True

    def __init__(self, region: fx.GraphModule, key: str, index: int, schedule: CacheSchedule):
        super().__init__()
        self.region, self.key, self.index, self.schedule = region, key, index, schedule

    def export_spec(self) -> CacheLookupSpec:
        return CacheLookupSpec(self.schedule, self.index)

    def forward(self, *args):
        state = self.step_state
        if state is None or state.step < 0 or state.fresh:  # no sampling run (or calibrating): the plain graph
            return self.region(*args)
        store = state.store("cache")
        cached = store.setdefault("outputs", {}).get(self.key)
        self.check_batch(cached, args[0].shape[0])
        if self.schedule.decide(state.step, self.index, cached is not None, store):
            cached = self.region(*args)
            self.keep(state.step, cached, store)
            self.schedule.observe(state.step, self.index, first_output(cached), store)
        return cached

    def check_batch(self, cached: Any, batch: int) -> None:
        """Refuse a stored output of another batch size: a new run must start at the first step."""
        if cached is not None and first_output(cached).shape[0] != batch:
            raise StepError(f"batch size changed inside a sampling run ({first_output(cached).shape[0]} -> {batch}) "
                            f"at {self.key}; start a new run at the first step")

    def keep(self, step: int, output: Any, store: dict) -> None:
        """Store the region's fresh output for later steps and log that it computed at ``step``
        (the Inductor backend's whole-graph patterns keep theirs through here too)."""
        store.setdefault("outputs", {})[self.key] = output
        store.setdefault("computed", {}).setdefault(step, set()).add(self.index)

    def report_section(self) -> str:
        # One summary for the whole cache, written by the first lookup from the last run's log.
        if self.index != 0 or self.step_state is None:
            return ""
        return cache_report(self.schedule, self.step_state.store("cache").get("computed", {}), self.step_state.num_steps)


def first_output(output: Any) -> torch.Tensor:
    """A region's output, or the first of a multi-output region's (a joint attention's image stream)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _lookups(model: nn.Module) -> List[CacheLookup]:
    return sorted((m for m in model.modules() if isinstance(m, CacheLookup)), key=lambda m: m.index)


def skipped_flops_fraction(model: nn.Module) -> float:
    """Share of block FLOPs a compiled model skipped in its last sampling run (0 without a cache)."""
    lookups = _lookups(model)
    if not lookups or not lookups[0].schedule.block_flops:
        return 0.0
    schedule, state = lookups[0].schedule, lookups[0].step_state
    computed = state.store("cache").get("computed", {})
    skipped = sum(f for step in range(state.num_steps) for i, f in enumerate(schedule.region_flops)
                  if i not in computed.get(step, set()))
    return skipped / (schedule.block_flops * state.num_steps)


def cache_report(schedule: CacheSchedule, computed: Dict[int, set], num_steps: int) -> str:
    """The schedule of the last run (C = computed, . = reused, per region) and the FLOPs skipped."""
    if not computed:
        return f"step cache ({schedule.policy}): no sampling run yet"
    n = len(schedule.regions)
    lines = [f"step cache ({schedule.policy}), last run; columns = {n} regions "
             f"({schedule.regions[0]} .. {schedule.regions[-1]}), C = computed, . = reused"]
    skipped = 0
    for step in range(num_steps):
        done = computed.get(step, set())
        lines.append(f"  step {step:>3}: " + "".join("C" if i in done else "." for i in range(n)))
        skipped += sum(f for i, f in enumerate(schedule.region_flops) if i not in done)
    total = schedule.block_flops * num_steps
    if total:
        lines.append(f"  block FLOPs skipped: {skipped / total:.1%} "
                     f"({skipped / 1e9:.2f} of {total / 1e9:.2f} GFLOP per sample)")
    return "\n".join(lines)


@register_pass
class StepCache(Pass):
    """Insert cache-lookup nodes around every block branch (see the module docstring for policies).

    Options come as ``config=StepCacheConfig(...)`` or as its fields by keyword, not both.
    """

    name = "step_cache"
    provides = frozenset({"cache"})

    def __init__(self, config: Optional[StepCacheConfig] = None, **options: Any):
        self.config = config_or_keywords(self.name, StepCacheConfig, config, options)

    def options(self) -> Dict[str, Any]:
        return self.config.to_json()

    @property
    def samples(self) -> bool:
        """A static schedule derived from measured changes samples trajectories."""
        return self.config.policy == "static" and self.config.schedule is None

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        cfg = self.config
        adapter, info = ctx.need("adapter", self.name), ctx.need("info", self.name)
        known = [b.name for b in adapter.blocks.branches]
        wanted = known if cfg.branches is None else list(cfg.branches)
        if set(wanted) - set(known):
            raise PassError(self.name, f"branches {sorted(set(wanted) - set(known))} are not {adapter.name!r} branches; "
                                       f"known: {known}")
        regions = [r for r in find_branch_regions(gm, adapter.blocks) if r.name in wanted]
        if not regions:
            raise PassError(self.name, f"found no {wanted} branch regions in the {adapter.name!r} blocks "
                                       f"({adapter.blocks.pattern}) to cache")
        device = model_device(gm)  # shapes are traced on the model's device
        example = tuple(v.to(device) for v in adapter.example_inputs(info, batch=1))
        flops, block_flops = region_flops(gm, regions, example, adapter.blocks.pattern)
        names = tuple(r.qualname for r in regions)
        schedule = self._schedule(cfg, names, flops, block_flops, ctx)
        lookups = []
        for i, r in enumerate(regions):
            name = "cache_" + r.qualname.replace(".", "_")
            outline_region(gm, r, name, lambda sub, i=i, r=r: CacheLookup(sub, r.qualname, i, schedule),
                           pass_name=self.name)
            lookups.append(gm.get_submodule(name))
        if cfg.policy == "static" and cfg.schedule is None:
            table = ctx.fit("cache.schedule", lambda: derive_schedule(gm, ctx, lookups, threshold=cfg.level,
                                                                       n_labels=cfg.calibration_labels))
            schedule = CacheSchedule("static", names, table=table, threshold=cfg.level, region_flops=flops,
                                     block_flops=block_flops)
            for lookup in lookups:
                lookup.schedule = schedule
        ctx.artifacts["cache"] = schedule
        gm.meta["qc.cache"] = schedule
        return PassResult(gm, modified=True, notes=f"{len(regions)} lookups, {cfg.describe()}")

    def _schedule(self, cfg: StepCacheConfig, names, flops, block_flops, ctx) -> CacheSchedule:
        common = dict(regions=names, region_flops=flops, block_flops=block_flops)
        if cfg.policy == "interval":
            return CacheSchedule("interval", interval=cfg.every, **common)
        if cfg.policy == "adaptive":
            return CacheSchedule("adaptive", threshold=cfg.level, **common)
        if cfg.policy == "first_block":
            first = sum(1 for n in names if n.rsplit(".", 1)[0] == names[0].rsplit(".", 1)[0])
            return CacheSchedule("first_block", threshold=cfg.level, first_block=first, **common)
        steps = ctx.need("sampler", self.name).steps
        if cfg.schedule is not None:
            if len(cfg.schedule) != steps or any(len(row) != len(names) for row in cfg.schedule):
                raise PassError(self.name, f"schedule must be {steps} steps x {len(names)} regions")
            return CacheSchedule("static", table=cfg.schedule, threshold=cfg.level, **common)
        # derived below, after the lookups exist; until then everything computes
        return CacheSchedule("static", table=[[1] * len(names)] * steps, **common)


def derive_schedule(gm: fx.GraphModule, ctx, lookups: List[CacheLookup], *, threshold: float,
                    n_labels: int) -> List[List[int]]:
    """Training-free static schedule: run the FP graph (computing everything) on a few labels, and
    let a region reuse at a step when its output changed by less than ``threshold`` (relative L1,
    accumulated since its last compute) in the majority of those runs."""
    steps = ctx.sampler.steps
    votes = torch.zeros(steps, len(lookups))
    num_classes = ctx.num_conditions or 1
    for run in range(2):
        outputs: Dict[int, List[torch.Tensor]] = {i: [] for i in range(len(lookups))}
        hooks = [m.region.register_forward_hook(lambda mod, a, out, i=i: outputs[i].append(first_output(out).detach()))
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
