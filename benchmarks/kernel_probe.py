"""The kernels that put ours past PT2E on a CPU without AMX, timed alone at DiT-B/2's shapes.

    python benchmarks/kernel_probe.py --threads 2 --json benchmarks/results/kernel_probe.json

- **Weight-only layers** (DiT-B/2's twelve adaLN modulations: batch 8 rows, 768 -> 4608, one SiLU in
  front): a float GEMM on a dequantized copy of the int8 codes (what we ran before) against the INT8
  GEMM on the codes with the input split into three int8 rows (``quant.weight_only``), eager and
  through ``torch.compile`` with freezing, as the Inductor backend lowers them.
- **Attention** (batch 8, 12 heads, 256 tokens, head dim 64, from a qkv projection's output, as in a
  block): SDPA in FP32, SDPA in bf16, and bf16 as two matmuls around a softmax, both ways
  ``AttentionPrecision(kernel="matmul")`` runs them: every score at once (up to
  ``blocked_attention.WHOLE_SCORES_MAX_MIB``) and one cache-sized block at a time (past it); each eager
  and compiled, per call (a DiT-B/2 forward makes 12). ``--batch 1 --hidden 1536 --tokens 4096``: an SD3
  image's 24 heads at 1024 px. ``--block-mib 0.5,1,2,4``: the blocks at those sizes too (eager).

Interleaved rounds, medians; errors against the FP32 form. The machine line says which ISA ran it:
compare only within one run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from qc_compiler.quant.weight_only import weight_only_int8_linear
from qc_compiler.blocked_attention import block_shape, blocked_attention
from qc_compiler.specs import low_precision_attention
from qc_compiler.tools.bench import interleaved_medians, machine_line, rel_err, whole_scores_attention, write_results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768, help="DiT-B/2's; the heads are hidden / 64")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--eager-only", action="store_true", help="skip the compiled rows (a quick check)")
    p.add_argument("--block-mib", type=lambda v: [float(x) for x in v.split(",")], default=[],
                   help="also time the blocked attention kernel at these block sizes (MiB of scores, comma-separated)")
    p.add_argument("--json", type=Path, help="also write the rows, with the machine, as JSON here")
    args = p.parse_args(argv)
    if any(not mib > 0 for mib in args.block_mib):
        p.error(f"--block-mib takes sizes above 0 MiB, got {args.block_mib}")
    return args


class AdaLN(torch.nn.Module):
    """``layers`` weight-only conditioning layers on one SiLU'd input: float GEMMs or INT8 GEMMs on the codes."""

    def __init__(self, int8: bool, layers: int, hidden: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.int8 = int8
        w = torch.randn(layers, 6 * hidden, hidden, generator=g) * 0.02
        self.w_scale = torch.nn.Parameter(w.abs().amax(2) / 127, requires_grad=False)
        self.codes = torch.nn.Parameter(torch.round(w / self.w_scale[..., None]).to(torch.int8), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(layers, 6 * hidden, generator=g) * 0.01, requires_grad=False)
        # the float row's weights: dequantized once, as the torch backend's float path keeps them
        self.dequantized = torch.nn.Parameter(self.codes.float() * self.w_scale[..., None], requires_grad=False)

    def forward(self, c):
        c = F.silu(c)
        outs = []
        for i in range(self.codes.shape[0]):
            if self.int8:
                outs.append(weight_only_int8_linear(c, self.codes[i].t(), self.w_scale[i], self.bias[i]))
            else:
                outs.append(F.linear(c, self.dequantized[i], self.bias[i]))
        return torch.cat(outs, 1)


ATTENTION = ("FP32 SDPA", "bf16 SDPA", "bf16 two matmuls, all scores at once", "bf16 two matmuls, blocked")


def attention(kind: str, block_mib=None):
    """One attention call on a qkv projection's output, as a DiT block makes it, on the kernel ``kind``."""
    def run(qkv):
        b, n, width = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, width // (3 * 64), 64).permute(2, 0, 3, 1, 4)
        if kind == "FP32 SDPA":
            out = F.scaled_dot_product_attention(q, k, v)
        elif kind == "bf16 SDPA":
            out = low_precision_attention(q, k, v, dtype="bf16", kernel="sdpa")
        elif kind == "bf16 two matmuls, all scores at once":  # kernel="matmul" up to WHOLE_SCORES_MAX_MIB
            out = whole_scores_attention(q, k, v)
        else:  # kernel="matmul" past it: cast as the pass casts (contiguous heads), then the blocks
            dense = {"dtype": torch.bfloat16, "memory_format": torch.contiguous_format}
            out = blocked_attention(q.to(**dense), k.to(**dense), v.to(**dense), block_mib=block_mib).float()
        return out.transpose(1, 2).reshape(b, n, -1)

    return run


def main(args):
    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True
    print(machine_line())
    g = torch.Generator().manual_seed(1)
    b, h, n = args.batch, args.hidden, args.tokens
    c, qkv = torch.randn(b, h, generator=g), torch.randn(b, n, 3 * h, generator=g)
    rows = []
    with torch.no_grad():
        groups = [(f"adaLN x{args.layers} ({b} rows, {h} -> {6 * h})", c,
                   [("float GEMM, dequantized copy", AdaLN(False, args.layers, h)),
                    ("INT8 GEMM on the codes", AdaLN(True, args.layers, h))]),
                  (f"attention, one call ({b} x {h // 64} heads x {n} tokens x 64)", qkv,
                   [(kind, attention(kind)) for kind in ATTENTION])]
        if args.block_mib:  # the block-size sweep behind BLOCK_MIB_PER_THREAD, eager (the op is opaque anyway)
            shapes = [block_shape(b, h // 64, n, n, 2, mib * 2 ** 20) for mib in args.block_mib]
            blocks = [(f"bf16 two matmuls, blocks of {mib:g} MiB ({ib} x {hb} heads x {qb} rows)", attention("blocks", mib))
                      for mib, (ib, hb, qb) in zip(args.block_mib, shapes)]
            groups.append((f"attention block sizes, one call ({b} x {h // 64} heads x {n} tokens x 64)", qkv,
                           [("FP32 SDPA", attention("FP32 SDPA"))] + blocks))
        for what, x, variants in groups:
            fns = []
            for label, fn in variants:
                fns.append((f"{label}, eager", fn))
                if not args.eager_only and not what.startswith("attention block sizes"):
                    fns.append((f"{label}, compiled", torch.compile(fn)))
            ref = fns[0][1](x)
            errs = [rel_err(fn(x), ref) for _, fn in fns]  # also the compile, before timing
            seconds = interleaved_medians([lambda fn=fn: fn(x) for _, fn in fns], args.repeats, pause=0.0)
            print(f"\n### {what}\n\n| row | median ms | vs the first row | rel. error |\n|---|---|---|---|")
            for (label, _), sec, err in zip(fns, seconds, errs):
                print(f"| {label} | {sec * 1e3:.2f} | {seconds[0] / sec:.2f}x | {err:.1e} |")
                rows.append({"what": what, "row": label, "ms": sec * 1e3, "vs_first": seconds[0] / sec, "rel_err": err})
    write_results(args.json, "kernel_probe", vars(args), rows)


if __name__ == "__main__":
    main(parse_args())
