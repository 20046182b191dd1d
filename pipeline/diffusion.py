"""Diffusion on a k-NN graph of the database (Iscen et al., CVPR 2017), as seed 001 uses it for retrieval.

Seed 001 (Siméoni et al.) reports every "with diffusion" number (Table 1, §4.4, Figure 10) with "k-NN search
and global diffusion [12]", [12] being Iscen, Tolias, Avrithis, Furon, Chum, *Efficient diffusion on region
manifolds*, CVPR 2017. Its graph is the one seed 001 §3.6 builds for Katz centrality (§3.7 is the same linear
system with ``y = 1``):

* affinity ``W_ij = s(x_i, x_j) = max(x_i . x_j, 0)^gamma`` iff ``x_i`` and ``x_j`` are *mutual* (reciprocal)
  k-nearest neighbours, 0 otherwise (sparse, symmetric, zero diagonal);
* ``S = D^-1/2 W D^-1/2`` with ``D = diag(W 1)`` (0/0 = 0 for an isolated vertex);
* the query enters through ``y``: its ``kq`` nearest database vectors get ``y_i = max(s_i, 0)^gamma``, all
  others 0 (for a query with several regional vectors, the similarities of the query's vectors to each
  database vector are summed first, then the top ``kq`` are kept);
* ranking scores ``f`` solve ``(I - alpha S) f = y`` by conjugate gradients (the matrix is symmetric positive
  definite for ``alpha < 1``). Only ``S`` is stored offline; a new query only costs its k-NN search and CG.
* regional diffusion: vertices are region descriptors; an image's score pools its regions' ``f`` with
  *generalized max-pooling* (GMP) weights, ``score(I) = sum_{r in I} w_r f_r`` with ``w = (V_I^T V_I + lambda
  I)^-1 1`` over the image's (L2-normalised) region descriptors ``V_I``, ``lambda = 1`` (Iscen et al.'s
  released code, ``gmpweights.m``); plain ``sum`` and ``max`` pooling are available for comparison. This is
  a weighted *sum*, not a max: GMP down-weights regions that repeat inside the image (near-duplicate regions
  share one unit of weight), so a large object covered by many overlapping regions does not dominate.

Parameters (:class:`DiffusionConfig`): seed 001 states none of them (it writes alpha in [0, 1) and beta > 0 for
its Katz graph); they are Iscen et al.'s, as set in the authors' released ``run_test.m``: ``alpha = 0.99``,
``gamma = 3``, ``k = 50`` graph neighbours and ``kq = 10`` query neighbours for global descriptors, ``k = kq =
200`` for regional ones, CG stopped after 20 iterations or a relative residual of 1e-6. The 20-iteration cap is
deliberate in the paper (the ranking settles long before the residual reaches 1e-6; CG is not expected to
"converge" there), so :func:`diffusion_scores` reports but does not raise on non-convergence unless asked
(``check=True``, which raises :class:`pipeline.katz.ConvergenceError`).

Departures, each for a reason:

* ``k`` counts neighbours *excluding* the vertex itself (as :mod:`pipeline.knn_graph` does for the Katz graph,
  so one graph builder serves both); Iscen et al.'s code counts the vertex among its own ``k``. With
  ``k = 50`` this is one neighbour more per list.
* Large-scale truncation (Iscen et al. solve the regional Oxford105k/Paris106k queries on the sub-graph of
  the regions of the top-10,000 images of an initial search, renormalised on that sub-graph; ``findtrunc.m``,
  ``trunclap.m``) is :func:`restrict_graph`; the caller picks the vertex subset.

The graph travels as plain CSR arrays (``indptr``, ``indices``, ``data``, ``shape``) plus the degrees ``deg``
of ``W`` (so the unnormalised affinity, needed to renormalise a truncated sub-graph, can be recovered as
``W_ij = S_ij sqrt(deg_i deg_j)``); no pickle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg

from pipeline.katz import check_convergence
from pipeline.knn_graph import graph_from_arrays, graph_to_arrays, knn_graph, mutual_knn_graph, normalize_graph

POOLINGS = ("gmp", "sum", "max")


@dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion parameters; defaults are Iscen et al.'s for *global* descriptors (seed 001's [12], see module
    docstring): alpha 0.99, gamma 3, k 50, kq 10, CG 20 iterations / tol 1e-6. :meth:`regional` gives theirs for
    regional descriptors (k = kq = 200)."""

    alpha: float = 0.99          # Iscen et al. 2017 (run_test.m): alpha for diffusion
    gamma: float = 3.0           # similarity exponent s = max(x.y, 0)^gamma (seed 001 §3.6 calls it beta)
    k: int = 50                  # mutual k-NN graph: 50 for global, 200 for regional vectors
    kq: int = 10                 # query's non-zeros in y: 10 for global, = k for regional
    tol: float = 1e-6            # CG relative residual
    maxiter: int = 20            # CG iterations (the paper stops at 20 by design)
    pooling: str = "gmp"         # regional: image score from region scores (gmp | sum | max)
    gmp_lambda: float = 1.0      # GMP ridge (gmpweights.m)
    exact_threshold: int = 20_000  # k-NN with an exact FAISS index up to this many vectors, IVF above

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError("alpha must be in [0, 1)")
        if self.gamma <= 0:
            raise ValueError("gamma must be positive")
        if self.k < 1 or self.kq < 1:
            raise ValueError("k and kq must be at least 1")
        if self.maxiter < 1 or self.tol <= 0:
            raise ValueError("maxiter must be >= 1 and tol > 0")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}")

    @classmethod
    def regional(cls, **overrides) -> "DiffusionConfig":
        """Iscen et al.'s setting for regional descriptors: k = kq = 200."""
        return cls(**{"k": 200, "kq": 200, **overrides})


