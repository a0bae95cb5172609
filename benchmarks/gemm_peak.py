"""How fast INT8 GEMMs can make a DiT on this CPU: the throughput of each GEMM path PyTorch offers,
on one model's linear shapes, in one run.

    python benchmarks/gemm_peak.py --model DiT-B/2 --batch 8 --threads 2

Every linear of a DiT block runs on M = batch x tokens rows. For each kernel this times the
block's linears (qkv, attention proj, fc1, fc2) and prints GOP/s and the ratio to FP32. Because the
float baseline already runs near this CPU's FMA peak, the INT8/FP32 ratio of the GEMMs bounds what
W8A8 can do per forward: the linears cannot speed up more than that, and the rest of the forward
(attention, norms, elementwise work) does not speed up at all from INT8 weights. A per-forward goal
above this ratio cannot be met by quantizing linears on this machine.

Kernels: FP32 ``F.linear`` (MKL), bf16 ``F.linear`` (oneDNN; AVX512-BF16 here), oneDNN
``qlinear_pointwise`` (u8 x s8 -> f32 with per-channel dequantize: our backend's CPU kernel), and
``torch._int_mm`` (s8 x s8 -> s32, no dequantize).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from qc_compiler.tools.bench import benchmark_model, machine_line, median_seconds, write_results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, help="also write every row, with the machine, as JSON here")
    return p.parse_args(argv)


def block_linear_shapes(model) -> List[Tuple[str, int, int]]:
    """(name, K, N) of the token linears of the first block."""
    block = model.blocks[0]
    layers = {"qkv": block.attn.qkv, "proj": block.attn.proj, "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}
    return [(name, lin.in_features, lin.out_features) for name, lin in layers.items()]


def kernels(m: int, k: int, n: int) -> Dict[str, Callable]:
    """name -> a call of that kernel on an (m, k) input and an (n, k) weight, made once."""
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.02
    xb, wb = x.bfloat16(), w.bfloat16()
    x_u8 = torch.randint(0, 256, (m, k), dtype=torch.uint8)
    x_s8 = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w_s8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_scale, w_zero = torch.rand(n) * 0.01, torch.zeros(n, dtype=torch.long)
    packed = torch.ops.onednn.qlinear_prepack(w_s8, None)
    w_s8_t = w_s8.t()
    return {
        "FP32 F.linear (MKL)": lambda: F.linear(x, w),
        "bf16 F.linear (oneDNN)": lambda: F.linear(xb, wb),
        "INT8 oneDNN qlinear_pointwise, u8 x s8 -> f32, dequantize fused (ours)": lambda: torch.ops.onednn.qlinear_pointwise(
            x_u8, 0.05, 128, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], ""),
        "INT8 torch._int_mm, s8 x s8 -> s32, no dequantize": lambda: torch._int_mm(x_s8, w_s8_t),
    }


def main(args) -> None:
    torch.set_num_threads(args.threads)
    print(machine_line())
    model = benchmark_model(args.model)
    tokens = model.grid_size ** 2
    m = args.batch * tokens
    shapes = block_linear_shapes(model)
    ops = sum(2 * m * k * n for _, k, n in shapes)
    seconds: Dict[str, List[float]] = {}  # kernel -> median seconds per shape
    for _, k, n in shapes:
        for kernel, fn in kernels(m, k, n).items():
            seconds.setdefault(kernel, []).append(median_seconds(fn, args.repeats))
    total = {kernel: sum(s) for kernel, s in seconds.items()}
    fp32 = total["FP32 F.linear (MKL)"]
    print(f"\n### {args.model} token linears, M = {args.batch} x {tokens} = {m} rows, {args.threads} threads\n")
    print("| kernel | " + " | ".join(f"{name} {k}->{n} ms" for name, k, n in shapes) + " | block ms | GOP/s | vs FP32 |")
    print("|---|" + "---|" * (len(shapes) + 3))
    for kernel, per_shape in seconds.items():
        print(f"| {kernel} | " + " | ".join(f"{s * 1e3:.1f}" for s in per_shape)
              + f" | {total[kernel] * 1e3:.1f} | {ops / total[kernel] / 1e9:.0f} | {fp32 / total[kernel]:.2f}x |")
    best = min((k for k in total if k.startswith("INT8")), key=total.get)
    print(f"\nFastest INT8 path: {best}, {fp32 / total[best]:.2f}x the FP32 GEMMs: the most W8A8 can speed up a "
          f"forward on this machine, even if attention, norms and elementwise work sped up as much.")
    results = [{"table": "block linears", "kernel": k, "ms_per_shape": [x * 1e3 for x in per_shape],
                "block_ms": total[k] * 1e3, "gops": ops / total[k] / 1e9, "vs_fp32": fp32 / total[k]}
               for k, per_shape in seconds.items()]
    results += weight_only_table(model, args)
    write_results(args.json, "gemm_peak", vars(args), results)


def weight_only_table(model, args) -> List[Dict]:
    """The conditioning (adaLN) linear on its few rows, one per sample and CFG half: why the torch
    backend's WeightOnlyLinear keeps a dequantized float copy of its int8 weights."""
    lin = model.blocks[0].adaLN_modulation[-1]
    k, n, m = lin.in_features, lin.out_features, 2 * args.batch
    x, w = torch.randn(m, k), lin.weight.detach().clone()
    scale = w.abs().amax(dim=1) / 127
    codes = torch.round(w / scale[:, None]).to(torch.int8)
    dequantized = codes.float() * scale[:, None]
    rows = {"float GEMM on the cached dequantized copy (ours)": lambda: F.linear(x, dequantized),
            "dequantize at every call, then float GEMM": lambda: F.linear(x, codes.float() * scale[:, None])}
    if hasattr(torch, "_weight_int8pack_mm"):
        rows["torch._weight_int8pack_mm"] = lambda: torch._weight_int8pack_mm(x, codes, scale)
    print(f"\n### Weight-only conditioning linear ({k}->{n}, {m} rows), {args.threads} threads\n")
    print("| kernel | ms |\n|---|---|")
    out = []
    for name, fn in rows.items():
        ms = median_seconds(fn, args.repeats) * 1e3
        print(f"| {name} | {ms:.3f} |")
        out.append({"table": "weight-only conditioning linear", "kernel": name, "ms": ms})
    return out


if __name__ == "__main__":
    main(parse_args())
