"""Confirm a `qc tune` result on many samples: FP32, the reference Q&C schedule and the tuned recipe, in one run.

    python benchmarks/tune_confirm.py runs/tune/recipe.json --n 2000 --threads 2 --json confirm.json

The tune scored its front on a few hundred samples; a claim needs 2,000 (docs/RESULTS.md). Every row
samples the same labels from the same per-sample noise at the recipe's sampler, and each speed is a
ratio of sampling times measured here against FP32's. The reference is
``qandc(bits="w8a8", cache=StepCacheConfig(interval=2))`` on the torch backend, the schedule the tune
must beat. The tuned row is compiled from the recipe and checked bit for bit against the tuned model.
A backend that compiles on its first call (Inductor) is called once on one batch before it is timed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import qc_compiler as qc
from qc_compiler.diffusion.samplers import sampler_from_spec
from qc_compiler.eval import evaluate
from qc_compiler.presets import qandc
from qc_compiler.specs import StepCacheConfig
from qc_compiler.tools.bench import machine_line, markdown, sample_timed, write_results
from qc_compiler.tune import REFERENCE, Candidate, compile_recipe, load_recipe


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    recipe = load_recipe(args.recipe)
    model = qc.load_model((recipe["model"] or {}).get("model") or "dit-mnist")
    sampler = sampler_from_spec(recipe["sampler"])
    labels = [i % model.num_classes for i in range(args.n)]
    seed = recipe["seed"]
    tuned = Candidate.from_json(recipe["candidate"])
    # (label, bits, cache, build, backend): labels are the tune's own, so rows read as in pareto.md.
    builds = [("fp32", "-", None, lambda: model, "torch"),
              ("reference qandc(w8a8, interval 2): " + REFERENCE.label(), REFERENCE.quant.label(), REFERENCE.cache.describe(),
               lambda: qc.compile(model, passes=qandc(bits="w8a8", cache=StepCacheConfig(interval=2)),
                                  sampler=sampler, seed=seed), "torch"),
              ("tuned: " + tuned.label(), tuned.quant.label(), tuned.cache.describe() if tuned.cache else None,
               lambda: compile_recipe(recipe, model), recipe["backend"])]
    rows, fp_seconds = [], None
    for name, bits, cache, build, backend in builds:
        t0 = time.perf_counter()
        compiled = build()
        if backend != "torch":
            sampler.sample(compiled, labels[:args.batch], seed=seed)  # its compile, untimed
        compile_s = time.perf_counter() - t0
        images, seconds = sample_timed(compiled, sampler, labels, seed=seed, batch=args.batch)
        fp_seconds = fp_seconds or seconds
        row = {"variant": name, "bits": bits, "steps": sampler.steps, "cache": cache,
               "compile_s": compile_s, "sample_s": seconds, "speed_vs_fp32": fp_seconds / seconds,
               "speed_vs_fp32_250": float("nan"), "backend": backend, **evaluate(images, torch.tensor(labels))}
        rows.append(row)
        print(f"{name}: FID {row['fid']:.3f}, {seconds:.0f} s, {row['speed_vs_fp32']:.2f}x", flush=True)
    print(markdown(rows, args.n, sampler.cfg_scale))
    write_results(args.json, "tune_confirm", vars(args), rows)


if __name__ == "__main__":
    main()