@dataclass(frozen=True)
class DiffusionStageConfig:
    """The ``diffusion`` stage: which final global methods get an offline diffusion graph, and its parameters."""

    methods: tuple[str, ...] = ("gem", "os_egm")
    params: DiffusionConfig = DiffusionConfig()


# ----------------------------------------------------------------------------------------- graph (offline)
def affinity_from_knn(ids: np.ndarray, sims: np.ndarray, n: int, cfg: DiffusionConfig) -> sp.csr_matrix:
    """Mutual k-NN affinity ``W`` (n, n) from each vertex's k-NN lists (``ids``/``sims`` (n, >= k+1), self
    allowed in the list: it is dropped), ``W_ij = max(s_ij, 0)^gamma``. Use this with a distributed k-NN search."""
    return mutual_knn_graph(ids, sims, beta=cfg.gamma, n=n, k=cfg.k)


def graph_arrays(W: sp.spmatrix) -> dict[str, np.ndarray]:
    """``S = D^-1/2 W D^-1/2`` as CSR arrays plus ``deg`` (the row sums of ``W``), ready to store."""
    W = sp.csr_matrix(W)
    S = normalize_graph(W)
    out = graph_to_arrays(S)
    out["deg"] = np.asarray(W.sum(axis=1, dtype=np.float64)).ravel()
    return out


def build_diffusion_graph(X: np.ndarray, cfg: DiffusionConfig = DiffusionConfig(),
                          **index_kwargs) -> dict[str, np.ndarray]:
    """Offline graph over the database vectors ``X`` (n, d; L2-normalised rows: global descriptors, or all
    images' regional descriptors stacked). k-NN by FAISS inner product (exact up to ``cfg.exact_threshold``).

    Returns the normalised affinity ``S`` as CSR arrays (``indptr``, ``indices``, ``data`` float32, ``shape``)
    and ``deg`` (n,) float64, the degrees of the unnormalised ``W`` (see module docstring).
    """
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    if X.shape[0] < 2:
        return graph_arrays(sp.csr_matrix((X.shape[0], X.shape[0]), dtype=np.float32))
    W = knn_graph(X, k=cfg.k, beta=cfg.gamma, exact_threshold=cfg.exact_threshold, use_gpu=False, **index_kwargs)
    return graph_arrays(W)


def _as_csr(S: sp.spmatrix | Mapping[str, np.ndarray]) -> sp.csr_matrix:
    if isinstance(S, Mapping):
        return graph_from_arrays(S)
    return sp.csr_matrix(S)


