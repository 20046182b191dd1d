"""Benchmark sharded FAISS index builds and search at R1M scale on synthetic clustered descriptors.

    python -m experiments.bench_faiss [--config none] [--n-global 1000000 --d-global 512 --n-regional 5000000
                                       --d-regional 128] [--budget-gb 16] [--quick]

For the global (one vector per image) and regional (several per image) corpora: synthetic clustered,
L2-normalised descriptors generated in chunks (landmark-like: Zipf-sized clusters nested in super-clusters,
plus 10% unclustered distractors); the index the ``faiss`` stage would build for them, with the index config's
``faiss`` section (by default the package defaults: a 16 GB budget; ``--config configs/benchmark.yaml`` for the
benchmark's): the factory (``faiss.factory`` or ``choose_factory`` with ``faiss.memory_budget_gb`` and
``faiss.flat_max_vectors``), trained on a sample of ``faiss.train_sample`` rows (``--train-per-list`` instead
gives an IVF that many points per list), added in shards (``add_shard`` on the serialised trained index) and
merged (``merge_indexes``); bytes per vector (serialised size) vs the memory model; recall@k against exact
search computed by numpy brute force in blocks, at the default parameters and at the ``nprobe``/``efSearch``
that ``tune`` picks on a separate held-out query set; query latency p50/p99 for single queries and batches,
with the exact brute-force search (``faiss.knn``) on the same data as the reference; peak RSS.
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
import sys
import tempfile
import time
from dataclasses import dataclass

import faiss
import numpy as np

from experiments.common import add_config_args, config_from_args, write_json
from pipeline import faiss_index as fi
from pipeline.faiss_index import FaissConfig
from pipeline.faiss_tuning import recall_at_k, tunable_parameter, tune

CHUNK = 100_000
Rows = list[tuple[str, str]]


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


def ivf_nlist_of(factory: str, d: int) -> int | None:
    """Number of IVF lists of ``factory`` (None when it is not an IVF index)."""
    try:
        return int(faiss.extract_index_ivf(faiss.index_factory(d, factory, fi.METRIC_IP)).nlist)
    except RuntimeError:
        return None


def choose(label: str, n: int, d: int, fc: FaissConfig, args: argparse.Namespace) -> str:
    """The factory of one corpus: a command-line override, the config's ``faiss.factory``, or the stage's rule."""
    override = args.factory_global if label == "global" else args.factory_regional
    return override or fc.factory or fi.choose_factory(n, d, fc.memory_budget_gb * (1 << 30),
                                                       flat_max_n=fc.flat_max_vectors,
                                                       prefer_hnsw=args.prefer_hnsw)


def train_size(n: int, d: int, factory: str, fc: FaissConfig, per_list: int | None) -> int:
    """Training rows: ``faiss.train_sample`` as the stage takes, or ``per_list`` points per IVF list."""
    nlist = ivf_nlist_of(factory, d)
    if per_list and nlist:
        return min(n, per_list * nlist)
    return min(n, fc.train_sample)


def build(X: np.ndarray, factory: str, n_train: int, shards: int) -> tuple[faiss.Index, dict]:
    """Train on a sample, add in shards from the serialised trained index (as workers do), merge (HNSW
    graphs do not merge, so HNSW shards go into one index one after another). Timings in the dict."""
    n, d = X.shape
    ids = np.arange(n, dtype=np.int64)
    sample = np.ascontiguousarray(X[np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))])
    t0 = time.perf_counter()
    blob = fi.serialize(fi.train_index(factory, sample, d))
    t_train = time.perf_counter() - t0
    del sample
    print(f"  trained on {n_train:,} in {t_train:.1f}s", flush=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    parts = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    hnsw = (tunable_parameter(fi.deserialize(blob)) or ("",))[0] == "efSearch"
    t0 = time.perf_counter()
    if hnsw:
        index = fi.deserialize(blob)
        for p in parts:
            fi.add_shard(index, X[p], ids[p])
        added = []
    else:
        added = [fi.add_shard(blob, X[p], ids[p]) for p in parts]
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not hnsw:
        index = fi.merge_indexes(added, consume=True)
    t_merge = time.perf_counter() - t0
    del added, blob
    gc.collect()
    assert index.ntotal == n, (index.ntotal, n)
    print(f"  added {shards} shards in {t_add:.1f}s, merged in {t_merge:.1f}s, peak RSS {peak_rss_gb():.2f} GiB",
          flush=True)
    return index, {"train": t_train, "add": t_add, "merge": t_merge}


def serialised_bytes(index: faiss.Index, folder: str) -> int:
    path = os.path.join(folder, "index.faiss")
    faiss.write_index(index, path)
    nbytes = os.path.getsize(path)
    os.remove(path)
    return nbytes


def measure_search(index: faiss.Index, Q_tune: np.ndarray, Q_test: np.ndarray, gt_tune: np.ndarray,
                   gt_test: np.ndarray, args: argparse.Namespace) -> dict:
    """Recall and latencies at the default parameters, then tuned on the tune set and measured on the test
    set, plus the recall of the cheapest setting (how hard the data is)."""
    k, n_single = args.k, min(args.single_queries, len(Q_test))
    m: dict = {"default_params": fi.default_search_params(index)}
    fi.set_search_params(index, **m["default_params"])
    m["rec_default"] = recall_at_k(index.search(Q_test, k)[1], gt_test, k)
    m["lat1_def"] = time_single(index.search, Q_test, k, n_single)
    m["latb_def"] = time_batched(index.search, Q_test, k, args.batch)
    print(f"  default {m['default_params']}: recall@{k} {m['rec_default']:.4f}, batch=1 p50 "
          f"{pct(m['lat1_def'], 50):.2f} ms", flush=True)
    t0 = time.perf_counter()
    m["tuned"] = tune(index, Q_tune, gt_tune, k, target_recall=args.target_recall)
    m["t_tune"] = time.perf_counter() - t0
    m["rec_tuned"] = recall_at_k(index.search(Q_test, k)[1], gt_test, k)
    print(f"  tune curve (value, recall, ms/query): "
          f"{[(v, round(r, 4), round(t, 3)) for v, r, t in m['tuned']['curve']]}", flush=True)
    hard = tunable_parameter(index)
    m["rec_min"] = None
    if hard is not None:
        cur = m["tuned"].get(m["tuned"]["param"])
        fi.set_search_params(index, **{hard[0]: hard[1][0]})
        m["rec_min"] = (hard[0], hard[1][0], recall_at_k(index.search(Q_test, k)[1], gt_test, k))
        fi.set_search_params(index, **{hard[0]: cur})
    m["lat1"] = time_single(index.search, Q_test, k, n_single)
    m["latb"] = time_batched(index.search, Q_test, k, args.batch)
    m["n_single"] = n_single
    return m


def exact_reference(X: np.ndarray, Q_test: np.ndarray, gt_test: np.ndarray, n_single: int,
                    args: argparse.Namespace) -> dict:
    """Exact brute force with FAISS on the same (memory-mapped) rows; its result must agree with the numpy
    ground truth (recall ~1.0 up to float ties): a check of the ground truth itself."""
    def exact(Qb: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(np.ascontiguousarray(Qb), X, kk, metric=faiss.METRIC_INNER_PRODUCT)

    n_chk = min(len(Q_test), args.batch * 2)
    return {"ref1": time_single(exact, Q_test, args.k, max(5, n_single // 10)),
            "refb": time_batched(exact, Q_test[:args.batch * 2], args.k, args.batch), "n_chk": n_chk,
            "rec_exact": recall_at_k(exact(Q_test[:n_chk], args.k)[1], gt_test[:n_chk], args.k)}


def regional_latency(index: faiss.Index, Q_test: np.ndarray, default_params: dict, args: argparse.Namespace,
                     n: int) -> tuple[str, str]:
    """Regional search (top k images from 10 k regions, max-pooled per image) at the default parameters."""
    fi.set_search_params(index, **default_params)
    region_to_image = np.arange(n, dtype=np.int64) // args.regions_per_image
    t = []
    for i in range(min(50, len(Q_test))):
        t0 = time.perf_counter()
        fi.regional_search(index, Q_test[i:i + 1], args.k, region_to_image, k_regions=10 * args.k)
        t.append((time.perf_counter() - t0) * 1e3)
    return (f"regional_search k={args.k} images (k_regions={10 * args.k}, default) p50 / p99",
            f"{pct(t, 50):.2f} / {pct(t, 99):.2f} ms")


def report_rows(c: dict, m: dict, r: dict, args: argparse.Namespace) -> Rows:
    """The README-ready rows of one corpus (``c``: corpus facts, ``m``: search, ``r``: exact reference)."""
    k, b, ns = args.k, args.batch, m["n_single"]
    tuned = m["tuned"]
    params = ", ".join(f"{kk}={v}" for kk, v in m["default_params"].items()) or "exact"
    tuned_s = f"{tuned['param']}={tuned.get(tuned['param'])}" if tuned["param"] else "exact"
    t = c["times"]
    rows = [("factory", c["factory"]), ("vectors x dim", f"{c['n']:,} x {c['d']}"),
            ("data: clusters / distractors", f"{c['clusters']:,} Zipf clusters / {c['distractor_frac']:.0%}"),
            ("data: mean cos to 1st / 100th true neighbour", c["cos"]),
            ("train sample / time", f"{c['n_train']:,} / {t['train']:.1f} s"),
            (f"add {args.shards} shards / merge", f"{t['add']:.1f} s / {t['merge']:.1f} s"),
            ("build total (train+add+merge)", f"{t['train'] + t['add'] + t['merge']:.1f} s"),
            ("bytes/vector (serialised)", f"{c['nbytes'] / c['n']:.1f} (model {c['model_bytes'] / c['n']:.1f})"),
            ("index size", f"{c['nbytes'] / (1 << 30):.2f} GiB"),
            (f"recall@{k} DEFAULT ({params})", f"{m['rec_default']:.4f}"),
            (f"latency batch=1 p50 / p99 (default, {ns} q)",
             f"{pct(m['lat1_def'], 50):.2f} / {pct(m['lat1_def'], 99):.2f} ms"),
            (f"latency batch={b} p50 / p99 (default)", f"{pct(m['latb_def'], 50):.1f} / {pct(m['latb_def'], 99):.1f}"
             f" ms ({pct(m['latb_def'], 50) / b:.3f} ms/query)"),
            (f"recall@{k} tuned ({tuned_s}, target {args.target_recall})",
             f"{m['rec_tuned']:.4f} (tune set {tuned['recall']:.4f}, {m['t_tune']:.1f} s)"),
            (f"latency batch=1 p50 / p99 (tuned, {ns} q)", f"{pct(m['lat1'], 50):.2f} / {pct(m['lat1'], 99):.2f} ms"),
            (f"latency batch={b} p50 / p99 (tuned)",
             f"{pct(m['latb'], 50):.1f} / {pct(m['latb'], 99):.1f} ms ({pct(m['latb'], 50) / b:.3f} ms/query)")]
    if m["rec_min"] is not None:
        rows.append((f"recall@{k} at {m['rec_min'][0]}={m['rec_min'][1]} (difficulty check)", f"{m['rec_min'][2]:.4f}"))
    return rows + [
        (f"recall@{k} exact faiss.knn vs numpy ground truth ({r['n_chk']} q)", f"{r['rec_exact']:.4f} (sanity: ~1.0)"),
        ("exact faiss.knn batch=1 p50 (reference)",
         f"{pct(r['ref1'], 50):.2f} ms -> speed-up x{pct(r['ref1'], 50) / pct(m['lat1'], 50):.1f} (tuned)"),
        (f"exact faiss.knn batch={b} p50 (reference)",
         f"{pct(r['refb'], 50):.1f} ms -> speed-up x{pct(r['refb'], 50) / pct(m['latb'], 50):.1f} (tuned)")]


def bench_corpus(label: str, n: int, d: int, fc: FaissConfig, args: argparse.Namespace) -> Rows:
    """Benchmark one corpus; the data lives in a memory-mapped .npy under ``args.tmp`` for the whole run."""
    with tempfile.TemporaryDirectory(prefix=f"bench_faiss_{label}_", dir=args.tmp) as td:
        return _bench_corpus(label, n, d, fc, args, td)


def _bench_corpus(label: str, n: int, d: int, fc: FaissConfig, args: argparse.Namespace, td: str) -> Rows:
    factory = choose(label, n, d, fc, args)
    gen = ClusteredGenerator(d=d, n_clusters=max(100, n // args.points_per_cluster),
                             seed=7 if label == "global" else 11)
    print(f"\n[{label}] n={n:,} d={d} factory={factory}", flush=True)
    t0 = time.perf_counter()
    X = gen.rows(0, n, path=os.path.join(td, "X.npy"))  # n*d*4 bytes, memory-mapped for the whole run
    Q_tune, Q_test = gen.rows(1, args.queries), gen.rows(2, args.queries)
    t_gen = time.perf_counter() - t0
    print(f"  generated in {t_gen:.1f}s ({X.nbytes / (1 << 30):.2f} GiB memory-mapped in {td}), "
          f"peak RSS {peak_rss_gb():.2f} GiB", flush=True)
    t0 = time.perf_counter()  # exact ground truth (numpy brute force in blocks), tune + test queries in one pass
    gt_D, gt = fi.brute_force_knn(X, np.vstack([Q_tune, Q_test]), args.k, block=32768)
    t_gt = time.perf_counter() - t0
    print(f"  ground truth in {t_gt:.1f}s", flush=True)
    n_train = train_size(n, d, factory, fc, args.train_per_list)
    index, times = build(X, factory, n_train, args.shards)
    test_D = gt_D[args.queries:]
    corpus = {"factory": factory, "n": n, "d": d, "clusters": gen.n_clusters, "distractor_frac": gen.distractor_frac,
              "cos": f"{test_D[:, 0].mean():.3f} / {test_D[:, -1].mean():.3f}", "n_train": n_train, "times": times,
              "nbytes": serialised_bytes(index, td), "model_bytes": fi.estimate_bytes(factory, n, d)}
    m = measure_search(index, Q_tune, Q_test, gt[:args.queries], gt[args.queries:], args)
    rows = report_rows(corpus, m, exact_reference(X, Q_test, gt[args.queries:], m["n_single"], args), args)
    if label == "regional":
        rows.append(regional_latency(index, Q_test, m["default_params"], args, n))
    rows.append(("generation / ground truth time", f"{t_gen:.1f} s / {t_gt:.1f} s"))
    rows.append(("peak RSS (process so far)", f"{peak_rss_gb():.2f} GiB (budget {fc.memory_budget_gb:g} GiB)"))
    del index, X
    gc.collect()
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default=None)
    ap.add_argument("--n-global", type=int, default=1_000_000)
    ap.add_argument("--d-global", type=int, default=512)
    ap.add_argument("--n-regional", type=int, default=5_000_000)
    ap.add_argument("--d-regional", type=int, default=128)
    ap.add_argument("--budget-gb", type=float, default=None, help="sets faiss.memory_budget_gb")
    ap.add_argument("--quick", action="store_true", help="1/10 of the corpus sizes")
    ap.add_argument("--only", choices=["global", "regional"], default=None)
    ap.add_argument("--factory-global", default=None, help="override the factory of the global corpus")
    ap.add_argument("--factory-regional", default=None, help="override the factory of the regional corpus")
    ap.add_argument("--prefer-hnsw", action="store_true", help="choose_factory(prefer_hnsw=True)")
    ap.add_argument("--queries", type=int, default=500, help="held-out queries (tune set and test set each)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--train-per-list", type=int, default=None,
                    help="IVF training points per list instead of faiss.train_sample (the README's runs: 40)")
    ap.add_argument("--points-per-cluster", type=int, default=100)
    ap.add_argument("--regions-per-image", type=int, default=5)
    ap.add_argument("--single-queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="directory for the memory-mapped corpus (n*d*4 bytes: "
                    "2 GB global, 2.5 GB regional) and the temporary serialised index; system temp by default")
    ap.add_argument("--json", default=None, help="write the tables as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fc = config_from_args(args, faiss__memory_budget_gb=args.budget_gb).faiss
    if args.quick:
        args.n_global //= 10
        args.n_regional //= 10
    faiss.omp_set_num_threads(args.threads)
    t_start = time.perf_counter()
    results = {}
    for label, n, d in (("global", args.n_global, args.d_global), ("regional", args.n_regional, args.d_regional)):
        if args.only in (None, label):
            results[label] = bench_corpus(label, n, d, fc, args)
    print(f"\nFAISS {faiss.__version__}, {args.threads} threads, GPUs seen: {fi.num_gpus()}, "
          f"total wall time {time.perf_counter() - t_start:.0f} s, peak RSS {peak_rss_gb():.2f} GiB "
          f"(includes touched pages of the memory-mapped data)")
    for label, rows in results.items():
        w = max(len(r[0]) for r in rows)
        print(f"\n== {label} ==\n| {'metric'.ljust(w)} | value |\n|{'-' * (w + 2)}|-------|")
        for name, val in rows:
            print(f"| {name.ljust(w)} | {val} |")
    write_json(args.json, {label: dict(rows) for label, rows in results.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
