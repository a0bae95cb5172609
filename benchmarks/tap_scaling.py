"""How TAP selection scales with the pool size, against exact spectral clustering.

For each pool size N: a synthetic pool of N x ``--dim`` float32 features drawn from clustered
Gaussians, each cluster on its own range of step indices. TAP (landmark spectral clustering, O(N n)
memory with n = N/20 landmarks) is timed with its peak numpy memory (tracemalloc) and the growth of
the process's peak RSS. Exact spectral clustering on the dense N x N TAP affinity
(``SpectralClustering(affinity="precomputed")``) is timed up to ``--exact-limit``; above it, the
memory its affinity would need is reported instead. Both are scored against the true clusters (ARI).

Example (a short smoke run):
    python benchmarks/tap_scaling.py --sizes 2000,5000 --exact-limit 5000 --threads 1
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["main", "make_pool", "measure"]

log = logging.getLogger("tap_scaling")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="5000,20000,50000", help="comma-separated pool sizes N")
    p.add_argument("--dim", type=int, default=1024, help="feature dimension (flattened x_t)")
    p.add_argument("--clusters", type=int, default=100, help="TAP clusters (k of the final k-means)")
    p.add_argument("--true-clusters", type=int, default=None,
                   help="Gaussian clusters in the synthetic pool (default: --clusters)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps the pool spans")
    p.add_argument("--size", type=int, default=800, help="calibration-set size TAP draws")
    p.add_argument("--exact-limit", type=int, default=20000, help="largest N for exact spectral clustering")
    p.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads and TAP's parallel rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-landmarks", type=int, default=None, help="cap on TAP's N/20 landmarks (linear cost)")
    p.add_argument("--json", type=Path, help="also write the rows, with the machine, as JSON here")
    return p.parse_args(argv)


def make_pool(n: int, dim: int, clusters: int, steps: int, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (n, dim) float32, step indices (n,), true labels (n,): cluster j lives in its own
    direction and on its own consecutive range of steps."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, clusters, n)  # (n,)
    centers = (rng.standard_normal((clusters, dim)) * 2.0).astype(np.float32)  # (K, dim)
    x = centers[truth] + rng.standard_normal((n, dim), dtype=np.float32)  # (n, dim)
    width = max(1, steps // clusters)
    lo = (truth * steps) // clusters  # cluster j starts at step j*S/K
    step = np.minimum(lo + rng.integers(0, width, n), steps - 1)
    return x, step, truth


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(fn: Callable[[], np.ndarray]) -> Dict[str, object]:
    """Run ``fn`` once: seconds, tracemalloc peak (numpy buffers included) and peak-RSS growth, in MB."""
    gc.collect()
    rss0 = _maxrss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": seconds, "peak_mb": peak / 2**20, "rss_mb": _maxrss_mb() - rss0, "out": out}


def exact_spectral(x: np.ndarray, step: np.ndarray, clusters: int, alpha: float, seed: int) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    from qc_compiler.calibration.tap import l2_normalize, tap_affinity

    xn = l2_normalize(x)
    affinity = tap_affinity(xn, step, xn, step, alpha=alpha)  # (N, N): what TAP's landmarks avoid
    model = SpectralClustering(n_clusters=clusters, affinity="precomputed", random_state=seed)
    return model.fit_predict(affinity)


def dense_gb(n: int) -> float:
    """GB of the dense N x N affinity SpectralClustering works on (it converts to float64)."""
    return n * n * 8 / 1e9


def run_tap(n: int, args: argparse.Namespace) -> Dict[str, object]:
    from sklearn.metrics import adjusted_rand_score

    from qc_compiler.calibration.tap import draw_per_cluster, tap_clusters

    x, step, truth = make_pool(n, args.dim, args.true_clusters, args.steps, args.seed)

    def tap() -> np.ndarray:
        labels = tap_clusters(x, step, clusters=args.clusters, seed=args.seed, n_jobs=args.threads,
                              max_landmarks=args.max_landmarks)
        draw_per_cluster(labels, args.size, args.seed)
        return labels

    res = measure(tap)
    return {"n": n, "tap_s": res["seconds"], "tap_peak": res["peak_mb"], "tap_rss": res["rss_mb"],
            "tap_ari": adjusted_rand_score(truth, res["out"])}


def run_exact(n: int, args: argparse.Namespace) -> str:
    from sklearn.metrics import adjusted_rand_score

    if n > args.exact_limit:
        return f"skipped: N^2 affinity would need {dense_gb(n):.1f} GB"
    x, step, truth = make_pool(n, args.dim, args.true_clusters, args.steps, args.seed)
    ex = measure(lambda: exact_spectral(x, step, args.clusters, 0.5, args.seed))
    return (f"{ex['seconds']:.2f} s, peak {ex['peak_mb']:.0f} MB numpy, +{ex['rss_mb']:.0f} MB RSS, "
            f"ARI {adjusted_rand_score(truth, ex['out']):.2f}")


def table(rows: List[Dict[str, object]]) -> str:
    lines = ["| N | TAP s | growth t(N)/t(prev) | N/N prev | TAP peak numpy MB | peak RSS growth MB | TAP ARI | exact spectral |",
             "|---|---|---|---|---|---|---|---|"]
    prev = None
    for r in rows:
        growth = f"{r['tap_s'] / prev['tap_s']:.2f}" if prev else "-"
        ratio = f"{r['n'] / prev['n']:.2f}" if prev else "-"
        lines.append(f"| {r['n']} | {r['tap_s']:.2f} | {growth} | {ratio} | {r['tap_peak']:.0f} | "
                     f"{r['tap_rss']:.0f} | {r['tap_ari']:.2f} | {r['exact']} |")
        prev = r
    return "\n".join(lines)


def main(args: Optional[Sequence[str]] = None) -> int:
    ns = parse_args(args)
    ns.true_clusters = ns.true_clusters or ns.clusters
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(ns.threads))  # for libraries that start threads later
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(ns.threads)  # qc_compiler imports torch; keep its pool as small as BLAS's
    sizes = sorted(int(s) for s in ns.sizes.split(",") if s.strip())
    rows = []
    with threadpool_limits(ns.threads):
        # peak RSS only grows, so all TAP runs go first (in increasing N), then the dense baseline
        for n in sizes:
            rows.append(run_tap(n, ns))
            log.info("TAP N=%d: %.2f s", n, rows[-1]["tap_s"])
        for row in rows:
            row["exact"] = run_exact(int(row["n"]), ns)
            log.info("exact N=%d: %s", row["n"], row["exact"])
    from qc_compiler.tools.bench import machine_line, write_results

    print(machine_line())
    print(f"TAP scaling: dim {ns.dim}, {ns.clusters} clusters, {ns.true_clusters} true clusters, "
          f"{ns.threads} threads, landmarks N/20 capped at {ns.max_landmarks}, size {ns.size}\n")
    print(table(rows))
    write_results(ns.json, "tap_scaling", vars(ns), rows)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
