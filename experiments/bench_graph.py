"""Benchmark of the offline object-discovery graph at corpus scale (seed 001 §3.6-3.7).

    python -m experiments.bench_graph --n 1000000 --dim 128         # full run (~1M regions)
    python -m experiments.bench_graph --n 100000                    # quick mode

Generates ``n`` synthetic L2-normalised float32 region descriptors (clusters of varying spread, like the
regions of one object seen in many images, plus a fraction of unclustered "background" regions), then times
each offline step with its peak resident memory:

1. ``index``:   FAISS index chosen by size (``pipeline.knn_graph.choose_index_factory``), trained and filled
2. ``search``:  k+1 nearest neighbours of every region (IVF, ``nprobe``), plus the recall@k of that search
                against exact search for a random sample of queries (``--recall-queries``)
3. ``mutual``:  mutual k-NN filtering and weights ``max(v.v',0)^beta`` (scipy.sparse)
4. ``normalize``: ``D^-1/2 W D^-1/2``
5. ``katz``:    conjugate gradients for ``(I - alpha Wn) g = (1 - alpha) 1``; iterations and residual

``k``, ``beta`` (``graph`` section) and ``alpha``, the CG tolerance and budget (``katz`` section) come from the
index config: by default the package defaults (k = 50, beta = 3, alpha = 0.99, tol 1e-6: the README's
table); ``--config configs/benchmark.yaml`` measures the benchmark's (k = 30), ``--set graph.k=..`` any other.
The same steps are first run on a smaller collection (``--growth-from``, default n/10) and the script prints
the measured growth law per step, ``cost ~ n^p`` with ``p = log(t_n / t_small) / log(n / n_small)``, and the
speed-up of the IVF search over exact search (exact time measured on the recall sample, extrapolated
linearly in the number of queries), and (``--nprobe-sweep``) the recall and extrapolated search time of other
``nprobe`` values, measured on the recall sample with the same index. ``--ray`` runs search and Katz through
``actors.graph`` on a local Ray.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
import psutil

from actors.common import init_ray
from actors.graph import build_knn_graph_ray, katz_centrality_ray
from experiments.common import add_config_args, config_from_args, write_json
from pipeline.config import IndexConfig
from pipeline.katz import katz_centrality
from pipeline.knn_graph import (DEFAULT_EXACT_THRESHOLD, DEFAULT_NPROBE, build_knn_index, choose_index_factory,
                                default_nlist, knn_search, mutual_knn_graph, normalize_graph, set_nprobe)

GB = 1024 ** 3


class PeakRSS:
    """Samples this process's RSS in a background thread; ``peak`` since the last ``reset``. ``base`` is the
    RSS before the run: the imported libraries (torch alone is ~0.7 GB, pulled in by the config's modules)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.proc = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = self.base = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = self.proc.memory_info().rss

    def stop(self) -> None:
        self._stop.set()


@contextmanager
def step(name: str, results: dict, mem: PeakRSS):
    """Wall time, CPU time and peak RSS of the block, stored under ``name``."""
    mem.reset()
    t0 = time.perf_counter()
    c0 = time.process_time()
    yield
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = max(mem.peak, mem.proc.memory_info().rss)
    results[name] = dt
    results.setdefault("cpu", {})[name] = cpu
    results.setdefault("peak", {})[name] = peak
    results["base_rss"] = mem.base
    print(f"  {name:<10s} {dt:9.2f} s wall  {cpu:9.2f} s CPU   peak RSS {peak / GB:6.2f} GB "
          f"(+{(peak - mem.base) / GB:.2f} over the start)  "
          f"(process max {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:6.2f} GB)", flush=True)


def synthetic_regions(n: int, dim: int, n_clusters: int, noise_frac: float, seed: int = 0,
                      chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised float32 descriptors and their cluster label (-1 = unclustered noise).

    Cluster ``c`` has a random unit centre and spread ``s_c`` in [0.4, 1.0]; a member is
    ``centre + s_c * N(0, I/dim)`` normalised (cosine to its centre ~ 1/sqrt(1 + s_c^2)). Cluster sizes are
    multinomial (some objects appear more often than others).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.4, 1.0, n_clusters).astype(np.float32)
    popularity = rng.gamma(1.0, 1.0, n_clusters)
    labels = rng.choice(n_clusters, size=n, p=popularity / popularity.sum()).astype(np.int64)
    labels[rng.random(n) < noise_frac] = -1
    X = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        lab = labels[a:b]
        noise = rng.standard_normal((b - a, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        member = lab >= 0
        x = noise.copy()
        x[member] = centres[lab[member]] + spread[lab[member], None] * noise[member]
        X[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return X, labels


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, rows: np.ndarray, k: int,
                exact_sims: np.ndarray | None = None, beta: float = 3.0) -> float:
    """Mean |approx ∩ exact| / k over the sampled rows, self matches removed from both lists.

    With ``exact_sims`` the recall is weighted by the edge weight ``max(s, 0)^beta`` of each exact neighbour
    (the share of the graph's would-be weight that the approximate search finds).
    """
    if len(rows) == 0:
        return float("nan")
    n = int(max(approx_ids.max(), exact_ids.max())) + 1

    def keep_mask(ids: np.ndarray) -> np.ndarray:
        keep = (ids >= 0) & (ids != rows[:, None])
        return keep & (np.cumsum(keep, axis=1) <= k)  # first k non-self neighbours of each row

    ka, ke = keep_mask(approx_ids), keep_mask(exact_ids)
    found = np.isin((rows[:, None] * n + exact_ids)[ke], (rows[:, None] * n + approx_ids)[ka])
    if exact_sims is None:
        return float(found.sum() / (len(rows) * k))
    w = np.maximum(exact_sims[ke].astype(np.float64), 0) ** beta
    return float((w * found).sum() / max(w.sum(), 1e-30))


@dataclass
class Setup:
    """One run's parameters: the config's graph / Katz sections plus the benchmark's own knobs."""

    cfg: IndexConfig
    dim: int
    nprobe: int
    noise_frac: float
    recall_queries: int
    use_ray: bool
    seed: int
    exact_threshold: int
    sweep: tuple[int, ...] = ()

    @property
    def k(self) -> int:
        return self.cfg.graph.k

    @property
    def beta(self) -> float:
        return self.cfg.graph.beta


def build_graph(X: np.ndarray, s: Setup, nl: int, res: dict, mem: PeakRSS):
    """Index + search + mutual k-NN (single process, or Ray blocks with ``--ray``): (W, sims, ids, index)."""
    n, k = len(X), s.k
    if s.use_ray:
        init_ray(num_cpus=faiss.omp_get_max_threads())
        with step("index+search+mutual (ray)", res, mem):
            W, sims, ids = build_knn_graph_ray(X, k=k, beta=s.beta, block_rows=s.cfg.graph.block_rows,
                                               num_workers=2, num_cpus=1, nlist=nl, nprobe=s.nprobe,
                                               return_knn=True, exact_threshold=s.exact_threshold)
        return W, sims, ids, None
    with step("index", res, mem):
        index = build_knn_index(X, exact_threshold=s.exact_threshold, nlist=nl, nprobe=s.nprobe)
    with step("search", res, mem):
        sims, ids = knn_search(X, None, k + 1, index=index)
    with step("mutual", res, mem):
        W = mutual_knn_graph(ids, sims, beta=s.beta, n=n, k=k)
    return W, sims, ids, index


def measure_recall(X: np.ndarray, labels: np.ndarray, ids: np.ndarray, index, s: Setup, nl: int, res: dict) -> None:
    """Recall@k of the graph's search against exact search on a sample of rows, and the ``nprobe`` sweep."""
    n, k, beta = len(X), s.k, s.beta
    rows = np.sort(np.random.default_rng(s.seed + 1).choice(n, min(s.recall_queries, n), replace=False))
    flat = faiss.IndexFlatIP(X.shape[1])
    flat.add(X)
    t0 = time.perf_counter()
    exact_sims, exact_ids = flat.search(X[rows], k + 1)
    t_exact_sample = time.perf_counter() - t0
    del flat
    exact_ids = exact_ids.astype(np.int64)
    cl = labels[rows] >= 0
    res["recall"] = recall_at_k(ids[rows], exact_ids, rows, k)
    res["recall_clustered"] = recall_at_k(ids[rows][cl], exact_ids[cl], rows[cl], k)
    res["recall_noise"] = recall_at_k(ids[rows][~cl], exact_ids[~cl], rows[~cl], k)
    res["recall_weighted"] = recall_at_k(ids[rows], exact_ids, rows, k, exact_sims, beta)
    res["exact_search_extrapolated"] = t_exact_sample * n / len(rows)
    if index is None or not s.sweep or choose_index_factory(n, s.exact_threshold, nlist=nl) == "Flat":
        return
    res["sweep"] = []  # recall / time trade-off of nprobe, measured on the sample (time extrapolated to all n)
    for p in s.sweep:
        set_nprobe(index, p)
        t0, c0 = time.perf_counter(), time.process_time()
        _, i_p = index.search(X[rows], k + 1)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        i_p = i_p.astype(np.int64)
        res["sweep"].append((p, recall_at_k(i_p, exact_ids, rows, k),
                             recall_at_k(i_p[cl], exact_ids[cl], rows[cl], k),
                             recall_at_k(i_p, exact_ids, rows, k, exact_sims, beta),
                             dt * n / len(rows), dc * n / len(rows)))
    set_nprobe(index, s.nprobe)


def centrality(W, s: Setup, res: dict, mem: PeakRSS) -> tuple[np.ndarray, dict]:
    """Normalise the graph and solve Katz (in process, or over Ray row blocks with ``--ray``)."""
    kc = s.cfg.katz
    with step("normalize", res, mem):
        Wn = normalize_graph(W)
    if s.use_ray:
        with step("katz (ray)", res, mem):
            return katz_centrality_ray(Wn, alpha=kc.alpha, n_blocks=2, tol=kc.tol, maxiter=kc.maxiter,
                                       num_cpus=0.5)
    with step("katz", res, mem):
        return katz_centrality(Wn, alpha=kc.alpha, tol=kc.tol, maxiter=kc.maxiter)


def run(n: int, s: Setup, nlist: int | None, clusters: int | None) -> dict:
    """Every step on ``n`` synthetic regions; wall / CPU / peak RSS per step, recall, CG and centralities."""
    mem = PeakRSS()
    res: dict = {"n": n}
    n_clusters = clusters or max(1, n // 50)
    nl = nlist or default_nlist(n)
    print(f"\n== n = {n:,}  dim = {s.dim}  k = {s.k}  beta = {s.beta:g}  alpha = {s.cfg.katz.alpha:g}  clusters = "
          f"{n_clusters:,}  noise = {s.noise_frac:.0%}  index = {choose_index_factory(n, s.exact_threshold, nlist=nl)}"
          f"  nprobe = {s.nprobe}", flush=True)
    with step("generate", res, mem):
        X, labels = synthetic_regions(n, s.dim, n_clusters, s.noise_frac, s.seed)
    W, sims, ids, index = build_graph(X, s, nl, res, mem)
    measure_recall(X, labels, ids, index, s, nl, res)
    del sims, ids, index
    deg = np.diff(W.indptr)
    g, info = centrality(W, s, res, mem)
    mem.stop()
    res.update(nnz=int(W.nnz), isolated=float((deg == 0).mean()), mean_degree=float(deg.mean()),
               cg_iterations=info["iterations"], cg_residual=info["residual"], cg_converged=info["converged"],
               g_clustered=float(np.median(g[labels >= 0])) if (labels >= 0).any() else float("nan"),
               g_noise=float(np.median(g[labels < 0])) if (labels < 0).any() else float("nan"))
    print_run(res, s)
    return res


def print_run(res: dict, s: Setup) -> None:
    n, k = res["n"], s.k
    print(f"  recall@{k} vs exact search ({min(s.recall_queries, n)} queries): {res['recall']:.4f} (clustered "
          f"queries {res['recall_clustered']:.4f}, noise queries {res['recall_noise']:.4f}; weighted by edge weight "
          f"s^beta {res['recall_weighted']:.4f});  exact search of all {n:,} queries would take "
          f"~{res['exact_search_extrapolated']:.0f} s")
    for p, r, rc, rw, t, c in res.get("sweep", []):
        print(f"  nprobe {p:4d}: recall@{k} {r:.4f} (clustered {rc:.4f}, weighted {rw:.4f});  search of all "
              f"{n:,} queries extrapolated from the sample: ~{t:.0f} s wall, ~{c:.0f} s CPU")
    print(f"  graph: nnz = {res['nnz']:,} (mean degree {res['mean_degree']:.1f}, isolated "
          f"{res['isolated']:.1%});  CG: {res['cg_iterations']} iterations, relative residual "
          f"{res['cg_residual']:.2e}, converged = {res['cg_converged']}")
    print(f"  median centrality: clustered regions {res['g_clustered']:.3f}, unclustered noise "
          f"{res['g_noise']:.3f}", flush=True)


STEP_EXCLUDE = ("n", "base_rss", "isolated", "mean_degree", "cg_residual", "g_clustered", "g_noise",
                "exact_search_extrapolated")


def timed_steps(big: dict) -> list[str]:
    return [s for s in big if isinstance(big[s], float) and s not in STEP_EXCLUDE and not s.startswith("recall")]


def print_growth(big: dict, small: dict) -> None:
    """Growth law ``cost ~ n^p`` per step between the small and the big run."""
    ratio = big["n"] / small["n"]
    print(f"   growth law from n = {small['n']:,} to {big['n']:,} (x{ratio:g}): cost ~ n^p "
          f"(p from CPU time, which other processes on a shared machine disturb less than wall time)")
    for s in timed_steps(big):
        if s in small and small[s] > 0 and small["cpu"].get(s, 0) > 0:
            p_wall = np.log(big[s] / small[s]) / np.log(ratio)
            c_small, c_big = small["cpu"][s], big["cpu"][s]
            p = np.log(c_big / c_small) / np.log(ratio) if c_big > 0 else float("nan")
            print(f"     {s:<26s} wall {small[s]:8.2f} s -> {big[s]:8.2f} s (p = {p_wall:.2f});  "
                  f"CPU {c_small:8.2f} s -> {c_big:8.2f} s (x{c_big / c_small:6.1f}, p = {p:.2f})")
    print(f"     CG iterations {small['cg_iterations']} -> {big['cg_iterations']}")


def print_summary(big: dict, small: dict | None, k: int) -> None:
    """Totals, growth law and the README-ready markdown tables."""
    n = big["n"]
    steps = timed_steps(big)
    total = sum(big[s] for s in steps if s != "generate")
    print(f"\n== summary: n = {n:,}: graph + centrality total {total:.1f} s (excluding data generation)")
    key = "search" if "search" in big else "index+search+mutual (ray)"
    print(f"   IVF search vs exact search (extrapolated): {big['exact_search_extrapolated'] / big[key]:.1f}x "
          f"faster at recall@{k} = {big['recall']:.3f} (weighted {big['recall_weighted']:.3f})")
    if small:
        print_growth(big, small)
    print(f"\n| step | wall n={small['n'] if small else 0:,} | wall n={n:,} | CPU n={n:,} | "
          f"peak RSS n={n:,} (over the start: {big['base_rss'] / GB:.2f} GB of imports) | growth p (CPU) |"
          f"\n|---|---|---|---|---|---|")
    for s in steps:
        p = ""
        if small and small.get(s, 0) > 0 and small["cpu"].get(s, 0) > 0 and big["cpu"].get(s, 0) > 0:
            p = f"{np.log(big['cpu'][s] / small['cpu'][s]) / np.log(n / small['n']):.2f}"
        w_small = f"{small[s]:.2f} s" if small and s in small else ""
        peak = big["peak"][s]
        print(f"| {s} | {w_small} | {big[s]:.2f} s | {big['cpu'][s]:.2f} s | {peak / GB:.2f} GB "
              f"(+{(peak - big['base_rss']) / GB:.2f}) | {p} |")
    print(f"\nrecall@{k} = {big['recall']:.3f} (weighted {big['recall_weighted']:.3f}); CG "
          f"{big['cg_iterations']} iterations, relative residual {big['cg_residual']:.2e}; process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB", flush=True)
    if big.get("sweep"):
        print(f"\n| nprobe | recall@{k} | clustered queries | weighted by s^beta | search CPU (extrapolated) |"
              f"\n|---|---|---|---|---|")
        for p, r, rc, rw, _t, c in big["sweep"]:
            print(f"| {p} | {r:.3f} | {rc:.3f} | {rw:.3f} | {c:.0f} s |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default=None)
    ap.add_argument("--n", type=int, default=100_000, help="number of regions (1000000 for the full run)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=None, help="sets graph.k")
    ap.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE)
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n), power of two)")
    ap.add_argument("--clusters", type=int, default=None, help="synthetic clusters (default n/50)")
    ap.add_argument("--noise-frac", type=float, default=0.2)
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--nprobe-sweep", type=int, nargs="*", default=[16, 32, 64, 128],
                    help="nprobe values whose recall and (extrapolated) search time are measured on the sample")
    ap.add_argument("--growth-from", type=int, default=None,
                    help="smaller n for the growth law (default n/10; 0 = skip)")
    ap.add_argument("--exact-threshold", type=int, default=None,
                    help="largest n searched exactly (default: below the growth-law run, so both runs use IVF)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="search and Katz through actors.graph on a local Ray")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write both runs' numbers as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args, graph__k=args.k)
    faiss.omp_set_num_threads(args.threads)
    small_n = args.n // 10 if args.growth_from is None else args.growth_from
    exact_threshold = args.exact_threshold
    if exact_threshold is None:  # same index family for both runs, so the growth law compares like with like
        exact_threshold = min(DEFAULT_EXACT_THRESHOLD, small_n - 1) if small_n else DEFAULT_EXACT_THRESHOLD
    s = Setup(cfg, args.dim, args.nprobe, args.noise_frac, args.recall_queries, args.ray, args.seed,
              exact_threshold, tuple(args.nprobe_sweep))
    small = None
    if small_n:
        clusters = None if args.clusters is None else max(1, args.clusters * small_n // args.n)
        small = run(small_n, s, nlist=None, clusters=clusters)
    big = run(args.n, s, nlist=args.nlist, clusters=args.clusters)
    print_summary(big, small, s.k)
    write_json(args.json, {"small": small, "big": big, "k": s.k, "beta": s.beta, "alpha": cfg.katz.alpha})
    return 0


if __name__ == "__main__":
    sys.exit(main())
