"""Per-forward and end-to-end speed of our INT8 lowering against the float and INT8 baselines, in one run.

    python benchmarks/forward_speed.py --models DiT-S/2,DiT-B/2,dit-mnist --batch 8 --threads 2

Rows (each with its output error against eager FP32 on the same inputs, and its first call's seconds):
- PyTorch eager FP32, and eager bf16 autocast;
- the compiled baselines (``qc_compiler.tools.baselines``): ``torch.compile`` FP32 and bf16 autocast
  with Inductor freezing, torchao's PT2E static INT8 (X86InductorQuantizer, calibrated on the same
  batches as ours) + ``torch.compile``, once on every Linear and once on the same GEMMs as ours
  (embedders and adaLN left float), and torchao's dynamic INT8 + ``torch.compile``;
- onnxruntime FP32 on a plain FP32 ONNX export, and onnxruntime's own ``quantize_dynamic`` (per
  tensor and per channel) and ``quantize_static`` (QDQ, MinMax, per-channel weights) applied to that
  export; ``quantize_static`` is calibrated on exactly the trajectory inputs our W8A8 row calibrates on
  (its calibration set: the same items, in the same CFG pairs and batches), once with onnxruntime's
  default op types and once restricted to MatMul/Gemm, as ours;
- torch.ao dynamic INT8 (``quantize_dynamic`` on nn.Linear);
- ours: W8A8 (uniform calibration, 2 sampling runs of pool) lowered to INT8 kernels (the ``torch``
  backend's, and the ``inductor`` backend's: the same calibration through torch.compile), and our INT8
  ONNX file under onnxruntime; through Inductor once more with every linear's input quantized (the
  conditioning linears too), the layer set of PT2E's all-layers row, and with attention in bf16
  (``AttentionPrecision``) on both its kernels, the one it picks for this machine first.
End-to-end: 50-step DDPM sampling (same noise) for eager FP32, ``torch.compile`` bf16, PT2E INT8 +
``torch.compile``, onnxruntime FP32 (our exporter, no passes), ours torch INT8, Inductor INT8 and ONNX
INT8, each without and with the cache (interval 2), and Inductor INT8 with bf16 attention (the kernel
the pass picks here) without and with the cache;
the error is that of the final samples against eager FP32's. ``--no-forward``, ``--e2e-no-reference``,
``--time-cpus``/``--build-cpus`` and ``--build-s`` split a run into processes side by side on one machine
(``benchmarks/gpu_host_check.sh``).
Per-forward rows are timed in interleaved rounds (one call of each row per round, 0.2 s idle before
each call so that no row inherits another's spinning threads), so that the shared machine's drift
hits every row alike; end-to-end rows run one after another.
DiT-S/2 and DiT-B/2 use random weights (adaLN re-initialised so every block matters), 4x32x32.
"""
from __future__ import annotations

import argparse
import functools
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import qc_compiler as qc
from qc_compiler.tools import baselines
from qc_compiler.tools.bench import (benchmark_inputs, benchmark_model, compile_benchmark_w8a8, interleaved_medians,
                                     machine_line, median_seconds, per_region_breaks, pin_threads, pinned, rel_err,
                                     write_results)
from qc_compiler.blocked_attention import WHOLE_SCORES_MAX_MIB
from qc_compiler.passes import AttentionPrecision, StepCache