def restrict_graph(graph: Mapping[str, np.ndarray], subset: np.ndarray) -> dict[str, np.ndarray]:
    """Truncated graph (Iscen et al.'s large-scale truncation): the affinity among ``subset`` vertices only
    (e.g. the regions of the top-ranked images of a first search), renormalised on that sub-graph.

    ``W`` is recovered from the stored ``S`` and ``deg`` (``W_ij = S_ij sqrt(deg_i deg_j)``). Row ``j`` of the
    result is vertex ``subset[j]``.
    """
    subset = np.asarray(subset, dtype=np.int64)
    S = graph_from_arrays(graph).tocsr()
    d = np.sqrt(np.asarray(graph["deg"], dtype=np.float64))
    W = sp.diags(d) @ S.astype(np.float64) @ sp.diags(d)
    Wsub = W.tocsr()[subset][:, subset].astype(np.float32)
    return graph_arrays(Wsub)


# ------------------------------------------------------------------------------------------- query (online)
def query_vector(sims: np.ndarray, ids: np.ndarray, n: int, cfg: DiffusionConfig = DiffusionConfig()) -> np.ndarray:
    """Initial vector ``y`` (n,) of one query from its k-NN search results.

    ``sims``/``ids`` (m, k') are the nearest database vectors of each of the query's ``m`` vectors (m = 1 for a
    global descriptor, the query's regions for regional diffusion), as any index returns them (ids < 0 =
    missing). Similarities are summed per database vector over the query's vectors, the ``cfg.kq`` largest
    are kept, and ``y_i = max(sum_i, 0)^gamma`` there, 0 elsewhere (Iscen et al., ``ymake.m``). Search with
    ``k' >= cfg.kq`` so the top ``kq`` are available.
    """
    sims = np.atleast_2d(np.asarray(sims, dtype=np.float64))
    ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    ok = ids >= 0
    acc = np.bincount(ids[ok], weights=sims[ok], minlength=n)[:n]
    touched = np.bincount(ids[ok], minlength=n)[:n] > 0
    cand = np.flatnonzero(touched)
    kq = min(cfg.kq, cand.size)
    y = np.zeros(n, dtype=np.float64)
    if kq == 0:
        return y
    # ties broken by vertex id (lexsort: last key is primary), so the result does not depend on search order
    top = cand[np.lexsort((cand, -acc[cand]))[:kq]]
    y[top] = np.maximum(acc[top], 0.0) ** cfg.gamma
    return y


def query_vector_exact(Q: np.ndarray, X: np.ndarray, cfg: DiffusionConfig = DiffusionConfig()) -> np.ndarray:
    """:func:`query_vector` with an exact numpy search of the query vectors ``Q`` (m, d) or (d,) over ``X`` (n, d)."""
    Q = np.atleast_2d(np.asarray(Q, dtype=np.float64))
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    kk = min(cfg.kq, n)
    s = Q @ X.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    return query_vector(np.take_along_axis(s, ids, axis=1), ids, n, cfg)


