"""FID against measured sampling speed, one point per ablation row, from ``qc bench ... --out`` JSON.

    pip install -e '.[bench]'   # matplotlib
    python benchmarks/plot_ablation.py runs/ablation.json [more.json ...] --out docs/fid_vs_speed.png

Speed is the row's wall-clock sampling speed relative to FP32 at the same step count, measured in
the same run (``speed_vs_fp32``); FP32 at 250 steps is drawn too when the run timed it (``--fp250``).
Rows of a later file that ran without an FP32 row are set against the first file's FP32 time.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

from qc_compiler.tools.bench import merge_results, variant_label

# One colour per family, so the eye finds naive -> +VC -> +TAP -> +TAP+VC.
FAMILY_COLOURS = {"fp32": "black", "cache": "tab:gray", "quant": "tab:blue", "qc": "tab:red"}


def family(variant: str) -> str:
    head = variant.split("-")[0]
    return "quant" if head in ("quant", "w8a8", "w4a8", "w4a4") else head


def plot(rows: List[Dict], out: Path, title: str = "Q&C ablation on the embedded model") -> None:
    """One panel per bit width (W8A8's rows sit within a few hundredths of FID of each other, W4A8's
    spread over several units: one shared axis would flatten the first), each with FP32 and the
    cache-only rows for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["bits"] for r in rows if r["bits"] != "-"}, reverse=True) or ["-"]  # w8a8 first
    fig, axes = plt.subplots(1, len(widths), figsize=(7 * len(widths), 5), squeeze=False)
    for ax, bits in zip(axes[0], widths):
        _panel(ax, [r for r in rows if r["bits"] in ("-", bits)], bits)
    fig.suptitle(f"{title}: quality against measured speed")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def _panel(ax, rows: List[Dict], bits: str) -> None:
    markers = {"w8a8": "o", "w4a8": "s", "w4a4": "^", "-": "D"}
    for i, r in enumerate(sorted(rows, key=lambda r: r["speed_vs_fp32"])):
        x, y = r["speed_vs_fp32"], r["fid"]
        ax.scatter(x, y, color=FAMILY_COLOURS.get(family(r["variant"]), "tab:green"),
                   marker=markers.get(r["bits"], "o"))
        # Alternate the label above and below the point: neighbours in speed often tie in FID.
        ax.annotate(variant_label(r), (x, y), fontsize=7, xytext=(3, 4 if i % 2 else -9), textcoords="offset points")
    fp = next((r for r in rows if r["variant"] == "fp32"), None)
    if fp and fp.get("fp32_250_s"):
        ax.axvline(fp["fp32_sample_s"] / fp["fp32_250_s"], color="black", ls=":", lw=1)
        ax.annotate("FP32 250 steps (speed)", (fp["fp32_sample_s"] / fp["fp32_250_s"], ax.get_ylim()[1]),
                    fontsize=7, rotation=90, va="top")
    if fp:
        ax.axhline(fp["fid"] * 1.05, color="black", ls="--", lw=0.8)
        ax.annotate("FP32 FID + 5%", (ax.get_xlim()[0], fp["fid"] * 1.05), fontsize=7, va="bottom")
    steps, n = rows[0]["steps"], rows[0].get("n", "?")
    ax.set_xlabel(f"measured sampling speed vs FP32 at {steps} steps (same run)")
    ax.set_ylabel(f"FID ({n} samples, digit-classifier features)")
    ax.set_title(bits.upper() if bits != "-" else "float")
    ax.grid(alpha=0.3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="JSON written by qc bench --out")
    p.add_argument("--out", type=Path, default=Path("docs/fid_vs_speed.png"))
    p.add_argument("--steps", type=int, default=50, help="plot the rows at this step count")
    p.add_argument("--title", default="Q&C ablation on the embedded model", help="the figure's title")
    args = p.parse_args(argv)
    rows = merge_results(args.results, args.steps)
    if not rows:
        raise SystemExit(f"no rows at {args.steps} steps in {args.results}")
    plot(rows, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
