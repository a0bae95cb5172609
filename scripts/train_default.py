"""Train the embedded default model: a class-conditional DiT on 32x32 MNIST digits.

Time-boxed for a 2-core CPU: bf16 autocast, AdamW with warmup and a cosine decay over *progress*,
where progress is the larger of steps/max_steps and elapsed/time_budget, so a run that is cut short by
its budget still ends its schedule. Checkpoints (safetensors + JSON) every few minutes; rerunning the
same command resumes. The EMA weights are exported in fp16 to ``qc_compiler/assets/dit-mnist.safetensors``
at every checkpoint, and the loss curve to ``docs/training.md``.

    python scripts/train_default.py --time-budget 6000 --out runs/train_default
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qc_compiler.data.mnist import load_digits
from qc_compiler.diffusion.losses import hybrid_loss
from qc_compiler.diffusion.schedule import Schedule
from qc_compiler.models.zoo import DEFAULT_MODEL_CONFIG, build_model, save_model_weights

ROOT = Path(__file__).resolve().parents[1]


def training_parser(description: str, name: str, asset: str, log_md: str, *, time_budget: float,
                    batch_size: int) -> argparse.ArgumentParser:
    """The options both training scripts share: where to write, and the time-boxed schedule."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / name)
    p.add_argument("--asset", type=Path, default=ROOT / "qc_compiler" / "assets" / asset)
    p.add_argument("--log-md", type=Path, default=ROOT / "docs" / log_md)
    p.add_argument("--max-steps", type=int, default=30000)
    p.add_argument("--time-budget", type=float, default=time_budget, help="seconds of training, summed over resumes")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = training_parser(__doc__.splitlines()[0], "train_default", "dit-mnist.safetensors", "training.md",
                        time_budget=6000.0, batch_size=128)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--min-snr-gamma", type=float, default=None,
                   help="weight the MSE by min(SNR, gamma)/SNR (Min-SNR; 5 is the paper's choice)")
    p.add_argument("--init-from", type=Path, help="start a new run from these weights (e.g. the shipped EMA), "
                   "when there is no checkpoint to resume")
    return p.parse_args(argv)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to +-max_shift pixels (the background is -1, so padding is exact)."""
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    n, _, h, w = x.shape
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


def lr_at(step: int, progress: float, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def save_checkpoint(out: Path, model, ema, opt, state: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, s in opt.state_dict()["state"].items():
        for name, v in s.items():
            tensors[f"opt.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tmp = out / "ckpt.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out / "ckpt.safetensors")
    tmp_json = out / "state.json.tmp"
    tmp_json.write_text(json.dumps(state))
    os.replace(tmp_json, out / "state.json")


def load_checkpoint(out: Path, model, ema, opt) -> dict:
    tensors = load_file(str(out / "ckpt.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_sd = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(opt_sd)
    return json.loads((out / "state.json").read_text())


def write_log(path: Path, header: str, state: dict) -> None:
    """``header`` (title, command, recipe), then the progress and the loss curve, written atomically."""
    rows = "\n".join(
        f"| {r['step']} | {r['elapsed'] / 60:.1f} | {r['loss']:.4f} | {r['lr']:.2e} |" for r in state["log"][::5]
    )
    text = f"""{header}
Steps so far: {state['step']}, elapsed {state['elapsed'] / 60:.1f} min,
{state['step'] / max(state['elapsed'], 1e-9):.2f} steps/s.

Loss curve (mean over the previous 100 steps; every 5th log point):