# how a row names the attention kernel (AttentionPrecision's kernel option)
ATTENTION_ROW = {"matmul": "two matmuls", "sdpa": "fused SDPA", "whole": "two matmuls, all scores at once"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="DiT-S/2,DiT-B/2,dit-mnist")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per forward row (a third of it end to end)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end sampling rows")
    p.add_argument("--no-compiled", action="store_true",
                   help="skip every torch.compile row, ours through Inductor included (each compiles for minutes)")
    p.add_argument("--e2e-only", default="",
                   help="comma-separated parts of end-to-end row labels to run, or whole labels after '=' "
                        "(eager FP32, the reference, runs unless --e2e-no-reference)")
    p.add_argument("--build-s", type=float, default=0.0,
                   help="per forward: start no compiled baseline after this many seconds of the model's run "
                        "(a time-boxed machine); the rows left out are listed. 0: no limit")
    p.add_argument("--no-ort", action="store_true", help="skip the onnxruntime rows per forward (theirs and our ONNX)")
    p.add_argument("--no-forward", action="store_true",
                   help="skip the per-forward table: build only what the end-to-end rows need (with --e2e-only, "
                        "only those rows' baselines), so the two tables can run as two processes on separate cores")
    p.add_argument("--e2e-no-reference", action="store_true",
                   help="skip eager FP32 end to end (the slowest row, the others' reference): no ratio or error "
                        "column then; for a second process that times more rows beside one that has it")
    p.add_argument("--time-cpus", default="",
                   help="comma-separated logical CPUs to time on (every thread pinned there while timing): two "
                        "runs side by side on one machine")
    p.add_argument("--build-cpus", default="",
                   help="comma-separated logical CPUs for everything else (builds, compiles, calibration)")
    p.add_argument("--input-size", type=int, default=32,
                   help="latent side of the random-weight DiTs: 32 (256px, 256 tokens at patch 2) or 64 (512px, 1024)")
    p.add_argument("--json", type=Path, help="also write every row, with the machine, as JSON here")
    args = p.parse_args(argv)
    if args.input_size < 8 or args.input_size % 8:
        p.error(f"--input-size is a latent side, a multiple of 8 from 8 up; got {args.input_size}")
    if args.input_size != 32 and "dit-mnist" in args.models.split(","):
        p.error("dit-mnist is trained at its own size: time it without --input-size")
    args.e2e_only = [part.strip() for part in args.e2e_only.split(",") if part.strip()]
    if not (args.build_s >= 0 and math.isfinite(args.build_s)):
        p.error(f"--build-s is a number of seconds, 0 or more; got {args.build_s}")
    if args.no_forward and args.no_e2e:
        p.error("--no-forward and --no-e2e leave nothing to run: drop one")
    for flag in ("time_cpus", "build_cpus"):
        try:
            setattr(args, flag, sorted({int(c) for c in getattr(args, flag).split(",") if c.strip()}))
        except ValueError:
            p.error(f"--{flag.replace('_', '-')} takes logical CPU numbers, like 0,1; got {getattr(args, flag)!r}")
    if args.time_cpus and len(args.time_cpus) < args.threads:
        p.error(f"--time-cpus gives {len(args.time_cpus)} CPUs for {args.threads} threads: give at least as many")
    return args


def wanted_e2e(label, args):
    """Whether the end-to-end table runs this row (eager FP32, its reference, does unless told not to)."""
    if label == "eager FP32":
        return not args.e2e_no_reference
    return not args.e2e_only or any(label == part[1:] if part.startswith("=") else part in label
                                    for part in args.e2e_only)


