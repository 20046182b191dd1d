"""Ray side of the region graph: block-parallel k-NN search and distributed Katz centrality.

k-NN graph (:func:`build_knn_graph_ray`)
    The driver trains and fills one FAISS index (``pipeline.knn_graph.build_knn_index``, CPU), serialises it
    with ``faiss.serialize_index`` to a flat ``uint8`` numpy array and puts that array in the object store
    once; the descriptor shards are put once as well. Query blocks of ``block_rows`` rows run as Ray tasks
    (``num_cpus`` per task is configurable, fractional allowed; at most ``num_workers`` in flight). A worker
    deserialises the index the first time it sees it and keeps it cached for the following blocks, so the
    per-block cost is the search alone. The driver gathers the (n, k+1) neighbour lists and builds the
    mutual k-NN matrix with ``pipeline.knn_graph.mutual_knn_graph`` (O(n k) memory: 1M regions, k = 50 ->
    ~0.6 GB of lists).

Katz centrality (:func:`katz_centrality_ray`)
    ``Wn`` is split into ``n_blocks`` contiguous row blocks of about equal non-zeros, each held by a
    ``RowBlockActor``. Conjugate gradients runs on the driver (``pipeline.katz.katz_centrality_operator``);
    its only access to the graph is ``x -> Wn x``, computed as: put ``x`` once in the object store, every
    actor returns ``block @ x`` for its rows, the driver concatenates.
    * Memory per actor: its block's CSR, ``12 * nnz_b + 8 * (rows_b + 1)`` bytes (float64 data, int32
      indices, int64 indptr), plus one read-only copy of ``x`` per node (``8 n`` bytes, shared by the actors
      of that node through the object store) and its ``8 rows_b`` output. No actor ever holds all of ``Wn``,
      which is what lets the centrality scale past one node's memory; the driver holds only O(n) CG state
      (about five float64 n-vectors, 40 MB per million regions).
    * Traffic per CG iteration: one n-vector broadcast (``8 n`` bytes, transferred once per node) and one
      gather of ``n`` floats in total (``8 n`` bytes), i.e. O(n) bytes regardless of nnz; CG needs on the
      order of a few hundred iterations for alpha = 0.99 (see ``pipeline.katz``).
    Row blocks may be given directly (list of ``graph_to_arrays`` dicts of shape (rows_b, n)) so that a
    graph built shard-wise never has to exist on one machine.

This module never calls ``ray.init``: jobs connect (``ray.init(address=..., ignore_reinit_error=True)``),
tests start a local Ray.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Sequence

import faiss
import numpy as np
import pyarrow.compute as pc
import ray
import scipy.sparse as sp

from actors.whiten import load_whitenings
from pipeline.katz import KatzConfig, check_convergence, katz_centrality_checked, katz_centrality_operator
from pipeline.knn_graph import (DEFAULT_EXACT_THRESHOLD, DEFAULT_NPROBE, GraphConfig, build_knn_index,
                                graph_from_arrays, graph_to_arrays, mutual_knn_graph, normalize_graph, set_nprobe)
from storage.artefacts import save_graph_artefacts
from storage.schemas import descriptors_to_numpy
from storage.tables import TableStore, read_parquet

# worker-side cache: the most recently deserialised index, keyed by a per-build token
_INDEX_CACHE: dict[str, faiss.Index] = {}


def _cached_index(token: str, index_bytes: np.ndarray, nprobe: int) -> faiss.Index:
    index = _INDEX_CACHE.get(token)
    if index is None:
        _INDEX_CACHE.clear()
        index = faiss.deserialize_index(np.ascontiguousarray(index_bytes))
        set_nprobe(index, nprobe)
        _INDEX_CACHE[token] = index
    return index


@ray.remote
def _search_block(token: str, index_bytes: np.ndarray, shard: np.ndarray, start: int, stop: int, k: int,
                  nprobe: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """k-NN of rows ``start:stop`` of one descriptor shard against the shared index."""
    faiss.omp_set_num_threads(max(1, int(threads)))
    index = _cached_index(token, index_bytes, nprobe)
    sims, ids = index.search(np.ascontiguousarray(shard[start:stop], dtype=np.float32), k)
    return sims, ids.astype(np.int64, copy=False)


def build_knn_graph_ray(V: np.ndarray | Sequence[np.ndarray], k: int = 50, beta: float = 3.0,
                        block_rows: int = 20_000, num_workers: int = 2, num_cpus: float = 1.0,
                        exact_threshold: int = DEFAULT_EXACT_THRESHOLD, nlist: int | None = None,
                        nprobe: int = DEFAULT_NPROBE, return_knn: bool = False,
                        index: faiss.Index | None = None
                        ) -> sp.csr_matrix | tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Mutual k-NN graph ``W`` (n, n) of the rows of ``V`` (one array or a list of row shards, global row
    order = shard order), searched block-wise by Ray tasks. See the module docstring.

    ``num_cpus`` is the Ray CPU request per task (fractional allowed) and also sets the FAISS threads of the
    task (at least 1). With ``return_knn`` the raw ``(sims, ids)`` lists of ``k + 1`` neighbours are
    returned too (for recall measurements). ``index`` reuses an already built CPU index over exactly these
    rows (e.g. the one a job also stores for object saliency) instead of building one.
    """
    shards = [np.ascontiguousarray(V, dtype=np.float32)] if isinstance(V, np.ndarray) else \
        [np.ascontiguousarray(s, dtype=np.float32) for s in V]
    if index is None:
        index = build_knn_index(shards, exact_threshold=exact_threshold, nlist=nlist, nprobe=nprobe, use_gpu=False)
    elif index.ntotal != sum(s.shape[0] for s in shards):
        raise ValueError(f"index holds {index.ntotal} vectors, V has {sum(s.shape[0] for s in shards)} rows")
    n = int(index.ntotal)
    kk = int(min(k + 1, n))
    index_bytes = faiss.serialize_index(index)
    index_ref = ray.put(index_bytes)
    del index_bytes
    token = uuid.uuid4().hex

    sims = np.empty((n, kk), dtype=np.float32)
    ids = np.empty((n, kk), dtype=np.int64)
    jobs: list[tuple[object, int, int, int]] = []  # (shard ref, start, stop, global offset)
    offset = 0
    for shard in shards:
        ref = ray.put(shard)
        for start in range(0, shard.shape[0], block_rows):
            stop = min(start + block_rows, shard.shape[0])
            jobs.append((ref, start, stop, offset + start))
        offset += shard.shape[0]

    task = _search_block.options(num_cpus=num_cpus)
    threads = max(1, int(round(num_cpus)))
    pending: dict[object, tuple[int, int]] = {}
    it = iter(jobs)
    while True:
        while len(pending) < max(1, num_workers):
            job = next(it, None)
            if job is None:
                break
            ref, start, stop, goff = job
            pending[task.remote(token, index_ref, ref, start, stop, kk, nprobe, threads)] = (goff, stop - start)
        if not pending:
            break
        done, _ = ray.wait(list(pending), num_returns=1)
        for d in done:
            goff, rows = pending.pop(d)
            s, i = ray.get(d)
            sims[goff:goff + rows] = s
            ids[goff:goff + rows] = i
    W = mutual_knn_graph(ids, sims, beta=beta, n=n, k=k)
    return (W, sims, ids) if return_knn else W


