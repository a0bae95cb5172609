"""Quality-and-speed runs over named compile variants, shared by ``benchmarks/`` and ``qc bench``.

Every variant samples the same labels from the same per-sample noise streams, at the same step
count, and is scored with the evaluator's suite; its sampling wall time is measured in the same run
as FP32's, so the speed column is a ratio of two measurements, never a nominal figure.

Example:
    >>> sorted(variant_names())[:3]
    ['cache-adaptive-0.1', 'cache-adaptive-0.3', 'cache-i2']
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .api import compile as qc_compile
from .api import load_model
from .diffusion import DDPM
from .passes import (AgglomerativeCalibration, DBSCANCalibration, KMeansCalibration, Quantize, StepCache,
                     TAPCalibration, UniformCalibration, VarianceCompensation)
from .quant import QuantConfig

__all__ = ["median_seconds", "interleaved_medians", "compile_benchmark_w8a8", "rel_err", "variant_passes", "variant_names", "ablation_rows", "bits_independent", "sample_timed", "run_variants", "markdown",
           "merge_results", "benchmark_model", "benchmark_inputs"]

log = logging.getLogger(__name__)

_SELECTORS = {"uniform": UniformCalibration, "tap": TAPCalibration, "kmeans": KMeansCalibration,
              "dbscan": DBSCANCalibration, "agglomerative": AgglomerativeCalibration}


def variant_passes(name: str, bits: str = "w8a8", cache: int = 2, size: int = 800, pool_labels: int = 32,
                   vc: str = "sample", threshold: float = 0.1) -> List:
    """Passes for a variant name: ``fp32``; ``cache-i3``; ``cache-adaptive-0.3``; ``cache-static-0.2``;
    ``quant-<selector>[-condq]``; ``qc-<selector>[-condq][-vc|-vcvar]`` (cache + quantization [+ VC,
    least-squares or variance-ratio form]). ``condq`` quantizes the conditioning linears' inputs too
    (the paper's setting; by default they are weight-only). ``w4a8-tap`` style names override ``bits``."""
    parts = name.split("-")
    if parts[0] in ("w8a8", "w4a8", "w4a4"):
        bits, parts = parts[0], ["quant"] + parts[1:]
    if parts == ["fp32"]:
        return []
    if parts[0] == "cache":
        kind = parts[1]
        if kind.startswith("i"):
            return [StepCache(interval=int(kind[1:]))]
        return [StepCache(policy=kind, threshold=float(parts[2]) if len(parts) > 2 else threshold)]
    flags = parts[2:]
    if parts[0] in ("quant", "qc") and len(parts) >= 2 and parts[1] in _SELECTORS and _known_flags(parts[0], flags):
        config = QuantConfig.preset(bits, **({"weight_only": ()} if "condq" in flags else {}))
        passes = [StepCache(interval=cache)] if parts[0] == "qc" else []
        passes += [_SELECTORS[parts[1]](size=size, pool_labels=pool_labels), Quantize(config=config)]
        if flags and flags[-1] in ("vc", "vcvar"):
            passes.append(VarianceCompensation(placement=vc, form="variance" if flags[-1] == "vcvar" else "exact"))
        return passes
    raise ValueError(f"unknown variant {name!r}; known patterns: {sorted(variant_names())}")


def _known_flags(kind: str, flags: List[str]) -> bool:
    allowed = [["condq"], ["vc", "vcvar"]] if kind == "qc" else [["condq"]]
    position = 0
    for flag in flags:  # in order, each at most once
        while position < len(allowed) and flag not in allowed[position]:
            position += 1
        if position == len(allowed):
            return False
        position += 1
    return True


def variant_names() -> List[str]:
    return ["fp32", "cache-i2", "cache-i3", "cache-adaptive-0.1", "cache-adaptive-0.3", "cache-static-0.2",
            "quant-uniform", "quant-tap", "quant-tap-condq", "w4a8-uniform", "w4a8-tap"] + ablation_rows()


def ablation_rows() -> List[str]:
    """The Q&C ablation (docs/method.md 5-6): naive quant+cache, +VC, +TAP, +TAP+VC, other clusterings."""
    return ["qc-uniform", "qc-uniform-vc", "qc-uniform-vcvar", "qc-tap", "qc-tap-vc", "qc-tap-vcvar", "qc-kmeans",
            "qc-dbscan", "qc-agglomerative"]


def bits_independent(name: str) -> bool:
    """True for variants without quantization (FP32, cache only): one run serves every bit width."""
    return name == "fp32" or name.startswith("cache-")


def interleaved_medians(fns: Sequence[Callable], repeats: int, pause: float = 0.2) -> List[float]:
    """Median wall seconds of each callable, after one untimed warm-up call of each (oneDNN
    prepacking, allocator growth), timed in rounds (one call of each per round) so that a shared
    machine's drift during the run hits every callable alike.

    ``pause`` seconds of idle before each timed call: onnxruntime's pool threads spin for a while
    after a run, and on 2 cores they slow whatever runs next (DiT-B/2: our torch forward 794 ms
    alone, 870 ms right after an onnxruntime call, 803 ms with the pause)."""
    for fn in fns:
        fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def median_seconds(fn: Callable, repeats: int) -> float:
    """Median wall seconds of ``repeats`` back-to-back calls of ``fn``, after one warm-up call."""
    return interleaved_medians([fn], repeats, pause=0.0)[0]


def benchmark_model(name: str):
    """The embedded model by name, or a DiT config with random weights on 4x32x32 latents and 1000
    classes, its adaLN re-initialised so that every block matters (DiT's zero init makes them identities)."""
    if name == "dit-mnist":
        return load_model(name)
    torch.manual_seed(0)
    model = load_model(name, input_size=32, in_channels=4, num_classes=1000)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "adaLN_modulation" in pname or "final_layer.linear" in pname:
                p.normal_(0, 0.02)
    return model.eval()


def compile_benchmark_w8a8(model, sampler, first_passes: Sequence = (), backend: str = "torch"):
    """The speed benchmarks' W8A8 recipe (uniform calibration over 2 sampling runs, 64 items) after
    ``first_passes`` (e.g. a ``StepCache``), lowered with ``backend`` (the torch INT8 one by default)."""
    passes = [*first_passes, UniformCalibration(size=64, pool_labels=2), Quantize(preset="w8a8")]
    with torch.no_grad():
        return qc_compile(model, passes=passes, sampler=sampler, backend=backend)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| for tensors or arrays (onnxruntime outputs)."""
    out = out if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))
    ref = ref if torch.is_tensor(ref) else torch.as_tensor(np.asarray(ref))
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def benchmark_inputs(model, batch: int):
    """(x, t, y) for timing one forward: random latents of the model's shape, t = 500, labels 0..batch-1."""
    return (torch.randn(batch, model.in_channels, model.input_size, model.input_size),
            torch.full((batch,), 500, dtype=torch.long), torch.arange(batch) % model.num_classes)


def sample_timed(model, sampler, labels: Sequence[int], seed: int, batch: int, progress: bool = False):
    """Samples for ``labels`` in batches (noise streams by sample index) and the wall time."""
    t0 = time.perf_counter()
    images = torch.cat([sampler.sample(model, labels[i:i + batch], seed=seed, sample_offset=i, progress=progress)
                        for i in range(0, len(labels), batch)])
    return images, time.perf_counter() - t0


def run_variants(names: Sequence[str], model_name: str = "dit-mnist", n: int = 1000, steps: int = 50,
                 cfg: float = 1.5, seed: int = 0, batch: int = 250, bits: str = "w8a8", cache: int = 2,
                 size: int = 800, pool_labels: int = 32, vc: str = "sample", backend: str = "torch",
                 fp250: bool = False, on_row: Optional[Callable[[Dict], None]] = None,
                 fp_seconds: Optional[float] = None, fp250_seconds: Optional[float] = None) -> List[Dict]:
    """Compile, sample and score each variant; rows carry metrics, times and speed ratios.

    ``fp_seconds`` / ``fp250_seconds``: FP32 times from an earlier call in the same run (same n, steps
    and batch), so that a second bit width need not sample FP32 again.
    """
    from .eval import evaluate

    model = load_model(model_name)
    sampler = DDPM(steps=steps, cfg_scale=cfg)
    labels = [i % model.num_classes for i in range(n)]
    rows: List[Dict] = []
    if fp250 and fp250_seconds is None:  # FP32 at 250 steps, timed on up to 100 samples and scaled per sample
        probe = labels[: min(batch, n, 100)]
        _, s = sample_timed(model, DDPM(steps=250, cfg_scale=cfg), probe, seed, batch)
        fp250_seconds = s * n / len(probe)
    for name in names:
        t0 = time.perf_counter()
        compiled = qc_compile(model, passes=variant_passes(name, bits, cache, size, pool_labels, vc),
                              sampler=sampler, seed=seed, backend=backend)
        compile_s = time.perf_counter() - t0
        images, seconds = sample_timed(compiled, sampler, labels, seed, batch)
        if fp_seconds is None and name == "fp32":
            fp_seconds = seconds
        row = {"variant": name, "bits": "-" if bits_independent(name) else bits, "steps": steps,
               "cache_interval": cache if name.startswith("qc-") else None,
               "compile_s": compile_s, "sample_s": seconds, "fp32_sample_s": fp_seconds, "fp32_250_s": fp250_seconds,
               "speed_vs_fp32": (fp_seconds / seconds) if fp_seconds else float("nan"),
               "speed_vs_fp32_250": (fp250_seconds / seconds) if fp250_seconds else float("nan"),
               **evaluate(images, torch.tensor(labels))}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def variant_label(row: Dict) -> str:
    """The variant name, with the cache interval of quant+cache rows (``qc-tap-vc (i3)``)."""
    interval = row.get("cache_interval")
    return f"{row['variant']} (i{interval})" if interval else row["variant"]


def markdown(rows: List[Dict], n: int, cfg: float) -> str:
    """A results table: quality (FID also relative to an FP32 row, when there is one), then measured
    speed against FP32 (same steps, and 250 steps)."""
    fp_fid = {r["steps"]: r["fid"] for r in rows if r["variant"] == "fp32"}
    head = (f"| variant ({n} samples, cfg {cfg}) | bits | steps | FID | FID vs FP32 | sFID | IS | precision | recall "
            "| class acc | sampling s | speed vs FP32 | vs FP32 250 steps |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    body = "\n".join(
        f"| {variant_label(r)} | {r['bits']} | {r['steps']} | {r['fid']:.2f} | {_relative(r['fid'], fp_fid.get(r['steps']))} | "
        f"{r['sfid']:.2f} | {r['is']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_acc']:.3f} | "
        f"{r['sample_s']:.0f} | {_ratio(r['speed_vs_fp32'])} | {_ratio(r['speed_vs_fp32_250'])} |" for r in rows)
    return head + "\n" + body


def _ratio(value: float) -> str:
    return "-" if value != value else f"{value:.2f}x"  # NaN: no FP32 time to compare with


def _relative(value: float, reference: Optional[float]) -> str:
    return "-" if reference is None else f"{100.0 * (value / reference - 1.0):+.1f}%"


def merge_results(paths: Sequence[Path], steps: int) -> List[Dict]:
    """Rows at ``steps`` from several ``qc bench --out`` files. A file that ran without an FP32 row
    (e.g. a second bit width) has NaN speeds; they are set against the first FP32 row's time."""
    rows = [r for path in paths for r in json.loads(Path(path).read_text())["rows"] if r["steps"] == steps]
    fp = next((r for r in rows if r["variant"] == "fp32"), None)
    for r in rows:
        if fp and r["speed_vs_fp32"] != r["speed_vs_fp32"]:  # NaN: its file had no FP32 row
            r["speed_vs_fp32"] = fp["sample_s"] / r["sample_s"]
            r["speed_vs_fp32_250"] = fp.get("fp32_250_s", float("nan")) / r["sample_s"]
    return rows
