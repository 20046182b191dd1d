"""Region k-NN search and the mutual k-NN graph of seed 001 §3.6 (ALGORITHMS.md §4).

The graph has one vertex per region descriptor ``v_i`` (L2-normalised rows of ``V``, float32) and an edge
``W_ij = max(v_i . v_j, 0)^beta`` iff ``i`` and ``j`` are *mutual* k-nearest neighbours (self excluded).
It is normalised symmetrically, ``Wn = D^-1/2 W D^-1/2`` (0/0 = 0), before Katz centrality
(:mod:`pipeline.katz`).

k-NN search uses FAISS with inner-product metric. The index type is chosen from the collection size by
:func:`choose_index_factory`: exact ``Flat`` up to ``exact_threshold`` vectors, ``IVF<nlist>,Flat``
(coarse k-means quantiser, exact inner products inside the probed lists, so the similarities returned are
the true ``v_i . v_j``) up to a few million, and ``IVF<nlist>_HNSW32,Flat`` beyond, where the flat coarse
quantiser would dominate the cost. ``nlist ~ 4 sqrt(n)`` (power of two) keeps list scans and quantiser cost
balanced; ``nprobe`` trades recall for time (``experiments.bench_graph`` measures the recall).
When FAISS sees GPUs the trained index is moved to all of them with ``faiss.index_cpu_to_all_gpus``.

Graphs are (de)serialised as plain CSR arrays (no pickle): :func:`graph_to_arrays` / :func:`graph_from_arrays`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import faiss
import numpy as np
import scipy.sparse as sp

DEFAULT_EXACT_THRESHOLD = 20_000
DEFAULT_NPROBE = 16
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39 training points per centroid

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class GraphConfig:
    """The region k-NN graph (seed 001 §3.6): which regions, ``k``, ``beta`` of ``s = max(v.u, 0)^beta``."""

    source: str = "fs_egm"              # regions that form the k-NN graph
    k: int = 50
    beta: float = 3.0
    exact_threshold: int = 200_000      # exact k-NN below this many regions, IVF above
    block_rows: int = 50_000            # query rows per Ray search task

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def default_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: the power of two nearest to ``4 sqrt(n)``, in [16, 65536], and
    small enough that every list gets FAISS's recommended 39 training points."""
    nlist = 2 ** int(round(np.log2(4.0 * np.sqrt(max(n, 1)))))
    cap = 2 ** int(np.floor(np.log2(max(n // 39, 16))))
    return int(np.clip(min(nlist, cap), 16, 65536))


def choose_index_factory(n: int, exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
                         nlist: int | None = None) -> str:
    """FAISS index-factory string for ``n`` database vectors (see module docstring for the rationale)."""
    if n <= exact_threshold:
        return "Flat"
    nlist = nlist or default_nlist(n)
    if n <= 4_000_000:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist}_HNSW32,Flat"


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set ``nprobe`` on an IVF index (CPU or GPU); a no-op for exact indexes."""
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    except RuntimeError:  # not an IVF index
        pass


def build_knn_index(V: np.ndarray | Sequence[np.ndarray], exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
                    nlist: int | None = None, nprobe: int = DEFAULT_NPROBE, use_gpu: bool | None = None,
                    train_size: int | None = None, kmeans_iters: int = 10, seed: int = 0) -> faiss.Index:
    """Build, train and fill an inner-product FAISS index over the rows of ``V`` (n, d).

    ``V`` may also be a list of row shards (added in order, never concatenated, so ids are the global row
    numbers). IVF indexes are trained on a random sample of ``train_size`` rows (default ``40 * nlist``;
    k-means with ``kmeans_iters`` iterations: the quantiser only has to partition, not to be optimal). With
    ``use_gpu=None`` the index goes to all GPUs when FAISS sees any; pass ``use_gpu=False`` for an index
    that must be serialised (``faiss.serialize_index`` needs a CPU index).
    """
    shards = [_as_f32(V)] if isinstance(V, np.ndarray) else [_as_f32(s) for s in V]
    sizes = np.array([s.shape[0] for s in shards], dtype=np.int64)
    n, d = int(sizes.sum()), int(shards[0].shape[1])
    factory = choose_index_factory(n, exact_threshold, nlist)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = int(kmeans_iters)
        ivf.cp.seed = int(seed)
        n_train = min(n, train_size or TRAIN_POINTS_PER_LIST * ivf.nlist)
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(n, n_train, replace=False))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        which = np.searchsorted(offsets, picks, side="right") - 1
        sample = np.concatenate([shards[s][picks[which == s] - offsets[s]] for s in range(len(shards))])
        index.train(sample)
        del sample
    for shard in shards:
        index.add(shard)
    set_nprobe(index, nprobe)
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
        set_nprobe(index, nprobe)
    return index


def knn_search(queries: np.ndarray, database: np.ndarray | None, k: int,
               index: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-NN of ``queries`` (m, d) by inner product; returns ``(sims (m,k) float32, ids (m,k) int64)``.

    Searches ``index`` if given, else builds one over ``database`` with :func:`build_knn_index`. ``k`` is
    capped at the database size; missing neighbours (possible with IVF) come back as id -1.
    """
    if index is None:
        if database is None:
            raise ValueError("knn_search needs a database or an index")
        index = build_knn_index(database)
    q = _as_f32(queries)
    k = int(min(k, index.ntotal))
    if q.shape[0] == 0 or k == 0:
        return np.zeros((q.shape[0], k), np.float32), np.full((q.shape[0], k), -1, np.int64)
    sims, ids = index.search(q, k)
    return sims, ids.astype(np.int64, copy=False)


def index_search_fn(index: faiss.Index) -> SearchFn:
    """Wrap an index as ``search(queries, k) -> (sims, ids)`` (the form object saliency takes)."""
    return lambda queries, k: knn_search(queries, None, k, index=index)


def exact_search_fn(V: np.ndarray) -> SearchFn:
    """Exact inner-product search over ``V``; the flat index is built once, not per call."""
    index = faiss.IndexFlatIP(V.shape[1])
    index.add(_as_f32(V))
    return index_search_fn(index)


def mutual_knn_graph(ids: np.ndarray, sims: np.ndarray, beta: float = 3.0, n: int | None = None,
                     k: int | None = None) -> sp.csr_matrix:
    """Mutual k-NN adjacency ``W`` (n, n) from the k-NN lists of every vertex.

    ``ids``/``sims`` (n, k'): row ``i`` lists the neighbours of vertex ``i`` (typically searched with
    ``k + 1`` so that ``i`` itself can be dropped). Self matches and ids < 0 are discarded; with ``k`` given
    only the first ``k`` remaining neighbours of each row count. ``W_ij = max(s_ij, 0)^beta`` iff ``j`` is in
    the list of ``i`` and ``i`` in the list of ``j``. Vectorised: with the binary neighbour matrix ``B``,
    ``W = A .* B^T`` where ``A`` holds the weights; the two (equal up to float rounding) directed weights are
    averaged so ``W`` is exactly symmetric. Edges of weight 0 are dropped. Returns float32 CSR.
    """
    ids = np.asarray(ids, dtype=np.int64)
    sims = np.asarray(sims, dtype=np.float32)
    m = ids.shape[0]
    n = int(n if n is not None else max(m, int(ids.max(initial=-1)) + 1))
    rows = np.arange(m, dtype=np.int64)[:, None]
    valid = (ids >= 0) & (ids != rows)
    if k is not None:
        valid &= np.cumsum(valid, axis=1) <= k
    idx_t = np.int32 if n < 2 ** 31 - 1 else np.int64  # halves the memory of the edge lists
    r = np.broadcast_to(rows, ids.shape)[valid].astype(idx_t)
    c = ids[valid].astype(idx_t)
    w = np.maximum(sims[valid], 0.0) ** np.float32(beta)
    B = sp.csr_matrix((np.ones(r.shape[0], np.float32), (r, c)), shape=(n, n))
    B.data[:] = 1.0  # duplicate ids in a row would have summed
    A = sp.csr_matrix((w.astype(np.float32), (r, c)), shape=(n, n))
    del r, c, w
    W = A.multiply(B.T.tocsr()).tocsr()
    del A, B
    W = ((W + W.T) * np.float32(0.5)).tocsr()
    W.eliminate_zeros()
    W.sort_indices()
    return W.astype(np.float32, copy=False)


def _row_of_nnz(W: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(W.shape[0], dtype=np.int64), np.diff(W.indptr))


def normalize_graph(W: sp.spmatrix) -> sp.csr_matrix:
    """Symmetric normalisation ``Wn = D^-1/2 W D^-1/2`` with ``D = diag(W 1)`` and 0/0 = 0 (isolated vertices)."""
    W = sp.csr_matrix(W)
    deg = np.asarray(W.sum(axis=1, dtype=np.float64)).ravel()
    dinv = np.zeros_like(deg)
    np.divide(1.0, np.sqrt(deg), out=dinv, where=deg > 0)
    Wn = W.copy()
    Wn.data = (W.data * dinv[_row_of_nnz(W)] * dinv[W.indices]).astype(W.dtype, copy=False)
    return Wn


def graph_to_arrays(W: sp.spmatrix) -> dict[str, np.ndarray]:
    """CSR as plain arrays (``indptr``, ``indices``, ``data``, ``shape``), for ``.npz`` storage without pickle."""
    W = sp.csr_matrix(W)
    return {"indptr": W.indptr, "indices": W.indices, "data": W.data,
            "shape": np.asarray(W.shape, dtype=np.int64)}


def graph_from_arrays(arrays: dict[str, np.ndarray]) -> sp.csr_matrix:
    """Inverse of :func:`graph_to_arrays`."""
    shape = tuple(int(s) for s in np.asarray(arrays["shape"]).ravel())
    return sp.csr_matrix((np.asarray(arrays["data"]), np.asarray(arrays["indices"]),
                          np.asarray(arrays["indptr"])), shape=shape)


def knn_graph(V: np.ndarray, k: int = 50, beta: float = 3.0, index: faiss.Index | None = None,
              **index_kwargs) -> sp.csr_matrix:
    """Single-process convenience: k-NN of every row of ``V`` against ``V`` then :func:`mutual_knn_graph`."""
    V = _as_f32(V)
    if index is None:
        index = build_knn_index(V, **index_kwargs)
    sims, ids = knn_search(V, None, k + 1, index=index)
    return mutual_knn_graph(ids, sims, beta=beta, n=V.shape[0], k=k)
