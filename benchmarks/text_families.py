"""Flux- and SD3-layout transformers: per forward and over a whole sampling run, in one run.

    python benchmarks/text_families.py --families flux,sd3 --steps 28 --repeats 3 --json out.json

Mid-size random configs of diffusers' own classes (no weights can be fetched here): hidden 768 (12
heads of 64), 12 blocks (Flux: 4 double-stream + 8 single-stream; SD3: 12 joint blocks), 1,024 image
tokens plus 256 text tokens, batch 2. Rows, all from the same noise and prompts:

- eager FP32, eager bf16 (the transformer cast; autocast would keep norms in FP32);
- ours W8A8 (torch INT8; calibrated on one prompt-conditioned trajectory);
- ours W8A8 with the step cache: interval 2, and the first-block policy (threshold 0.1);
- ours W8A8 as INT8 ONNX in onnxruntime (CPU provider, same threads).

Per forward: median ms of one call at the first step (interleaved rounds). Whole run: median seconds
of a ``--steps`` Euler flow-matching run (Flux: its dynamic shift; SD3: shift 3). Error: relative L2
of the final latent against eager FP32's. Memory: MB of the tensors the model holds (weights, int8
codes, scales). Ratios are against eager FP32 in this run; compare only within one machine.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qc_compiler as qc
from qc_compiler.models import Geometry
from qc_compiler.passes import Quantize, StepCache, UniformCalibration
from qc_compiler.tools.bench import interleaved_medians, machine_line, rel_err, write_results

# hidden, heads, blocks (Flux: double + single), text tokens, image side in tokens (32 x 32 = 1,024)
SIZES = {"mid": (768, 12, (4, 8), 256, 32), "tiny": (64, 2, (1, 1), 8, 4)}  # tiny: the smoke test's


def build(family: str, size: str = "mid"):
    """(transformer, geometry) for the family's random layout of ``size``."""
    import diffusers

    hidden, heads, (double, single), text, side = SIZES[size]
    torch.manual_seed(0)
    geo = Geometry(height=2 * side, width=2 * side, text_tokens=text)  # latent pixels: 2x2 patches are tokens
    head_dim = hidden // heads
    if family == "flux":
        rope = [8, (head_dim - 8) // 2, (head_dim - 8) // 2]
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=hidden, pooled_projection_dim=hidden, axes_dims_rope=rope,
            guidance_embeds=True), geo
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=2 * side, patch_size=2, in_channels=16, num_layers=double + single, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=hidden, caption_projection_dim=hidden,
            pooled_projection_dim=hidden, out_channels=16, qk_norm="rms_norm"), geo
    raise SystemExit(f"unknown family {family!r}; choose from flux, sd3")


def make_sampler(family: str, steps: int):
    if family == "flux":  # FluxPipeline's schedule at 1,024 image tokens (mu from its config's line)
        return qc.FlowMatchEuler(steps=steps, mu=0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256), flux_sigmas=True)
    return qc.FlowMatchEuler(steps=steps, shift=3.0)


def bank_for(adapter, batch: int) -> qc.ConditionBank:
    """``batch`` random prompts (the same for every row) in the family's condition inputs."""
    gen = torch.Generator().manual_seed(1)
    rows = {}
    for row in adapter.rows:
        if row.name == "guidance":
            rows[row.name] = torch.full((batch,), 3.5)
        else:
            rows[row.name] = torch.randn(batch, *row.shape, generator=gen)
    return qc.ConditionBank(adapter.inputs.conditions, rows)


def held_mb(module: torch.nn.Module) -> float:
    seen, total = set(), 0
    for t in list(module.state_dict().values()):
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2 ** 20


