"""Is INT8 exact on this CPU? oneDNN's u8 x s8 GEMM against exact integer math, and each backend against the reference.

    python benchmarks/vnni_saturation.py --threads 2 --json vnni.json

Without VNNI (AVX2, AVX-512 before Cascade Lake), x86 INT8 GEMMs add pairs of u8 x s8 products in
int16 (vpmaddubsw) and saturate; VNNI (vpdpbusd) and AMX accumulate in int32. Part 1 multiplies
full-range random codes (M x K x N = 512 x 256 x 1024) with oneDNN as PyTorch calls it, with the
activation codes split in two GEMMs as the torch backend does without VNNI, with 7-bit weights and
with 7-bit activations, and times them against an FP32 GEMM. Part 2 compiles dit-mnist at W8A8 and
W4A8 (uniform calibration, 256 items) and compares one forward (batch 64) of the torch backend, the
Inductor backend (where it accepts the schedule) and onnxruntime with the fake-quant reference.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import qc_compiler as qc
from qc_compiler.backends.registry import cpu_has_vnni
from qc_compiler.errors import QCError
from qc_compiler.passes import Quantize, UniformCalibration
from qc_compiler.tools.bench import benchmark_inputs, machine_line, median_seconds, rel_err, write_results


def gemm_rows(repeats: int):
    g = torch.Generator().manual_seed(0)
    m, k, n = 512, 256, 1024
    x = torch.randint(0, 256, (m, k), generator=g, dtype=torch.int32)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int32)
    zero, scale, ws, wz = 77, 0.01, torch.full((n,), 0.01), torch.zeros(n, dtype=torch.long)
    ql, qb = torch.ops.onednn.qlinear_pointwise, torch.ops.onednn.qlinear_pointwise.binary

    def exact(xc, wc, z):
        return ((xc.double() - z) * scale) @ (wc.double() * 0.01).T

    def plain(xc, wc, z):
        packed = torch.ops.onednn.qlinear_prepack(wc.to(torch.int8), None)
        xu = xc.to(torch.uint8)
        return lambda: ql(xu, scale, z, packed, ws, wz, None, 1.0, 0, torch.float32, "none", [], "")

    def split(xc, wc, z):
        packed = torch.ops.onednn.qlinear_prepack(wc.to(torch.int8), None)
        xu = xc.to(torch.uint8)

        def run():
            lo = ql(xu & 1, scale, z, packed, ws, wz, None, 1.0, 0, torch.float32, "none", [], "")
            return qb(xu >> 1, 2 * scale, 0, packed, ws, wz, lo, None, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0,
                      "none", [], "")
        return run

    cases = [("oneDNN u8 x s8, full-range codes", plain, x, w, zero),
             ("two GEMMs on the split activation codes (torch backend, no VNNI)", split, x, w, zero),
             ("oneDNN, 7-bit weight codes", plain, x, w // 2, zero),
             ("oneDNN, 7-bit activation codes", plain, x // 2, w, 38)]
    rows = []
    xf, wf = x.float(), w.float()
    fp_s = median_seconds(lambda: xf @ wf.T, repeats)
    for label, make, xc, wc, z in cases:
        fn = make(xc, wc, z)
        ref = exact(xc, wc, z)
        err = float((fn().double() - ref).norm() / ref.norm())
        s = median_seconds(fn, repeats)
        rows.append({"part": "gemm", "row": label, "rel_err": err, "ms": 1e3 * s, "vs_fp32_gemm": fp_s / s})
    rows.append({"part": "gemm", "row": "FP32 GEMM", "rel_err": 0.0, "ms": 1e3 * fp_s, "vs_fp32_gemm": 1.0})
    return rows


def backend_rows(tmp: Path):
    from qc_compiler.backends.onnx import OrtDenoiser

    model, sampler = qc.load_model("dit-mnist"), qc.DDPM(steps=50, cfg_scale=1.5)
    inputs = benchmark_inputs(model, 64)
    rows = []
    for bits in ("w8a8", "w4a8"):
        def build(backend):
            return qc.compile(model, passes=[UniformCalibration(size=256, pool_labels=16), Quantize(preset=bits)],
                              sampler=sampler, backend=backend)
        with torch.no_grad():
            ref = build("fakequant")(*inputs)
            torch_int8 = build("torch")
            rows.append({"part": "backend", "row": f"{bits} torch INT8", "rel_err": rel_err(torch_int8(*inputs), ref)})
            try:
                out = build("inductor")(*inputs)
                rows.append({"part": "backend", "row": f"{bits} inductor", "rel_err": rel_err(out, ref)})
            except QCError as e:
                rows.append({"part": "backend", "row": f"{bits} inductor", "refused": str(e)})
            path = torch_int8.export_onnx(tmp / f"{bits}.onnx")
            rows.append({"part": "backend", "row": f"{bits} onnxruntime", "rel_err": rel_err(OrtDenoiser(path)(*inputs), ref)})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path)
    p.add_argument("--tmp", type=Path, default=Path("out/vnni"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"VNNI detected: {cpu_has_vnni()}")
    rows = gemm_rows(args.repeats)
    print("| GEMM 512x256x1024, full-range random codes | rel. error vs exact | ms | vs FP32 GEMM |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['rel_err']:.2e} | {r['ms']:.2f} | {r['vs_fp32_gemm']:.2f}x |")
    args.tmp.mkdir(parents=True, exist_ok=True)
    more = backend_rows(args.tmp)
    print("\n| dit-mnist, one forward (batch 64) | rel. error vs the fake-quant reference |\n|---|---|")
    for r in more:
        print(f"| {r['row']} | {r['rel_err']:.4f} |" if "rel_err" in r else f"| {r['row']} | refused: {r['refused']} |")
    write_results(args.json, "vnni_saturation", vars(args), rows + more)


if __name__ == "__main__":
    main()
