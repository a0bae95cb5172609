"""What each low-bit technique costs per forward, against eager FP32 and plain round-to-nearest, in one run.

    python benchmarks/lowbit_speed.py --model dit-mnist --batch 250 --threads 2 --json out.json
    python benchmarks/lowbit_speed.py --only "per-token" "low rank 16" --json out.json   # some rows

GPTQ changes only which codes are stored, so it must cost nothing; salience balancing moves a
per-channel scale into the quantizer the INT8 layer already runs (a vector instead of a scalar), and
turns off the fc1 -> fc2 requantization fusion that needs one scalar; the low-rank branch adds two thin
float GEMMs per layer and turns off the GELU fusion; per-token activations take each row's min and
max and rescale each output row (no fusion either). Rows are timed in interleaved rounds (one call
of each per round) on the same inputs; each row's error is its output's relative L2 against FP32.
All rows use the torch INT8 backend on one calibration (uniform, 256 items).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import qc_compiler as qc
from qc_compiler.passes import Quantize, UniformCalibration
from qc_compiler.quant.balance import BalanceConfig
from qc_compiler.tools.bench import (benchmark_inputs, benchmark_model, interleaved_medians, machine_line, rel_err,
                                     write_results)

ROWS = [  # (label, bits, Quantize options)
    ("W4A8 round to nearest", "w4a8", {}),
    ("W4A8 GPTQ", "w4a8", {"rounding": "gptq"}),
    ("W4A8 GPTQ + balance", "w4a8", {"rounding": "gptq", "balance": "search"}),
    ("W4A8 GPTQ + balance, fc2 left unbalanced", "w4a8",
     {"rounding": "gptq", "balance": BalanceConfig(method="search", exclude=("*.fc2",))}),
    ("W4A4 balance", "w4a4", {"balance": "search"}),
    ("W4A4 GPTQ + balance", "w4a4", {"rounding": "gptq", "balance": "search"}),
    ("W4A4 GPTQ + balance + low rank 16", "w4a4", {"rounding": "gptq", "balance": "search", "low_rank": 16}),
    ("W4A4 GPTQ + balance + low rank 32", "w4a4", {"rounding": "gptq", "balance": "search", "low_rank": 32}),
    # per-token activations: a min/max per row and a per-row rescale after the GEMM, fusions off
    ("W4A8 GPTQ, per-token activations", "w4a8", {"rounding": "gptq", "act_granularity": "token"}),
    ("W4A4 GPTQ + balance, per-token activations", "w4a4",
     {"rounding": "gptq", "balance": "search", "act_granularity": "token"}),
    ("W4A4 GPTQ + balance + low rank 16, per-token activations", "w4a4",
     {"rounding": "gptq", "balance": "search", "low_rank": 16, "act_granularity": "token"}),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-mnist")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--only", nargs="+", metavar="TEXT",
                   help="time only the rows whose label contains one of these (FP32 and W4A8 RTN always run)")
    args = p.parse_args(argv)
    rows_run = [r for i, r in enumerate(ROWS) if i == 0 or not args.only or any(t in r[0] for t in args.only)]
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    model = benchmark_model(args.model)
    sampler = qc.DDPM(steps=50, cfg_scale=1.5)
    inputs = benchmark_inputs(model, args.batch)
    with torch.no_grad():
        ref = model(*inputs)
    calls, labels, compiled = [lambda: model(*inputs)], ["eager FP32"], {}
    for label, bits, options in rows_run:
        cm = qc.compile(model, passes=[UniformCalibration(size=256, pool_labels=16), Quantize(preset=bits, **options)],
                        sampler=sampler, backend="torch")
        compiled[label] = cm
        calls.append(lambda cm=cm: cm(*inputs))
        labels.append(label)
    with torch.no_grad():
        errors = [0.0] + [rel_err(compiled[label](*inputs), ref) for label in labels[1:]]
        seconds = interleaved_medians(calls, args.repeats)
    rows = []
    print(f"| row ({args.model}, batch {args.batch}) | ms per forward | vs FP32 | vs W4A8 RTN | rel. error |")
    print("|---|---|---|---|---|")
    for label, s, err in zip(labels, seconds, errors):
        rows.append({"row": label, "ms": s * 1e3, "speed_vs_fp32": seconds[0] / s, "vs_rtn": seconds[1] / s,
                     "rel_err": err})
        print(f"| {label} | {s * 1e3:.1f} | {seconds[0] / s:.2f}x | {seconds[1] / s:.2f}x | {err:.4f} |")
    write_results(args.json, "lowbit_speed", vars(args), rows)


if __name__ == "__main__":
    main()
