"""GPU speed: per forward and over a whole sampling run, with and without the step cache, every row
against FP32 on the same inputs and noise, all in one run with CUDA synchronisation.

    python benchmarks/gpu_speed.py --model DiT-XL/2 --batch 32 --steps 50 --json gpu.json --md gpu.md

``--batch`` is the model's batch in both sections: per forward, 32 images; end to end, 16 images under
CFG (conditional and unconditional halves in one batch), so one compiled shape serves both.

Rows: eager FP32 (the error reference), eager bf16 autocast, ``torch.compile`` bf16 autocast, and ours
W8A8 three ways: the torch backend on ``torch._int_mm``, the inductor backend (those layers inside
``torch.compile``), and the FP8 lowering (``torch._scaled_mm``, e4m3, on GPUs that have it). Ours run
under bf16 autocast too, so attention, norms and the weight-only conditioning GEMMs are bf16, as in
the baselines. End to end, each row runs without and with the cache (``StepCache(interval=2)``; the
bf16 rows then go through our cache pass with the torch or inductor backend and no quantization).
Our INT8 ONNX on onnxruntime's CUDA provider is measured where that provider exists; otherwise the
row says why not.

Random weights (4x32x32 latents, 1000 classes, adaLN re-initialised): speed does not depend on
them, and the error columns compare each row with FP32. ``--device cpu`` with a small config is
the smoke test (tests/test_benchmarks.py); the figures that matter come from
``benchmarks/gpu_check.sh`` on a GPU machine. A row that fails is reported with its error and the
run goes on; the JSON is rewritten after every row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import qc_compiler as qc
from qc_compiler.passes import Quantize, StepCache, UniformCalibration
from qc_compiler.tools.bench import benchmark_model, machine, machine_line, rel_err

SECTIONS = ("tests", "forward", "e2e", "onnx")
OURS = {"int_mm": ("torch", "int_mm"), "inductor": ("inductor", None), "fp8": ("torch", "fp8")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-XL/2", help="a DiT config name (random weights), e.g. DiT-XL/2, DiT-S/2")
    p.add_argument("--batch", type=int, default=32,
                   help="the model's batch: images per forward; end to end, batch/2 images under CFG")
    p.add_argument("--steps", type=int, default=50, help="sampling steps end to end (DDPM, CFG 1.5)")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per row (median reported; at least 3)")
    p.add_argument("--e2e-repeats", type=int, default=3, help="timed sampling runs per row (at least 1)")
    p.add_argument("--sections", default="forward,e2e,onnx", help=f"comma-separated, of {','.join(SECTIONS[1:])}")
    p.add_argument("--e2e-cache", default="both", choices=("both", "no", "yes"),
                   help="end-to-end rows without the cache, with it, or both (FP32, the reference, always runs)")
    p.add_argument("--ours", default="int_mm,inductor,fp8", help=f"our lowerings to time, of {','.join(OURS)}")
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile row (slow to build)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, help="results file (rewritten after each row)")
    p.add_argument("--md", type=Path, help="markdown tables")
    args = p.parse_args(argv)
    args.section_list = [s for s in args.sections.split(",") if s]
    args.ours_list = [s for s in args.ours.split(",") if s]
    bad = [s for s in args.section_list if s not in SECTIONS[1:]] + [s for s in args.ours_list if s not in OURS]
    if bad:
        p.error(f"unknown section or lowering {bad}; sections: {','.join(SECTIONS[1:])}; ours: {','.join(OURS)}")
    if args.batch < 2 or args.batch % 2 or args.steps < 1 or args.repeats < 3 or args.e2e_repeats < 1:
        p.error("--batch must be even (CFG halves it end to end), --steps and --e2e-repeats at least 1, "
                "--repeats at least 3")
    for path in (args.json, args.md):
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            p.error(f"{path}: give a file path in an existing folder")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU machine (benchmarks/gpu_check.sh) or pass --device cpu")
    return args


@contextlib.contextmanager
def kernel_env(kernel: Optional[str]):
    """QC_INT8_KERNEL for one compile (how a lowering is chosen), restored after."""
    saved = os.environ.get("QC_INT8_KERNEL")
    if kernel:
        os.environ["QC_INT8_KERNEL"] = kernel
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("QC_INT8_KERNEL", None)
        else:
            os.environ["QC_INT8_KERNEL"] = saved


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)


class Run:
    """The run's state: device sync, results, and the files rewritten after each row."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self._built: Dict[tuple, tuple] = {}
        self.results: Dict[str, object] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                           "forward": [], "e2e": [], "onnx": [], "failures": []}

    def built(self, name: str, cache: bool, build: Callable) -> Callable:
        """``build`` made once per row and cache setting: the forward and end-to-end sections share it."""
        def once():
            key = (name, cache)
            if key not in self._built:
                self._built[key] = build()
                return self._built[key]
            fn, amp, _ = self._built[key]
            return fn, amp, 0.0  # built already (its time is in the first section's row)
        return once

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def save(self) -> None:
        if self.args.json:
            tmp = self.args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=1))
            tmp.replace(self.args.json)

    def fail(self, section: str, row: str, exc: BaseException) -> None:
        print(f"FAILED {section} / {row}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
        self.results["failures"].append({"section": section, "row": row, "error": f"{type(exc).__name__}: {exc}"})
        self.save()

    def timed(self, fn: Callable, repeats: int, warmup: int):
        """(last output, median seconds, first-call seconds): the first call (compilation) is timed apart."""
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        self.sync()
        first = time.perf_counter() - t0
        times = []
        with torch.no_grad():
            for i in range(warmup + repeats):
                self.sync()
                t0 = time.perf_counter()
                out = fn()
                self.sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        return out, statistics.median(times), first


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def compile_ours(model, sampler, lowering: str, cache: bool):
    backend, kernel = OURS[lowering]
    passes = ([StepCache(interval=2)] if cache else []) + [UniformCalibration(size=64, pool_labels=2),
                                                          Quantize(preset="w8a8")]
    with kernel_env(kernel), torch.no_grad():
        return qc.compile(model, passes=passes, sampler=sampler, backend=backend)


def rows_for(run: Run, model, sampler, cache: bool) -> List[tuple]:
    """(name, build) pairs, eager rows first, compiled ones last (a run cut short keeps the cheap rows):
    build() returns (callable model, autocast on, build seconds)."""
    device, args = run.device, run.args
    eager, compiled = [], []
    if not cache:
        eager.append(("eager FP32", lambda: (model, False, 0.0)))
    eager.append(("eager bf16 autocast", lambda: (
        model if not cache else qc.compile(model, passes=[StepCache(interval=2)], sampler=sampler), True, 0.0)))
    if not args.no_compile:
        compiled.append(("torch.compile bf16 autocast", lambda: (
            torch.compile(model) if not cache else
            qc.compile(model, passes=[StepCache(interval=2)], sampler=sampler, backend="inductor"), True, 0.0)))
    for lowering in args.ours_list:
        if (lowering == "inductor" and args.no_compile) or (lowering == "fp8" and not fp8_supported(device)):
            continue
        label = {"int_mm": "ours W8A8, torch._int_mm" if device.type == "cuda" else "ours W8A8, torch backend",
                 "inductor": "ours W8A8, inductor", "fp8": "ours FP8, torch._scaled_mm"}[lowering]

        def build(lowering=lowering):
            t0 = time.perf_counter()
            built = compile_ours(model, sampler, lowering, cache)
            return built, True, time.perf_counter() - t0
        (compiled if lowering == "inductor" else eager).append((label, build))
    return [(name, run.built(name, cache, build)) for name, build in eager + compiled]


def forward_section(run: Run, model, sampler) -> None:
    args, device = run.args, run.device
    torch.manual_seed(1)
    x = torch.randn(args.batch, 4, 32, 32, device=device)
    t = torch.full((args.batch,), int(sampler.schedule.timestep_map[sampler.steps // 2]), device=device, dtype=torch.long)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    ref = None
    for name, build in rows_for(run, model, sampler, cache=False):
        try:
            fn, amp, build_s = build()

            def call(fn=fn, amp=amp):
                with autocast(device, amp):
                    return fn(x, t, y)
            out, sec, first = run.timed(call, args.repeats, warmup=2)
            ref = out.float() if ref is None else ref
            row = {"row": name, "ms": sec * 1e3, "rel_err": rel_err(out.float(), ref), "first_call_s": first,
                   "build_s": build_s}
            row["vs_fp32"] = run.results["forward"][0]["ms"] / row["ms"] if run.results["forward"] else 1.0
            run.results["forward"].append(row)
            print(f"forward | {name} | {row['ms']:.2f} ms | {row['vs_fp32']:.2f}x | err {row['rel_err']:.4f} | "
                  f"first call {first:.1f} s, build {build_s:.1f} s", flush=True)
            run.save()
        except Exception as exc:  # noqa: BLE001 - a row that fails is reported; the run goes on
            run.fail("forward", name, exc)


def e2e_section(run: Run, model, sampler) -> None:
    args, device = run.args, run.device
    # CFG runs the conditional and unconditional halves in one batch: batch/2 images keep the model's
    # batch equal to the per-forward rows' (one compiled shape serves both sections)
    labels = [int(v) for v in torch.randint(0, 1000, (args.batch // 2,), generator=torch.Generator().manual_seed(2))]
    ref = None
    settings = {"both": (False, True), "no": (False,), "yes": (False, True)}[args.e2e_cache]
    for cache in settings:
        rows = rows_for(run, model, sampler, cache)
        if args.e2e_cache == "yes" and not cache:
            rows = rows[:1]  # the FP32 reference alone
        for name, build in rows:
            full = f"{name}{' + cache i2' if cache else ''}"
            try:
                fn, amp, build_s = build()

                def call(fn=fn, amp=amp):
                    with autocast(device, amp):
                        return sampler.sample(fn, labels, seed=0)
                out, sec, first = run.timed(call, args.e2e_repeats, warmup=0)
                ref = out.float() if ref is None else ref
                row = {"row": full, "cache": cache, "s": sec, "rel_err": rel_err(out.float(), ref),
                       "first_run_s": first, "build_s": build_s}
                row["vs_fp32"] = run.results["e2e"][0]["s"] / sec if run.results["e2e"] else 1.0
                run.results["e2e"].append(row)
                print(f"e2e | {full} | {sec:.3f} s | {row['vs_fp32']:.2f}x | err {row['rel_err']:.4f} | "
                      f"first run {first:.1f} s, build {build_s:.1f} s", flush=True)
                run.save()
            except Exception as exc:  # noqa: BLE001
                run.fail("e2e", full, exc)


def onnx_section(run: Run, model, sampler) -> None:
    """Our INT8 ONNX on onnxruntime's CUDA provider, where this onnxruntime has it."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    want = "CUDAExecutionProvider" if run.device.type == "cuda" else "CPUExecutionProvider"
    if want not in providers:
        run.results["onnx"].append({"row": "ours INT8 ONNX, onnxruntime CUDA provider", "ms": None,
                                    "note": f"not measured: this onnxruntime {ort.__version__} has {providers}"})
        print(f"onnx | not measured: onnxruntime {ort.__version__} has {providers}", flush=True)
        run.save()
        return
    from qc_compiler.backends.onnx import OrtDenoiser

    try:
        args = run.args
        compiled = compile_ours(model.cpu(), sampler, "int_mm", cache=False)  # exported from the CPU graph
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            t0 = time.perf_counter()
            compiled.export_onnx(path)
            export_s = time.perf_counter() - t0
            ort_model = OrtDenoiser(path, provider="cuda" if run.device.type == "cuda" else "cpu")
            torch.manual_seed(1)
            x, y = torch.randn(args.batch, 4, 32, 32), torch.randint(0, 1000, (args.batch,))
            t = torch.full((args.batch,), int(sampler.schedule.timestep_map[sampler.steps // 2]), dtype=torch.long)
            out, sec, first = run.timed(lambda: ort_model(x, t, y), args.repeats, warmup=2)
            ref = model.cpu()(x, t, y)
        row = {"row": f"ours INT8 ONNX, onnxruntime {want}", "ms": sec * 1e3, "rel_err": rel_err(out.float(), ref),
               "export_s": export_s, "first_call_s": first}
        run.results["onnx"].append(row)
        print(f"onnx | {row['row']} | {row['ms']:.2f} ms | err {row['rel_err']:.4f}", flush=True)
        run.save()
    except Exception as exc:  # noqa: BLE001
        run.fail("onnx", "ours INT8 ONNX", exc)
    finally:
        model.to(run.device)


def markdown(results: Dict, args) -> str:
    m = results["machine"]
    lines = [f"Machine: {m.get('gpu', 'no GPU')}; {m.get('cpu', '?')}; torch {m['torch']}. {args.model}, "
             f"4x32x32 latents, random weights."]
    if results["forward"]:
        lines += ["", f"Per forward, batch {args.batch} ({args.repeats} timed, median):", "",
                  "| row | ms | vs eager FP32 | rel. error | first call s | build s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['ms']:.2f} | {r['vs_fp32']:.2f}x | {r['rel_err']:.4f} | {r['first_call_s']:.1f} "
                  f"| {r['build_s']:.1f} |" for r in results["forward"]]
    if results["e2e"]:
        lines += ["", f"End to end, {args.steps} DDPM steps, CFG 1.5, {args.batch // 2} images (model batch "
                  f"{args.batch}), {args.e2e_repeats} timed runs, median:", "",
                  "| row | s | vs eager FP32 | rel. error of samples | first run s | build s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['s']:.3f} | {r['vs_fp32']:.2f}x | {r['rel_err']:.4f} | {r['first_run_s']:.1f} "
                  f"| {r['build_s']:.1f} |" for r in results["e2e"]]
    for r in results["onnx"]:
        lines += ["", f"{r['row']}: " + (r["note"] if r.get("ms") is None else
                                         f"{r['ms']:.2f} ms per forward, rel. error {r['rel_err']:.4f}")]
    for f in results["failures"]:
        lines += ["", f"FAILED {f['section']} / {f['row']}: {f['error']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    args = parse_args(argv)
    # a new batch size compiles a static graph again, not a dynamic one
    torch._dynamo.config.automatic_dynamic_shapes = False
    run = Run(args)
    print(machine_line(), flush=True)
    model = benchmark_model(args.model).to(run.device)  # adaLN re-initialised: DiT's zero init makes blocks identities
    sampler = qc.DDPM(steps=args.steps, cfg_scale=1.5)
    sections = {"forward": forward_section, "e2e": e2e_section, "onnx": onnx_section}
    for name in args.section_list:
        sections[name](run, model, sampler)
    run.save()
    text = markdown(run.results, args)
    print(text, flush=True)
    if args.md:
        args.md.write_text(text)
    return run.results


if __name__ == "__main__":
    main()
