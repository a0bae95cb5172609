"""Per-layer output error of each low-bit technique on the embedded model's real inputs.

    python benchmarks/lowbit_layers.py --act-bits 8 --json out.json

Inputs of every token linear are recorded while FP32 samples 20 digits (50 DDPM steps, cfg 1.5),
256 random rows per call. Each layer is then quantized alone at W4 and the given activation bits
(per-tensor min-max activations, MSE-searched per-channel weights, as the Quantize pass does) and its
relative L2 output error against float is measured: round to nearest, SmoothQuant at alpha 0.5,
balance search, GPTQ, and balance search + GPTQ. The search and GPTQ are the library's own
(``quant/balance.py``, ``quant/gptq.py``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import qc_compiler as qc
from qc_compiler.quant import BalanceConfig, make_observer
from qc_compiler.quant.balance import ChannelStats, balance_scales, quantized_output_error
from qc_compiler.quant.gptq import HessianAccumulator, gptq_codes
from qc_compiler.quant.qparams import fake_quantize, qparams_from_range
from qc_compiler.tools.bench import machine_line, write_results


def gptq_error(w, x, s, act_bits):
    """As ``quantized_output_error`` (round to nearest), with GPTQ's codes on the same grid instead."""
    wb, xb = w * s, x / s
    qa = qparams_from_range(xb.min(), xb.max(), act_bits, symmetric=False)
    obs = make_observer("mse", 4, symmetric=True, axis=0)
    obs.update(wb)
    scale = obs.compute().scale
    h = HessianAccumulator(w.shape[1])
    h.update(xb)
    wq = gptq_codes(wb, h.hessian(), scale, 4).float() * scale[:, None]
    ref = x @ w.T
    return float((fake_quantize(xb, qa) @ wq.T - ref).norm() / ref.norm())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line())
    model = qc.load_model("dit-mnist")
    inputs, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ("blocks" in name or name == "final_layer.linear") and "adaLN" not in name:
            def hook(mod, inp, out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1])
                inputs.setdefault(name, []).append(x[torch.randperm(x.shape[0])[:256]])
            hooks.append(mod.register_forward_hook(hook))
    qc.DDPM(steps=50, cfg_scale=1.5).sample(model, list(range(10)) * 2, seed=0)
    for h in hooks:
        h.remove()
    modules, rows = dict(model.named_modules()), []
    for name, xs in inputs.items():
        x, w = torch.cat(xs), modules[name].weight.detach()
        stats = ChannelStats(w.shape[1])
        stats.update(x, 0)
        smooth = balance_scales(stats, w, BalanceConfig(method="smoothquant", alpha=0.5), act_bits=args.act_bits, weight_bits=4)
        search = balance_scales(stats, w, BalanceConfig(method="search"), act_bits=args.act_bits, weight_bits=4)
        one = torch.ones(w.shape[1])
        rtn = lambda s: quantized_output_error(x, w, s, args.act_bits, 4, "mse")  # noqa: E731
        rows.append({"layer": name, "nearest": rtn(one), "smoothquant_0.5": rtn(smooth), "search": rtn(search),
                     "gptq": gptq_error(w, x, one, args.act_bits),
                     "search_gptq": gptq_error(w, x, search, args.act_bits)})
    keys = [k for k in rows[0] if k != "layer"]
    print(f"| W4A{args.act_bits}, mean over {len(rows)} linears | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    print("| relative output error | " + " | ".join(f"{sum(r[k] for r in rows) / len(rows):.4f}" for k in keys) + " |")
    write_results(args.json, "lowbit_layers", vars(args), rows)


if __name__ == "__main__":
    main()
