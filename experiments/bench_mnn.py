"""MNN matching of one query against a shortlist: the product's one-product version against the two-product one.

    python -m experiments.bench_mnn [--query 2048] [--db 1024] [--images 100] [--dim 64] [--repeats 7] [--threads 2]

:func:`pipeline.matching.mutual_nn_matches_many` takes each database keypoint's best query similarity as a column
*max* of the one product ``q @ B.T``; the reference here (the product's code until 2026-12-01) computes a second
product ``B @ q.T`` for a row argmax. Both are timed in the same run, interleaved, on unit random descriptors with
planted correspondences in a fifth of the images, and must return identical pairs. Prints medians and the ratio.
"""
from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np
import torch

from pipeline.matching import mutual_nn_matches_many


def two_product_reference(q: np.ndarray, dbs: list[np.ndarray], min_similarity: float) -> list[np.ndarray]:
    """MNN pairs per image with the b -> a nearest neighbours from a second product (the former implementation)."""
    stacked = np.concatenate(dbs)
    sim_all = q @ stacked.T
    nn_back = (stacked @ q.T).argmax(axis=1)
    out, off = [], 0
    for d in dbs:
        sim = sim_all[:, off:off + len(d)]
        nn_ab = sim.argmax(axis=1)
        idx = np.arange(len(sim))
        best = sim[idx, nn_ab]
        keep = (nn_back[off:off + len(d)][nn_ab] == idx) & (best >= min_similarity)
        out.append(np.stack([idx[keep], nn_ab[keep]], axis=1).astype(np.int64))
        off += len(d)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--query", type=int, default=2048, help="query keypoints (the +sv query: 2 scales x 1,024)")
    p.add_argument("--db", type=int, default=1024, help="keypoints per database image")
    p.add_argument("--images", type=int, default=100, help="shortlist length")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-similarity", type=float, default=0.75)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    q = unit(rng.standard_normal((args.query, args.dim)))
    dbs = [unit(rng.standard_normal((args.db, args.dim))) for _ in range(args.images)]
    n = min(300, args.query, args.db)
    for i in range(args.images // 5):
        dbs[i][:n] = unit(q[:n] + 0.2 * rng.standard_normal((n, args.dim)))
    print(f"[load] {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    t_ref, t_new = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ref = two_product_reference(q, dbs, args.min_similarity)
        t_ref.append(time.perf_counter() - t)
        t = time.perf_counter()
        new = mutual_nn_matches_many(q, dbs, args.min_similarity)
        t_new.append(time.perf_counter() - t)
        if not all(np.array_equal(a, b) for a, (b, _) in zip(ref, new)):
            raise SystemExit("the two versions disagree")
    a, b = float(np.median(t_ref)), float(np.median(t_new))
    print(f"[mnn] {args.query} x {args.images} x {args.db} ({args.dim}-D), median of {args.repeats}: two products "
          f"{a:.3f} s, one product {b:.3f} s, ratio {b / a:.2f} (identical pairs)")


if __name__ == "__main__":
    main()
