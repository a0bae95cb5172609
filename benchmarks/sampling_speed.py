"""End-to-end sampling speed of ablation variants, timed in interleaved rounds, in one run.

    python benchmarks/sampling_speed.py --model mmdit-mnist --steps 28 --cfg 3 \
        --variants fp32,quant-tap,cache-i2,qc-tap-vcvar --n 100 --repeats 5 --json out.json

``qc bench quality`` times each row once, over all its samples, one row after another: on a shared
machine whose speed drifts (measured: docs/RESULTS.md, "mmdit-mnist", two rows that run the same
kernels differed by 30%), that column carries the drift. Here every variant is compiled exactly as
the quality run compiles it (the same passes, calibration and seed), then one sampling run of each is
timed per round, and the median per variant is reported with its speed against FP32's median. The
rows also carry the spread (max/min over rounds), so a reader sees how much the machine moved.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from qc_compiler.specs import StepCacheConfig
from qc_compiler.tools.bench import (VARIANTS, interleaved_times, machine_line, make_task, sample_timed, unknown_variants,
                                     variant_passes, write_results)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-mnist", help="dit-mnist or mmdit-mnist")
    p.add_argument("--variants", default="fp32,quant-tap,cache-i2,qc-tap-vcvar",
                   help="comma-separated qc bench variant names; fp32 must be one of them")
    p.add_argument("--bits", default="w8a8", choices=("w8a8", "w4a8", "w4a4"))
    p.add_argument("--interval", type=int, default=2, help="the run's cache interval (the qc-* variants)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--n", type=int, default=100, help="samples per timed sampling run (one batch)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (at least 3; the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = unknown_variants(names)
    if unknown:
        p.error(unknown)
    if "fp32" not in names:
        p.error("--variants must include fp32 (every speed is a ratio against it)")
    if args.repeats < 3 or args.n < 1 or args.steps < 1 or args.interval < 1 or args.threads < 1:
        p.error("--repeats must be at least 3, and --n, --steps, --interval and --threads at least 1")
    if args.json is not None and args.json.is_dir():
        p.error(f"--json {args.json} is a folder; give a file path")
    args.names = names
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    task = make_task(args.model, None, n=args.n, steps=args.steps, cfg=args.cfg, seed=args.seed)
    cache = StepCacheConfig(interval=args.interval)
    runs, compile_s = [], {}
    for name in args.names:
        t0 = time.perf_counter()
        compiled = task.compile(variant_passes(name, bits=args.bits, cache=cache), seed=args.seed, backend="torch")
        compile_s[name] = time.perf_counter() - t0
        bound = task.bind(compiled)
        runs.append(lambda m=bound: sample_timed(m, task.sampler, task.labels, seed=args.seed, batch=args.n))
        print(f"compiled {name} in {compile_s[name]:.1f} s", flush=True)

    def progress(r, times):
        print(f"round {r}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in zip(args.names, times)),
              flush=True)

    times = dict(zip(args.names, interleaved_times(runs, args.repeats, on_round=progress)))
    fp = statistics.median(times["fp32"])
    rows = []
    for name in args.names:
        med = statistics.median(times[name])
        rows.append({"variant": name, "bits": "-" if VARIANTS[name].bits_independent else args.bits,
                     "steps": args.steps, "n": args.n, "median_s": med, "speed_vs_fp32": fp / med,
                     "spread": max(times[name]) / min(times[name]), "times": times[name],
                     "compile_s": compile_s[name]})
    print(f"\n| {args.model}, {args.n} samples, {args.steps} steps, cfg {args.cfg}, {args.repeats} interleaved rounds "
          "| median s | speed vs FP32 | spread (max/min) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} ({row['bits']}) | {row['median_s']:.1f} | {row['speed_vs_fp32']:.2f}x "
              f"| {row['spread']:.2f} |")
    write_results(args.json, "sampling_speed", {k: v for k, v in vars(args).items() if k != "names"}, rows)


if __name__ == "__main__":
    main()