def ort_rows(model, inputs, ref, threads, calibration):
    """(label, timed call, error) of onnxruntime FP32, quantize_dynamic and quantize_static on a plain
    FP32 export; ``calibration`` is the list of (x, t, y) batches ours calibrated on."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    tmp = Path(tempfile.mkdtemp())
    names = ["x", "t", "y"]
    torch.onnx.export(model, inputs, tmp / "fp32.onnx", dynamo=False, input_names=names, output_names=["out"],
                      dynamic_axes={n: {0: "batch"} for n in names + ["out"]}, opset_version=17)
    feed = {n: v.numpy() for n, v in zip(names, inputs)}

    class Reader(CalibrationDataReader):
        def __init__(self):
            # in the dtypes the model was exported with (a float32 timestep for DiT)
            self.items = iter([{n: v.to(like.dtype).numpy() for n, v, like in zip(names, batch, inputs)}
                               for batch in calibration])

        def get_next(self):
            return next(self.items, None)

    quantize_dynamic(tmp / "fp32.onnx", tmp / "dyn.onnx", weight_type=QuantType.QInt8)
    quantize_dynamic(tmp / "fp32.onnx", tmp / "dyn_pc.onnx", weight_type=QuantType.QInt8, per_channel=True)
    quantize_static(tmp / "fp32.onnx", tmp / "static.onnx", Reader(), weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, per_channel=True)
    # The same, restricted to what ours quantizes (the GEMMs): onnxruntime's default also quantizes
    # the residual adds, the modulation, softmax and layer norms, whose per-tensor ranges over a
    # whole trajectory cost far more accuracy than they buy speed.
    quantize_static(tmp / "fp32.onnx", tmp / "static_mm.onnx", Reader(), weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    rows = []
    for label, f in (("onnxruntime FP32", "fp32"), ("onnxruntime quantize_dynamic", "dyn"),
                     ("onnxruntime quantize_dynamic per-channel", "dyn_pc"),
                     ("onnxruntime quantize_static (QDQ)", "static"),
                     ("onnxruntime quantize_static (QDQ), MatMul/Gemm only", "static_mm")):
        sess = ort.InferenceSession(str(tmp / f"{f}.onnx"), opts, providers=["CPUExecutionProvider"])
        rows.append((label, lambda sess=sess: sess.run(None, feed), rel_err(sess.run(None, feed)[0], ref)))
    return rows


def float_linears(model):
    """The Linear modules ours does not quantize with activations (embedders, conditioning linears)."""
    from fnmatch import fnmatch

    from qc_compiler.models import adapter_for

    adapter = adapter_for(model)
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (not any(fnmatch(name, p) for p in adapter.quantizable)
                 or any(fnmatch(name, p) for p in adapter.conditioning_linears))]


def calibration_batches(ours, batch):
    """The (x, t, y) batches our W8A8 row was calibrated on (restored from its fitted state)."""
    from qc_compiler.calibration import CalibrationPool

    fitted = ours.build["fitted"]
    x, t, step, y, meta = (fitted[f"calibration.set.{k}"] for k in ("x", "t", "step", "y", "meta"))
    pool = CalibrationPool(x, t, step.long(), y.long(), null_label=int(meta[0]), cfg=bool(meta[1]))
    return pool.batches(batch)


def ours_onnx_row(ours, model, inputs, args):
    """Our INT8 QDQ export run by onnxruntime (its error measured at a timestep of the compiled table)."""
    from qc_compiler.backends.onnx import OrtDenoiser

    path = ours.export_onnx(Path(tempfile.mkdtemp()) / "ours.onnx")
    ort = OrtDenoiser(path, threads=args.threads)
    t = torch.full_like(inputs[1], ours.timesteps[0])
    x, y = inputs[0], inputs[2]
    ref = model(x, t, y)
    return ("ours W8A8 ONNX INT8 (onnxruntime)", lambda: ort(x, t, y), rel_err(ort(x, t, y), ref))


def model_heads_scores_mib(model) -> float:
    """MiB of bf16 attention scores one sample's forward holds per attention call (heads x tokens^2)."""
    try:
        tokens = model.pos_embed.shape[1]
        return model.blocks[0].attn.num_heads * tokens * tokens * 2 / 2 ** 20
    except AttributeError:  # not our DiT layout: no A/B row
        return 0.0


def latents(args) -> str:
    """What a table's heading adds when the DiTs run on other than the default 32x32 latents."""
    return "" if args.input_size == 32 else f" on {args.input_size}x{args.input_size} latents"


