"""Train the evaluator's digit classifier and write its assets (weights + held-out reference statistics).

Trains :class:`qc_compiler.eval.DigitClassifier` on the 4,000 "train" digits with light augmentation
(random +-2 px shifts, small rotations and scalings through ``F.affine_grid``), checks its accuracy on
the 1,000 held-out "test" digits (exit 1 below ``--min-acc``), then writes, each atomically:

* ``qc_compiler/assets/digit-classifier.safetensors`` (fp16 by default; config and held-out accuracy
  in the metadata), and
* ``qc_compiler/assets/mnist-ref-stats.npz`` (feature statistics of the held-out digits, computed with
  the weights exactly as stored).

    python scripts/train_classifier.py            # 3-5 min on one (shared) CPU core
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from qc_compiler.data.mnist import load_digits
from qc_compiler.eval.classifier import (
    DEFAULT_CLASSIFIER_PATH, ClassifierConfig, DigitClassifier, classifier_config_json, load_classifier,
)
from qc_compiler.eval.suite import DEFAULT_REFERENCE_PATH, compute_reference, save_reference
from qc_compiler.io import save_tensors

logger = logging.getLogger("train_classifier")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    # No label smoothing: it caps the posteriors, and the Inception Score of real digits with them.
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--width", type=int, default=ClassifierConfig.width)
    p.add_argument("--max-shift", type=float, default=2.0, help="pixels")
    p.add_argument("--max-rotate", type=float, default=10.0, help="degrees")
    p.add_argument("--max-scale", type=float, default=0.08, help="relative zoom, +-")
    p.add_argument("--max-shear", type=float, default=0.0, help="shear factor, +-")
    p.add_argument("--elastic", type=float, default=1.0, help="std (px) of a smooth random displacement field")
    p.add_argument("--min-acc", type=float, default=0.985, help="held-out accuracy bar; below it, exit 1")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the weights that are kept (0: keep the last step)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16, half the size)")
    p.add_argument("--weights-out", type=Path, default=DEFAULT_CLASSIFIER_PATH)
    p.add_argument("--reference-out", type=Path, default=DEFAULT_REFERENCE_PATH)
    return p.parse_args(argv)


def augment(x: torch.Tensor, gen: torch.Generator, args: argparse.Namespace) -> torch.Tensor:
    """Random small rotation, zoom and +-max_shift px translation of a batch in [-1, 1]."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(args.max_rotate)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * args.max_scale
    # affine_grid works in [-1, 1] coordinates: one pixel of a 32-wide image is 2/32.
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * args.max_shift * 2 / x.shape[-1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shear = (torch.rand(n, generator=gen) * 2 - 1) * args.max_shear
    theta = torch.stack(
        [torch.stack([cos, -sin + shear * cos, shift[:, 0]], 1), torch.stack([sin, cos + shear * sin, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if args.elastic > 0:
        # Elastic distortion (Simard et al. 2003), cheaply: random displacements on a 5x5 lattice,
        # upsampled smoothly to the image; the classic regulariser for small MNIST training sets.
        coarse = torch.randn(n, 2, 5, 5, generator=gen) * args.elastic * 2 / x.shape[-1]
        grid = grid + F.interpolate(coarse, size=x.shape[-2:], mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    # grid_sample pads with 0; shifting to [0, 2] first makes that padding the -1 background.
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train(args: argparse.Namespace) -> DigitClassifier:
    x_train, y_train = load_digits("train")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = DigitClassifier(ClassifierConfig(width=args.width))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    # An EMA of the weights (BatchNorm statistics included) generalises better than the last step.
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, t0 = 0.0, time.time()
        for i in range(0, len(x_train), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = augment(x_train[idx], gen, args)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            # Ramped decay, so the random init has washed out of the average by the end.
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.is_floating_point():
                        ema[k].lerp_(v, 1 - decay)
                    else:
                        ema[k].copy_(v)
            total += loss.item() * len(idx)
        logger.info("epoch %d/%d  loss %.4f  (%.1fs)", epoch + 1, args.epochs, total / len(x_train), time.time() - t0)
    model.load_state_dict(ema)
    return model.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    start = time.time()
    model = train(args)
    train_s = time.time() - start

    x_test, y_test = load_digits("test")
    acc = accuracy(model, x_test, y_test)
    print(f"held-out accuracy (fp32, in memory): {acc:.4f} on {len(x_test)} digits; training took {train_s:.0f}s")
    if acc < args.min_acc:
        print(f"FAIL: held-out accuracy {acc:.4f} is below the bar {args.min_acc}; nothing written", file=sys.stderr)
        return 1

    dtype = torch.float32 if args.fp32 else torch.float16
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    # Measure the weights as stored (fp16 by default) before they replace the shipped file, so a
    # failed run never leaves new weights beside a reference made with the old ones.
    metadata = {"config": classifier_config_json(model.config), "dtype": str(dtype).replace("torch.", ""),
                "train_seconds": f"{train_s:.1f}", "epochs": str(args.epochs), "seed": str(args.seed)}
    candidate = args.weights_out.with_name(f".{args.weights_out.name}.candidate")
    try:
        save_tensors(state, candidate, metadata=metadata)
        shipped_acc = accuracy(load_classifier(candidate), x_test, y_test)
    finally:
        candidate.unlink(missing_ok=True)
    print(f"held-out accuracy (as stored, {metadata['dtype']}): {shipped_acc:.4f}")
    if shipped_acc < args.min_acc:
        print(f"FAIL: stored weights score {shipped_acc:.4f} < {args.min_acc}; nothing written", file=sys.stderr)
        return 1
    save_tensors(state, args.weights_out, metadata={**metadata, "heldout_acc": f"{shipped_acc:.4f}"})
    shipped = load_classifier(args.weights_out)

    # The reference names the weights it was made with, so evaluate() can refuse a mismatched pair.
    sha = hashlib.sha256(args.weights_out.read_bytes()).hexdigest()
    reference = compute_reference(x_test, shipped, classifier_sha256=sha)
    save_reference(reference, args.reference_out)
    sizes = {p.name: p.stat().st_size for p in (args.weights_out, args.reference_out)}
    print(f"wrote {json.dumps(sizes)} in {time.time() - start:.0f}s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
