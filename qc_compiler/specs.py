"""Step-dependent behaviours as frozen, serialisable specs, each with one decide/apply function.

Two behaviours change with the step index (``qc_compiler.step``), and each is written down once here:

- :class:`CacheSchedule` says which cached regions compute at which step (interval, static table,
  or the adaptive policy's run-time decision). ``decide`` is the one function the torch cache
  lookups and the onnxruntime runner both call.
- :class:`VCTable` holds variance compensation's per-step, per-channel K. ``apply`` (through
  :func:`rescale`) is the one formula the torch nodes, the sampler hooks, the ONNX graph and the
  onnxruntime runner all use.

Their options are frozen configs too (:class:`StepCacheConfig`, :class:`VCConfig`), checked once when
built, so that a backend can refuse what it cannot run by reading them, before any pass runs.

Example:
    >>> s = CacheSchedule(policy="interval", regions=("b0.attn", "b0.mlp"), interval=3)
    >>> [s.decide(step, 0, have=True, memory={}) for step in range(5)]
    [True, False, False, True, False]
    >>> CacheSchedule.from_json(s.to_json()) == s
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .blocked_attention import WHOLE_SCORES_MAX_MIB, blocked_attention, plain_attention
from .errors import StepError
from .options import check_choice, check_float, check_int, parse_options

__all__ = ["ATTENTION_DTYPES", "ATTENTION_KERNELS", "AttentionConfig",
           "low_precision_attention", "CACHE_POLICIES", "StepCacheConfig",
           "CacheSchedule", "CacheLookupSpec", "VC_PLACEMENTS", "OUTPUT_PLACEMENTS", "VC_FORMS", "VCConfig", "VCTable",
           "rescale", "apply_vc_row"]

CACHE_POLICIES = ("interval", "static", "adaptive", "first_block")
VC_PLACEMENTS = ("eps", "velocity", "sample")
# placements that rescale the model's output inside the graph: predicted noise (a DDPM model) or
# predicted velocity (a flow-matching model); the same node, named for what the output is
OUTPUT_PLACEMENTS = ("eps", "velocity")
VC_FORMS = ("exact", "paper", "variance")


def _table(rows: Optional[Sequence[Sequence[int]]]) -> Optional[Tuple[Tuple[int, ...], ...]]:
    if rows is None:
        return None
    out = []
    for i, row in enumerate(rows):
        values = tuple(check_int(f"schedule[{i}]", v, lo=0, hi=1) for v in row)
        out.append(values)
    return tuple(out)


# --- the step cache ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepCacheConfig:
    """Options of the step cache, checked when built. Conflicting options raise.

    - ``policy="interval"``: compute every ``interval`` steps (default 2);
    - ``policy="static"``: a 0/1 ``schedule`` (steps x regions), or one derived from the measured
      change of each region's output, reusing below ``threshold`` (default 0.1);
    - ``policy="adaptive"``: the first region decides at run time from its accumulated relative
      change against ``threshold`` (default 0.1);
    - ``policy="first_block"`` (First-Block-Cache): every region of the first block computes; when
      the first region's output (the first block's first residual) changed by less than
      ``threshold`` (relative L1) since the last step that computed everything, the other blocks
      reuse theirs.

    ``interval`` only goes with the interval policy, ``threshold`` with the other two, and
    ``schedule`` with the static one. ``branches`` names the block branches to cache (None: every
    branch the model adapter lists).

    Example:
        >>> StepCacheConfig(interval=3).interval
        3
        >>> StepCacheConfig(policy="adaptive", interval=3)
        Traceback (most recent call last):
        ...
        ValueError: interval is an option of the interval policy, not of 'adaptive'
    """

    policy: str = "interval"
    interval: Optional[int] = None
    threshold: Optional[float] = None
    schedule: Optional[Tuple[Tuple[int, ...], ...]] = None
    calibration_labels: int = 4
    branches: Optional[Tuple[str, ...]] = None

    def __post_init__(self) -> None:
        check_choice("policy", self.policy, CACHE_POLICIES)
        if self.interval is not None:
            if self.policy != "interval":
                raise ValueError(f"interval is an option of the interval policy, not of {self.policy!r}")
            object.__setattr__(self, "interval", check_int("interval", self.interval, lo=1))
        if self.threshold is not None:
            if self.policy == "interval":
                raise ValueError("threshold is an option of the static, adaptive and first_block policies, not of "
                                 "'interval'")
            object.__setattr__(self, "threshold", check_float("threshold", self.threshold, lo=0.0))
        if self.schedule is not None and self.policy != "static":
            raise ValueError(f"schedule is an option of the static policy, not of {self.policy!r}")
        object.__setattr__(self, "schedule", _table(self.schedule))
        object.__setattr__(self, "calibration_labels", check_int("calibration_labels", self.calibration_labels, lo=1))
        if self.branches is not None:
            if isinstance(self.branches, str) or not self.branches or not all(isinstance(b, str) for b in self.branches):
                raise ValueError(f"branches must be a non-empty list of branch names, got {self.branches!r}")
            object.__setattr__(self, "branches", tuple(self.branches))

    @classmethod
    def parse(cls, text: str) -> "StepCacheConfig":
        """The shell spelling, the same as ``--pass step_cache:...``: ``"interval=3"``,
        ``"policy=adaptive,threshold=0.1"``.

        Example:
            >>> StepCacheConfig.parse("policy=static,threshold=0.2").describe()
            'static (threshold 0.2)'
        """
        try:
            return cls(**parse_options(text, "cache"))
        except TypeError as e:  # an unknown key
            raise ValueError(f"cache: {e}") from None

    @property
    def every(self) -> int:
        """The interval in effect (2 unless given)."""
        return 2 if self.interval is None else self.interval

    @property
    def level(self) -> float:
        """The threshold in effect (0.1 unless given)."""
        return 0.1 if self.threshold is None else self.threshold

    def to_json(self) -> Dict[str, Any]:
        return {"policy": self.policy, "interval": self.interval, "threshold": self.threshold,
                "schedule": None if self.schedule is None else [list(r) for r in self.schedule],
                "calibration_labels": self.calibration_labels,
                "branches": None if self.branches is None else list(self.branches)}

    def describe(self) -> str:
        if self.policy == "interval":
            return f"interval {self.every}"
        return f"{self.policy} (threshold {self.level})" if self.schedule is None else "static (given schedule)"


@dataclass(frozen=True)
class CacheSchedule:
    """Which cached regions compute at which step. ``regions`` are in graph order; region 0 is the
    adaptive policy's probe. ``table`` (static) is steps x regions, 1 = compute."""

    policy: str
    regions: Tuple[str, ...]
    interval: int = 1
    table: Optional[Tuple[Tuple[int, ...], ...]] = None
    threshold: float = 0.1
    region_flops: Tuple[int, ...] = ()
    block_flops: int = 0
    first_block: int = 1  # regions of the first block (first_block policy: they always compute)

    def __post_init__(self) -> None:
        check_choice("policy", self.policy, CACHE_POLICIES)
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "region_flops", tuple(int(f) for f in self.region_flops))
        object.__setattr__(self, "table", _table(self.table))
        check_int("interval", self.interval, lo=1)
        check_int("first_block", self.first_block, lo=1, hi=max(1, len(self.regions)))
        check_float("threshold", self.threshold, lo=0.0)
        if self.policy == "static":
            if self.table is None:
                raise ValueError("a static cache schedule needs its table")
            if any(len(row) != len(self.regions) for row in self.table):
                raise ValueError(f"every row of the static schedule must have {len(self.regions)} entries")

    def decide(self, step: int, region: int, have: bool, memory: Dict[str, Any]) -> bool:
        """True when ``region`` computes at ``step``. ``have``: a stored output exists; ``memory``: the
        run's store, where the adaptive policy keeps its decisions."""
        if step == 0 or not have:
            return True
        if self.policy == "interval":
            return step % self.interval == 0
        if self.policy == "static":
            if step >= len(self.table):
                raise StepError(f"the static cache schedule has {len(self.table)} steps; step {step} is past it")
            return bool(self.table[step][region])
        # The others follow this step's decision.
        return region < self.probe_regions or memory.get("decision", {}).get(step, True)

    @property
    def probe_regions(self) -> int:
        """Regions that compute at every step, first in graph order (data-dependent policies): adaptive,
        the probe, region 0; first_block, the whole first block. Region 0's output decides for the rest."""
        return 1 if self.policy == "adaptive" else self.first_block

    def observe(self, step: int, region: int, output: torch.Tensor, memory: Dict[str, Any]) -> None:
        """Adaptive and first_block: after the probe region runs, decide for the rest of this step."""
        if self.policy not in ("adaptive", "first_block") or region != 0:
            return
        prev = memory.get("probe")
        decision = memory.setdefault("decision", {})
        if prev is None or step == 0:
            memory["acc"], decision[step] = 0.0, True
            memory["probe"] = output
        elif self.policy == "first_block":
            # against the probe of the last step that computed everything (FBCache), not accumulated
            rel = float((output - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
            decision[step] = rel >= self.threshold
            if decision[step]:
                memory["probe"] = output
            return
        else:
            rel = float((output - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
            memory["acc"] = memory.get("acc", 0.0) + rel
            decision[step] = memory["acc"] >= self.threshold
            if decision[step]:
                memory["acc"] = 0.0
        memory["probe"] = output

    def to_json(self) -> Dict[str, Any]:
        return {"policy": self.policy, "regions": list(self.regions), "interval": self.interval,
                "table": None if self.table is None else [list(r) for r in self.table], "threshold": self.threshold,
                "region_flops": list(self.region_flops), "block_flops": self.block_flops,
                "first_block": self.first_block}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "CacheSchedule":
        return cls(policy=d["policy"], regions=tuple(d["regions"]), interval=d["interval"], table=d["table"],
                   threshold=d["threshold"], region_flops=tuple(d.get("region_flops", ())),
                   block_flops=d.get("block_flops", 0), first_block=d.get("first_block", 1))


@dataclass(frozen=True)
class CacheLookupSpec:
    """What a cache-lookup node is, for an exporter: region ``index`` of ``schedule``."""

    schedule: CacheSchedule
    index: int


# --- variance compensation -------------------------------------------------------------------------

@dataclass(frozen=True)
class VCConfig:
    """Options of variance compensation (docs/method.md 5), checked when built.

    ``placement``: ``"sample"`` (x_t after each sampler update, the paper's), ``"eps"`` (the model's
    predicted noise, inside the graph) or ``"velocity"`` (the same node on a flow-matching model's
    predicted velocity; docs/method.md 5). ``form``: ``"variance"`` (spread ratio, the default),
    ``"exact"`` (least squares) or ``"paper"`` (as printed). ``batch``: paired trajectories fitted on.
    ``mask_eps``: 1/x' terms are masked where |x'| < mask_eps x RMS(x'). ``k_range``: K is clamped to
    it (None: no clamp).
    """

    placement: str = "sample"
    form: str = "variance"
    batch: int = 32
    mask_eps: float = 0.1
    k_range: Optional[Tuple[float, float]] = (0.5, 2.0)

    def __post_init__(self) -> None:
        check_choice("placement", self.placement, VC_PLACEMENTS)
        check_choice("form", self.form, VC_FORMS)
        object.__setattr__(self, "batch", check_int("batch", self.batch, lo=2))
        object.__setattr__(self, "mask_eps", check_float("mask_eps", self.mask_eps, lo=0.0))
        if self.k_range is not None:
            if isinstance(self.k_range, str) or len(self.k_range) != 2:
                raise ValueError(f"k_range must be [low, high] or None, got {self.k_range!r}")
            lo, hi = (check_float("k_range", v, lo=0.0, lo_open=True) for v in self.k_range)
            if not lo <= 1.0 <= hi:
                raise ValueError(f"k_range must contain 1 and be positive, got {list(self.k_range)}")
            object.__setattr__(self, "k_range", (lo, hi))

    def to_json(self) -> Dict[str, Any]:
        return {"placement": self.placement, "form": self.form, "batch": self.batch, "mask_eps": self.mask_eps,
                "k_range": None if self.k_range is None else list(self.k_range)}


def rescale(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """mu + K (x - mu) per sample and channel: x (N, C, *spatial), k (C,); mu is the spatial mean."""
    dims = tuple(range(2, x.dim()))
    mu = x.mean(dim=dims, keepdim=True)
    return mu + k.to(x.dtype).view(1, -1, *([1] * len(dims))) * (x - mu)


def apply_vc_row(x: torch.Tensor, k: torch.Tensor, placement: str, channels_last: bool = False) -> torch.Tensor:
    """One step's VC: ``k`` (C,) is that step's row of a :class:`VCTable`; see there for the placements.
    (The Inductor backend passes the row in as an input, so one compiled graph serves every step.)"""
    if channels_last:
        return apply_vc_row(x.transpose(1, -1), k, placement).transpose(1, -1)
    if placement == "sample":
        return rescale(x, k)
    c = k.shape[0]  # no int(): under ONNX tracing this stays a traced size
    return torch.cat([rescale(x[:, :c], k), x[:, c:]], dim=1)


@dataclass(frozen=True)
class VCTable:
    """K (steps x channels) and where it applies: to the first ``k.shape[1]`` channels of the model
    output (``eps``/``velocity``; learned-sigma channels are left alone) or to x_t after an update
    (``sample``). ``channels_last``: the tensor is tokens x channels (Flux's packed latent), so the
    channels are its last axis and the mean runs over the tokens."""

    placement: str
    k: torch.Tensor = field(compare=False)
    channels_last: bool = False

    def __post_init__(self) -> None:
        check_choice("placement", self.placement, VC_PLACEMENTS)
        if self.k.dim() != 2:
            raise ValueError(f"a VC table is (steps, channels), got shape {tuple(self.k.shape)}")

    @property
    def channels(self) -> int:
        return int(self.k.shape[1])

    def apply(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The corrected tensor at ``step`` (a model output for ``eps``/``velocity``, x_t for ``sample``)."""
        return apply_vc_row(x, self.k[step], self.placement, self.channels_last)

    def to_json(self) -> Dict[str, Any]:
        d = {"placement": self.placement, "k": self.k.tolist()}
        if self.channels_last:
            d["channels_last"] = True
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "VCTable":
        return cls(d["placement"], torch.tensor(d["k"], dtype=torch.float32), bool(d.get("channels_last", False)))


# --- attention precision ------------------------------------------------------------------------------

ATTENTION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# "sdpa": PyTorch's fused attention kernel; "matmul": two matmuls (oneDNN's GEMMs) around a softmax, block
# by block past 32 MiB of scores (qc_compiler.blocked_attention); "auto": the pass picks per machine
# (see AttentionPrecision)
ATTENTION_KERNELS = ("auto", "sdpa", "matmul")


@dataclass(frozen=True)
class AttentionConfig:
    """Options of the attention-precision pass: ``dtype`` is what attention's softmax and both matmuls run
    in (``"bf16"`` or ``"fp16"``); ``kernel`` how (``ATTENTION_KERNELS``); the rest of the graph keeps its
    precision."""

    dtype: str = "bf16"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, tuple(ATTENTION_DTYPES))
        check_choice("kernel", self.kernel, ATTENTION_KERNELS)

    def to_json(self) -> Dict[str, Any]:
        return {"dtype": self.dtype, "kernel": self.kernel}


def low_precision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, dtype: str = "bf16",
                            kernel: str = "sdpa", **kwargs: Any) -> torch.Tensor:
    """``scaled_dot_product_attention`` with q, k and v cast to ``dtype`` and the output cast back to q's
    dtype: the node the attention-precision pass puts in the graph (one function, so every backend that
    runs it, and the exporter that refuses it, recognise the same thing). ``kernel="matmul"`` runs it as
    two matmuls around a softmax: every score at once up to ``WHOLE_SCORES_MAX_MIB``, past it one
    cache-sized block at a time (:func:`blocked_attention`); dropout and grouped-query attention still go
    to the fused kernel. NaN stays NaN through the casts."""
    low = ATTENTION_DTYPES[dtype]

    def cast(a: Any) -> Any:  # an additive float mask joins the scores, so it takes their dtype; a bool mask stays
        return a.to(low) if torch.is_tensor(a) and a.is_floating_point() else a

    args, kwargs = tuple(map(cast, args)), {key: cast(a) for key, a in kwargs.items()}
    if kernel == "matmul" and q.dim() >= 3 and k.shape[:-2] == v.shape[:-2] == q.shape[:-2]:
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = {**dict(zip(names, args)), **kwargs}
        if not bound.pop("dropout_p", 0.0) and not bound.pop("enable_gqa", False) and set(bound) <= set(names):
            if q.shape[:-1].numel() * k.shape[-2] * low.itemsize <= WHOLE_SCORES_MAX_MIB * 2 ** 20:
                # held at once while small: Inductor fuses that form best
                return plain_attention(q.to(low), k.to(low), v.to(low), **bound).to(q.dtype)
            # block by block past that, cast into contiguous heads (one fused kernel when compiled) so that the
            # blocks' GEMMs read dense rows, not a qkv projection's interleaved ones (9.2 against 11.8 ms a
            # DiT-B/2 call, compiled; measured by hand)
            dense = {"dtype": low, "memory_format": torch.contiguous_format}
            return blocked_attention(q.to(**dense), k.to(**dense), v.to(**dense), **bound).to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q.to(low), k.to(low), v.to(low), *args, **kwargs)
    return out.to(q.dtype)