def main(args):
    torch.set_num_threads(args.threads)
    if args.build_cpus:
        pin_threads(args.build_cpus)
    print(machine_line())
    results = []
    for name in args.models.split(","):
        start = time.perf_counter()
        model = benchmark_model(name, args.input_size)
        b = args.batch
        inputs = benchmark_inputs(model, b)
        sampler = qc.DDPM(steps=args.steps, cfg_scale=1.0)
        if args.no_forward:
            e2e_alone(name, model, inputs, sampler, args, results)
            continue
        with torch.no_grad():
            ref = model(*inputs)
            ours = compile_benchmark_w8a8(model, sampler)
            dyn = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            ours.reset()

            bf16 = baselines.eager_bf16(model, inputs).fn
            rows = [("PyTorch eager FP32", lambda: model(*inputs), 0.0),
                    ("PyTorch eager bf16 autocast", lambda: bf16(*inputs), rel_err(bf16(*inputs), ref)),
                    ("torch.ao dynamic INT8", lambda: dyn(*inputs), rel_err(dyn(*inputs), ref))]
            calibration = list(calibration_batches(ours, args.batch))
            # The builds, the goals' rows first (ours through Inductor, compiled bf16, PT2E), while --build-s lasts.
            ours_ind, ours_rows, first_call, late = None, [], {}, []

            def in_time(label):
                if args.build_s and time.perf_counter() - start > args.build_s:
                    late.append(label)
                    return False
                return True

            def add_ours(label, m):
                ours_rows.append((label, lambda gm=m.graph_module: gm(*inputs), rel_err(m.graph_module(*inputs), ref)))
                first_call[label] = m.graph_module.first_call_s

            if not args.no_compiled:
                ours_ind = compile_benchmark_w8a8(model, sampler, backend="inductor", like=ours)  # ours' calibration
                add_ours("ours W8A8 Inductor INT8", ours_ind)
                # attention is the largest cost left in float (docs/RESULTS.md, "AMX"): in bf16, on the kernel
                # the pass picks for this machine (auto), and on the other one
                auto = AttentionPrecision(dtype="bf16").kernel(model)
                other = {"sdpa": "matmul", "matmul": "sdpa"}[auto]
                # past WHOLE_SCORES_MAX_MIB of scores the two matmuls run block by block: then also every
                # score at once, the blocks' A/B (below it the two rows would be the same)
                blocks = inputs[0].shape[0] * model_heads_scores_mib(model) > WHOLE_SCORES_MAX_MIB
                for kernel in (auto, other, *(("whole",) if blocks else ())):
                    label = f"ours W8A8 Inductor INT8, bf16 attention ({ATTENTION_ROW[kernel]})"
                    if in_time(label):
                        add_ours(label, compile_benchmark_w8a8(model, sampler, backend="inductor", attention="bf16",
                                                               attention_kernel=kernel))
            built, failed = (baselines.build_all(model, inputs, calibration, float_linears(model), only=in_time)
                             if not args.no_compiled else ([], []))
            label = "ours W8A8 Inductor INT8, every linear (as PT2E all layers)"
            if not args.no_compiled and in_time(label):  # PT2E's all-layers set: the conditioning linears too
                add_ours(label, compile_benchmark_w8a8(model, sampler, backend="inductor", every_linear=True))
            failed += [f"{label}: not built, past --build-s {args.build_s:g}" for label in late]
            first_call.update({b.label: b.first_call_s for b in built})
            rows += [(b.label, lambda fn=b.fn: fn(*inputs), rel_err(b.fn(*inputs), ref)) for b in built]
            failed = [(line, float("nan"), float("nan")) for line in failed]
            try:
                rows += ort_rows(model, inputs, ref, args.threads, calibration) if not args.no_ort else []
            except Exception as e:  # report, don't hide: the row says why it is missing
                failed.append((f"onnxruntime rows failed: {type(e).__name__}: {str(e)[:80]}", float("nan"), float("nan")))
            rows.append(("ours W8A8 torch INT8", lambda: ours.graph_module(*inputs), rel_err(ours.graph_module(*inputs), ref)))
            rows += ours_rows
            if not args.no_ort:
                rows.append(ours_onnx_row(ours, model, inputs, args))
            with pinned(args.time_cpus):
                seconds = interleaved_medians([fn for _, fn, _ in rows], args.repeats)
            rows = [(label, sec, err) for (label, _, err), sec in zip(rows, seconds)] + failed
        base = rows[0][1]
        ort_fp32 = next((r[1] for r in rows if r[0] == "onnxruntime FP32"), float("nan"))
        print(f"\n### {name}{latents(args)}, per forward, batch {b}, {args.threads} threads\n")
        print("| row | median ms | vs eager FP32 | vs ORT FP32 | rel. error vs FP32 | first call s |\n"
              "|---|---|---|---|---|---|")
        for label, sec, err in rows:
            first = f"{first_call[label]:.1f}" if label in first_call else "-"
            vs_ort = f"{ort_fp32 / sec:.2f}x" if ort_fp32 == ort_fp32 else "-"  # no onnxruntime row: no ratio
            if sec != sec:  # a row that failed or was not built: its line says why
                print(f"| {label} | - | - | - | - | - |", flush=True)
            else:
                print(f"| {label} | {sec * 1e3:.1f} | {base / sec:.2f}x | {vs_ort} | {err:.4f} | {first} |", flush=True)
            results.append({"model": name, "kind": "per forward", "row": label, "ms": sec * 1e3,
                            "vs_eager_fp32": base / sec, "rel_err": err, "first_call_s": first_call.get(label)})
        if not args.no_e2e:
            run_e2e(name, model, sampler, lambda: ours, args, built, ours_ind, results)
    write_results(args.json, "forward_speed", vars(args), results)


