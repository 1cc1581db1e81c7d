"""1-D k-means benchmark: onnxopt.kmeans1d on 10M float32 values vs scikit-learn on a 1M subsample.

Both codebooks (k=16) are judged by the within-cluster sum of squares on the *full* data (and,
for fairness to scikit-learn, on the subsample it was fitted on). Times are the medians of
``--rounds`` interleaved runs in the same process, so machine load affects both alike; the
reported speed-up is the ratio of those medians.

The values are weight-like: a Laplace core (most weights) plus a Gaussian tail.

Usage::

    python benchmarks/bench_kmeans.py [--n 10000000] [--k 16] [--subsample 1000000]
        [--rounds 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from sklearn.cluster import KMeans

from onnxopt.compress.kmeans1d import kmeans1d, within_cluster_sse


def make_values(n: int, seed: int = 0) -> np.ndarray:
    """Weight-like float32 values: 80% Laplace(0, 0.02), 20% Normal(0, 0.08)."""
    rng = np.random.default_rng(seed)
    core = rng.laplace(0.0, 0.02, int(n * 0.8))
    tail = rng.normal(0.0, 0.08, n - core.size)
    values = np.concatenate([core, tail]).astype(np.float32)
    rng.shuffle(values)
    return values


def run(n: int, k: int, subsample: int, rounds: int) -> dict:
    values = make_values(n)
    sub = np.random.default_rng(1).choice(values, subsample, replace=False)
    ours_t, theirs_t = [], []
    ours = theirs = None
    for _ in range(rounds):  # interleaved
        t0 = time.perf_counter()
        ours = kmeans1d(values, k, init="kmeans++", seed=0)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = KMeans(n_clusters=k, n_init=1, random_state=0).fit(sub.reshape(-1, 1).astype(np.float64))
        theirs_t.append(time.perf_counter() - t0)
    their_centroids = np.sort(theirs.cluster_centers_.ravel())
    result = {
        "n": n,
        "k": k,
        "subsample": subsample,
        "rounds": rounds,
        "ours_seconds_median": statistics.median(ours_t),
        "sklearn_seconds_median": statistics.median(theirs_t),
        "ours_iterations": ours.iterations,
        "sklearn_iterations": int(theirs.n_iter_),
        "sse_full_ours": within_cluster_sse(values, ours.centroids),
        "sse_full_sklearn": within_cluster_sse(values, their_centroids),
        "sse_subsample_ours": within_cluster_sse(sub, ours.centroids),
        "sse_subsample_sklearn": within_cluster_sse(sub, their_centroids),
    }
    result["speedup"] = result["sklearn_seconds_median"] / result["ours_seconds_median"]
    result["sse_ratio_full"] = result["sse_full_ours"] / result["sse_full_sklearn"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--subsample", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    result = run(args.n, args.k, args.subsample, args.rounds)
    print(f"1-D k-means, k={args.k}: ours on {args.n:,} values vs scikit-learn KMeans on {args.subsample:,}")
    print(f"  time (median of {args.rounds} interleaved): ours {result['ours_seconds_median']:.2f} s "
          f"({result['ours_iterations']} Lloyd iterations), scikit-learn {result['sklearn_seconds_median']:.2f} s "
          f"({result['sklearn_iterations']} iterations) -> ours {result['speedup']:.1f}x faster")
    print(f"  SSE on all {args.n:,} values: ours {result['sse_full_ours']:.6g}, "
          f"scikit-learn {result['sse_full_sklearn']:.6g} (ratio {result['sse_ratio_full']:.4f})")
    print(f"  SSE on the 1M subsample: ours {result['sse_subsample_ours']:.6g}, "
          f"scikit-learn {result['sse_subsample_sklearn']:.6g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
