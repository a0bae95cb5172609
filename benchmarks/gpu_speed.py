"""Per-forward speed on a GPU: eager FP32, eager bf16, ``torch.compile`` bf16, and ours W8A8 on
``torch._int_mm``, each with its error against FP32, all timed in one run with CUDA synchronisation.

    python benchmarks/gpu_speed.py --model DiT-XL/2 --batch 8 --json gpu_speed.json

Runs on the CPU too (``--device cpu``, for a smoke test); the figures that matter come from
``benchmarks/gpu_check.sh`` on a GPU machine. Random weights (4x32x32 latents, 1000 classes): speed does not depend on them, and the
error column compares each row with FP32 on the same inputs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import qc_compiler as qc
from qc_compiler.passes import Quantize, TAPCalibration
from qc_compiler.tools.bench import benchmark_model, machine_line, rel_err


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-XL/2", help="a DiT config name (random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (slow to build)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def timed(fn, repeats: int, device: torch.device) -> tuple:
    """(median ms, first-call s): the first call (compilation) is timed apart, then two warm-ups."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times), first


def main(args) -> list:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run on a GPU machine (benchmarks/gpu_check.sh) or pass --device cpu")
    model = benchmark_model(args.model).to(device)  # adaLN re-initialised: DiT's zero init makes blocks identities
    sampler = qc.DDPM(steps=50, cfg_scale=1.5)
    x = torch.randn(args.batch, 4, 32, 32, device=device)
    t = torch.full((args.batch,), sampler.timesteps[0], device=device, dtype=torch.long)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"{machine_line()}; GPU {gpu}; {args.model}, batch {args.batch}, 4x32x32 latents")

    def bf16(fn):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn(x, t, y)
        return run

    rows, ref = [], None
    variants = [("eager FP32", lambda: model(x, t, y)), ("eager bf16 autocast", bf16(model))]
    if not args.no_compile:
        variants.append(("torch.compile bf16 autocast", bf16(torch.compile(model))))
    t0 = time.perf_counter()
    ours = qc.compile(model, passes=[TAPCalibration(size=args.calib_size, pool_labels=8), Quantize(preset="w8a8")],
                      sampler=sampler, backend="torch")
    build = time.perf_counter() - t0
    variants.append((f"ours W8A8 ({'torch._int_mm' if device.type == 'cuda' else 'oneDNN'})", lambda: ours(x, t, y)))
    for name, fn in variants:
        out, ms, first = timed(fn, args.repeats, device)
        ref = out.float() if ref is None else ref
        rows.append({"row": name, "ms": ms, "first_call_s": first if "ours" not in name else build,
                     "rel_err": rel_err(out.float(), ref)})
    for r in rows:
        r["vs_fp32"] = rows[0]["ms"] / r["ms"]
        print(f"| {r['row']} | {r['ms']:.2f} ms | {r['vs_fp32']:.2f}x | err {r['rel_err']:.4f} | "
              f"first call / build {r['first_call_s']:.1f} s |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "gpu": gpu,
                                         "machine": machine_line(), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main(parse_args())