def e2e_alone(name, model, inputs, sampler, args, results):
    """--no-forward: build only what the end-to-end rows asked for need (our W8A8 model, calibrated, only
    when a row of ours or PT2E, calibrated on its set, is among them), then run them."""
    ours = functools.lru_cache(maxsize=None)(lambda: compile_benchmark_w8a8(model, sampler))
    built, failed = [], []
    if not args.no_compiled:
        with torch.no_grad():
            built, failed = baselines.build_all(model, inputs, lambda: list(calibration_batches(ours(), args.batch)),
                                                float_linears(model), only=lambda label: wanted_e2e(label, args))
    for line in failed:
        print(f"| {line} | | | | |", flush=True)
    run_e2e(name, model, sampler, ours, args, built, None, results)


def run_e2e(name, model, sampler, ours, args, built, ours_ind, results):
    """The end-to-end table: each row samples the same labels from the same noise; error against eager FP32."""
    b = args.batch
    labels = benchmark_inputs(model, b)[2].tolist()  # 0..b-1 modulo the classes, as the per-forward rows
    print(f"\n### {name}{latents(args)}, end to end, {args.steps} DDPM steps, batch {b}, {args.threads} threads\n")
    print("| row | s / run | vs eager FP32 | vs ORT FP32 | rel. error of the samples vs FP32 |\n|---|---|---|---|---|")
    base_e2e = ort_e2e = ref_samples = None
    for label, make in e2e_rows(model, sampler, ours, args, built, ours_ind):
        if args.no_compiled and "Inductor" in label:
            continue
        if not wanted_e2e(label, args):
            continue
        try:
            m, runs = make(), []
            # The warm-up (compiles, prepacks) runs unpinned: eager FP32 has nothing to warm and is the slowest
            # row to run twice; a compiled baseline is one static graph, warm after a call (two steps); ours
            # (step-conditional regions, per-step ranges) samples the whole schedule once.
            if isinstance(m, Denoiser):
                type(sampler)(steps=2, cfg_scale=sampler.cfg_scale).sample(m, labels, seed=0)
            elif label != "eager FP32":
                runs.append(sampler.sample(m, labels, seed=0))
            with pinned(args.time_cpus):
                sec = median_seconds(lambda: runs.append(sampler.sample(m, labels, seed=0)),
                                     max(1, args.repeats // 3), warmup=False)
            samples = runs[-1]
        except Exception as e:  # report, don't hide: the row says why it is missing
            print(f"| {label} failed: {type(e).__name__}: {str(e)[:80]} | | | | |", flush=True)
            continue
        if label == "eager FP32":
            base_e2e, ref_samples = sec, samples
        ort_e2e = sec if label == "onnxruntime FP32" else ort_e2e
        ratio = base_e2e / sec if base_e2e else float("nan")
        err = rel_err(samples, ref_samples) if ref_samples is not None else float("nan")
        ort_ratio = f"{ort_e2e / sec:.2f}x" if ort_e2e else "-"
        shown = f"{ratio:.2f}x | {ort_ratio} | {err:.4f}" if base_e2e else f"- | {ort_ratio} | -"
        print(f"| {label} | {sec:.2f} | {shown} |", flush=True)
        results.append({"model": name, "kind": f"end to end, {args.steps} steps", "row": label, "s": sec,
                        "vs_eager_fp32": ratio, "rel_err": err})


class Denoiser:
    """A compiled baseline called by our samplers: ``fn(x, t, y)``, the model's attributes otherwise."""

    def __init__(self, fn, model, t_dtype):
        self.fn, self.model, self.t_dtype = fn, model, t_dtype

    def __call__(self, x, t, y):
        return self.fn(x, t.to(self.t_dtype), y)  # in the timestep dtype the graph was traced with

    def __getattr__(self, name):
        return getattr(self.model, name)


def e2e_rows(model, sampler, ours, args, built=(), ours_ind=None):
    """(label, factory) for the end-to-end rows; ONNX rows export and load their file when reached.
    ``ours``: a function that gives our W8A8 model (built on first use, when the caller makes it so)."""
    from qc_compiler.backends.onnx import OrtDenoiser

    compiled = {b.label: b.fn for b in built}
    t_dtype = benchmark_inputs(model, 1)[1].dtype
    attention_row = ATTENTION_ROW[AttentionPrecision(dtype="bf16").kernel(model)]

    cached = {}

    def ours_cache(backend="torch"):  # built when a row first needs it; Inductor reuses the torch one's calibration
        if backend not in cached:
            cached[backend] = compile_benchmark_w8a8(model, sampler, [StepCache(interval=2)], backend=backend,
                                                     like=cached.get("torch"))
        return cached[backend]

    def ort(build):
        return lambda: OrtDenoiser(build().export_onnx(Path(tempfile.mkdtemp()) / "m.onnx"), threads=args.threads)

    def fp32_graph():  # our exporter's FP32 file, same interface
        return qc.compile(model, passes=[], sampler=sampler)

    extra = [(label, lambda fn=compiled[label]: Denoiser(fn, model, t_dtype)) for label in compiled
             if label.startswith(("torch.compile bf16", "torchao PT2E"))]
    return [("eager FP32", lambda: model), *extra, ("onnxruntime FP32", ort(fp32_graph)),
            ("ours W8A8 torch INT8", ours),
            ("ours W8A8 Inductor INT8",  # the per-forward rows' model when they built it (compiled already)
             lambda: ours_ind or compile_benchmark_w8a8(model, sampler, backend="inductor", like=ours())),
            ("ours W8A8 ONNX INT8", ort(ours)),
            ("ours W8A8 torch INT8 + cache interval 2", ours_cache),
            ("ours W8A8 Inductor INT8 + cache interval 2", lambda: ours_cache("inductor")),
            (f"ours W8A8 Inductor INT8, bf16 attention ({attention_row}), no cache",
             lambda: compile_benchmark_w8a8(model, sampler, backend="inductor", attention="bf16")),
            (f"ours W8A8 Inductor INT8, bf16 attention ({attention_row}) + cache interval 2",
             lambda: compile_benchmark_w8a8(model, sampler, [StepCache(interval=2)], backend="inductor",
                                            attention="bf16")),
            # last: the A/B of the lowering before whole-graph cache patterns (a time-boxed lane loses it first)
            ("ours W8A8 Inductor INT8 + cache interval 2 (a graph break per region)",
             lambda: per_region_breaks(lambda: compile_benchmark_w8a8(
                 model, sampler, [StepCache(interval=2)], backend="inductor", like=ours_cache()))),
            ("ours W8A8 ONNX INT8 + cache interval 2", ort(ours_cache))]


if __name__ == "__main__":
    main(parse_args())