| step | minutes | loss | lr |
|---|---|---|---|
{rows}
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_log_md(path: Path, state: dict, args) -> None:
    snr = f", MSE weighted by Min-SNR-{args.min_snr_gamma:g}" if args.min_snr_gamma else ""
    write_log(path, f"""# Training the embedded default model

Written by `scripts/train_default.py` at each checkpoint. Command:

    python scripts/train_default.py --time-budget {args.time_budget:.0f}

Model: `DiT-MNIST` ({json.dumps(DEFAULT_MODEL_CONFIG)}), learned sigma, hybrid loss (MSE + VLB{snr}),
bf16 autocast on CPU, batch {args.batch_size}, AdamW lr {args.lr} with {args.warmup} warmup steps and
cosine decay, warm-up EMA (decay = min({args.ema_decay}, (1+n)/(10+n))), +-1 px random shifts,
4,000 training digits (400 per class; the other 1,000 are held out for the evaluator).
""", state)


def start_run(args, model, ema):
    """(AdamW, state): the EMA starts as the model, and a checkpoint in ``args.out`` is resumed."""
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"step": 0, "elapsed": 0.0, "log": []}
    if (args.out / "ckpt.safetensors").exists():
        state = load_checkpoint(args.out, model, ema, opt)
        print(f"resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min)", flush=True)
    return opt, state


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train = load_digits("train")
    schedule = Schedule.linear()
    model = build_model(DEFAULT_MODEL_CONFIG | {"fused_attn": False})
    ema = build_model(DEFAULT_MODEL_CONFIG | {"fused_attn": False})
    opt, state = start_run(args, model, ema)
    if not (args.out / "ckpt.safetensors").exists() and args.init_from:
        from qc_compiler.io import load_tensors

        weights = {k: v.float() for k, v in load_tensors(args.init_from)[0].items()}
        model.load_state_dict(weights)
        ema.load_state_dict(weights)
        print(f"initialised from {args.init_from}", flush=True)
    gen = torch.Generator().manual_seed(args.seed + state["step"])

    def loss_of_batch(model: torch.nn.Module) -> torch.Tensor:
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen)
        x0, y = random_shift(x_train[idx], gen), y_train[idx]
        t = torch.randint(0, schedule.num_steps, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = schedule.q_sample(x0, t, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            out = model(x_t, t, y)
        return hybrid_loss(out.float(), x0, x_t, t, noise=noise, schedule=schedule,
                           min_snr_gamma=args.min_snr_gamma).mean()

    train_loop(model, ema, opt, state, args, loss_of_batch, lambda: checkpoint(args, model, ema, opt, state))


def train_loop(model, ema, opt, state: dict, args, loss_of_batch, save) -> None:
    """The time-boxed loop both training scripts share: lr from progress (the larger of steps/max_steps
    and elapsed/budget), a step with clipped gradients, the warm-up EMA, a log line every 100 steps,
    ``save()`` every ``checkpoint_every`` seconds and at the end. ``loss_of_batch(model)`` draws a
    batch and returns its loss."""
    model.train()
    t_start, last_ckpt, running = time.time() - state["elapsed"], time.time(), []
    while True:
        step, elapsed = state["step"], time.time() - t_start
        progress = max(step / args.max_steps, elapsed / args.time_budget)
        if progress >= 1.0:
            break
        lr = lr_at(step, progress, args)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of_batch(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running.append(loss.item())
        state["step"] = step + 1
        if state["step"] % 100 == 0:
            state["elapsed"] = time.time() - t_start
            state["log"].append({"step": state["step"], "elapsed": state["elapsed"],
                                 "loss": sum(running) / len(running), "lr": lr})
            running = []
            print(json.dumps(state["log"][-1]), flush=True)
        if time.time() - last_ckpt > args.checkpoint_every:
            state["elapsed"] = time.time() - t_start
            save()
            last_ckpt = time.time()
    state["elapsed"] = time.time() - t_start
    save()
    print(f"done: {state['step']} steps in {state['elapsed'] / 60:.1f} min", flush=True)


def checkpoint(args, model, ema, opt, state) -> None:
    save_checkpoint(args.out, model, ema, opt, state)
    save_model_weights(ema, args.asset, extra={"train_steps": str(state["step"])})
    write_log_md(args.log_md, state, args)


if __name__ == "__main__":
    main(parse_args())
