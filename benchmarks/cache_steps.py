"""What one compute step and one reuse step of a cached model cost, per lowering, against the uncached forward.

    python benchmarks/cache_steps.py --model DiT-S/2 --batch 8 --threads 2 --rounds 7 \
        --json benchmarks/results/cache_steps_dit-s2.json

Our W8A8 recipe with a step cache (interval 2), lowered three ways from one calibration: the torch INT8
backend; Inductor with the whole graph compiled once per cache pattern (the default); and Inductor with
a graph break per cached region (the lowering before cache patterns, which a data-dependent cache
policy kept until it was cut after its probe). Beside them, Inductor without a cache: the forward a
compute step should cost. Rows are timed in interleaved rounds (one call of each per round, after two
warm-up steps each), step 0 (every region computes) and step 1 (every region reused); then two sampling
runs of each Inductor lowering, alternating, for the end-to-end effect. Ratios only within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import qc_compiler as qc
from qc_compiler.io import save_json
from qc_compiler.passes import StepCache
from qc_compiler.tools.bench import (benchmark_inputs, benchmark_model, compile_benchmark_w8a8, machine, machine_line,
                                     per_region_breaks)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="the sampler's steps (the end-to-end runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per step row")
    p.add_argument("--runs", type=int, default=2, help="sampling runs per Inductor lowering")
    p.add_argument("--json", type=Path, help="also write every row, with the machine, as JSON")
    args = p.parse_args(argv)
    for name in ("batch", "steps", "threads", "rounds", "runs"):
        if getattr(args, name) < (2 if name == "steps" else 1):
            p.error(f"--{name} must be at least {2 if name == 'steps' else 1}")
    return args


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    print(machine_line())
    model = benchmark_model(args.model)
    sampler = qc.DDPM(steps=args.steps, cfg_scale=1.0)
    x, _, y = benchmark_inputs(model, args.batch)
    cache = [StepCache(interval=2)]
    with torch.no_grad():
        ours = compile_benchmark_w8a8(model, sampler, cache)
        models = {
            "torch INT8 + cache": ours,
            "Inductor + cache, whole graph per pattern": compile_benchmark_w8a8(model, sampler, cache,
                                                                                backend="inductor", like=ours),
            "Inductor + cache, a graph break per region": per_region_breaks(
                lambda: compile_benchmark_w8a8(model, sampler, cache, backend="inductor", like=ours)),
            "Inductor, no cache": compile_benchmark_w8a8(model, sampler, backend="inductor",
                                                         like=compile_benchmark_w8a8(model, sampler)),
        }

        def step(m, i: int) -> float:
            t = torch.full((args.batch,), sampler.timesteps[i], dtype=torch.long)
            t0 = time.perf_counter()
            m(x, t, y)
            return time.perf_counter() - t0

        for m in models.values():  # compiles, prepacks: every step kind twice
            for i in (0, 1, 0, 1):
                step(m, i)
        times = {(label, i): [] for label in models for i in (0, 1)}
        for _ in range(args.rounds):
            for label, m in models.items():
                for i in (0, 1):
                    times[label, i].append(step(m, i))
        runs = {label: [] for label in models if label.startswith("Inductor + cache")}
        for _ in range(args.runs):
            for label in runs:
                t0 = time.perf_counter()
                sampler.sample(models[label], y.tolist(), seed=0)
                runs[label].append(time.perf_counter() - t0)
    plain = statistics.median(times["Inductor, no cache", 0])
    print(f"\n### {args.model}, batch {args.batch}, {args.threads} threads: one step, median of {args.rounds} "
          f"interleaved rounds\n")
    print("| lowering | compute step ms | vs uncached forward | reuse step ms | two steps ms |\n|---|---|---|---|---|")
    rows = []
    for label in models:
        compute, reuse = statistics.median(times[label, 0]), statistics.median(times[label, 1])
        cached = label != "Inductor, no cache"
        print(f"| {label} | {compute * 1e3:.1f} | {compute / plain:.2f}x | "
              + (f"{reuse * 1e3:.1f} | {(compute + reuse) * 1e3:.1f} |" if cached else f"- | {2 * compute * 1e3:.1f} |"))
        rows.append({"row": label, "compute_step_s": compute, "reuse_step_s": reuse if cached else None,
                     "vs_uncached_forward": compute / plain})
    print(f"\n{args.steps}-step sampling runs, alternating: "
          + "; ".join(f"{label}: {', '.join(f'{s:.2f}' for s in secs)} s" for label, secs in runs.items()))
    result = {"machine": machine(), "model": args.model, "batch": args.batch, "steps": args.steps,
              "rounds": args.rounds, "rows": rows, "sampling_runs_s": runs}
    if args.json:
        save_json(result, args.json)
    return result


if __name__ == "__main__":
    main(parse_args())