@ray.remote
class RowBlockActor:
    """Holds rows ``[row0, row0 + rows)`` of ``Wn`` as CSR and multiplies them with broadcast vectors."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, shape: np.ndarray) -> None:
        self.block = graph_from_arrays({"indptr": indptr, "indices": indices, "data": data, "shape": shape})
        # own float64 arrays (object-store views are read-only; float64 avoids an upcast per product)
        self.block = self.block.astype(np.float64)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return self.block @ x

    def nbytes(self) -> int:
        b = self.block
        return int(b.data.nbytes + b.indices.nbytes + b.indptr.nbytes)


def split_rows_by_nnz(W: sp.csr_matrix, n_blocks: int) -> list[tuple[int, int]]:
    """Contiguous row ranges with about ``nnz / n_blocks`` non-zeros each (empty ranges dropped)."""
    n = W.shape[0]
    targets = np.linspace(0, W.nnz, n_blocks + 1)[1:-1]
    cuts = np.searchsorted(W.indptr, targets, side="left")
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 0, n), [n]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def row_blocks(W: sp.spmatrix, n_blocks: int) -> list[dict[str, np.ndarray]]:
    """Split ``W`` into row blocks as ``graph_to_arrays`` dicts of shape (rows_b, n)."""
    W = sp.csr_matrix(W)
    return [graph_to_arrays(W[a:b]) for a, b in split_rows_by_nnz(W, n_blocks)]


def katz_centrality_ray(Wn: sp.spmatrix | Sequence[dict[str, np.ndarray]], alpha: float = 0.99,
                        n_blocks: int = 2, tol: float = 1e-6, maxiter: int | None = 1000,
                        num_cpus: float = 0.5) -> tuple[np.ndarray, dict]:
    """Katz centrality with the matvec spread over ``n_blocks`` Ray actors (row blocks of ``Wn``).

    ``Wn`` is the normalised graph as CSR, or already as a list of row blocks (``graph_to_arrays`` dicts,
    in row order, each with ``shape = (rows_b, n)``). Same result as ``pipeline.katz.katz_centrality``.
    """
    blocks = row_blocks(Wn, n_blocks) if sp.issparse(Wn) else list(Wn)
    n = int(np.asarray(blocks[0]["shape"])[1])
    if sum(int(np.asarray(b["shape"])[0]) for b in blocks) != n:
        raise ValueError("row blocks do not cover a square matrix")
    actor_cls = RowBlockActor.options(num_cpus=num_cpus)
    actors = [actor_cls.remote(b["indptr"], b["indices"], b["data"], np.asarray(b["shape"])) for b in blocks]
    del blocks
    try:
        def matvec(x: np.ndarray) -> np.ndarray:
            x_ref = ray.put(np.ascontiguousarray(x, dtype=np.float64))
            return np.concatenate(ray.get([a.matvec.remote(x_ref) for a in actors]))

        g, info = katz_centrality_operator(matvec, n, alpha=alpha, tol=tol, maxiter=maxiter)
        info["n_blocks"] = len(actors)
        info["block_bytes"] = ray.get([a.nbytes.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    return g, info


# ------------------------------------------------------------------------------------------ the graph stage
def run_graph_stage(root: str, graph: GraphConfig, katz: KatzConfig, num_cpus: float = 1.0,
                    num_workers: int = 2) -> dict[str, Any]:
    """Region k-NN graph + Katz centrality over the whitened ``graph.source`` regions of the corpus; stores
    ``V``, ``f``, ``g``, the graph and a serialised FAISS index over ``V`` (object saliency and queries use it).
    Fails with a clear message when CG does not reach ``katz.tol`` within ``katz.maxiter`` iterations."""
    t0 = time.time()
    white = load_whitenings(root)["regions"]
    V_parts, ids, rids, sal = [], [], [], []
    for uri in TableStore(root).committed_files("regions", ["extract"]):
        t = read_parquet(uri)
        t = t.filter(pc.equal(t.column("source"), graph.source))
        if t.num_rows == 0:
            continue
        V_parts.append(white.apply(descriptors_to_numpy(t.column("descriptor"))).astype(np.float32))
        ids += t.column("image_id").to_pylist()
        rids.append(t.column("region_id").to_numpy())
        sal.append(t.column("saliency").to_numpy())
    if not V_parts:
        raise RuntimeError(f"graph: no '{graph.source}' regions found; enable that region source in extract")
    V = np.concatenate(V_parts)
    del V_parts
    f = np.concatenate(sal).astype(np.float32)
    n = len(V)
    t_knn = time.time()
    # one index over V: searched for the graph, then stored for object saliency and queries (built once)
    index = build_knn_index(V, exact_threshold=graph.exact_threshold, use_gpu=False)
    W = build_knn_graph_ray(V, k=graph.k, beta=graph.beta, block_rows=graph.block_rows, num_workers=num_workers,
                            num_cpus=num_cpus, exact_threshold=graph.exact_threshold, index=index)
    t_knn = time.time() - t_knn
    Wn = normalize_graph(W)
    t_katz = time.time()
    if n > katz.distributed_above:
        g, info = katz_centrality_ray(Wn, alpha=katz.alpha, n_blocks=max(2, num_workers), tol=katz.tol,
                                      maxiter=katz.maxiter)
        check_convergence(info, maxiter=katz.maxiter)
    else:  # raises with iterations, residual and the keys to change when CG stays above katz.tol
        g, info = katz_centrality_checked(Wn, alpha=katz.alpha, tol=katz.tol, maxiter=katz.maxiter,
                                          retries=katz.retries)
    t_katz = time.time() - t_katz
    g = np.asarray(g, np.float32)
    summary = {"regions": n, "edges": int(W.nnz), "k": graph.k, "beta": graph.beta, "alpha": katz.alpha,
               "cg_iterations": int(info.get("iterations", -1)), "cg_residual": float(info.get("residual", np.nan)),
               "knn_seconds": t_knn, "katz_seconds": t_katz, "seconds": time.time() - t0,
               "isolated_regions": int((np.diff(W.indptr) == 0).sum())}
    save_graph_artefacts(root, V, f, g, faiss.serialize_index(index), graph_to_arrays(W), ids,
                         np.concatenate(rids), summary)
    return summary
