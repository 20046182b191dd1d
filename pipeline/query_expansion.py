"""Query-side re-ranking: average query expansion, alpha-QE and diffusion on the top results (ALGORITHMS.md §8).

All functions are batched over queries and take the *descriptors* of each query's ranked results
(``neighbours`` (nq, m, d), best first), so they work with any index: fetch them with :func:`gather`.
Missing results (id -1) are zero rows, which add nothing to an expansion and have no edge in a graph.
Descriptors are expected L2-normalised (similarity = inner product).
"""
from __future__ import annotations

import numpy as np

EPS = 1e-12


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def gather(X: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows ``X[ids]`` as (nq, m, d) float32; ids < 0 (missing results) give zero rows."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.asarray(X, dtype=np.float32)[np.clip(ids, 0, None)]
    out[ids < 0] = 0.0
    return out


def average_qe(Q: np.ndarray, neighbours: np.ndarray, n: int = 10) -> np.ndarray:
    """Average query expansion: ``L2(q + sum_{i<n} x_i)`` over each query's top ``n`` results.

    ``Q`` (nq, d), ``neighbours`` (nq, m >= n, d) in rank order. n = 10 as in seed 003 (Gordo et al.).
    """
    Q = np.asarray(Q, dtype=np.float32)
    N = np.asarray(neighbours, dtype=np.float32)[:, :n]
    return _l2n(Q + N.sum(axis=1)).astype(np.float32)


def alpha_qe(Q: np.ndarray, neighbours: np.ndarray, n: int = 10, alpha: float = 3.0) -> np.ndarray:
    """alpha-QE (Radenovic et al.): ``L2(q + sum_{i<n} max(q.x_i, 0)^alpha x_i)``.

    Weights follow the similarity to the query, so far-down results count little; ``alpha = 0`` gives
    :func:`average_qe`. The query keeps weight 1 (its similarity to itself).
    """
    Q = np.asarray(Q, dtype=np.float32)
    N = np.asarray(neighbours, dtype=np.float32)[:, :n]
    sims = np.einsum("qd,qnd->qn", Q, N)
    w = np.power(np.clip(sims, 0.0, None), alpha)
    w[~np.any(N != 0, axis=-1)] = 0.0          # missing results contribute nothing (0**0 would be 1)
    return _l2n(Q + np.einsum("qn,qnd->qd", w, N)).astype(np.float32)


def knn_graph(V: np.ndarray, valid: np.ndarray, k: int, beta: float) -> np.ndarray:
    """Batched mutual-kNN affinity ``W`` (b, m, m) over node sets ``V`` (b, m, d) (ALGORITHMS.md §4).

    ``W_ij = max(v_i.v_j, 0)^beta`` if i and j are mutual k-nearest neighbours (self excluded, invalid
    nodes excluded, zero-affinity pairs excluded), else 0. Symmetric, zero diagonal.
    """
    b, m, _ = V.shape
    S = np.power(np.clip(np.einsum("bid,bjd->bij", V, V), 0.0, None), beta)
    pair_ok = valid[:, :, None] & valid[:, None, :]
    pair_ok &= ~np.eye(m, dtype=bool)[None]
    S = np.where(pair_ok, S, 0.0)
    kk = int(min(k, m - 1))
    if kk <= 0:
        return np.zeros_like(S)
    cand = np.where(pair_ok, S, -np.inf)
    nn = np.argpartition(-cand, kk - 1, axis=-1)[..., :kk]
    A = np.zeros((b, m, m), dtype=bool)
    np.put_along_axis(A, nn, True, axis=-1)
    A &= pair_ok & (S > 0)
    A &= np.swapaxes(A, 1, 2)
    return np.where(A, S, 0.0)


def _normalise(W: np.ndarray) -> np.ndarray:
    deg = W.sum(axis=-1)
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, EPS)), 0.0)
    return dinv[:, :, None] * W * dinv[:, None, :]


