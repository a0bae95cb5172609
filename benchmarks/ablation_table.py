"""Print the markdown results table of one or more ``qc bench ... --out`` JSON files, merged.

    python benchmarks/ablation_table.py runs/ablation.json runs/ablation_w4a8.json

FID is also given relative to the FP32 row; rows of a file without an FP32 row (a second bit width)
get their speed against the first file's FP32 time, as ``plot_ablation.py`` draws them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qc_compiler.tools.bench import markdown, merge_results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="JSON written by qc bench --out")
    p.add_argument("--steps", type=int, default=50, help="the rows at this step count")
    args = p.parse_args(argv)
    rows = merge_results(args.results, args.steps)
    if not rows:
        raise SystemExit(f"no rows at {args.steps} steps in {args.results}")
    settings = json.loads(args.results[0].read_text())["args"]
    print(markdown(rows, int(settings["n"]), float(settings["cfg"])))


if __name__ == "__main__":
    main()
