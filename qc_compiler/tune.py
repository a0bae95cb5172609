"""``qc tune``: the fastest schedule that keeps quality, searched within a time budget.

Every tool leaves the choice of bits, cache policy, calibration and VC to the user, and a cache's
thresholds read features that quantization shifts. This module searches them together, measuring
speed and quality in the same run, and returns the schedule, the front it came from, and a recipe
that ``qc compile --recipe`` replays bit for bit.

The search (why this shape: docs/tune.md):

1. **Proxy rung.** Every candidate is compiled and samples a fixed small batch (``n_proxy``) with the
   same noise as an FP32 run of the same batch. Its proxy error is the mean per-step relative error
   of its denoiser outputs against FP32's on FP32's inputs, plus the drift of its final samples'
   spread (:func:`proxy_errors`); its proxy speed is FP32's sampling time over its own, timed in this
   process.

   - *Quantization first*: each bit choice (W8A8, 4-bit weights with GPTQ, mixed W4/W8) with each
     calibration (selector and size), no cache. The best calibration of each bit choice is kept, and
     of those the ones no other beats on both error and speed.
   - *Then the cache, on the quantized model*: each kept quantization with each cache policy
     (interval, adaptive and First-Block-Cache thresholds, static per-region schedules) and each VC
     form. Thresholds are judged on the quantized model they will run in.
   - *Then the backend*: the proxy front is compiled again for each other backend of the space.

2. **Suite rung** (successive halving's second rung): the reference schedule
   ``qandc(bits="w8a8", cache=interval 2)``, then members of the proxy's Pareto front (error against
   speed) are sampled on ``n`` samples at the run's batch and scored with the metric suite against
   FP32 sampled on the same noise in the same process; speed is the ratio of the two sampling times.
   The front is ordered by speed and quality falls along it, so the fastest member that meets the
   bounds is found by bisection (:func:`suite_order`), and the rest scored outwards from it.

The quantization and cache stages stop at three quarters of ``proxy_share`` of the time budget, the
backend stage at ``proxy_share``, the suite at the budget; an evaluation that its predecessors' median
says would overrun is not started. Each result is appended to a JSON
log (atomically); a rerun with the same log skips what is done, and refuses a log written under
other settings.

Example:
    >>> TuneSpace.quick().size()
    4
    >>> TuneSpace.default().size()
    144
    >>> Candidate(cache=StepCacheConfig(interval=2), vc="variance").label()
    'w8a8 tap800, interval 2, vc variance, torch'
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .api import compile as qc_compile
from .backends.registry import BACKENDS
from .diffusion.samplers import Sampler, model_sample_shape, sampler_from_spec
from .errors import QCError
from .io import load_json, save_json, tensor_digest
from .options import check_choice, check_float, check_int
from .passes import Quantize, StepCache, VarianceCompensation
from .quant import QuantConfig
from .quant.config import PRESETS
from .specs import VC_FORMS, StepCacheConfig, VCConfig
from .tools.bench import SELECTORS, sample_timed

__all__ = ["Candidate", "QuantChoice", "TuneSpace", "TuneResult", "tune", "pareto_front", "candidate_passes",
           "REFERENCE", "RECIPE_FORMAT", "OUTPUTS", "check_tune_folder", "load_recipe", "compile_recipe", "parse_duration", "parse_fraction", "proxy_errors", "suite_order"]

LOG_FORMAT = "qc-tune-log"
PROXY = "teacher-forced step error + spread drift"  # in the log's settings: a log of another proxy is refused
RECIPE_FORMAT = "qc-recipe"
_VERSION = 1


# --- the search space --------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantChoice:
    """Bit widths of the quantized linears: a preset, its weight rounding, and with 4-bit weights how
    many of the most sensitive linears stay at W8A8 (:func:`qc.mixed_precision`). ``"fp32"``: no
    quantization (a cache alone can be the best trade, e.g. where INT8 kernels are slow)."""

    bits: str = "w8a8"
    rounding: str = "nearest"
    keep8: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, str) or (self.bits.lower() not in PRESETS and self.bits != "fp32"):
            raise ValueError(f"bits must be 'fp32' or one of {sorted(PRESETS)}, got {self.bits!r}")
        check_choice("rounding", self.rounding, ("nearest", "gptq"))
        check_int("keep8", self.keep8, lo=0)
        if self.bits == "fp32" and (self.rounding != "nearest" or self.keep8):
            raise ValueError("fp32 quantizes nothing: rounding and keep8 do not apply")
        if self.keep8 and PRESETS[self.bits.lower()][0] >= 8:
            raise ValueError(f"keep8 keeps layers at W8A8 among lower-bit ones; {self.bits} is already 8-bit")

    def label(self) -> str:
        return self.bits + ("-gptq" if self.rounding == "gptq" else "") + (f"-mixed{self.keep8}" if self.keep8 else "")


@dataclass(frozen=True)
class Candidate:
    """One point of the search: quantization, calibration, cache, VC form and backend."""

    quant: QuantChoice = QuantChoice()
    selector: str = "tap"
    size: int = 800
    cache: Optional[StepCacheConfig] = None
    vc: Optional[str] = None
    backend: str = "torch"

    def __post_init__(self) -> None:
        if not isinstance(self.quant, QuantChoice):
            raise ValueError(f"quant must be a QuantChoice, got {type(self.quant).__name__}")
        check_choice("selector", self.selector, sorted(SELECTORS))
        check_int("size", self.size, lo=1)
        if self.cache is not None and not isinstance(self.cache, StepCacheConfig):
            raise ValueError(f"cache must be a StepCacheConfig or None, got {type(self.cache).__name__}")
        if self.vc is not None:
            check_choice("vc", self.vc, VC_FORMS)
        check_choice("backend", self.backend, sorted(BACKENDS))

    def label(self) -> str:
        return ", ".join([f"{self.quant.label()} {self.selector}{self.size}",
                           self.cache.describe() if self.cache else "no cache",
                           f"vc {self.vc}" if self.vc else "no vc", self.backend])

    def to_json(self) -> Dict[str, Any]:
        return {"quant": asdict(self.quant), "selector": self.selector, "size": self.size,
                "cache": None if self.cache is None else asdict(self.cache), "vc": self.vc, "backend": self.backend}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Candidate":
        return cls(quant=QuantChoice(**d["quant"]), selector=d["selector"], size=d["size"],
                   cache=None if d["cache"] is None else StepCacheConfig(**d["cache"]), vc=d["vc"], backend=d["backend"])

    def key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, default=list)


#: The schedule a tuned one must beat: ``qandc(bits="w8a8", cache=StepCacheConfig(interval=2))``.
REFERENCE = Candidate(cache=StepCacheConfig(interval=2), vc="variance")


@dataclass(frozen=True)
class TuneSpace:
    """What the search may choose. ``default()`` is the space the RESULTS run used; ``quick()`` a
    tiny one for tests and smoke runs."""

    quants: Tuple[QuantChoice, ...] = (QuantChoice("fp32"), QuantChoice(), QuantChoice("w4a8", "gptq"),
                                       QuantChoice("w4a8", "gptq", 8))
    calibrations: Tuple[Tuple[str, int], ...] = (("tap", 800), ("uniform", 256))
    caches: Tuple[Optional[StepCacheConfig], ...] = (
        None, StepCacheConfig(interval=2), StepCacheConfig(interval=3), StepCacheConfig(interval=4),
        StepCacheConfig(policy="adaptive", threshold=0.05), StepCacheConfig(policy="adaptive", threshold=0.1),
        StepCacheConfig(policy="first_block", threshold=0.05), StepCacheConfig(policy="first_block", threshold=0.1),
        StepCacheConfig(policy="static", threshold=0.1))
    vcs: Tuple[Optional[str], ...] = (None, "variance")
    backends: Tuple[str, ...] = ("torch",)
    pool_labels: int = 32
    reference: Optional[Candidate] = REFERENCE  # always scored by the suite, to compare against (None: not)

    def __post_init__(self) -> None:
        for name in ("quants", "calibrations", "caches", "vcs", "backends"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value:
                raise ValueError(f"{name} must be a non-empty list, got {value!r}")
            object.__setattr__(self, name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        for q in self.quants:
            if not isinstance(q, QuantChoice):
                raise ValueError(f"quants must hold QuantChoice, got {q!r}")
        for sel, size in self.calibrations:
            Candidate(selector=sel, size=size)  # checks them
        for c in self.caches:
            Candidate(cache=c)
        for v in self.vcs:
            Candidate(vc=v)
        for b in self.backends:
            Candidate(backend=b)
        if self.backends[0] != "torch" and "torch" in self.backends:
            raise ValueError("list the torch backend first: the proxy stages run on the first backend")
        check_int("pool_labels", self.pool_labels, lo=1)
        if self.reference is not None and not isinstance(self.reference, Candidate):
            raise ValueError(f"reference must be a Candidate or None, got {type(self.reference).__name__}")

    @classmethod
    def default(cls, backends: Sequence[str] = ("torch",)) -> "TuneSpace":
        return cls(backends=tuple(backends))

    @classmethod
    def quick(cls, backends: Sequence[str] = ("torch",)) -> "TuneSpace":
        return cls(quants=(QuantChoice(),), calibrations=(("uniform", 8),),
                   caches=(None, StepCacheConfig(interval=2)), vcs=(None, "variance"), backends=tuple(backends),
                   pool_labels=2, reference=Candidate(selector="uniform", size=8, cache=StepCacheConfig(interval=2),
                                                      vc="variance"))

    def size(self) -> int:
        """Grid points (the search visits a pruned subset of them)."""
        return (len(self.quants) * len(self.calibrations) * len(self.caches) * len(self.vcs) * len(self.backends))


def candidate_passes(c: Candidate, model, sampler, *, pool_labels: int, seed: int = 0, conditions=None) -> List:
    """The passes of a candidate, in Q&C order: cache, calibration, quantization, VC. A mixed candidate
    ranks its layers here (on the cached model, under its rounding) and carries the chosen config, so
    the passes (and a recipe made from them) replay without ranking again."""
    from .sensitivity import mixed_precision

    first = [StepCache(c.cache)] if c.cache is not None else []
    q = c.quant
    if q.bits == "fp32":  # a cache alone; VC still needs its calibration set
        if c.vc is None:
            return first
        return first + [SELECTORS[c.selector](size=c.size, pool_labels=pool_labels),
                        VarianceCompensation(VCConfig(form=c.vc))]
    if q.keep8:
        config = mixed_precision(model, sampler, low=q.bits, high="w8a8", keep=q.keep8, rounding=q.rounding,
                                 first_passes=first, seed=seed, conditions=conditions).config
    else:
        config = QuantConfig.preset(q.bits)
    passes = first + [SELECTORS[c.selector](size=c.size, pool_labels=pool_labels),
                      Quantize(config=config, rounding=q.rounding)]
    if c.vc is not None:
        passes.append(VarianceCompensation(VCConfig(form=c.vc)))
    return passes


# --- measuring ---------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@dataclass
class _Reference:
    """FP32 on the proxy batch: its inputs and outputs at each step, its samples and its time."""

    inputs: List[torch.Tensor]
    outputs: List[torch.Tensor]
    samples: torch.Tensor
    seconds: float

    @classmethod
    def measure(cls, model, sampler, labels: List[int], seed: int) -> "_Reference":
        t0 = time.perf_counter()
        traj = sampler.sample(model, labels, seed=seed, record=True)
        seconds = time.perf_counter() - t0
        return cls([s.x_t for s in traj.steps], [s.model_output for s in traj.steps], traj.samples, seconds)


def proxy_errors(compiled, sampler, labels: List[int], seed: int, ref: _Reference) -> Dict[str, float]:
    """The proxy of one candidate against FP32 on the same noise, and its sampling time.

    ``step_err``: the mean over steps of its denoiser output's relative L2 error against FP32's, with
    the candidate fed FP32's x_t at every step (teacher forcing: the step cache still carries its own
    state from step to step). A free-running trajectory's difference from FP32's mixes the denoiser's
    error with how much chaotic sampling amplifies it (docs/tune.md).
    ``final_err``: |spread ratio - 1| of its free-running samples against FP32's (the standard
    deviation over the batch per pixel, averaged), the drift of x_t's spread that quantization and
    caching cause and VC undoes. The free-running run is the one timed."""
    following = ref.inputs[1:]

    def teacher(step: int, t, x: torch.Tensor) -> Optional[torch.Tensor]:
        return following[step].to(x.dtype) if step < len(following) else None

    traj = sampler.sample(compiled, labels, seed=seed, record=True, callback=teacher)
    step_err = statistics.fmean(_rel(s.model_output, r) for s, r in zip(traj.steps, ref.outputs))
    t0 = time.perf_counter()
    samples = sampler.sample(compiled, labels, seed=seed)
    seconds = time.perf_counter() - t0
    spread = float(samples.float().std(dim=0).mean() / ref.samples.float().std(dim=0).mean().clamp_min(1e-12))
    return {"step_err": step_err, "final_err": abs(spread - 1.0), "spread": spread, "sample_s": seconds}


def pareto_front(rows: Sequence[Dict[str, Any]], err: str, speed: str) -> List[Dict[str, Any]]:
    """The rows no other row beats on both ``err`` (lower) and ``speed`` (higher), fastest first.

    Example:
        >>> rows = [{"e": 1, "s": 1}, {"e": 2, "s": 3}, {"e": 3, "s": 2}, {"e": 0.5, "s": 0.5}]
        >>> [(r["e"], r["s"]) for r in pareto_front(rows, "e", "s")]
        [(2, 3), (1, 1), (0.5, 0.5)]
    """
    ok = [r for r in rows if _finite(r.get(err)) and _finite(r.get(speed))]
    front = [r for r in ok if not any((o[err] <= r[err] and o[speed] >= r[speed]) and
                                      (o[err] < r[err] or o[speed] > r[speed]) for o in ok)]
    return sorted(front, key=lambda r: -r[speed])


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- the log -----------------------------------------------------------------------------------------
class _Log:
    """Rows appended atomically to a JSON file; a rerun skips keys done under the same settings."""

    def __init__(self, path: Optional[Path], settings: Dict[str, Any]):
        self.path, self.settings, self.rows = path, settings, []
        if path is not None and path.exists():
            data = load_json(path)
            if not isinstance(data, dict) or data.get("format") != LOG_FORMAT or data.get("version") != _VERSION:
                raise QCError(f"{path} is not a qc tune log (format {LOG_FORMAT} v{_VERSION}); give a new --out")
            if data.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(data.get("settings", {}))
                                 if settings.get(k) != data.get("settings", {}).get(k))
                raise QCError(f"{path} was written under other settings ({', '.join(changed)} differ); resume with "
                              "the same model, sampler, seed and sizes, or give a new --out")
            self.rows = list(data.get("rows", []))
        self.resumed = len(self.rows)

    def find(self, rung: str, key: str) -> Optional[Dict[str, Any]]:
        return next((r for r in self.rows if r["rung"] == rung and r["key"] == key), None)

    def add(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path is not None:
            save_json({"format": LOG_FORMAT, "version": _VERSION, "settings": self.settings, "rows": self.rows},
                      self.path)


# --- the result --------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """Every row measured (``rows``), the proxy and suite fronts, the chosen candidate's suite row (None
    when nothing met the bounds), the reference schedule's row, FP32's, and the proxy's agreement with
    FID (Spearman rho over the suite rows). ``compiled`` is the chosen schedule, compiled."""

    rows: List[Dict[str, Any]]
    chosen: Optional[Dict[str, Any]]
    reference: Optional[Dict[str, Any]]
    fp32: Optional[Dict[str, Any]]
    agreement: Dict[str, float]
    settings: Dict[str, Any]
    bounds: Dict[str, Optional[float]]
    compiled: Any = None
    elapsed_s: float = 0.0
    evaluated: Dict[str, int] = field(default_factory=dict)

    def suite_rows(self) -> List[Dict[str, Any]]:
        return [r for r in self.rows if r["rung"] == "suite" and r.get("error") is None and r["key"] != "fp32"]

    def proxy_rows(self) -> List[Dict[str, Any]]:
        return [r for r in self.rows if r["rung"] == "proxy" and r.get("error") is None and r["key"] != "fp32"]

    def front(self) -> List[Dict[str, Any]]:
        """The suite rows no other beats on both FID increase and speed, fastest first."""
        return pareto_front(self.suite_rows(), "fid_increase", "speed")

    def table(self) -> str:
        """The suite rows as markdown (front rows in bold), then the proxy rows."""
        front = {r["key"] for r in self.front()}
        lines = ["| schedule | FID | FID vs FP32 | class acc | speed vs FP32 | proxy error | on front |",
                 "|---|---|---|---|---|---|---|"]
        if self.fp32:
            lines.append(f"| FP32 | {self.fp32['fid']:.3f} | +0.0% | {self.fp32['class_acc']:.3f} | 1.00x | 0 | |")
        for r in sorted(self.suite_rows(), key=lambda r: -r["speed"]):
            name = r["label"] + (" (reference)" if r["stage"] == "reference" else "") + \
                (" **chosen**" if self.chosen and r["key"] == self.chosen["key"] else "")
            lines.append(f"| {name} | {r['fid']:.3f} | {100 * r['fid_increase']:+.1f}% | {r['class_acc']:.3f} | "
                         f"{r['speed']:.2f}x | {r.get('proxy', float('nan')):.4f} | {'yes' if r['key'] in front else ''} |")
        lines += ["", "| proxy rung (n_proxy samples) | stage | step err | final err | proxy | proxy speed |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(self.proxy_rows(), key=lambda r: r["proxy"]):
            lines.append(f"| {r['label']} | {r['stage']} | {r['step_err']:.4f} | {r['final_err']:.4f} | "
                         f"{r['proxy']:.4f} | {r['speed']:.2f}x |")
        refused = [r for r in self.rows if r.get("error")]
        for r in refused:
            lines.append(f"| {r['label']} | {r['stage']} | refused: {r['error']} | | | |")
        return "\n".join(lines)

    def summary(self) -> str:
        b = self.bounds
        want = " and ".join(s for s in (f"speed >= {b['min_speedup']:.2f}x" if b["min_speedup"] else "",
                                         f"FID within +{100 * b['max_fid_increase']:.1f}%"
                                         if b["max_fid_increase"] is not None else "") if s)
        head = f"tune: {len(self.proxy_rows())} proxy rows, {len(self.suite_rows())} suite rows, {self.elapsed_s:.0f} s"
        if self.chosen is None:
            return f"{head}\nno schedule met {want}; the front is in the table"
        c, ref = self.chosen, self.reference
        vs = (f"; the reference qandc(w8a8, interval 2): {ref['speed']:.2f}x, {100 * ref['fid_increase']:+.1f}%"
              if ref else "")
        return (f"{head}\nchosen ({want}): {c['label']}: {c['speed']:.2f}x FP32, FID {100 * c['fid_increase']:+.1f}%, "
                f"class acc {c['class_acc']:.3f}{vs}")

    def plot(self, path) -> None:
        """FID against measured speed (suite rows and FP32), the front joined, the bounds dashed."""
        from .imaging import scatter_png

        front_rows = self.front()
        front = {r["key"] for r in front_rows}
        points = [(1.0, 0.0, "point")] if self.fp32 else []
        for r in self.suite_rows():
            kind = ("chosen" if self.chosen and r["key"] == self.chosen["key"] else
                    "reference" if r["stage"] == "reference" else "front" if r["key"] in front else "point")
            points.append((r["speed"], 100.0 * r["fid_increase"], kind))
        b = self.bounds
        scatter_png(points, path, xlabel="speed vs FP32 (sampling time, measured in the same run)",
                    ylabel="FID vs FP32 (%)", title=f"qc tune: {self.settings['n']} samples per schedule",
                    hline=None if b["max_fid_increase"] is None else 100.0 * b["max_fid_increase"],
                    vline=b["min_speedup"], line=[(r["speed"], 100.0 * r["fid_increase"]) for r in front_rows])

    def write(self, folder, *, model: Optional[Dict[str, Any]] = None, command: str = "") -> List[Path]:
        """Write the outputs beside the log: ``pareto.md`` (machine, command, summary, table), ``front.png``,
        and when a schedule was chosen ``recipe.json`` and the compiled model in ``compiled/``."""
        from .persist import check_output_folder
        from .tools.bench import machine_line

        folder = Path(folder)
        check_output_folder(folder / "compiled")
        agree = ", ".join(f"{k} {v:+.2f}" for k, v in self.agreement.items() if k != "rows")
        text = "\n\n".join([f"{machine_line()}", f"command: `{command}`" if command else "", self.summary(),
                             f"Spearman rho with FID over {int(self.agreement.get('rows', 0))} suite rows: {agree}",
                             self.table()])
        from .io import atomic_write_bytes

        written = [folder / "pareto.md"]
        atomic_write_bytes(written[0], (text + "\n").encode())
        if self.suite_rows():
            self.plot(folder / "front.png")
            written.append(folder / "front.png")
        if self.chosen is not None:
            save_json(self.recipe(model), folder / "recipe.json")
            self.compiled.save(folder / "compiled")
            written += [folder / "recipe.json", folder / "compiled"]
        return written

    def recipe(self, model: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """What ``qc compile --recipe`` replays: the chosen passes with their fitted choices (a mixed
        config's layers), sampler, seed, backend and the threads it was tuned with, how to load the model
        (``model``: the CLI's model options, or None) and its weight digest, and the compiled model's
        content digest that the replay must reproduce."""
        if self.chosen is None or self.compiled is None:
            raise QCError("no schedule met the bounds, so there is no recipe; loosen --min-speedup or "
                          "--max-fid-increase, or read the front")
        build = self.compiled.build
        return {"format": RECIPE_FORMAT, "version": _VERSION, "model": model,
                "weights_digest": self.settings["weights"], "sampler": self.compiled.sampler_spec,
                "seed": self.settings["seed"], "backend": build["backend"], "passes": build["passes"],
                "threads": torch.get_num_threads(), "candidate": self.chosen["candidate"],
                "measured": {k: self.chosen[k] for k in ("fid", "fid_increase", "class_acc", "speed", "n")},
                "compiled_digest": self.compiled.content_digest()}


OUTPUTS = ("log.json", "pareto.md", "front.png", "recipe.json", "compiled")


def check_tune_folder(folder) -> Path:
    """Refuse, before any sampling, an output folder that is a file, not writable, or holds anything but
    an earlier tune's outputs (which a rerun resumes from and replaces)."""
    import os

    from .persist import check_output_folder

    folder = Path(folder)
    if str(folder) in ("", "."):
        raise QCError("the output folder is empty or '.'; name a folder, e.g. --out out/tune")
    if folder.exists() and not folder.is_dir():
        raise QCError(f"{folder} exists and is not a folder; name a folder for the tune's outputs")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in OUTPUTS and not p.name.startswith("."))
        if foreign:
            raise QCError(f"{folder} holds {foreign[:3]}, not a tune's outputs; name a new folder or a tune's to resume")
        check_output_folder(folder / "compiled")
    parent = folder if folder.is_dir() else folder.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise QCError(f"{parent} is not writable, so the tune's outputs cannot be written there")
    return folder


# --- the search --------------------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """``"45m"``, ``"1h"``, ``"90s"`` or seconds -> seconds.

    Example:
        >>> parse_duration("45m"), parse_duration("1.5h"), parse_duration("30")
        (2700.0, 5400.0, 30.0)
    """
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = str(text).strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"a duration is a number with s, m or h (45m), got {text!r}") from None
    return check_float("time budget", value, lo=0.0, lo_open=True)


def parse_fraction(text: str) -> float:
    """``"5%"`` -> 0.05; ``"0.05"`` -> 0.05.

    Example:
        >>> parse_fraction("5%"), parse_fraction("0.1")
        (0.05, 0.1)
    """
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"a fraction is 5% or 0.05, got {text!r}") from None
    return check_float("max FID increase", value, lo=0.0)


def _check_bounds(min_speedup, max_fid_increase, n) -> None:
    if min_speedup is None and max_fid_increase is None:
        raise ValueError("give a bound: min_speedup, max_fid_increase, or both (qc tune --min-speedup 3.5 "
                         "--max-fid-increase 5%)")
    if min_speedup is not None:
        check_float("min_speedup", min_speedup, lo=0.0, lo_open=True)
    if max_fid_increase is not None:
        check_float("max_fid_increase", max_fid_increase, lo=0.0)
    check_int("n", n, lo=2)


def tune(model, sampler: Sampler, *, min_speedup: Optional[float] = None, max_fid_increase: Optional[float] = None,
         time_budget: float = 2700.0, space: Optional[TuneSpace] = None, n_proxy: int = 64, n: int = 500,
         batch: int = 250, seed: int = 0, log: Optional[Path] = None, proxy_share: float = 0.6,
         progress: bool = True, on_row: Optional[Callable[[Dict[str, Any]], None]] = None) -> TuneResult:
    """Search ``space`` for the fastest schedule within ``max_fid_increase`` (a fraction: 0.05 = +5% FID
    against FP32) that is at least ``min_speedup`` times FP32's speed; with one bound only, the other
    objective is optimised (the fastest within the FID bound, or the best FID at that speed).

    ``n_proxy`` samples rank every candidate cheaply; ``n`` samples (at ``batch``) score the proxy's
    front with the metric suite; ``time_budget`` seconds bound the whole search. ``log``: a JSON file
    the rows are appended to, from which a rerun resumes. Everything is checked before any sampling.
    """
    _check_bounds(min_speedup, max_fid_increase, n)
    space = TuneSpace.default() if space is None else space
    if not isinstance(space, TuneSpace):
        raise ValueError(f"space must be a TuneSpace, got {type(space).__name__}")
    time_budget = check_float("time_budget", time_budget, lo=0.0, lo_open=True)
    check_int("n_proxy", n_proxy, lo=1)
    check_int("batch", batch, lo=1)
    check_int("seed", seed, lo=0)
    check_float("proxy_share", proxy_share, lo=0.0, lo_open=True, hi=1.0)
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a qc sampler (DDPM, DDIM), got {type(sampler).__name__}")
    if getattr(model, "num_classes", None) is None:
        raise QCError("qc tune scores class-conditional samples with the digit metric suite; this model has no classes")
    try:
        dims = tuple(model_sample_shape(model))
    except ValueError as e:
        raise QCError(str(e)) from None
    if dims != (1, 32, 32):
        raise QCError(f"the metric suite scores 1x32x32 digits (the embedded dit-mnist); this model samples {dims}")
    log = None if log is None else Path(log)
    settings = {"weights": tensor_digest(model.state_dict()), "sampler": sampler.spec(), "seed": seed,
                "n_proxy": n_proxy, "n": n, "batch": batch, "pool_labels": space.pool_labels,
                "threads": torch.get_num_threads(), "proxy": PROXY}
    book = _Log(log, settings)
    start = time.perf_counter()
    # the quantization and cache stages get three quarters of the proxy share, so the backends get a turn
    stage_deadline = start + 0.75 * proxy_share * time_budget
    proxy_deadline, deadline = start + proxy_share * time_budget, start + time_budget
    k = model.num_classes
    proxy_labels = [i % k for i in range(n_proxy)]
    labels = [i % k for i in range(n)]
    counts = {"resumed": 0, "new": 0, "skipped_for_time": 0}
    durations: Dict[str, List[float]] = {"proxy": [], "suite": []}
    compiled_cache: Dict[str, Any] = {}

    def fits(rung: str, limit: float) -> bool:
        past = durations[rung]
        est = statistics.median(past) if past else 0.0
        return time.perf_counter() + est <= limit

    ref = _Reference.measure(model, sampler, proxy_labels, seed)

    def record(row: Dict[str, Any], t0: float, rung: Optional[str]) -> Dict[str, Any]:
        """Time a measured row, count it toward its rung's estimate, and append it to the log."""
        row["seconds"] = time.perf_counter() - t0
        if rung is not None:
            durations[rung].append(row["seconds"])
        counts["new"] += 1
        book.add(row)
        if on_row:
            on_row(row)
        return row

    def compile_candidate(c: Candidate):
        passes = candidate_passes(c, model, sampler, pool_labels=space.pool_labels, seed=seed)
        return qc_compile(model, passes=passes, sampler=sampler, seed=seed, backend=c.backend)

    def proxy(c: Candidate, stage: str) -> Optional[Dict[str, Any]]:
        done = book.find("proxy", c.key())
        if done is not None:
            counts["resumed"] += 1
            return done
        if not fits("proxy", proxy_deadline if stage == "backend" else stage_deadline):
            counts["skipped_for_time"] += 1
            return None
        t0 = time.perf_counter()
        row: Dict[str, Any] = {"rung": "proxy", "stage": stage, "key": c.key(), "label": c.label(),
                               "candidate": c.to_json(), "error": None}
        try:
            compiled = compile_candidate(c)
        except (QCError, ValueError) as e:  # a backend that refuses the schedule: a row, not a crash
            row["error"] = str(e).splitlines()[0]
        else:
            row["compile_s"] = time.perf_counter() - t0
            if c.backend != "torch":  # a compiling backend pays its compile on the first call, untimed here
                sampler.sample(compiled, proxy_labels, seed=seed)
            errs = proxy_errors(compiled, sampler, proxy_labels, seed, ref)
            row.update(errs, proxy=errs["step_err"] + errs["final_err"], fp32_sample_s=ref.seconds,
                       speed=ref.seconds / errs["sample_s"])
            if not math.isfinite(row["proxy"]):  # NaN samples: a broken schedule ranks last, it is not dropped
                row["proxy"] = float("inf")
        return record(row, t0, "proxy")

    bar = tqdm(total=None, desc="tune", unit="candidate", disable=not progress, dynamic_ncols=True)

    def visit(c: Candidate, stage: str) -> Optional[Dict[str, Any]]:
        row = proxy(c, stage)
        bar.update(1)
        bar.set_postfix_str(f"{stage}: {c.label()}"[:70])
        return row

    # 1a. quantization alone: the best calibration per bit choice, then those no other beats
    first_backend = space.backends[0]
    best_per_quant = []
    for q in space.quants:
        calibrations = space.calibrations[:1] if q.bits == "fp32" else space.calibrations  # FP32 needs none
        rows = [visit(Candidate(quant=q, selector=s, size=z, backend=first_backend), "quant")
                for s, z in calibrations]
        rows = [r for r in rows if r is not None and r.get("error") is None]
        if rows:
            best_per_quant.append(min(rows, key=lambda r: r["proxy"]))
    kept = pareto_front(best_per_quant, "proxy", "speed")
    kept.sort(key=lambda r: r["proxy"])  # the most accurate quantization explored first
    # 1b. the cache and VC, on each kept quantization
    for qrow in kept:
        base = Candidate.from_json(qrow["candidate"])
        for cache in space.caches:
            for vc in space.vcs:
                if cache is None and vc is None:
                    continue  # that is qrow itself
                visit(replace(base, cache=cache, vc=vc), "cache")
    # 1c. the other backends, on the proxy front
    proxy_front = pareto_front([r for r in book.rows if r["rung"] == "proxy" and r.get("error") is None
                                and r["candidate"]["backend"] == first_backend], "proxy", "speed")
    for r in proxy_front:
        for b in space.backends[1:]:
            visit(replace(Candidate.from_json(r["candidate"]), backend=b), "backend")
    bar.close()

    # 2. the suite rung: FP32, the reference, then the proxy front (every backend), fastest first
    from .eval import evaluate

    def suite(c: Optional[Candidate], stage: str) -> Optional[Dict[str, Any]]:
        key = "fp32" if c is None else c.key()
        done = book.find("suite", key)
        if done is not None:
            counts["resumed"] += 1
            return done
        if c is not None and not fits("suite", deadline):
            counts["skipped_for_time"] += 1
            return None
        t0 = time.perf_counter()
        row = {"rung": "suite", "stage": stage, "key": key, "label": "FP32" if c is None else c.label(),
               "candidate": None if c is None else c.to_json(), "error": None}
        try:
            compiled = model if c is None else compile_candidate(c)
        except (QCError, ValueError) as e:
            row["error"] = str(e).splitlines()[0]
        else:
            row["compile_s"] = time.perf_counter() - t0
            if c is not None and c.backend != "torch":
                sampler.sample(compiled, labels[:batch], seed=seed)  # compile at the run's batch, untimed
            images, seconds = sample_timed(compiled, sampler, labels, seed=seed, batch=batch)
            row.update(sample_s=seconds, **evaluate(images, torch.tensor(labels)))
            if c is not None:
                compiled_cache[key] = compiled
        return record(row, t0, "suite" if c is not None else None)

    fp = suite(None, "fp32")
    if space.reference is not None:
        suite(space.reference, "reference")
    everything = pareto_front([r for r in book.rows if r["rung"] == "proxy" and r.get("error") is None],
                              "proxy", "speed")
    front = [c for c in (Candidate.from_json(r["candidate"]) for r in everything) if c != space.reference]

    def meets(row: Optional[Dict[str, Any]]) -> Optional[bool]:
        if row is None or fp is None or fp.get("error") is not None:
            return None  # not measured (out of time)
        if row.get("error") is not None:
            return False  # refused by its backend: it cannot be chosen
        speed, increase = fp["sample_s"] / row["sample_s"], row["fid"] / fp["fid"] - 1.0
        return ((min_speedup is None or speed >= min_speedup)
                and (max_fid_increase is None or increase <= max_fid_increase))

    bar = tqdm(total=len(front), desc="tune: suite", unit="candidate", disable=not progress, dynamic_ncols=True)

    def measure(i: int) -> Optional[bool]:
        bar.update(1)
        return meets(suite(front[i], "front"))

    suite_order(len(front), measure)
    bar.close()

    # the speed and FID of each suite row against FP32's, and the proxy's agreement with FID
    proxy_of = {r["key"]: r for r in book.rows if r["rung"] == "proxy" and r.get("error") is None}
    scored = []
    for r in book.rows:
        if r["rung"] == "suite" and r["key"] != "fp32" and r.get("error") is None:
            r["speed"] = fp["sample_s"] / r["sample_s"]
            r["fid_increase"] = r["fid"] / fp["fid"] - 1.0
            for name in ("proxy", "step_err", "final_err"):  # the proxy's view of it, when it had one
                if r["key"] in proxy_of:
                    r[name] = proxy_of[r["key"]][name]
            scored.append(r)
    agreement = _agreement(scored)
    chosen = _choose(scored, min_speedup, max_fid_increase)
    reference = next((r for r in scored if space.reference is not None and r["key"] == space.reference.key()), None)
    result = TuneResult(rows=list(book.rows), chosen=chosen, reference=reference, fp32=fp, agreement=agreement,
                        settings=settings, bounds={"min_speedup": min_speedup, "max_fid_increase": max_fid_increase},
                        elapsed_s=time.perf_counter() - start, evaluated=counts)
    if chosen is not None:
        result.compiled = compiled_cache.get(chosen["key"]) or compile_candidate(Candidate.from_json(chosen["candidate"]))
    return result


def suite_order(n: int, measure: Callable[[int], Optional[bool]]) -> List[int]:
    """Which front members the suite scores, and in what order: the front runs fastest (index 0) to most
    accurate, and quality falls as speed rises along it, so the fastest one that meets the bounds is
    found by bisection (``measure(i)``: True meets, False misses, None could not be measured), then the
    rest are scored from the boundary outwards while time allows. Returns the indices measured.

    Example:
        >>> ok = [False, False, True, True, True]           # the fastest two miss the bounds
        >>> suite_order(5, lambda i: ok[i])
        [2, 0, 1, 3, 4]
    """
    done: Dict[int, Optional[bool]] = {}

    def ask(i: int) -> Optional[bool]:
        if i not in done:
            done[i] = measure(i)
        return done[i]

    lo, hi = 0, n - 1  # the boundary lies in [lo, hi]
    while lo <= hi:
        mid = (lo + hi) // 2
        verdict = ask(mid)
        if verdict is None:  # out of time or refused: stop bisecting
            break
        if verdict:
            hi = mid - 1  # it meets: look faster
        else:
            lo = mid + 1  # it misses: look more accurate
    edge = min((i for i, v in done.items() if v), default=n)
    for i in sorted(range(n), key=lambda i: abs(i - edge)):
        ask(i)
    return list(done)


def _choose(rows: List[Dict[str, Any]], min_speedup, max_fid_increase) -> Optional[Dict[str, Any]]:
    ok = [r for r in rows if (min_speedup is None or r["speed"] >= min_speedup)
          and (max_fid_increase is None or r["fid_increase"] <= max_fid_increase)]
    if not ok:
        return None
    if max_fid_increase is None:  # a speed floor only: the best FID that is that fast
        return min(ok, key=lambda r: (r["fid_increase"], -r["speed"]))
    return max(ok, key=lambda r: (r["speed"], -r["fid_increase"]))


def _agreement(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """Spearman rho between each proxy component and FID over the suite rows (NaN under 3 rows)."""
    from scipy.stats import spearmanr

    rows = [r for r in rows if _finite(r.get("proxy"))]
    out = {"rows": float(len(rows))}
    for name in ("proxy", "step_err", "final_err"):
        out[name] = (float(spearmanr([r[name] for r in rows], [r["fid"] for r in rows]).statistic)
                     if len(rows) >= 3 else float("nan"))
    return out


# --- recipes -----------------------------------------------------------------------------------------
def load_recipe(path) -> Dict[str, Any]:
    """A recipe written by ``qc tune``, its format checked."""
    path = Path(path)
    if not path.is_file():
        raise QCError(f"{path} is not a file; give the recipe.json that qc tune wrote")
    data = load_json(path)
    keys = {"format", "version", "model", "weights_digest", "sampler", "seed", "backend", "passes", "threads",
            "compiled_digest"}
    if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT or data.get("version") != _VERSION:
        raise QCError(f"{path} is not a qc recipe (format {RECIPE_FORMAT} v{_VERSION})")
    missing = sorted(keys - set(data))
    if missing:
        raise QCError(f"{path} lacks {missing}; rerun qc tune")
    return data


def compile_recipe(recipe: Dict[str, Any], model, *, verify: bool = True):
    """Compile ``model`` as the recipe says. The model must be the one tuned (its weight digest), and with
    ``verify`` the result must be the tuned model bit for bit (its content digest)."""
    from .pipeline import passes_from_specs

    if tensor_digest(model.state_dict()) != recipe["weights_digest"]:
        raise QCError("the recipe was tuned on other weights (their digest differs); give the model it was tuned on")
    passes = passes_from_specs(recipe["passes"], "the recipe")
    try:
        sampler = sampler_from_spec(recipe["sampler"])
    except (KeyError, TypeError, ValueError) as e:
        raise QCError(f"the recipe's sampler cannot be rebuilt: {e}") from None
    compiled = qc_compile(model, passes=passes, sampler=sampler, seed=recipe["seed"], backend=recipe["backend"])
    if verify and compiled.content_digest() != recipe["compiled_digest"]:
        raise QCError(f"the replay differs from the tuned model (content digest); tuned with {recipe['threads']} "
                      f"threads, replayed with {torch.get_num_threads()}: pass --threads {recipe['threads']}, or "
                      "--no-verify if the recipe was edited on purpose")
    return compiled