def _batched_cg(Wn: np.ndarray, alpha: float, y: np.ndarray, tol: float, maxiter: int) -> np.ndarray:
    """Solve ``(I - alpha Wn) f = y`` for every batch item by conjugate gradients (SPD for alpha < 1)."""
    def A(x: np.ndarray) -> np.ndarray:
        return x - alpha * np.einsum("bij,bj->bi", Wn, x)

    f = np.zeros_like(y)
    r = y - A(f)
    p = r.copy()
    rs = (r * r).sum(-1)
    stop = tol ** 2 * np.maximum((y * y).sum(-1), EPS)
    for _ in range(maxiter):
        active = rs > stop
        if not active.any():
            break
        Ap = A(p)
        a = np.where(active, rs / np.maximum((p * Ap).sum(-1), EPS), 0.0)
        f += a[:, None] * p
        r -= a[:, None] * Ap
        rs_new = (r * r).sum(-1)
        p = r + np.where(active, rs_new / np.maximum(rs, EPS), 0.0)[:, None] * p
        rs = rs_new
    return f


def diffusion_rerank(
    Q: np.ndarray,
    neighbours: np.ndarray,
    ids: np.ndarray | None = None,
    *,
    k: int = 10,
    alpha: float = 0.99,
    beta: float = 3.0,
    query_node: bool = True,
    solver: str = "direct",
    tol: float = 1e-8,
    maxiter: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's top results by diffusion on a small graph (Iscen et al. style).

    Nodes are the query's ``m`` results (``neighbours`` (nq, m, d), rank order), plus the query itself when
    ``query_node`` (default). Edges: mutual ``k``-NN with affinity ``max(v.u, 0)^beta`` (:func:`knn_graph`);
    ``Wn = D^-1/2 W D^-1/2``. The ranking function solves ``(I - alpha Wn) f = y``:

    - ``query_node=True``: ``y`` = unit mass on the query node;
    - ``query_node=False`` (Iscen et al.'s query vector): ``y_i = max(q.x_i, 0)^beta`` for the query's ``k``
      most similar results, 0 elsewhere.

    ``solver="direct"`` solves the (m+1)x(m+1) systems in one batched LAPACK call; ``"cg"`` runs batched
    conjugate gradients (the method of ALGORITHMS.md §4). Results are ordered by ``f`` (desc); results the
    diffusion does not reach (``f = 0``) keep their original order after the reached ones; missing results
    (``ids < 0`` or zero descriptors) go last.

    Returns ``(f, reranked)`` (nq, m): ``f`` in the new order, and the reordered ``ids`` (or the original
    positions 0..m-1 when ``ids`` is None).
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError("alpha must be in [0, 1)")
    Q = np.asarray(Q, dtype=np.float64)
    N = np.asarray(neighbours, dtype=np.float64)
    nq, m, _ = N.shape
    pos = np.broadcast_to(np.arange(m), (nq, m))
    ids_arr = pos if ids is None else np.asarray(ids, dtype=np.int64)
    valid = np.any(N != 0, axis=-1) & (ids_arr >= 0)
    if query_node:
        V = np.concatenate([Q[:, None, :], N], axis=1)
        vmask = np.concatenate([np.ones((nq, 1), bool), valid], axis=1)
        y = np.zeros((nq, m + 1))
        y[:, 0] = 1.0
    else:
        V, vmask = N, valid
        s = np.where(valid, np.power(np.clip(np.einsum("qd,qnd->qn", Q, N), 0.0, None), beta), 0.0)
        kk = int(min(k, m))
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        y = np.zeros((nq, m))
        np.put_along_axis(y, top, np.take_along_axis(s, top, axis=1), axis=1)
    Wn = _normalise(knn_graph(V, vmask, k, beta))
    if solver == "direct":
        L = np.eye(V.shape[1])[None] - alpha * Wn
        f = np.linalg.solve(L, y[..., None])[..., 0]
    elif solver == "cg":
        f = _batched_cg(Wn, alpha, y, tol, maxiter)
    else:
        raise ValueError(f"unknown solver {solver!r}")
    f = f[:, 1:] if query_node else f
    # f >= 0 in exact arithmetic; clear solver round-off so unreached results tie at 0 (original order)
    f = np.where(np.abs(f) <= 1e-10 * np.abs(f).max(axis=1, keepdims=True), 0.0, f)
    f = np.where(valid, f, -np.inf)
    order = np.lexsort((pos, -f), axis=-1)
    return (np.take_along_axis(f, order, axis=1).astype(np.float32),
            np.take_along_axis(np.broadcast_to(ids_arr, (nq, m)), order, axis=1))
