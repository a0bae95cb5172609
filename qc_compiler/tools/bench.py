"""Quality-and-speed runs over compile variants, shared by ``benchmarks/`` and ``qc bench``.

Every variant samples the same labels from the same per-sample noise streams, at the same step
count, and is scored with the evaluator's suite; its sampling wall time is measured in the same run
as FP32's, so the speed column is a ratio of two measurements, never a nominal figure.

A variant is built from configs (:class:`Variant`): a cache (a ``StepCacheConfig``, or the run's
own), a calibration selector, whether to quantize (and whether the conditioning linears' inputs
too), and a VC form. Its name is a label in :data:`VARIANTS`, never parsed.

Example:
    >>> sorted(VARIANTS)[:3]
    ['cache', 'cache-adaptive-0.1', 'cache-adaptive-0.3']
    >>> [p.name for p in variant_passes("qc-tap-vc", cache=StepCacheConfig(interval=3))]
    ['step_cache', 'tap_calibration', 'quantize', 'variance_compensation']
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from ..api import compile as qc_compile
from ..api import load_model
from ..cpu import cpu_flags
from ..diffusion import DDPM
from ..models import adapter_for
from ..passes import (AgglomerativeCalibration, AttentionPrecision, DBSCANCalibration, KMeansCalibration, Quantize,
                      RandomCalibration, StepCache, TAPCalibration, UniformCalibration, VarianceCompensation)
from ..quant import QuantConfig
from ..quant.balance import BalanceConfig
from ..quant.brecq import BRECQConfig
from ..quant.gptq import GPTQConfig
from ..blocked_attention import plain_attention
from ..graph import iter_graph_modules
from ..specs import ATTENTION_DTYPES, StepCacheConfig, VCConfig, low_precision_attention

__all__ = ["Variant", "VARIANTS", "RUN_CACHE", "machine", "machine_line", "write_results", "median_seconds", "interleaved_medians", "interleaved_times", "compile_benchmark_w8a8",
           "rel_err", "variant_passes", "ablation_rows", "sample_timed", "run_variants", "markdown", "merge_results",
           "benchmark_model", "benchmark_inputs", "variant_label", "Task", "make_task", "FP32Run"]

log = logging.getLogger(__name__)

SELECTORS = {"uniform": UniformCalibration, "random": RandomCalibration, "tap": TAPCalibration,
             "kmeans": KMeansCalibration, "dbscan": DBSCANCalibration, "agglomerative": AgglomerativeCalibration}
RUN_CACHE = "run"  # a variant whose cache is the run's (``qc bench --cache``)


@dataclass(frozen=True)
class Variant:
    """One row of a quality-and-speed run, as configs.

    ``cache``: a StepCacheConfig, ``RUN_CACHE`` for the run's, or None. ``selector``: the calibration
    selector (None: no quantization). ``bits``: fixed bit widths, or None for the run's.
    ``condq``: quantize the conditioning linears' inputs too (the paper's setting). ``vc``: a VC
    form, or None. ``rounding``/``gptq``/``brecq``/``balance``/``low_rank``: the Quantize pass's (GPTQ's
    and block reconstruction's options, salience balancing, SVDQuant's low-rank branch);
    ``mixed``: keep that many of the most sensitive linears at W8A8 (:func:`qc.mixed_precision`);
    ``act_observer``: the activation observer (None: the preset's, min-max); ``act_granularity``:
    ``"token"`` quantizes activations per token at run time (None: the preset's, per tensor)."""

    cache: Union[StepCacheConfig, str, None] = None
    selector: Optional[str] = None
    bits: Optional[str] = None
    condq: bool = False
    vc: Optional[str] = None
    rounding: str = "nearest"
    balance: Union[str, BalanceConfig, None] = None
    low_rank: int = 0
    mixed: int = 0
    gptq: Optional[GPTQConfig] = None
    brecq: Optional[BRECQConfig] = None
    act_observer: Optional[str] = None
    act_granularity: Optional[str] = None

    def __post_init__(self) -> None:
        if self.selector is not None and self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {sorted(SELECTORS)}, got {self.selector!r}")
        if self.selector is None and (self.bits or self.condq or self.vc or self.rounding != "nearest"
                                      or self.balance or self.mixed or self.low_rank or self.gptq or self.brecq
                                      or self.act_observer or self.act_granularity):
            raise ValueError("bits, condq, vc, rounding, balance, low_rank, mixed, gptq, brecq, act_observer and "
                             "act_granularity need a calibration selector (a quantized variant)")
        if self.mixed and (self.act_observer or self.act_granularity):
            raise ValueError("a mixed variant's config comes from the sensitivity ranking; act_observer and "
                             "act_granularity are not applied to it: drop them or mixed")

    @property
    def bits_independent(self) -> bool:
        """No quantization (FP32, cache only): one run serves every bit width."""
        return self.selector is None


# balancing every layer but fc2, so the torch backend keeps its fc1 -> fc2 requantization fusion
_BALANCE_NO_FC2 = BalanceConfig(method="search", exclude=("*.fc2",))
# GPTQ layer after layer, each on the inputs of the already-quantized layers before it
_SEQUENTIAL = GPTQConfig(sequential=True)
# ... each fitted to the float model's output (GPTAQ's asymmetric target)
_FLOAT_TARGET = GPTQConfig(sequential=True, target="float")
# block reconstruction with twice the default optimiser steps a block (1,000 -> 2,000 moved the probe 15%)
_BRECQ_4K = BRECQConfig(iters=4000)


def _table() -> Dict[str, Variant]:
    table: Dict[str, Variant] = {"fp32": Variant(), "cache": Variant(cache=RUN_CACHE)}
    table.update({f"cache-i{i}": Variant(cache=StepCacheConfig(interval=i)) for i in (2, 3)})
    table.update({f"cache-adaptive-{t}": Variant(cache=StepCacheConfig(policy="adaptive", threshold=t)) for t in (0.1, 0.3)})
    table["cache-static-0.2"] = Variant(cache=StepCacheConfig(policy="static", threshold=0.2))
    # First-Block-Cache (as the FLUX caches): skip the rest when the first block's residual barely moved
    table.update({f"cache-fbc-{t}": Variant(cache=StepCacheConfig(policy="first_block", threshold=t)) for t in (0.05, 0.1)})
    for sel in SELECTORS:
        table[f"quant-{sel}"] = Variant(selector=sel)
        table[f"quant-{sel}-condq"] = Variant(selector=sel, condq=True)
        for bits in ("w4a8", "w4a4"):
            table[f"{bits}-{sel}"] = Variant(selector=sel, bits=bits)
        table[f"qc-{sel}"] = Variant(cache=RUN_CACHE, selector=sel)
        for condq in (False, True):
            for tag, form in (("vc", "exact"), ("vcvar", "variance")):
                name = f"qc-{sel}" + ("-condq" if condq else "") + f"-{tag}"
                table[name] = Variant(cache=RUN_CACHE, selector=sel, condq=condq, vc=form)
        table[f"qc-{sel}-condq"] = Variant(cache=RUN_CACHE, selector=sel, condq=True)
        # low-bit techniques (docs/RESULTS.md "Low-bit fidelity"): GPTQ, balancing, mixed precision
        for tag, extra in (("gptq", {"rounding": "gptq"}), ("bal", {"balance": "search"}),
                           ("gptq-bal", {"rounding": "gptq", "balance": "search"}),
                           ("sq", {"balance": "smoothquant"}), ("ptq4dit", {"balance": "ptq4dit"}),
                           ("mixed4", {"mixed": 4}), ("gptq-mixed4", {"rounding": "gptq", "mixed": 4}),
                           ("gptq-bal-lr16", {"rounding": "gptq", "balance": "search", "low_rank": 16}),
                           ("gptq-bal-nofc2", {"rounding": "gptq", "balance": _BALANCE_NO_FC2}),
                           ("sgptq", {"rounding": "gptq", "gptq": _SEQUENTIAL}),
                           ("fgptq", {"rounding": "gptq", "gptq": _FLOAT_TARGET}),
                           ("fgptq-bal-lr16", {"rounding": "gptq", "gptq": _FLOAT_TARGET, "balance": "search",
                                               "low_rank": 16}),
                           ("sgptq-bal-lr16", {"rounding": "gptq", "gptq": _SEQUENTIAL, "balance": "search",
                                               "low_rank": 16}),
                           ("brecq", {"rounding": "brecq"}), ("brecq4k", {"rounding": "brecq", "brecq": _BRECQ_4K})):
            table[f"quant-{sel}-{tag}"] = Variant(selector=sel, **extra)
            table[f"qc-{sel}-{tag}"] = Variant(cache=RUN_CACHE, selector=sel, **extra)
            table[f"qc-{sel}-{tag}-vcvar"] = Variant(cache=RUN_CACHE, selector=sel, vc="variance", **extra)
        # ... with MSE-searched activation ranges instead of min-max (what makes A4 work: RESULTS.md)
        for tag, extra in (("gptq", {"rounding": "gptq"}), ("brecq", {"rounding": "brecq"}),
                           ("gptq-bal-lr16", {"rounding": "gptq", "balance": "search", "low_rank": 16}),
                           ("brecq-bal-lr16", {"rounding": "brecq", "balance": "search", "low_rank": 16})):
            table[f"quant-{sel}-{tag}-amse"] = Variant(selector=sel, act_observer="mse", **extra)
            table[f"qc-{sel}-{tag}-amse-vcvar"] = Variant(cache=RUN_CACHE, selector=sel, vc="variance",
                                                          act_observer="mse", **extra)
            # ... per-token activation ranges, taken at run time (no calibrated range at all)
            table[f"quant-{sel}-{tag}-atok"] = Variant(selector=sel, act_granularity="token", **extra)
            table[f"qc-{sel}-{tag}-atok"] = Variant(cache=RUN_CACHE, selector=sel, act_granularity="token", **extra)
            table[f"qc-{sel}-{tag}-atok-vcvar"] = Variant(cache=RUN_CACHE, selector=sel, vc="variance",
                                                          act_granularity="token", **extra)
    return table


VARIANTS: Dict[str, Variant] = _table()


def unknown_variants(names: List[str]) -> Optional[str]:
    """None when every name is a variant; else one line naming the unknown ones and, for each, the
    closest known names (the table has hundreds: listing them all helps no one)."""
    import difflib

    unknown = [n for n in names if n not in VARIANTS]
    if not unknown:
        return None
    close = {n: difflib.get_close_matches(n, list(VARIANTS), n=3, cutoff=0.6) for n in unknown}
    hints = "; ".join(f"{n}: did you mean {', '.join(c)}?" for n, c in close.items() if c)
    return (f"unknown variants {unknown}" + (f" ({hints})" if hints else "") +
            f"; {len(VARIANTS)} variants are defined in qc_compiler/tools/bench.py (_table)")


def variant_passes(variant: Union[str, Variant], *, bits: str = "w8a8",
                   cache: StepCacheConfig = StepCacheConfig(interval=2), size: int = 800, pool_labels: int = 32,
                   vc_placement: str = "sample", config: Optional[QuantConfig] = None, calib_seed: int = 0) -> List:
    """The passes of a variant (a :data:`VARIANTS` name or a :class:`Variant`); ``cache`` is the run's.
    ``config``: the QuantConfig of a ``mixed`` variant (chosen by :func:`mixed_config`). ``calib_seed``:
    the calibration selector's seed (its pool's sampling runs and its draw), for error bars over calibrations."""
    if isinstance(variant, str):
        unknown = unknown_variants([variant])
        if unknown:
            raise ValueError(unknown)
        variant = VARIANTS[variant]
    passes: List = []
    chosen = cache if variant.cache == RUN_CACHE else variant.cache
    if chosen is not None:
        passes.append(StepCache(chosen))
    if variant.selector is not None:
        if variant.mixed and config is None:
            raise ValueError("a mixed-precision variant needs its config: mixed_config(variant, ...)")
        if config is None:
            config = QuantConfig.preset(variant.bits or bits, **({"weight_only": ()} if variant.condq else {}))
            if variant.act_observer is not None:
                config = replace(config, default=replace(config.default, act_observer=variant.act_observer))
            if variant.act_granularity is not None:
                config = replace(config, default=replace(config.default, act_granularity=variant.act_granularity))
        passes += [SELECTORS[variant.selector](size=size, pool_labels=pool_labels, seed=calib_seed),
                   Quantize(config=config, rounding=variant.rounding, gptq=variant.gptq, brecq=variant.brecq,
                            balance=variant.balance, low_rank=variant.low_rank)]
    if variant.vc is not None:
        passes.append(VarianceCompensation(VCConfig(placement=vc_placement, form=variant.vc)))
    return passes


def mixed_config(variant: Variant, model, sampler, *, bits: str, cache: StepCacheConfig, seed: int = 0):
    """A mixed variant's QuantConfig: its ``mixed`` most sensitive linears at W8A8, ranked on the
    model it will run (after the cache, under its rounding); the ranking goes to the log."""
    from ..sensitivity import mixed_precision

    chosen = cache if variant.cache == RUN_CACHE else variant.cache
    mp = mixed_precision(model, sampler, low=variant.bits or bits, high="w8a8", keep=variant.mixed, seed=seed,
                         rounding=variant.rounding, first_passes=[StepCache(chosen)] if chosen is not None else [])
    log.info("%s", mp.report())
    return mp.config


def ablation_rows() -> List[str]:
    """The Q&C ablation (docs/method.md 5-6): naive quant+cache, +VC, +TAP, +TAP+VC, other clusterings."""
    return ["qc-uniform", "qc-uniform-vc", "qc-uniform-vcvar", "qc-tap", "qc-tap-vc", "qc-tap-vcvar", "qc-kmeans",
            "qc-dbscan", "qc-agglomerative"]


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "amx_tile")


def machine() -> Dict[str, object]:
    """What a benchmark ran on: the CPU (model, vendor, family/model), the ISA extensions that INT8
    and bf16 kernels use, the ISA ATen dispatches to, oneDNN's version, torch, threads, and a GPU."""
    info: Dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        first = text.split("\n\n")[0]
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("model name", "?")
        info["vendor"] = fields.get("vendor_id", "?")
        info["family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
        info["isa"] = [f for f in _ISA_FLAGS if f in cpu_flags()]
    except OSError:  # not Linux
        import platform

        info["cpu"], info["isa"] = platform.processor() or "?", []
    version = re.search(r"(?:MKL-DNN|oneDNN) (v[\d.]+)", torch.__config__.show())
    info["onednn"] = f"oneDNN {version.group(1)}" if version else "oneDNN ?"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line() -> str:
    """One line for the top of every benchmark's output: compare only within one machine."""
    m = machine()
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    return (f"machine: {m['cpu']} ({m.get('vendor', '?')}, family/model {m.get('family_model', '?')}), "
            f"ISA {'+'.join(m['isa']) or '?'}, ATen {m['aten_cpu_capability']}, {m['onednn']}, "
            f"torch {m['torch']}, {m['threads']} threads{gpu}")


def write_results(path: Optional[Path], benchmark: str, args: Dict, rows: List[Dict]) -> None:
    """Save a benchmark's rows as JSON (atomically), with the machine and the arguments that made them."""
    if path is None:
        return
    from ..io import save_json

    save_json({"benchmark": benchmark, "machine": machine(), "args": {k: str(v) for k, v in args.items()},
               "rows": rows}, Path(path))


def interleaved_times(fns: Sequence[Callable], repeats: int, pause: float = 0.2,
                      on_round: Optional[Callable[[int, List[List[float]]], None]] = None,
                      warmup: bool = True) -> List[List[float]]:
    """Wall seconds of every timed call of each callable, after one untimed warm-up call of each
    (oneDNN prepacking, allocator growth; ``warmup=False`` for a call that has nothing to warm and is
    too slow to run twice), timed in rounds (one call of each per round) so that a shared machine's
    drift during the run hits every callable alike.

    ``pause`` seconds of idle before each timed call: onnxruntime's pool threads spin for a while
    after a run, and on 2 cores they slow whatever runs next (measured: docs/RESULTS.md, "INT8
    kernels and speed"). ``on_round(round, times)`` is called after each round (progress)."""
    for fn in fns if warmup else ():
        fn()
    times: List[List[float]] = [[] for _ in fns]
    for r in range(repeats):
        for fn, fn_times in zip(fns, times):
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - t0)
        if on_round:
            on_round(r + 1, times)
    return times


def interleaved_medians(fns: Sequence[Callable], repeats: int, pause: float = 0.2) -> List[float]:
    """Median wall seconds of each callable, timed as :func:`interleaved_times` does."""
    return [statistics.median(t) for t in interleaved_times(fns, repeats, pause)]


def median_seconds(fn: Callable, repeats: int, warmup: bool = True) -> float:
    """Median wall seconds of ``repeats`` back-to-back calls of ``fn``, after one warm-up call (unless not)."""
    return statistics.median(interleaved_times([fn], repeats, pause=0.0, warmup=warmup)[0])


def pin_threads(cpus: Sequence[int]) -> Dict[int, set]:
    """Every thread of this process on ``cpus`` (threads started later inherit their starter's set);
    returns each moved thread's former set."""
    before = {}
    for tid in (int(t) for t in os.listdir("/proc/self/task")):
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            before.pop(tid, None)
    return before


@contextlib.contextmanager
def pinned(cpus: Optional[Sequence[int]]) -> Iterator[None]:
    """:func:`pin_threads` inside the block, each thread's own CPU set back after: runs side by side on
    one machine each time on their own cores, while their builds (compiles, calibration) run elsewhere.
    ``None`` or empty: no change."""
    if not cpus:
        yield
        return
    before = pin_threads(cpus)
    try:
        yield
    finally:
        for tid, mask in before.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass


def benchmark_model(name: str, input_size: int = 32):
    """The embedded model by name, or a DiT config with random weights on 4 x ``input_size`` x ``input_size``
    latents (32: 256px images, 256 tokens at patch 2; 64: 512px, 1024 tokens) and 1000 classes, its adaLN
    re-initialised so that every block matters (DiT's zero init makes them identities)."""
    if name == "dit-mnist":
        if input_size != 32:
            raise ValueError("dit-mnist is trained at its own size: time it without --input-size")
        return load_model(name)
    torch.manual_seed(0)
    model = load_model(name, input_size=input_size, in_channels=4, num_classes=1000)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "adaLN_modulation" in pname or "final_layer.linear" in pname:
                p.normal_(0, 0.02)
    return model.eval()


def compile_benchmark_w8a8(model, sampler, first_passes: Sequence = (), backend: str = "torch",
                           every_linear: bool = False, like=None, attention: Optional[str] = None,
                           attention_kernel: str = "auto"):
    """The speed benchmarks' W8A8 recipe (uniform calibration over 2 sampling runs, 64 items) after
    ``first_passes`` (e.g. a ``StepCache``), lowered with ``backend`` (the torch INT8 one by default).
    ``every_linear`` quantizes the conditioning linears' inputs too (our default keeps them weight-only),
    the layer set of PT2E's all-layers baseline. ``like``: a model this recipe compiled before with the
    same passes, whose fitted state (calibration set, scales) is reused: the same calibration lowered
    to another backend, without calibrating again (a minute and more for DiT-B/2 on 2 cores).
    ``attention="bf16"`` then runs attention in bf16 (``AttentionPrecision``, after calibration), on
    ``attention_kernel`` (or ``"whole"``: :class:`WholeScoresAttention`, the two matmuls never blocked)."""
    quant = Quantize(config=QuantConfig.preset("w8a8", weight_only=())) if every_linear else Quantize(preset="w8a8")
    passes = [*first_passes, UniformCalibration(size=64, pool_labels=2), quant]
    if attention is not None and attention_kernel == "whole":
        passes.append(WholeScoresAttention(dtype=attention, kernel="matmul"))
    elif attention is not None:
        passes.append(AttentionPrecision(dtype=attention, kernel=attention_kernel))
    fitted = like.build["fitted"] if like is not None else None
    with torch.no_grad():
        return qc_compile(model, passes=passes, sampler=sampler, backend=backend, fitted=fitted)


def whole_scores_attention(q, k, v, *, dtype: str = "bf16", kernel: str = "matmul") -> torch.Tensor:
    """``low_precision_attention(kernel="matmul")`` with every score held at once at any size (it blocks past
    ``WHOLE_SCORES_MAX_MIB``): the speed benchmarks' A/B of the blocks. No mask, dropout or scale: the
    benchmarked DiTs pass none."""
    low = ATTENTION_DTYPES[dtype]
    return plain_attention(q.to(low), k.to(low), v.to(low)).to(q.dtype)


class WholeScoresAttention(AttentionPrecision):
    """``AttentionPrecision`` with every call on :func:`whole_scores_attention` (``attention_kernel="whole"``)."""

    def run(self, gm, ctx):
        result = super().run(gm, ctx)
        for _, module in iter_graph_modules(result.graph_module):
            for node in module.graph.nodes:
                if node.op == "call_function" and node.target is low_precision_attention:
                    if node.args[3:] or set(node.kwargs) - {"dtype", "kernel"}:
                        raise ValueError("whole_scores_attention takes no mask, dropout or scale")
                    node.target = whole_scores_attention
            module.recompile()
        return result


def per_region_breaks(build):
    """``build()`` with the Inductor lowering of before whole-graph cache patterns: every step-aware node a
    graph break, each cached region compiled alone (what a static table with many patterns still gets):
    the A/B of the speed benchmarks, in one run."""
    from ..backends import inductor

    saved, inductor._whole_graph_plan = inductor._whole_graph_plan, lambda gm, step_aware: None
    try:
        return build()
    finally:
        inductor._whole_graph_plan = saved


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| for tensors or arrays (onnxruntime outputs)."""
    out = out if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))
    ref = ref if torch.is_tensor(ref) else torch.as_tensor(np.asarray(ref))
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def benchmark_inputs(model, batch: int):
    """(x, t, y) for timing one forward: the model adapter's example inputs, with labels 0..batch-1."""
    adapter = adapter_for(model)
    info = adapter.info(model)
    x, t, _ = adapter.example_inputs(info, batch=batch)
    return x, t, torch.arange(batch) % info.num_classes


def sample_timed(model, sampler, labels: Sequence[int], *, seed: int, batch: int, progress: bool = False):
    """Samples for ``labels`` in batches (noise streams by sample index) and the wall time."""
    t0 = time.perf_counter()
    images = torch.cat([sampler.sample(model, labels[i:i + batch], seed=seed, sample_offset=i, progress=progress)
                        for i in range(0, len(labels), batch)])
    return images, time.perf_counter() - t0


@dataclass
class Task:
    """What a quality run samples: the model ``qc.compile`` takes, its sampler, the label of each sample,
    and how samples are scored. A class-conditional DiT samples digits by label. A text model
    (``mmdit-mnist``) samples prompts: ``labels`` index the rows of ``conditions`` (a ConditionBank),
    ``classes`` are the prompted digits for the class-accuracy metric, and ``metrics`` adds the
    attribute accuracy."""

    model: torch.nn.Module
    sampler: object
    labels: List[int]
    classes: List[int]
    conditions: Optional[object] = None
    geometry: Optional[object] = None
    metrics: Optional[Callable[[torch.Tensor], Dict[str, float]]] = None

    def bind(self, compiled):
        """A compiled model as the sampler calls it (by label)."""
        return self.conditions.bind(compiled) if self.conditions is not None else compiled

    def compile(self, passes, *, seed: int, backend: str):
        extra = {"conditions": self.conditions, "geometry": self.geometry} if self.conditions is not None else {}
        return qc_compile(self.model, passes=passes, sampler=self.sampler, seed=seed, backend=backend, **extra)


def make_task(model_name: str = "dit-mnist", model=None, *, n: int, steps: int, cfg: float, seed: int = 0) -> Task:
    """The run's :class:`Task`: DDPM over labels ``i % 10`` for a class-conditional DiT; flow-matching Euler
    over the 90 attribute prompts of ``mmdit_mnist.prompt_table`` for ``mmdit-mnist`` (``model``: its
    loaded ``MMDiTMNIST`` bundle, or None to load it)."""
    if model_name == "mmdit-mnist":
        from ..models import mmdit_mnist as mm
        from ..models.digit_text import attribute_accuracy

        bundle = model if model is not None else mm.load_mmdit()
        table = mm.prompt_table()
        labels = mm.evaluation_labels(n, seed)
        prompts = [table[i] for i in labels]
        return Task(bundle.transformer, mm.flow_sampler(bundle, steps, cfg), labels, [i // 9 for i in labels],
                    conditions=mm.condition_bank(bundle.text_encoder, table), geometry=mm.geometry(bundle.transformer),
                    metrics=lambda images: {"attr_" + k: v for k, v in
                                            attribute_accuracy(images, prompts, bundle.thresholds).items()})
    model = load_model(model_name) if model is None else model
    labels = [i % model.num_classes for i in range(n)]
    return Task(model, DDPM(steps=steps, cfg_scale=cfg), labels, labels)


@dataclass
class FP32Run:
    """FP32's results in one quality run: its sampling time (and at 250 steps) for the speed columns,
    its images for the fidelity columns. One instance is shared by the calls for several bit widths."""

    seconds: Optional[float] = None
    seconds_250: Optional[float] = None
    images: Optional[torch.Tensor] = None


def run_variants(names: Sequence[str], *, model_name: str = "dit-mnist", model=None, n: int = 1000, steps: int = 50,
                 cfg: float = 1.5, seed: int = 0, batch: int = 250, bits: str = "w8a8",
                 cache: StepCacheConfig = StepCacheConfig(interval=2), size: int = 800, pool_labels: int = 32,
                 vc: str = "sample", backend: str = "torch", fp250: bool = False,
                 on_row: Optional[Callable[[Dict], None]] = None, fp: Optional["FP32Run"] = None,
                 calib_seed: int = 0) -> List[Dict]:
    """Compile, sample and score each variant; rows carry metrics, times and speed ratios.

    ``model`` (a module; for ``mmdit-mnist`` its loaded bundle) replaces loading ``model_name``; it must
    sample (N, 1, 32, 32) images for the metric suite.

    ``fp``: FP32's results in this run (same n, steps, batch and seed), shared by the calls for several
    bit widths so that a second one need not sample FP32 again; filled in when this call samples FP32.
    Rows after FP32's also carry the fidelity scores (:func:`~qc_compiler.eval.fidelity`): how far each
    sample moved from FP32's sample from the same noise.
    """
    from ..eval import evaluate, fidelity

    fp = fp if fp is not None else FP32Run()

    unknown = unknown_variants(names)
    if unknown:
        raise ValueError(unknown)
    task = make_task(model_name, model, n=n, steps=steps, cfg=cfg, seed=seed)
    model, sampler, labels = task.model, task.sampler, task.labels
    if task.conditions is not None and (fp250 or any(VARIANTS[name].mixed for name in names)):
        raise ValueError(f"{model_name}: --fp250 and mixed-precision variants are for class-conditional DiTs")
    rows: List[Dict] = []
    if fp250 and fp.seconds_250 is None:  # FP32 at 250 steps, timed on up to 100 samples and scaled per sample
        probe = labels[: min(batch, n, 100)]
        _, s = sample_timed(model, DDPM(steps=250, cfg_scale=cfg), probe, seed=seed, batch=batch)
        fp.seconds_250 = s * n / len(probe)
    for name in names:
        t0 = time.perf_counter()
        variant = VARIANTS[name]
        config = mixed_config(variant, model, sampler, bits=bits, cache=cache, seed=seed) if variant.mixed else None
        passes = variant_passes(name, bits=bits, cache=cache, size=size, pool_labels=pool_labels, vc_placement=vc,
                                config=config, calib_seed=calib_seed)
        compiled = task.compile(passes, seed=seed, backend=backend)
        compile_s = time.perf_counter() - t0
        images, seconds = sample_timed(task.bind(compiled), sampler, labels, seed=seed, batch=batch)
        if name == "fp32" and fp.seconds is None:
            fp.seconds, fp.images = seconds, images
        row = {"variant": name, "bits": "-" if variant.bits_independent else (variant.bits or bits), "steps": steps,
               "cache": cache.describe() if variant.cache == RUN_CACHE else None,
               **({"calib_seed": calib_seed} if calib_seed and variant.selector is not None else {}),
               "compile_s": compile_s, "sample_s": seconds, "fp32_sample_s": fp.seconds, "fp32_250_s": fp.seconds_250,
               "speed_vs_fp32": (fp.seconds / seconds) if fp.seconds else float("nan"),
               "speed_vs_fp32_250": (fp.seconds_250 / seconds) if fp.seconds_250 else float("nan"),
               **evaluate(images, torch.tensor(task.classes)), **(task.metrics(images) if task.metrics else {}),
               **(fidelity(images, fp.images) if fp.images is not None and images is not fp.images else {})}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def variant_label(row: Dict) -> str:
    """The variant name, with the run's cache where the row used it (``qc-tap-vc (interval 3)``)."""
    cache = row.get("cache") or (f"interval {row['cache_interval']}" if row.get("cache_interval") else None)
    return f"{row['variant']} ({cache})" if cache else row["variant"]


def markdown(rows: List[Dict], n: int, cfg: float) -> str:
    """A results table: quality (FID also relative to an FP32 row, when there is one), then measured
    speed against FP32 (same steps, and 250 steps)."""
    fp_fid = {r["steps"]: r["fid"] for r in rows if r["variant"] == "fp32"}
    attrs = any("attr_attributes" in r for r in rows)  # a text model's rows: attribute accuracy too
    paired = any("fid_vs_fp32" in r for r in rows)  # FP32 sampled in the same run: how far each row moved from it
    head = (f"| variant ({n} samples, cfg {cfg}) | bits | steps | FID | FID vs FP32 | sFID | IS | precision | recall "
            f"| class acc |{' attribute acc |' if attrs else ''}"
            f"{' FID to FP32 samples | RMSE to FP32 | same digit as FP32 |' if paired else ''}"
            f" sampling s | speed vs FP32 | vs FP32 250 steps |\n" + "|---" * (13 + attrs + 3 * paired) + "|")
    body = "\n".join(
        f"| {variant_label(r)} | {r['bits']} | {r['steps']} | {r['fid']:.2f} | {_relative(r['fid'], fp_fid.get(r['steps']))} | "
        f"{r['sfid']:.2f} | {r['is']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_acc']:.3f} | "
        + (f"{r.get('attr_attributes', float('nan')):.3f} | " if attrs else "")
        + (_paired(r) if paired else "")
        + f"{r['sample_s']:.0f} | {_ratio(r['speed_vs_fp32'])} | {_ratio(r['speed_vs_fp32_250'])} |" for r in rows)
    return head + "\n" + body


def _paired(row: Dict) -> str:
    if "fid_vs_fp32" not in row:  # FP32 itself, or a row from a file without FP32
        return "- | - | - | "
    return f"{row['fid_vs_fp32']:.3f} | {row['rmse_vs_fp32']:.4f} | {row['agree_vs_fp32']:.3f} | "


def _ratio(value: float) -> str:
    return "-" if value != value else f"{value:.2f}x"  # NaN: no FP32 time to compare with


def _relative(value: float, reference: Optional[float]) -> str:
    return "-" if reference is None else f"{100.0 * (value / reference - 1.0):+.1f}%"


def merge_results(paths: Sequence[Path], steps: int) -> List[Dict]:
    """Rows at ``steps`` from several ``qc bench --out`` files. A file that ran without an FP32 row
    (e.g. a second bit width) has NaN speeds; they are set against the first FP32 row's time. A row
    that several files measured (same variant, bits and cache: a reference rerun) is taken from the
    first file only."""
    rows, seen = [], set()
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            key = (r["variant"], r.get("bits"), json.dumps(r.get("cache"), sort_keys=True))
            if r["steps"] == steps and key not in seen:
                seen.add(key)
                rows.append(r)
    fp = next((r for r in rows if r["variant"] == "fp32"), None)
    for r in rows:
        if fp and r["speed_vs_fp32"] != r["speed_vs_fp32"]:  # NaN: its file had no FP32 row
            r["speed_vs_fp32"] = fp["sample_s"] / r["sample_s"]
            r["speed_vs_fp32_250"] = (fp.get("fp32_250_s") or float("nan")) / r["sample_s"]  # None: not timed
    return rows
