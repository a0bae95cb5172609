"""How fast can onnxruntime run the FP32 baseline? Export and session options, timed in one run.

    python benchmarks/ort_probe.py --model DiT-B/2 --threads 2

The onnxruntime FP32 row of ``forward_speed.py`` is a baseline our speed is quoted against, so it
must be onnxruntime's best, not an artefact of how we export. This times one forward (random-init
DiT, 4x32x32, batch 8) under: a dynamic or a static batch axis, the TorchScript or the
``torch.export`` (dynamo) exporter (when onnxscript is installed), our thread setting or onnxruntime's default, and sequential or
parallel execution; PyTorch eager FP32 is timed last, in the same process, as the reference.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import torch

from qc_compiler.io import save_json
from qc_compiler.tools.bench import benchmark_inputs, benchmark_model, machine, machine_line, median_seconds

NAMES = ["x", "t", "y"]


def export(model, inputs, path: Path, dynamic: bool, dynamo: bool) -> Path:
    axes = {n: {0: "batch"} for n in NAMES + ["out"]} if dynamic else None
    if dynamo:
        shapes = ({0: torch.export.Dim("batch")},) * 3 if dynamic else None
        torch.onnx.export(model, inputs, path, dynamo=True, input_names=NAMES, output_names=["out"],
                          dynamic_shapes=shapes, opset_version=18)
    else:
        torch.onnx.export(model, inputs, path, dynamo=False, input_names=NAMES, output_names=["out"],
                          dynamic_axes=axes, opset_version=17)
    return path


def session(path: Path, threads, parallel: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if parallel:
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write every row, with the machine, as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line())
    model = benchmark_model(args.model)
    b = args.batch
    inputs = benchmark_inputs(model, b)
    feed = {n: v.numpy() for n, v in zip(NAMES, inputs)}
    with torch.no_grad():
        ref = model(*inputs).numpy()
    tmp = Path(tempfile.mkdtemp())
    cases = [("TorchScript export, dynamic batch, threads set", dict(dynamic=True, dynamo=False), args.threads, False),
             ("TorchScript export, static batch, threads set", dict(dynamic=False, dynamo=False), args.threads, False),
             ("TorchScript export, dynamic batch, onnxruntime's default threads", dict(dynamic=True, dynamo=False), None, False),
             ("TorchScript export, dynamic batch, parallel execution", dict(dynamic=True, dynamo=False), args.threads, True)]
    if importlib.util.find_spec("onnxscript"):  # the torch.export-based exporter needs it
        cases.append(("dynamo export, static batch, threads set", dict(dynamic=False, dynamo=True), args.threads, False))
    rows = []
    for label, how, threads, parallel in cases:
        try:
            path = export(model, inputs, tmp / f"{len(rows)}.onnx", **how)
            sess = session(path, threads, parallel)
            out = sess.run(None, feed)[0]
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            rows.append((label, median_seconds(lambda: sess.run(None, feed), args.repeats), err))
        except Exception as e:  # report, don't hide: the row says why it is missing
            rows.append((f"{label}: failed, {type(e).__name__}: {str(e)[:80]}", float("nan"), float("nan")))
    with torch.no_grad():
        eager = median_seconds(lambda: model(*inputs), args.repeats)
    print(f"\n### onnxruntime FP32, {args.model}, batch {b}, {args.threads} threads (eager FP32: {eager * 1e3:.0f} ms)\n")
    print("| export and session | median ms | vs eager FP32 | rel. error vs eager |\n|---|---|---|---|")
    for label, sec, err in rows:
        print(f"| {label} | {sec * 1e3:.0f} | {eager / sec:.2f}x | {err:.1e} |", flush=True)
    if args.json:
        save_json({"machine": machine(), "model": args.model, "batch": b, "eager_fp32_s": eager,
                   "rows": [{"row": label, "median_s": sec, "rel_error": err} for label, sec, err in rows]}, args.json)


if __name__ == "__main__":
    main()
