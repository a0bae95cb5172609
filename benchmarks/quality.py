"""Quality of compiled variants against FP32, same seeds, same step count, one run.

    python benchmarks/quality.py --variants fp32,w8a8-uniform,w8a8-tap --n 1000 --steps 50 --cfg 1.5

Prints a markdown table (FID, sFID, IS, precision, recall, class accuracy, sampling seconds and the
speed ratio against FP32 measured in the same run) and writes it as JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qc_compiler as qc  # noqa: E402
from qc_compiler.eval import evaluate  # noqa: E402
from qc_compiler.io import save_json  # noqa: E402
from variants import variants  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-mnist")
    p.add_argument("--variants", default="fp32,w8a8-uniform,w8a8-tap")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--calib-size", type=int, default=800)
    p.add_argument("--pool-labels", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def sample_all(model, sampler, labels, seed, batch):
    t0 = time.perf_counter()
    images = torch.cat([sampler.sample(model, labels[i:i + batch], seed=seed, sample_offset=i)
                        for i in range(0, len(labels), batch)])
    return images, time.perf_counter() - t0


def main(args) -> list:
    torch.set_num_threads(args.threads)
    model = qc.load_model(args.model)
    sampler = qc.DDPM(steps=args.steps, cfg_scale=args.cfg)
    labels = [i % model.num_classes for i in range(args.n)]
    table = variants(args.calib_size, args.pool_labels)
    rows, fp_seconds = [], None
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        compiled = qc.compile(model, passes=table[name](), sampler=sampler, seed=args.seed)
        compile_s = time.perf_counter() - t0
        images, seconds = sample_all(compiled, sampler, labels, args.seed, args.batch)
        fp_seconds = fp_seconds or seconds
        scores = evaluate(images, torch.tensor(labels))
        rows.append({"variant": name, "compile_s": compile_s, "sample_s": seconds,
                     "speed_vs_fp32": fp_seconds / seconds, **scores})
        print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows, args))
    if args.out:
        save_json({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, args.out)
    return rows


def markdown(rows, args) -> str:
    head = (f"| variant ({args.n} samples, {args.steps} DDPM steps, cfg {args.cfg}) | FID | sFID | IS | precision "
            "| recall | class acc | sampling s | speed vs FP32 |\n|---|---|---|---|---|---|---|---|---|")
    body = "\n".join(
        f"| {r['variant']} | {r['fid']:.2f} | {r['sfid']:.2f} | {r['is']:.2f} | {r['precision']:.3f} | "
        f"{r['recall']:.3f} | {r['class_acc']:.3f} | {r['sample_s']:.0f} | {r['speed_vs_fp32']:.2f}x |" for r in rows)
    return head + "\n" + body


if __name__ == "__main__":
    main(parse_args())
