"""The paper's two problems, measured on our model (METHOD.md section 1), as PNG plots and JSON.

(a) Calibration candidates lose their value under a cache: per sampling step, the mean pairwise
    cosine similarity between the candidates x_t of different samples, and the cosine between each
    sample's x_t and its own x_t one step earlier, with and without the cache.
(b) Exposure bias: per step, the distribution (median and 5-95% band) of the per-sample variance of
    x_t for FP32, quant only, cache only, quant+cache, and quant+cache+VC, from the same noise.

    pip install -e '.[bench]'   # matplotlib, for the plots
    python benchmarks/diagnostics.py --n 64 --steps 50 --bits w4a8 --cache interval=3 --out docs
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

import qc_compiler as qc
from qc_compiler.specs import StepCacheConfig
from qc_compiler.tools.bench import machine, variant_passes
from qc_compiler.io import save_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-mnist")
    p.add_argument("--n", type=int, default=64, help="samples per variant (labels cycle 0..9)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--bits", default="w8a8")
    p.add_argument("--cache", type=StepCacheConfig.parse, default="interval=2",
                   help="the step cache, as step_cache options (interval=3, policy=adaptive,threshold=0.1, ...)")
    p.add_argument("--calib-size", type=int, default=800)
    p.add_argument("--pool-labels", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--json", type=Path, help="where the figures' numbers go (default: beside the PNG in --out)")
    p.add_argument("--no-plot", action="store_true", help="the numbers only (no matplotlib needed)")
    args = p.parse_args(argv)
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:  # before the minutes of sampling
        p.error("the plots need matplotlib: pip install -e '.[bench]', or --no-plot for the JSON alone")
    return args


def trajectory(model, passes, sampler, labels, seed):
    compiled = qc.compile(model, passes=passes, sampler=sampler, seed=seed)
    return sampler.sample(compiled, labels, seed=seed, record=True)


def cosine_stats(traj) -> dict:
    """Per step: mean pairwise cosine across samples, and cosine to the same sample's previous x_t."""
    across, temporal, prev = [], [], None
    for rec in traj.steps:
        x = torch.nn.functional.normalize(rec.x_t.reshape(len(rec.x_t), -1).float(), dim=1)  # (N, D)
        sim = x @ x.T
        n = len(x)
        across.append(float((sim.sum() - n) / (n * (n - 1))))
        temporal.append(float((x * prev).sum(dim=1).mean()) if prev is not None else float("nan"))
        prev = x
    return {"across_samples": across, "to_previous_step": temporal}


def variance_bands(traj) -> dict:
    """Per step: 5th, 50th and 95th percentile of the per-sample variance of x_t."""
    bands = {"p5": [], "p50": [], "p95": []}
    for rec in traj.steps[1:] + [None]:
        x = (rec.x_t if rec is not None else traj.samples).reshape(len(traj.samples), -1).float()
        v = x.var(dim=1).numpy()
        for key, q in (("p5", 5), ("p50", 50), ("p95", 95)):
            bands[key].append(float(np.percentile(v, q)))
    return bands


def plot(stats: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, s in stats["cosine"].items():
        axes[0].plot(s["across_samples"], label=f"{name}: across samples")
        axes[0].plot(s["to_previous_step"], "--", label=f"{name}: to previous step")
    axes[0].set(xlabel="sampling step", ylabel="mean cosine similarity", title="(a) calibration candidates")
    axes[0].legend(fontsize=7)
    for name, b in stats["variance"].items():
        line, = axes[1].plot(b["p50"], label=name)
        axes[1].fill_between(range(len(b["p50"])), b["p5"], b["p95"], color=line.get_color(), alpha=0.12)
    axes[1].set(xlabel="sampling step", ylabel="per-sample variance of x_t", title="(b) variance drift (median, 5-95%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    model = qc.load_model(args.model)
    sampler = qc.DDPM(steps=args.steps, cfg_scale=args.cfg)
    labels = [i % model.num_classes for i in range(args.n)]
    opts = dict(bits=args.bits, cache=args.cache, size=args.calib_size, pool_labels=args.pool_labels)
    rows = {
        "FP32": [], "cache only": variant_passes("cache", **opts),
        f"quant only ({args.bits})": variant_passes("quant-uniform", **opts),
        "quant+cache": variant_passes("qc-uniform", **opts), "quant+cache+VC": variant_passes("qc-uniform-vc", **opts),
        "quant+cache+VC (variance form)": variant_passes("qc-uniform-vcvar", **opts),
    }
    trajs = {name: trajectory(model, passes, sampler, labels, args.seed) for name, passes in rows.items()}
    stats = {"cosine": {k: cosine_stats(trajs[k]) for k in ("FP32", "cache only")},
             "variance": {k: variance_bands(t) for k, t in trajs.items()},
             "settings": {k: (str(v) if isinstance(v, Path) else v.to_json() if isinstance(v, StepCacheConfig) else v)
                          for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"cache{args.cache.every}" if args.cache.policy == "interval" else f"cache-{args.cache.policy}"
    png = args.out / f"diagnostics_{args.bits}_{tag}_{args.steps}steps.png"
    save_json({**stats, "machine": machine()}, args.json or png.with_suffix(".json"))
    if not args.no_plot:
        plot(stats, png)
    late = slice(int(0.8 * args.steps), None)
    for name, b in stats["variance"].items():
        print(f"{name:<24} late-step median variance {np.mean(b['p50'][late]):.4f}  "
              f"5-95% [{np.mean(b['p5'][late]):.4f}, {np.mean(b['p95'][late]):.4f}]")
    for name, c in stats["cosine"].items():
        print(f"{name:<24} late-step cosine: across samples {np.mean(c['across_samples'][late]):.3f}, "
              f"to previous step {np.nanmean(c['to_previous_step'][late]):.3f}")
    print(f"wrote {args.json or png.with_suffix('.json')}" + ("" if args.no_plot else f" and {png}"))
    return stats


if __name__ == "__main__":
    main(parse_args())
