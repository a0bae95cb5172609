"""Train ``mmdit-mnist``: diffusers' SD3 transformer on 32x32 MNIST digits with prompts, by rectified flow.

The recipe is SD3's: the straight path ``x_t = (1 - s) x0 + s noise`` with the velocity target
``noise - x0``, and training sigmas drawn logit-normal (``u = sigmoid(N(0, 1))``) and mapped through
the scheduler's static shift ``s = shift u / (1 + (shift - 1) u)``, as diffusers' SD3 training
scripts draw them from ``FlowMatchEulerDiscreteScheduler(shift=...)``. The shift defaults to 1:
SD3 raises it with the pixel count (3.0 at 1024 px), and a 32x32 digit has fewer pixels than its
256 px base.

Each image's prompt names its digit and, from the image itself, its thickness and slant when they
are in the outer thirds for that digit (``qc_compiler/models/digit_text.py``); each attribute word is
dropped with probability 0.25 and the whole prompt with 0.1 (the empty prompt is the unconditional
one for guidance). The text encoder trains with the transformer.

Time-boxed for a 2-core CPU like ``scripts/train_default.py`` (whose schedule, checkpointing and
resume it shares): bf16 autocast, AdamW with warmup and cosine decay over progress, warm-up EMA,
+-1 px shifts. The EMA weights go to ``qc_compiler/assets/mmdit-mnist.safetensors`` at every
checkpoint, the loss curve to ``docs/training_mmdit.md``.

    python scripts/train_mmdit.py --time-budget 7200 --out runs/train_mmdit
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default import (random_shift, save_checkpoint, start_run, train_loop, training_parser,  # noqa: E402
                           write_log)

from qc_compiler.data.mnist import load_digits  # noqa: E402
from qc_compiler.models.digit_text import AttributeThresholds, DigitTextEncoder, describe, tokenize  # noqa: E402
from qc_compiler.models.mmdit_mnist import MMDIT_MNIST_CONFIG, TEXT_CONFIG, build_mmdit, save_mmdit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = training_parser(__doc__.splitlines()[0], "train_mmdit", "mmdit-mnist.safetensors", "training_mmdit.md",
                        time_budget=7200.0, batch_size=64)
    p.add_argument("--shift", type=float, default=1.0, help="the flow shift of training and sampling")
    p.add_argument("--drop-word", type=float, default=0.25, help="probability of leaving out an attribute word")
    p.add_argument("--drop-prompt", type=float, default=0.1, help="probability of the empty prompt")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast; auto: where the CPU has native bf16 (AVX512-BF16 or AMX), since "
                        "emulated bf16 is about 10x slower than fp32")
    return p.parse_args(argv)


def native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Trainee(nn.Module):
    """The transformer and its text encoder, trained (and averaged) together."""

    def __init__(self):
        super().__init__()
        self.transformer = build_mmdit(MMDIT_MNIST_CONFIG)
        self.text = DigitTextEncoder(**TEXT_CONFIG)

    def forward(self, x, t, tokens):
        hidden, pooled = self.text(tokens)
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=hidden,
                                pooled_projections=pooled, return_dict=False)[0]


def prompts_for(labels, thickness, slant, gen, args) -> list:
    """One prompt per image: its digit and the attributes it has, words dropped at random."""
    n = len(labels)
    keep_th = torch.rand(n, generator=gen) >= args.drop_word
    keep_sl = torch.rand(n, generator=gen) >= args.drop_word
    empty = torch.rand(n, generator=gen) < args.drop_prompt
    return ["" if empty[i] else describe(int(labels[i]), int(thickness[i]) * int(keep_th[i]),
                                         int(slant[i]) * int(keep_sl[i])) for i in range(n)]


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bf16 = args.bf16_used = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16())
    print(f"bf16 autocast: {bf16}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train = load_digits("train")
    thresholds = AttributeThresholds.fit(x_train, y_train)
    thickness, slant = thresholds.bins(x_train, y_train)
    model, ema = Trainee(), Trainee()
    opt, state = start_run(args, model, ema)
    gen = torch.Generator().manual_seed(args.seed + state["step"])

    def loss_of_batch(model: nn.Module) -> torch.Tensor:
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen)
        x0 = random_shift(x_train[idx], gen)
        tokens = tokenize(prompts_for(y_train[idx], thickness[idx], slant[idx], gen, args))
        u = torch.sigmoid(torch.randn(args.batch_size, generator=gen))  # logit-normal
        sigma = args.shift * u / (1 + (args.shift - 1) * u)  # the scheduler's static shift
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = model(x_t, sigma * 1000, tokens)
        return (v.float() - (noise - x0)).pow(2).mean()

    train_loop(model, ema, opt, state, args, loss_of_batch,
               lambda: checkpoint(args, model, ema, opt, state, thresholds))


def checkpoint(args, model, ema, opt, state, thresholds) -> None:
    save_checkpoint(args.out, model, ema, opt, state)
    save_mmdit(ema.transformer, ema.text, thresholds, args.asset, shift=args.shift,
               extra={"train_steps": str(state["step"])})
    write_log_md(args.log_md, state, args)


def write_log_md(path: Path, state: dict, args) -> None:
    precision = "bf16 autocast" if args.bf16_used else "fp32 (no native bf16 on this CPU)"
    write_log(path, f"""# Training mmdit-mnist

Written by `scripts/train_mmdit.py` at each checkpoint. Command:

    python scripts/train_mmdit.py --time-budget {args.time_budget:.0f}

Model: diffusers `SD3Transformer2DModel` ({json.dumps(MMDIT_MNIST_CONFIG)}) with the digit text encoder
({json.dumps(TEXT_CONFIG)}, 8 tokens), trained together by rectified flow: velocity target, logit-normal
sigmas with shift {args.shift:g}, {precision}, batch {args.batch_size}, AdamW lr {args.lr} with
{args.warmup} warmup steps and cosine decay, warm-up EMA (decay = min({args.ema_decay}, (1+n)/(10+n))),
+-1 px random shifts, attribute words dropped with p={args.drop_word}, empty prompt with
p={args.drop_prompt}, 4,000 training digits (the other 1,000 are held out for the evaluator).
""", state)


if __name__ == "__main__":
    main(parse_args())
