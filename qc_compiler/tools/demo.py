"""``qc demo`` (what ``make demo`` runs): the main job on the embedded model.

It loads the embedded MNIST DiT and compiles it twice: W8A8 on INT8 kernels (TAP calibration), and
the full Q&C schedule (``presets.qandc``: step cache at interval 2, TAP on the cached model, W8A8,
variance compensation). It samples a labelled grid (one column per digit) from FP32 to
``out/grid.png`` and FP32 beside Q&C, from the same noise, to ``out/grid_fp32_vs_qandc.png``; exports
the Q&C model (cache and VC tables included) to ``out/dit_int8.onnx``; and prints a table of
measured sampling speed and quality (the digit-classifier suite) for each variant, all from the
same seeds.

Then the same for the embedded text-conditioned model, ``mmdit-mnist`` (diffusers' SD3 transformer,
flow matching): a grid of prompts (each digit thin and left-slanted, plain, thick and right-slanted)
from FP32 beside Q&C W8A8, to ``out/mmdit_fp32_vs_qandc.png``, and the quality table with attribute
accuracy, to ``out/demo_mmdit.json``.

Example:
    >>> run_demo(out_dir="out", n_eval=200)     # doctest: +SKIP
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

import torch

from ..api import compile as qc_compile
from ..api import load_model
from ..diffusion import DDPM
from ..imaging import save_grid, side_by_side
from ..io import save_json
from ..passes import Quantize, TAPCalibration
from ..presets import qandc
from ..specs import StepCacheConfig
from .bench import machine, machine_line, make_task, sample_timed

__all__ = ["run_demo", "run_text_demo", "measure", "format_table"]

log = logging.getLogger(__name__)

STEPS, CFG, ROWS, BATCH = 50, 1.5, 6, 250
QANDC = "Q&C W8A8 (i2+TAP+VC)"


def format_table(rows: List[Dict]) -> str:
    """A fixed-width table of the demo's measured rows (with attribute accuracy for a text model's)."""
    attrs = any("attr_attributes" in r for r in rows)
    head = (f"{'variant':<24}{'s/sample':>9}{'speed':>7}{'FID':>8}{'sFID':>8}{'IS':>6}{'prec':>6}{'rec':>6}{'acc':>7}"
            + (f"{'attr':>7}" if attrs else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['variant']:<24}{r['sec_per_sample']:>9.3f}{r['speedup']:>6.2f}x{r['fid']:>8.2f}"
                     f"{r['sfid']:>8.2f}{r['is']:>6.2f}{r['precision']:>6.2f}{r['recall']:>6.2f}{r['class_acc']:>7.3f}"
                     + (f"{r['attr_attributes']:>7.3f}" if attrs else ""))
    return "\n".join(lines)


def measure(task, variants: Dict, seed: int) -> List[Dict]:
    """Each variant samples the task's labels from the same noise, timed against the first (FP32), and
    is scored by the digit suite (plus the task's own metrics: attribute accuracy for a text model)."""
    from ..eval import evaluate

    table, base, n = [], None, len(task.labels)
    for name, m in variants.items():
        images, seconds = sample_timed(task.bind(m), task.sampler, task.labels, seed=seed, batch=BATCH, progress=True)
        base = base or seconds
        table.append({"variant": name, "sec_per_sample": seconds / n, "speedup": base / seconds,
                      **evaluate(images, torch.tensor(task.classes)), **(task.metrics(images) if task.metrics else {})})
    return table


def run_text_demo(out_dir="out", *, n_eval: int = 200, seed: int = 0, steps: int = 28, calib_size: int = 800,
                  pool_labels: int = 32) -> List[Dict]:
    """``mmdit-mnist``: FP32 beside Q&C W8A8 on a prompt grid, and both scored (with attribute accuracy)
    on ``n_eval`` samples of the evaluation prompts, same noise."""
    from ..models import mmdit_mnist as mm
    from ..models.digit_text import describe

    out_dir = Path(out_dir)
    bundle = mm.load_mmdit()
    cfg = mm.DEFAULT_CFG
    task = make_task("mmdit-mnist", bundle, n=n_eval, steps=steps, cfg=cfg, seed=seed)
    print(f"\nmmdit-mnist (SD3Transformer2DModel, flow matching, {steps} Euler steps, guidance {cfg:g}): "
          "compiling Q&C W8A8 ...")
    variants = {"FP32 eager": mm.denoiser(task.model),
                "Q&C W8A8 (i2+TAP+VC)": task.compile(qandc(bits="w8a8", size=calib_size, pool_labels=pool_labels),
                                                     seed=seed, backend="torch")}
    prompts = [describe(d, th, sl) for th, sl in ((-1, -1), (0, 0), (1, 1)) for d in range(10)]
    grids = [mm.sample(bundle, prompts, steps=steps, cfg_scale=cfg, seed=seed, model=m) for m in variants.values()]
    side_by_side(*grids, out_dir / "mmdit_fp32_vs_qandc.png", nrow=10)
    print(f"wrote {out_dir / 'mmdit_fp32_vs_qandc.png'} (rows: thin left-slanted, plain, thick right-slanted; "
          "same noise: FP32 left, Q&C W8A8 right)")
    table = measure(task, variants, seed)
    print(f"\n{n_eval} samples per variant (prompts with attributes), same seeds:")
    print(format_table(table))
    save_json({"steps": steps, "cfg": cfg, "n": n_eval, "seed": seed, "machine": machine(), "rows": table},
              out_dir / "demo_mmdit.json")
    return table


def run_demo(out_dir="out", *, n_eval: int = 200, seed: int = 0, steps: int = STEPS, rows: int = ROWS,
             calib_size: int = 800, pool_labels: int = 32) -> List[Dict]:
    """Grid to ``out_dir/grid.png``, metrics to ``out_dir/demo.json``; returns the table rows."""
    out_dir = Path(out_dir)
    model = load_model("dit-mnist")
    sampler = DDPM(steps=steps, cfg_scale=CFG)
    print("compiling W8A8 (TAP calibration) and Q&C (cache i2 + TAP + W8A8 + VC) ...")
    variants = {"FP32 eager": model,
                "W8A8 INT8 (TAP)": qc_compile(model, sampler=sampler, passes=[
                    TAPCalibration(size=calib_size, pool_labels=pool_labels), Quantize(preset="w8a8")]),
                QANDC: qc_compile(model, sampler=sampler,
                                  passes=qandc(bits="w8a8", cache=StepCacheConfig(interval=2), size=calib_size,
                                               pool_labels=pool_labels))}
    grid_labels = [c for _ in range(rows) for c in range(model.num_classes)]
    fp_grid, _ = sample_timed(model, sampler, grid_labels, seed=seed, batch=BATCH, progress=True)
    save_grid(fp_grid, out_dir / "grid.png", nrow=model.num_classes, col_labels=[str(c) for c in range(model.num_classes)])
    q_grid, _ = sample_timed(variants[QANDC], sampler, grid_labels, seed=seed, batch=BATCH, progress=True)
    side_by_side(fp_grid, q_grid, out_dir / "grid_fp32_vs_qandc.png", nrow=model.num_classes)
    print(f"wrote {out_dir / 'grid.png'} ({rows} samples of each digit, DDPM {steps} steps, cfg {CFG}) and "
          f"{out_dir / 'grid_fp32_vs_qandc.png'} (same noise: FP32 left, Q&C W8A8 right)")
    onnx_path = variants[QANDC].export_onnx(out_dir / "dit_int8.onnx")
    print(f"wrote {onnx_path} (INT8 QDQ with the cache and VC; run it with qc_compiler.backends.onnx.OrtDenoiser)")

    table = measure(make_task(model=model, n=n_eval, steps=steps, cfg=CFG, seed=seed), variants, seed)
    print(f"\n{n_eval} samples per variant, same seeds; speed is measured wall clock against FP32 eager "
          f"({torch.get_num_threads()} threads):\n{machine_line()}")
    print(format_table(table))
    save_json({"steps": steps, "cfg": CFG, "n": n_eval, "seed": seed, "machine": machine(), "rows": table},
              out_dir / "demo.json")
    return table
