"""Per-forward speed of the main variants with pytest-benchmark, in one session, on one machine.

    pytest benchmarks/test_speed.py --benchmark-only                      # the table
    pytest benchmarks/test_speed.py --benchmark-only --benchmark-autosave # keep it (.benchmarks/)
    pytest benchmarks/test_speed.py --benchmark-only --benchmark-compare  # against the last saved run

``QC_BENCH_MODEL`` (default DiT-S/2, random weights, 4x32x32), ``QC_BENCH_BATCH`` (8) and
``QC_BENCH_THREADS`` (2) choose the config. Each row's ``extra_info`` carries its output error against
eager FP32 and its first call's seconds (the compile); the machine line is printed once. Nothing here
asserts a speed: ratios are read off the table, within one run (docs/RESULTS.md). ``make test`` does not
collect this folder; the long tables are the scripts beside it (forward_speed.py, ...).
"""
import os

import pytest
import torch

import qc_compiler as qc
from qc_compiler.tools import baselines
from qc_compiler.tools.bench import (benchmark_inputs, benchmark_model, compile_benchmark_w8a8, machine_line,
                                     rel_err)

pytest.importorskip("pytest_benchmark")

MODEL = os.environ.get("QC_BENCH_MODEL", "DiT-S/2")
BATCH = int(os.environ.get("QC_BENCH_BATCH", "8"))
THREADS = int(os.environ.get("QC_BENCH_THREADS", "2"))


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(THREADS)
    print("\n" + machine_line())
    model = benchmark_model(MODEL)
    inputs = benchmark_inputs(model, BATCH)
    with torch.no_grad():
        ref = model(*inputs)
        ours = compile_benchmark_w8a8(model, qc.DDPM(steps=50, cfg_scale=1.0))
    return model, inputs, ref, ours


def _row(benchmark, fn, inputs, ref, first_call_s=0.0):
    with torch.no_grad():
        out = fn(*inputs)
        benchmark.extra_info.update({"model": MODEL, "batch": BATCH, "threads": THREADS,
                                     "rel_err": rel_err(out, ref), "first_call_s": first_call_s})
        benchmark.pedantic(fn, args=inputs, rounds=5, warmup_rounds=1)


def test_eager_fp32(benchmark, setup):
    model, inputs, ref, _ = setup
    _row(benchmark, model, inputs, ref)


def test_eager_bf16(benchmark, setup):
    model, inputs, ref, _ = setup
    _row(benchmark, baselines.eager_bf16(model, inputs).fn, inputs, ref)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_compile(benchmark, setup, dtype):
    model, inputs, ref, _ = setup
    b = baselines.compiled(model, inputs, dtype)
    _row(benchmark, b.fn, inputs, ref, b.first_call_s)


def test_pt2e_int8(benchmark, setup):
    pytest.importorskip("torchao")
    model, inputs, ref, ours = setup
    from forward_speed import calibration_batches  # the batches ours calibrated on

    b = baselines.pt2e_int8(model, inputs, list(calibration_batches(ours, BATCH)))
    _row(benchmark, b.fn, inputs, ref, b.first_call_s)


def test_ours_w8a8_torch_int8(benchmark, setup):
    _, inputs, ref, ours = setup
    _row(benchmark, ours.graph_module, inputs, ref)