def main(args) -> None:
    if args.repeats < 3:
        raise SystemExit("--repeats must be at least 3: one timed run is not a measurement")
    torch.set_num_threads(args.threads)
    print(machine_line())
    results = []
    for family in args.families.split(","):
        model, geo = build(family, args.size)
        model.eval()
        half = copy.deepcopy(model).to(torch.bfloat16)
        sampler = make_sampler(family, args.steps)
        adapter = qc.adapter_for(model).for_model(model, geo)
        bank = bank_for(adapter, args.batch)
        labels = list(range(args.batch))
        calib = [UniformCalibration(size=args.steps * 2, pool_labels=args.batch), Quantize(preset="w8a8")]
        variants = {
            "eager FP32": lambda: qc.compile(model, [], sampler, geometry=geo),
            "eager bf16": lambda: qc.compile(half, [], sampler, geometry=geo),
            "ours W8A8": lambda: qc.compile(model, calib, sampler, geometry=geo, conditions=bank),
            "ours W8A8 + cache interval 2": lambda: qc.compile(model, [StepCache(interval=2)] + calib, sampler,
                                                                geometry=geo, conditions=bank),
            "ours W8A8 + first-block cache 0.1": lambda: qc.compile(
                model, [StepCache(policy="first_block", threshold=0.1)] + calib, sampler, geometry=geo,
                conditions=bank),
        }
        compiled = {}
        for name, make in variants.items():
            t0 = time.perf_counter()
            compiled[name] = make()
            print(f"# {family}: {name} compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        from qc_compiler.backends.onnx import OrtDenoiser

        path = Path(tempfile.mkdtemp()) / f"{family}.onnx"
        compiled["ours W8A8, onnxruntime"] = OrtDenoiser(compiled["ours W8A8"].export_onnx(path),
                                                         threads=args.threads)
        # one forward at the first step, interleaved rounds (the cache computes at step 0 anyway)
        x = torch.randn(args.batch, *compiled["eager FP32"].sample_shape, generator=torch.Generator().manual_seed(2))
        # the bf16 model takes its prompts in bf16, as a bf16 pipeline hands them over
        banks = {name: (bank.like(qc.adapter_for(half).for_model(half, geo).example_inputs(m.info)[2:])
                        if m.dtype == torch.bfloat16 else bank) for name, m in compiled.items()}

        def forward(name, m):
            conds = banks[name].take(torch.tensor(labels))

            def call():
                m.reset()
                m(x, torch.full((args.batch,), m.timesteps[0]), *conds)
            return call

        per_forward = dict(zip(compiled, interleaved_medians([forward(n, m) for n, m in compiled.items()], args.repeats)))
        reference = None
        for name, m in compiled.items():
            times, out = [], None
            for r in range(args.repeats + 1):  # the first run warms up
                t0 = time.perf_counter()
                out = sampler.sample(banks[name].bind(m), labels, seed=0)
                if r:
                    times.append(time.perf_counter() - t0)
            run_s = statistics.median(times)
            reference = out if reference is None else reference
            row = {"family": family, "variant": name, "forward_ms": per_forward[name] * 1e3, "run_s": run_s,
                   "rel_err": rel_err(out.float(), reference.float()), "held_mb": held_mb(m) if name != "ours W8A8, onnxruntime"
                   else path.stat().st_size / 2 ** 20}
            results.append(row)
        base = next(r for r in results if r["family"] == family and r["variant"] == "eager FP32")
        print(f"\n{family}-layout, batch {args.batch}, {args.steps} steps; ratios against eager FP32")
        print("| variant | ms / forward | speedup | s / run | speedup | rel. error vs FP32 | MB held |")
        print("|---|---|---|---|---|---|---|")
        for r in (r for r in results if r["family"] == family):
            print(f"| {r['variant']} | {r['forward_ms']:.0f} | {base['forward_ms'] / r['forward_ms']:.2f}x | "
                  f"{r['run_s']:.1f} | {base['run_s'] / r['run_s']:.2f}x | {r['rel_err']:.4f} | {r['held_mb']:.0f} |",
                  flush=True)
        write_results(args.json, "text_families", vars(args), results)  # after each family: hours-long runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="flux,sd3")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median; at least 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", choices=sorted(SIZES), default="mid", help="mid: the measured layout; tiny: a smoke test")
    p.add_argument("--json", type=Path, help="also write every row, with the machine, as JSON here")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
