"""Benchmark sharded FAISS index builds and search at R1M scale on synthetic clustered descriptors.

    python -m jobs.bench_faiss [--n-global 1000000 --d-global 512 --n-regional 5000000 --d-regional 128
                                --budget-gb 16] [--quick]

For the global (one vector per image) and regional (several per image) corpora:
synthetic clustered, L2-normalised descriptors generated in chunks (landmark-like: Zipf-sized clusters
nested in super-clusters, plus 10% unclustered distractors); the factory from ``choose_factory``;
train on a sample + add in shards (``add_shard`` on the serialised trained index) + ``merge_indexes``;
bytes per vector (serialised size) vs the memory model; recall@k against exact search computed by
numpy brute force in blocks, at the default parameters and at the ``nprobe``/``efSearch`` that ``tune``
picks on a separate held-out query set; query latency p50/p99 for single queries and batches, with the
exact brute-force search (``faiss.knn``) on the same data as the reference; peak RSS.
The database rows are written chunk by chunk to a memory-mapped .npy under ``--tmp`` and kept there
for the whole run, so ground truth, index build and the exact reference all see the very same rows
while the (reclaimable, file-backed) pages do not add to the anonymous memory. Sanity rows: recall of
the exact ``faiss.knn`` against the numpy ground truth (must be ~1.0) and recall at ``nprobe=1`` (how
hard the data is). ``--quick`` divides the corpus sizes by 10 to iterate. Uses 2 FAISS threads.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import resource
import tempfile
import time
from dataclasses import dataclass

import faiss
import numpy as np

from pipeline import faiss_index as fi

CHUNK = 100_000


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB -> GiB


@dataclass
class ClusteredGenerator:
    """Deterministic landmark-like descriptors: ``n_clusters`` Zipf-sized clusters nested in super-clusters.

    A row is ``L2(centre + noise * g / sqrt(d))`` (cosine ~0.7 to its centre, ~0.5 to a cluster mate,
    ~0.3 to a sibling cluster's members, ~0 to the rest); ``distractor_frac`` of rows are uniform on the
    sphere. Stream ``s`` and chunk ``i`` have their own RNG, so any chunk can be regenerated alone.
    """

    d: int
    n_clusters: int
    seed: int = 0
    noise: float = 1.0
    sub_spread: float = 0.8
    clusters_per_super: int = 10
    zipf: float = 1.0
    distractor_frac: float = 0.1

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 999])
        n_super = max(1, self.n_clusters // self.clusters_per_super)
        sup = rng.standard_normal((n_super, self.d), dtype=np.float32)
        sup /= np.linalg.norm(sup, axis=1, keepdims=True)
        parent = rng.integers(0, n_super, self.n_clusters)
        C = sup[parent] + self.sub_spread * rng.standard_normal((self.n_clusters, self.d), dtype=np.float32) \
            / np.sqrt(self.d)
        self.centres = (C / np.linalg.norm(C, axis=1, keepdims=True)).astype(np.float32)
        w = 1.0 / np.arange(1, self.n_clusters + 1) ** self.zipf
        self.p = rng.permutation(w / w.sum())

    def chunk(self, stream: int, i: int, size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, i])
        c = rng.choice(self.n_clusters, size=size, p=self.p)
        X = self.centres[c] + self.noise / np.sqrt(self.d) * rng.standard_normal((size, self.d), dtype=np.float32)
        distract = rng.random(size) < self.distractor_frac
        X[distract] = rng.standard_normal((int(distract.sum()), self.d), dtype=np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        return X

    def rows(self, stream: int, n: int, path: str | None = None) -> np.ndarray:
        """``n`` rows of ``stream``: in RAM, or (``path``) written chunk by chunk to a memory-mapped .npy."""
        if path is None:
            X = np.empty((n, self.d), np.float32)
        else:
            X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, self.d))
        for i, s in enumerate(range(0, n, CHUNK)):
            X[s:s + CHUNK] = self.chunk(stream, i, min(CHUNK, n - s))
        if path is not None:
            X.flush()
            del X
            X = np.load(path, mmap_mode="r")  # read-only map: pages are file-backed, reclaimable
        return X


def pct(a: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(a), q))


def time_single(search, Q: np.ndarray, k: int, n: int) -> np.ndarray:
    """Per-query latencies (ms) of ``n`` batch-of-1 searches."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        search(Q[i:i + 1], k)
        out.append((time.perf_counter() - t0) * 1e3)
    return np.array(out)


def time_batched(search, Q: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Per-batch latencies (ms) over consecutive batches of ``Q``."""
    out = []
    for s in range(0, len(Q) - batch + 1, batch):
        t0 = time.perf_counter()
        search(Q[s:s + batch], k)
        out.append((time.perf_counter() - t0) * 1e3)
    return np.array(out)


def bench_corpus(label: str, n: int, d: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Benchmark one corpus; the data lives in a memory-mapped .npy under ``args.tmp`` for the whole run."""
    with tempfile.TemporaryDirectory(prefix=f"bench_faiss_{label}_", dir=args.tmp) as td:
        return _bench_corpus(label, n, d, args, td)


def _bench_corpus(label: str, n: int, d: int, args: argparse.Namespace, td: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    k = args.k
    budget = args.budget_gb * (1 << 30)
    factory = args.factory_global if label == "global" else args.factory_regional
    factory = factory or fi.choose_factory(n, d, budget, prefer_hnsw=args.prefer_hnsw)
    gen = ClusteredGenerator(d=d, n_clusters=max(100, n // args.points_per_cluster), seed=7 if label == "global" else 11)
    print(f"\n[{label}] n={n:,} d={d} factory={factory}", flush=True)

    # The database rows go to a memory-mapped file (n*d*4 bytes: 2 GB global, 2.5 GB regional) and stay
    # there for the whole run: the exact reference at the end searches the very same rows as the index.
    t0 = time.perf_counter()
    X = gen.rows(0, n, path=os.path.join(td, "X.npy"))
    Q_tune = gen.rows(1, args.queries)
    Q_test = gen.rows(2, args.queries)
    t_gen = time.perf_counter() - t0
    ids = np.arange(n, dtype=np.int64)
    print(f"  generated in {t_gen:.1f}s ({X.nbytes / (1 << 30):.2f} GiB memory-mapped in {td}), "
          f"peak RSS {peak_rss_gb():.2f} GiB", flush=True)

    # exact ground truth (numpy brute force in blocks), tune + test queries in one pass
    t0 = time.perf_counter()
    gt_D, gt = fi.brute_force_knn(X, np.vstack([Q_tune, Q_test]), k, block=32768)
    gt_tune, gt_test = gt[:args.queries], gt[args.queries:]
    t_gt = time.perf_counter() - t0
    print(f"  ground truth in {t_gt:.1f}s", flush=True)

    # train on a sample
    probe = faiss.index_factory(d, factory, fi.METRIC_IP)
    ivf = fi._find_ivf(probe)
    n_train = min(n, args.train_per_list * ivf.nlist) if ivf is not None else min(n, 100_000)
    del probe
    sample = np.ascontiguousarray(X[np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))])
    t0 = time.perf_counter()
    trained = fi.train_index(factory, sample, d)
    t_train = time.perf_counter() - t0
    del sample
    blob = fi.serialize(trained)
    del trained
    print(f"  trained on {n_train:,} in {t_train:.1f}s", flush=True)

    # add in shards (each shard from the serialised trained index, as a worker would), then merge
    # (HNSW graphs do not merge, so HNSW shards go into one index one after another)
    t0 = time.perf_counter()
    bounds = np.linspace(0, n, args.shards + 1).astype(int)
    parts = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    hnsw = fi._find_hnsw(fi.deserialize(blob)) is not None
    if hnsw:
        index = fi.deserialize(blob)
        for p in parts:
            fi.add_shard(index, X[p], ids[p])
        shards = []
    else:
        shards = [fi.add_shard(blob, X[p], ids[p]) for p in parts]
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not hnsw:
        index = fi.merge_indexes(shards, consume=True)
    t_merge = time.perf_counter() - t0
    del shards, blob
    gc.collect()
    assert index.ntotal == n, (index.ntotal, n)
    print(f"  added {args.shards} shards in {t_add:.1f}s, merged in {t_merge:.1f}s, "
          f"peak RSS {peak_rss_gb():.2f} GiB", flush=True)

    path = os.path.join(td, "index.faiss")
    faiss.write_index(index, path)
    nbytes = os.path.getsize(path)
    os.remove(path)

    # recall at the default params (those train_index sets), then tuned on the tune set, evaluated on test
    default_params = fi.default_search_params(index)
    fi.set_search_params(index, **default_params)
    _, I = index.search(Q_test, k)
    rec_default = fi.recall_at_k(I, gt_test, k)
    n_single = min(args.single_queries, len(Q_test))
    lat1_def = time_single(index.search, Q_test, k, n_single)
    latb_def = time_batched(index.search, Q_test, k, args.batch)
    print(f"  default {default_params}: recall@{k} {rec_default:.4f}, batch=1 p50 {pct(lat1_def, 50):.2f} ms",
          flush=True)
    t0 = time.perf_counter()
    tuned = fi.tune(index, Q_tune, gt_tune, k, target_recall=args.target_recall)
    t_tune = time.perf_counter() - t0
    _, I = index.search(Q_test, k)
    rec_tuned = fi.recall_at_k(I, gt_test, k)
    print(f"  tune curve (value, recall, ms/query): {[(v, round(r, 4), round(t, 3)) for v, r, t in tuned['curve']]}",
          flush=True)
    # how hard the data is: recall of the cheapest setting (one probed list) on the test set
    hard = fi.tunable_parameter(index)
    rec_min = None
    if hard is not None:
        cur = tuned.get(tuned["param"])
        fi.set_search_params(index, **{hard[0]: hard[1][0]})
        _, I = index.search(Q_test, k)
        rec_min = (hard[0], hard[1][0], fi.recall_at_k(I, gt_test, k))
        fi.set_search_params(index, **{hard[0]: cur})

    lat1 = time_single(index.search, Q_test, k, n_single)
    latb = time_batched(index.search, Q_test, k, args.batch)

    # reference: exact brute force with FAISS on the same (memory-mapped) rows; its result must agree
    # with the numpy ground truth (recall ~1.0 up to float ties): a check of the ground truth itself
    def exact(Qb: np.ndarray, kk: int, _X: np.ndarray = X) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(np.ascontiguousarray(Qb), _X, kk, metric=faiss.METRIC_INNER_PRODUCT)

    ref1 = time_single(exact, Q_test, k, max(5, n_single // 10))
    refb = time_batched(exact, Q_test[:args.batch * 2], k, args.batch)
    n_chk = min(len(Q_test), args.batch * 2)
    _, I_exact = exact(Q_test[:n_chk], k)
    rec_exact = fi.recall_at_k(I_exact, gt_test[:n_chk], k)
    gt_test_D = gt_D[args.queries:]

    param_str = ", ".join(f"{kk}={v}" for kk, v in default_params.items()) or "exact"
    tuned_str = f"{tuned['param']}={tuned.get(tuned['param'])}" if tuned["param"] else "exact"
    rows += [
        ("factory (choose_factory)", factory),
        ("vectors x dim", f"{n:,} x {d}"),
        ("data: clusters / distractors", f"{gen.n_clusters:,} Zipf clusters / {gen.distractor_frac:.0%}"),
        ("data: mean cos to 1st / 100th true neighbour", f"{gt_test_D[:, 0].mean():.3f} / {gt_test_D[:, -1].mean():.3f}"),
        ("train sample / time", f"{n_train:,} / {t_train:.1f} s"),
        (f"add {args.shards} shards / merge", f"{t_add:.1f} s / {t_merge:.1f} s"),
        ("build total (train+add+merge)", f"{t_train + t_add + t_merge:.1f} s"),
        ("bytes/vector (serialised)", f"{nbytes / n:.1f} (model {fi.estimate_bytes(factory, n, d) / n:.1f})"),
        ("index size", f"{nbytes / (1 << 30):.2f} GiB"),
        (f"recall@{k} DEFAULT ({param_str})", f"{rec_default:.4f}"),
        (f"latency batch=1 p50 / p99 (default, {n_single} q)",
         f"{pct(lat1_def, 50):.2f} / {pct(lat1_def, 99):.2f} ms"),
        (f"latency batch={args.batch} p50 / p99 (default)",
         f"{pct(latb_def, 50):.1f} / {pct(latb_def, 99):.1f} ms ({pct(latb_def, 50) / args.batch:.3f} ms/query)"),
        (f"recall@{k} tuned ({tuned_str}, target {args.target_recall})",
         f"{rec_tuned:.4f} (tune set {tuned['recall']:.4f}, {t_tune:.1f} s)"),
        (f"latency batch=1 p50 / p99 (tuned, {n_single} q)",
         f"{pct(lat1, 50):.2f} / {pct(lat1, 99):.2f} ms"),
        (f"latency batch={args.batch} p50 / p99 (tuned)",
         f"{pct(latb, 50):.1f} / {pct(latb, 99):.1f} ms ({pct(latb, 50) / args.batch:.3f} ms/query)"),
    ]
    if rec_min is not None:
        rows.append((f"recall@{k} at {rec_min[0]}={rec_min[1]} (difficulty check)", f"{rec_min[2]:.4f}"))
    rows += [
        (f"recall@{k} exact faiss.knn vs numpy ground truth ({n_chk} q)", f"{rec_exact:.4f} (sanity: ~1.0)"),
        ("exact faiss.knn batch=1 p50 (reference)",
         f"{pct(ref1, 50):.2f} ms -> speed-up x{pct(ref1, 50) / pct(lat1, 50):.1f} (tuned)"),
        (f"exact faiss.knn batch={args.batch} p50 (reference)",
         f"{pct(refb, 50):.1f} ms -> speed-up x{pct(refb, 50) / pct(latb, 50):.1f} (tuned)"),
    ]
    if label == "regional":
        fi.set_search_params(index, **default_params)
        region_to_image = ids // args.regions_per_image
        t = []
        for i in range(min(50, len(Q_test))):
            t0 = time.perf_counter()
            fi.regional_search(index, Q_test[i:i + 1], k, region_to_image, k_regions=10 * k)
            t.append((time.perf_counter() - t0) * 1e3)
        rows.append((f"regional_search k={k} images (k_regions={10 * k}, default) p50 / p99",
                     f"{pct(t, 50):.2f} / {pct(t, 99):.2f} ms"))
    rows.append(("generation / ground truth time", f"{t_gen:.1f} s / {t_gt:.1f} s"))
    rows.append(("peak RSS (process so far)", f"{peak_rss_gb():.2f} GiB (budget {args.budget_gb} GiB)"))
    del index, X, I_exact
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-global", type=int, default=1_000_000)
    ap.add_argument("--d-global", type=int, default=512)
    ap.add_argument("--n-regional", type=int, default=5_000_000)
    ap.add_argument("--d-regional", type=int, default=128)
    ap.add_argument("--budget-gb", type=float, default=16.0)
    ap.add_argument("--quick", action="store_true", help="1/10 of the corpus sizes")
    ap.add_argument("--only", choices=["global", "regional"], default=None)
    ap.add_argument("--factory-global", default=None, help="override choose_factory")
    ap.add_argument("--factory-regional", default=None, help="override choose_factory")
    ap.add_argument("--prefer-hnsw", action="store_true", help="choose_factory(prefer_hnsw=True)")
    ap.add_argument("--queries", type=int, default=500, help="held-out queries (tune set and test set each)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--train-per-list", type=int, default=40, help="IVF training points per list")
    ap.add_argument("--points-per-cluster", type=int, default=100)
    ap.add_argument("--regions-per-image", type=int, default=5)
    ap.add_argument("--single-queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="directory for the memory-mapped corpus (n*d*4 bytes: "
                    "2 GB global, 2.5 GB regional) and the temporary serialised index; system temp by default")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_global //= 10
        args.n_regional //= 10
    faiss.omp_set_num_threads(args.threads)
    t_start = time.perf_counter()

    results = {}
    if args.only in (None, "global"):
        results["global"] = bench_corpus("global", args.n_global, args.d_global, args)
    if args.only in (None, "regional"):
        results["regional"] = bench_corpus("regional", args.n_regional, args.d_regional, args)

    print(f"\nFAISS {faiss.__version__}, {args.threads} threads, GPUs seen: {fi.num_gpus()}, "
          f"total wall time {time.perf_counter() - t_start:.0f} s, peak RSS {peak_rss_gb():.2f} GiB "
          f"(includes touched pages of the memory-mapped data)")
    for label, rows in results.items():
        w = max(len(r[0]) for r in rows)
        print(f"\n== {label} ==")
        print(f"| {'metric'.ljust(w)} | value |")
        print(f"|{'-' * (w + 2)}|-------|")
        for name, val in rows:
            print(f"| {name.ljust(w)} | {val} |")


if __name__ == "__main__":
    main()
