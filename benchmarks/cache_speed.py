"""End-to-end sampling time with and without the step cache, measured in one run.

    python benchmarks/cache_speed.py --models dit-mnist,DiT-B/2 --steps 50 --repeats 3

For each model: no cache, FORA interval 2 and 3, and the adaptive policy at two thresholds. Prints
the median wall-clock time of a full sampling run, the speedup against no cache, and the share of
block FLOPs the cache skipped, so the cache's overhead is visible (speedup vs 1/(1 - skipped)).
DiT-B/2 runs with random weights (its adaLN re-initialised so that every block matters) on
4x32x32 latents, batch 8; the embedded model on its own 1x32x32 digits, batch 8 with CFG 1.5.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import qc_compiler as qc
from qc_compiler.tools.bench import benchmark_model, machine_line, write_results
from qc_compiler.passes import StepCache
from qc_compiler.passes.cache import skipped_flops_fraction

POLICIES = {
    "no cache": [],
    "interval 2": [StepCache(interval=2)],
    "interval 3": [StepCache(interval=3)],
    "adaptive 0.1": [StepCache(policy="adaptive", threshold=0.1)],
    "adaptive 0.3": [StepCache(policy="adaptive", threshold=0.3)],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="dit-mnist,DiT-B/2")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported; at least 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write every row, with the machine, as JSON here")
    return p.parse_args(argv)


def main(args) -> None:
    if args.repeats < 3:
        raise SystemExit("--repeats must be at least 3: one timed run is not a measurement")
    torch.set_num_threads(args.threads)
    print(machine_line())
    results = []
    print(f"| model | policy | median s / run ({args.steps} steps, batch {args.batch}) | speedup | block FLOPs skipped |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        model = benchmark_model(name)
        cfg = 1.5 if name == "dit-mnist" else 1.0
        sampler = qc.DDPM(steps=args.steps, cfg_scale=cfg)
        labels = [i % model.num_classes for i in range(args.batch)]
        base = None
        for policy, passes in POLICIES.items():
            compiled = qc.compile(model, passes=passes, sampler=sampler)
            sampler.sample(compiled, labels, seed=0)  # warm-up at the timed batch size (allocator, prepacking)
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                sampler.sample(compiled, labels, seed=r)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            base = base or med
            skipped = skipped_flops_fraction(compiled)
            print(f"| {name} | {policy} | {med:.2f} | {base / med:.2f}x | {skipped:.1%} |", flush=True)
            results.append({"model": name, "policy": policy, "median_s": med, "times_s": times, "speedup": base / med,
                            "block_flops_skipped": skipped})
    write_results(args.json, "cache_speed", vars(args), results)


if __name__ == "__main__":
    main(parse_args())