def diffusion_scores(S: sp.spmatrix | Mapping[str, np.ndarray], y: np.ndarray, cfg: DiffusionConfig = DiffusionConfig(),
                     check: bool = False, x0: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Ranking scores ``f`` solving ``(I - alpha S) f = y`` by conjugate gradients.

    ``S`` is the normalised affinity (sparse, or the arrays of :func:`build_diffusion_graph`); ``y`` (n,) from
    :func:`query_vector`, or (n, q) for several queries (solved one after the other). CG stops at
    ``cfg.maxiter`` iterations or relative residual ``cfg.tol``, as in the paper. Returns ``f`` (float64, the
    shape of ``y``) and ``info``: ``iterations``, ``residual`` (worst relative residual over the queries,
    recomputed), ``converged``, ``tol``, ``maxiter``. With ``check=True`` an unconverged solve raises
    :class:`pipeline.katz.ConvergenceError` naming ``diffusion.maxiter`` / ``diffusion.tol``.
    """
    S = _as_csr(S).astype(np.float64)
    n = S.shape[0]
    A = (sp.identity(n, dtype=np.float64, format="csr") - cfg.alpha * S).tocsr()
    Y = np.asarray(y, dtype=np.float64)
    single = Y.ndim == 1
    Y = Y[:, None] if single else Y
    if Y.shape[0] != n:
        raise ValueError(f"y has {Y.shape[0]} rows, the graph {n} vertices")
    X0 = None if x0 is None else np.asarray(x0, dtype=np.float64).reshape(Y.shape)
    F = np.zeros_like(Y)
    iters, worst, ok = 0, 0.0, True
    for j in range(Y.shape[1]):
        b = Y[:, j]
        nb = np.linalg.norm(b)
        if nb == 0:  # a query with no neighbour: f = 0
            continue
        count = [0]

        def tick(_x: np.ndarray) -> None:
            count[0] += 1

        f, status = cg(A, b, x0=None if X0 is None else X0[:, j], rtol=cfg.tol, atol=0.0, maxiter=cfg.maxiter,
                       callback=tick)
        F[:, j] = f
        iters = max(iters, count[0])
        worst = max(worst, float(np.linalg.norm(b - A @ f) / nb))
        ok &= status == 0
    info = {"iterations": iters, "residual": worst, "converged": bool(ok), "tol": cfg.tol, "maxiter": cfg.maxiter}
    if check:
        check_convergence(info, what="diffusion", maxiter=cfg.maxiter, maxiter_key="diffusion.maxiter",
                          tol_key="diffusion.tol")
    return (F[:, 0] if single else F), info


# ------------------------------------------------------------------------------------ regional -> image scores
def gmp_weights(X: np.ndarray, image_of_vertex: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Generalized max-pooling weights (Murray & Perronnin) per region: for each image ``I`` with region
    descriptors ``V_I`` (rows of ``X``), ``w_I = (V_I V_I^T + lam I)^-1 1``. Computed offline, once."""
    X = np.asarray(X, dtype=np.float64)
    img = np.asarray(image_of_vertex, dtype=np.int64)
    w = np.zeros(X.shape[0], dtype=np.float64)
    order = np.argsort(img, kind="stable")
    bounds = np.flatnonzero(np.diff(img[order])) + 1
    for grp in np.split(order, bounds):
        if grp.size == 0:
            continue
        V = X[grp]
        w[grp] = np.linalg.solve(V @ V.T + lam * np.eye(grp.size), np.ones(grp.size))
    return w


def image_scores(f: np.ndarray, image_of_vertex: np.ndarray, n_images: int, pooling: str = "gmp",
                 weights: np.ndarray | None = None) -> np.ndarray:
    """Image scores (n_images,) from region scores ``f`` (n_regions,) or (n_regions, q).

    ``gmp`` (the paper's): ``sum_r w_r f_r`` with :func:`gmp_weights` ``weights``; ``sum``: ``sum_r f_r``;
    ``max``: ``max_r f_r``. Images without regions score 0 (``-inf`` for ``max``).
    """
    f = np.asarray(f, dtype=np.float64)
    img = np.asarray(image_of_vertex, dtype=np.int64)
    F = f[:, None] if f.ndim == 1 else f
    out = np.zeros((n_images, F.shape[1]), dtype=np.float64)
    if pooling == "gmp":
        if weights is None:
            raise ValueError("gmp pooling needs the GMP weights (gmp_weights)")
        np.add.at(out, img, F * np.asarray(weights, np.float64)[:, None])
    elif pooling == "sum":
        np.add.at(out, img, F)
    elif pooling == "max":
        out[:] = -np.inf
        np.maximum.at(out, img, F)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}")
    return out[:, 0] if f.ndim == 1 else out


def diffuse_query(graph: Mapping[str, np.ndarray], sims: np.ndarray, ids: np.ndarray,
                  cfg: DiffusionConfig = DiffusionConfig(), image_of_vertex: np.ndarray | None = None,
                  n_images: int | None = None, weights: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """One query end to end: ``y`` from its k-NN results, CG, and (regional, when ``image_of_vertex`` is given)
    pooling to image scores with ``cfg.pooling``. Returns scores over vertices (global) or images (regional)."""
    n = int(np.asarray(graph["shape"]).ravel()[0])
    y = query_vector(sims, ids, n, cfg)
    f, info = diffusion_scores(graph, y, cfg)
    if image_of_vertex is None:
        return f, info
    if n_images is None:
        n_images = int(np.max(image_of_vertex, initial=-1)) + 1
    return image_scores(f, image_of_vertex, n_images, cfg.pooling, weights), info


def rank(scores: np.ndarray, top: int | None = None) -> np.ndarray:
    """Indices by decreasing score (stable: ties keep index order), optionally the first ``top``."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return order if top is None else order[:top]


__all__ = ["DiffusionConfig", "DiffusionStageConfig", "POOLINGS",
           "affinity_from_knn", "build_diffusion_graph", "diffuse_query",
           "diffusion_scores", "gmp_weights", "graph_arrays", "image_scores", "query_vector", "query_vector_exact",
           "rank", "restrict_graph"]
