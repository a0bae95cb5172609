"""A quick probe of W4A8 weight rounding: how far each rounding's samples land from FP32's, same noise.

    python benchmarks/rounding_probe.py --n 250 --rows nearest gptq fgptq brecq:1000 brecq:2000 brecq-unmixed:1000

Samples ``--n`` digits (50 DDPM steps, cfg 1.5) with FP32 and with each row (uniform calibration, 800
items, torch INT8 backend) from the same noise, and prints the pixel RMSE between each row's samples
and FP32's: a 5-minute stand-in for the 2,000-sample FID table when choosing options
(docs/RESULTS.md, "Low-bit fidelity"). ``brecq:N`` is BRECQ with N steps a block; ``brecq-unmixed``
draws each minibatch from one calibration batch (one timestep) instead of mixing timesteps.
``brecq+lsq=1e-2+drop=0.5+branch=1e-3:2000`` adds BRECQ's options for 4-bit activations: the
learning rate of the activation step sizes (``act_lr``), QDrop's rate (``drop``) and the learning
rate of the low-rank branch (``branch_lr``, with ``--low-rank``). ``--bits``, ``--balance`` and
``--low-rank`` apply to every row (and ``--act-observer``, ``--act-groups``, ``--act-granularity``), e.g. for W4A4:

    python benchmarks/rounding_probe.py --bits w4a4 --balance search --low-rank 16 --rows gptq brecq:1000 brecq+lsq=1e-3:1000
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

import torch

import qc_compiler as qc
from qc_compiler.passes import Quantize, UniformCalibration
from qc_compiler.quant import OBSERVERS, LayerQuant, QuantConfig
from qc_compiler.passes import quantize as quantize_pass
from qc_compiler.tools.bench import machine_line, write_results


_EXTRAS = {"lsq": "act_lr", "drop": "drop", "branch": "branch_lr"}


def _options(row: str) -> dict:
    name, _, iters = row.partition(":")
    if name == "nearest":
        return {}
    if name == "gptq":
        return {"rounding": "gptq"}
    if name == "fgptq":
        return {"rounding": "gptq", "gptq": {"sequential": True, "target": "float"}}
    base, *extras = name.split("+")
    if base in ("brecq", "brecq-unmixed"):
        brecq = {"iters": int(iters)} if iters else {}
        for extra in extras:  # +lsq=LR (act_lr), +drop=P, +branch=LR (branch_lr)
            key, _, value = extra.partition("=")
            if key not in _EXTRAS or not value:
                raise SystemExit(f"unknown BRECQ extra {extra!r}: lsq=LR, drop=P, branch=LR")
            brecq[_EXTRAS[key]] = float(value)
        return {"rounding": "brecq", "brecq": brecq}
    raise SystemExit(f"unknown row {row!r}: nearest, gptq, fgptq, brecq[+lsq=LR][+drop=P][+branch=LR][:iters], "
                     "brecq-unmixed[:iters]")


def _unmixed(s, mods, batches, env_f, env_q, gen):
    """The minibatch draw with timesteps never mixed (whole calibration batches)."""
    def whole():
        b = int(torch.randint(len(batches), (1,), generator=gen))
        return batches[b][0], {n: env_q[b][n] for n in s.inputs}, env_f[b]
    return whole


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=250)
    p.add_argument("--rows", nargs="+", default=["nearest", "gptq", "fgptq", "brecq"])
    p.add_argument("--bits", choices=["w4a8", "w4a4"], default="w4a8")
    p.add_argument("--balance", choices=["search", "smoothquant", "ptq4dit"], help="salience balancing on every row")
    p.add_argument("--low-rank", type=int, default=0, help="SVDQuant's float branch of this rank on every row")
    p.add_argument("--act-observer", choices=sorted(OBSERVERS), default="minmax", help="activation observer, every row")
    p.add_argument("--act-groups", type=int, default=1, help="activation ranges per group of steps, every row")
    p.add_argument("--act-granularity", choices=["tensor", "token"], default="tensor",
                   help="activation ranges per tensor (calibrated) or per token (at run time), every row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    common = {"balance": args.balance} if args.balance else {}
    common.update({"low_rank": args.low_rank} if args.low_rank else {})
    options = {row: {**_options(row), **common} for row in args.rows}  # refuse a bad row before any work
    w, a = int(args.bits[1]), int(args.bits[3])
    config = QuantConfig(default=LayerQuant(w, a, act_observer=args.act_observer, act_granularity=args.act_granularity),
                         act_step_groups=args.act_groups)
    torch.set_num_threads(args.threads)
    print(machine_line())
    model, sampler = qc.load_model("dit-mnist"), qc.DDPM(steps=50, cfg_scale=1.5)
    labels = [i % 10 for i in range(args.n)]
    ref = sampler.sample(model, labels=labels, seed=0).clamp(-1, 1)
    rows = []
    for row, opts in options.items():
        t0 = time.time()
        patch = (mock.patch.object(quantize_pass, "_minibatches", _unmixed) if row.startswith("brecq-unmixed")
                 else mock.patch.object(quantize_pass, "_minibatches", quantize_pass._minibatches))
        with patch:
            fast = qc.compile(model, passes=[UniformCalibration(size=800), Quantize(config=config, **opts)],
                              sampler=sampler, backend="torch")
        compile_s = time.time() - t0
        out = sampler.sample(fast, labels=labels, seed=0).clamp(-1, 1)
        rmse = float(((out - ref) ** 2).mean().sqrt())
        rows.append({"row": row, "rmse_vs_fp32": rmse, "compile_s": compile_s})
        print(f"| {row} | {rmse:.4f} | {compile_s:.0f} s |", flush=True)
    write_results(args.json, "rounding_probe", vars(args), rows)


if __name__ == "__main__":
    main()
