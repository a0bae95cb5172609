"""Where one forward's time goes: our W8A8 torch INT8 model against eager FP32, by kind of work.

    python benchmarks/profile_forward.py --model DiT-B/2 --batch 8 --threads 2 [--kernel int_mm]

``torch.profiler`` times a few forwards of each. Our backend's two hot paths (activation quantization
and the INT8 GEMM) are wrapped in ``record_function`` labels for the profile only, so their shares
are measured, not guessed from op names. The last line is Amdahl's bound: the speed against eager
FP32 if everything but the INT8 GEMMs took no time, which is what decides whether a goal such as
"5x eager" can be met by faster GEMMs alone.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import qc_compiler as qc
from qc_compiler.backends import torch_int8
from qc_compiler.io import save_json
from qc_compiler.tools.bench import machine, machine_line, benchmark_inputs, benchmark_model, compile_benchmark_w8a8

# (label in the table, profiler event names whose inclusive time it sums)
CATEGORIES: List[Tuple[str, Tuple[str, ...]]] = [
    ("INT8 GEMMs with their epilogue (oneDNN: bias, GELU and requantization fused)", ("qc::int8_gemm",)),
    ("activation quantization (x / s, round, + z, clamp, to uint8)", ("qc::quantize_u8",)),
    ("float linears (FP32 model; weight-only conditioning linears in ours)", ("aten::linear",)),
    ("attention, FP32 (scaled_dot_product_attention)", ("aten::scaled_dot_product_attention",)),
    ("layer norms", ("aten::layer_norm",)),
    ("GELU (unfused)", ("aten::gelu",)),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--forwards", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernel", choices=sorted(torch_int8.KERNELS), help="INT8 kernel (default: the backend's choice)")
    p.add_argument("--json", type=Path, help="also write both profiles, with the machine, as JSON")
    return p.parse_args(argv)


def labelled(fn: Callable, label: str) -> Callable:
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def instrument_backend() -> None:
    """Label our backend's quantize and GEMM calls (module globals, looked up at call time)."""
    torch_int8._quantize_u8 = labelled(torch_int8._quantize_u8, "qc::quantize_u8")
    for name, kernel in list(torch_int8.KERNELS.items()):
        torch_int8.KERNELS[name] = labelled(kernel, "qc::int8_gemm")


def profile_forward(fn: Callable, forwards: int) -> Tuple[float, Dict[str, float]]:
    """Wall seconds per forward, and the inclusive CPU seconds per forward of every event name."""
    fn()  # warm-up: oneDNN prepacking, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()  # inside: the profiler's own start-up is not a forward's time
        for _ in range(forwards):
            fn()
        wall = (time.perf_counter() - t0) / forwards
    # cpu_time_total is inclusive and per thread of the caller: the intra-op workers are not added twice.
    events = {e.key: e.cpu_time_total / 1e6 / forwards for e in prof.key_averages()}
    return wall, events


def shares(wall: float, events: Dict[str, float]) -> Dict[str, float]:
    """Seconds per forward of each category of CATEGORIES present, and of everything else."""
    out = {label: sum(events.get(n, 0.0) for n in names) for label, names in CATEGORIES}
    out = {label: seconds for label, seconds in out.items() if seconds > 0}
    out["everything else"] = max(wall - sum(out.values()), 0.0)
    return out


def print_table(title: str, wall: float, events: Dict[str, float], eager_wall: float) -> None:
    print(f"\n### {title}: {wall * 1e3:.0f} ms per forward ({eager_wall / wall:.2f}x eager FP32)\n")
    print("| work | ms per forward | share |\n|---|---|---|")
    for label, seconds in shares(wall, events).items():
        if label == "everything else":
            label = "everything else (modulation, residual adds, cache and step bookkeeping, Python)"
        print(f"| {label} | {seconds * 1e3:.0f} | {100 * seconds / wall:.0f}% |")


def main(args) -> None:
    torch.set_num_threads(args.threads)
    print(machine_line())
    model = benchmark_model(args.model)
    b = args.batch
    inputs = benchmark_inputs(model, b)
    if args.kernel:
        os.environ["QC_INT8_KERNEL"] = args.kernel  # read when the model is lowered
    with torch.no_grad():
        ours = compile_benchmark_w8a8(model, qc.DDPM(steps=50, cfg_scale=1.0))
        instrument_backend()
        eager_wall, eager_events = profile_forward(lambda: model(*inputs), args.forwards)
        ours_wall, ours_events = profile_forward(lambda: ours.graph_module(*inputs), args.forwards)
    kernel = os.environ.get("QC_INT8_KERNEL", "default")
    print(f"{args.model}, batch {b}, {args.threads} threads, INT8 kernel {kernel}, {args.forwards} profiled forwards each")
    print_table("eager FP32", eager_wall, eager_events, eager_wall)
    print_table("ours W8A8 torch INT8", ours_wall, ours_events, eager_wall)
    gemm = ours_events.get("qc::int8_gemm", float("nan"))
    print(f"\nAmdahl: with everything but the INT8 GEMMs free, ours would be {eager_wall / gemm:.2f}x eager FP32;"
          f" the INT8 GEMMs alone run {eager_events.get('aten::linear', float('nan')) / gemm:.2f}x faster than"
          " eager's FP32 linears.")
    if args.json:
        save_json({"machine": machine(), "model": args.model, "batch": b, "kernel": kernel, "forwards": args.forwards,
                   "eager_fp32": {"wall_s": eager_wall, "shares_s": shares(eager_wall, eager_events)},
                   "ours_w8a8_torch_int8": {"wall_s": ours_wall, "shares_s": shares(ours_wall, ours_events)},
                   "int8_gemm_s": gemm}, args.json)


if __name__ == "__main__":
    main(parse_args())
