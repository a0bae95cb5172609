"""How closely our INT8 ONNX file under onnxruntime follows the torch INT8 model, and how big it is.

    python benchmarks/onnx_parity.py --models dit-mnist,DiT-S/2,DiT-B/2 --steps 50 --batch 8 --threads 2

For each model: the W8A8 recipe of the speed benchmarks, without and with the cache (interval 2),
exported with ``export_onnx`` beside the FP32 export of the same graph (no passes). Rows:
- file size of the INT8 file against the FP32 one (weights int8: about a quarter);
- per-step outputs: onnxruntime evaluated on the torch INT8 run's own inputs (x_t, t, y) at every
  step, so errors do not compound; the worst relative error and the worst absolute difference; and,
  for scale, the worst relative error of the fake-quant reference graph against torch INT8 on the
  same inputs (two implementations of the same integer math);
- final samples of a full sampling run from the same noise, onnxruntime against torch INT8.
The cache changes the model's state from step to step, so the cached file is compared on final
samples only.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import qc_compiler as qc
from qc_compiler.backends.onnx import OrtDenoiser
from qc_compiler.io import save_json
from qc_compiler.tools.bench import machine, machine_line, benchmark_model, compile_benchmark_w8a8, rel_err
from qc_compiler.passes import StepCache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="dit-mnist,DiT-S/2")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write every row, with the machine, as JSON")
    return p.parse_args(argv)


def per_step_errors(sampler, compiled, ort, reference, labels):
    """Worst relative error and worst absolute difference of onnxruntime's output on the torch run's
    inputs, and worst relative error of the fake-quant reference's output on them."""
    run = sampler.sample(compiled, labels, seed=0, record=True)
    null = compiled.num_classes
    worst_rel = worst_abs = worst_ref = 0.0
    for rec in run.steps:
        out = sampler.guided_output(ort, rec.x_t, rec.t, rec.y, null_label=null)
        worst_rel = max(worst_rel, rel_err(out, rec.model_output))
        worst_abs = max(worst_abs, float((out - rec.model_output).abs().max()))
        worst_ref = max(worst_ref, rel_err(sampler.guided_output(reference, rec.x_t, rec.t, rec.y, null_label=null), rec.model_output))
    return worst_rel, worst_abs, worst_ref


def main(args) -> None:
    torch.set_num_threads(args.threads)
    print(machine_line())
    tmp = Path(tempfile.mkdtemp())
    rows = []
    print("| model | variant | INT8 file MB | FP32 file MB | ratio | per-step rel. error (worst) "
          "| per-step abs. diff (worst) | fake-quant vs torch INT8, per step (worst) | final samples rel. error |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = benchmark_model(name)
        sampler = qc.DDPM(steps=args.steps, cfg_scale=1.0)
        labels = [i % model.num_classes for i in range(args.batch)]
        fp32_path = qc.compile(model, passes=[], sampler=sampler).export_onnx(tmp / "fp32.onnx")
        for variant, first in (("W8A8", []), ("W8A8 + cache interval 2", [StepCache(interval=2)])):
            compiled = compile_benchmark_w8a8(model, sampler, first)
            path = compiled.export_onnx(tmp / "int8.onnx")
            ort = OrtDenoiser(path, threads=args.threads)
            reference = None if first else compile_benchmark_w8a8(model, sampler, backend="fakequant")
            errors = (None, None, None) if first else per_step_errors(sampler, compiled, ort, reference, labels)
            steps = "- | - | -" if first else "{:.1e} | {:.1e} | {:.1e}".format(*errors)
            final = rel_err(sampler.sample(ort, labels, seed=0), sampler.sample(compiled, labels, seed=0))
            int8_mb, fp32_mb = path.stat().st_size / 2 ** 20, fp32_path.stat().st_size / 2 ** 20
            print(f"| {name} | {variant} | {int8_mb:.1f} | {fp32_mb:.1f} | {int8_mb / fp32_mb:.2f} | {steps} "
                  f"| {final:.1e} |", flush=True)
            rows.append({"model": name, "variant": variant, "int8_mb": int8_mb, "fp32_mb": fp32_mb,
                         "per_step_rel_worst": errors[0], "per_step_abs_worst": errors[1],
                         "fakequant_vs_int8_per_step_rel_worst": errors[2], "final_samples_rel": final})
            if args.json:  # rewritten after each row: a stopped run keeps what it measured
                save_json({"machine": machine(), "steps": args.steps, "batch": args.batch, "rows": rows}, args.json)


if __name__ == "__main__":
    main(parse_args())
