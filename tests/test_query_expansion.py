"""Tests for pipeline.query_expansion against hand computations and dense solves built with loops."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import query_expansion as qe


def _unit(rng, *shape):
    X = rng.standard_normal(shape)
    return X / np.linalg.norm(X, axis=-1, keepdims=True)


def test_gather_zero_rows_for_missing():
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    G = qe.gather(X, np.array([[2, -1], [0, 3]]))
    np.testing.assert_array_equal(G, [[[6, 7, 8], [0, 0, 0]], [[0, 1, 2], [9, 10, 11]]])


def test_average_qe_by_hand():
    q = np.array([[1.0, 0.0, 0.0]])
    N = np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]])
    # n=2: q + x1 + x2 = (1,1,1)/sqrt(3)
    np.testing.assert_allclose(qe.average_qe(q, N, n=2), [[1 / np.sqrt(3)] * 3], rtol=1e-6)
    # n=3: (1,0,1)/sqrt(2)
    np.testing.assert_allclose(qe.average_qe(q, N, n=3), [[1 / np.sqrt(2), 0, 1 / np.sqrt(2)]], atol=1e-7)


def test_alpha_qe_vs_loop_and_alpha_zero_is_average():
    rng = np.random.default_rng(0)
    Q = _unit(rng, 5, 8).astype(np.float32)
    N = _unit(rng, 5, 12, 8).astype(np.float32)
    N[2, 4] = 0.0  # a missing result
    out = qe.alpha_qe(Q, N, n=10, alpha=3.0)
    for i in range(5):
        acc = Q[i].astype(np.float64).copy()
        for j in range(10):
            if not N[i, j].any():
                continue
            s = float(Q[i] @ N[i, j])
            acc += (max(s, 0.0) ** 3) * N[i, j]
        np.testing.assert_allclose(out[i], acc / np.linalg.norm(acc), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(qe.alpha_qe(Q, N, n=10, alpha=0.0), qe.average_qe(Q, N, n=10), atol=1e-6)


def _dense_diffusion(q, X, k, alpha, beta, query_node):
    """Reference: graph by explicit loops, f = inv(I - alpha Wn) y."""
    V = np.vstack([q[None], X]) if query_node else X
    m = len(V)
    S = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            S[i, j] = max(float(V[i] @ V[j]), 0.0) ** beta
    knn = []
    for i in range(m):
        others = sorted((j for j in range(m) if j != i), key=lambda j: -S[i, j])
        knn.append(set(others[:k]))
    W = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            if i != j and j in knn[i] and i in knn[j] and S[i, j] > 0:
                W[i, j] = S[i, j]
    d = W.sum(1)
    Dm = np.diag([1 / np.sqrt(x) if x > 0 else 0.0 for x in d])
    Wn = Dm @ W @ Dm
    if query_node:
        y = np.zeros(m)
        y[0] = 1.0
    else:
        s = np.array([max(float(q @ x), 0.0) ** beta for x in X])
        y = np.zeros(m)
        top = np.argsort(-s)[:k]
        y[top] = s[top]
    f = np.linalg.inv(np.eye(m) - alpha * Wn) @ y
    return f[1:] if query_node else f


@pytest.mark.parametrize("query_node", [True, False])
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_diffusion_matches_dense_solve(query_node, solver):
    rng = np.random.default_rng(1)
    nq, m, d, k = 3, 14, 6, 4
    Q = _unit(rng, nq, d)
    N = _unit(rng, nq, m, d)
    N = 0.6 * N + 0.4 * Q[:, None, :]  # results resemble their query
    N /= np.linalg.norm(N, axis=-1, keepdims=True)
    ids = np.arange(nq * m).reshape(nq, m) * 10
    f, ranked = qe.diffusion_rerank(Q, N, ids, k=k, alpha=0.9, beta=3.0, query_node=query_node,
                                    solver=solver, tol=1e-12)
    for i in range(nq):
        ref = _dense_diffusion(Q[i], N[i], k, 0.9, 3.0, query_node)
        assert (ref > 0).sum() >= 3  # the graph is not trivial
        order = sorted(range(m), key=lambda j: (-round(ref[j], 10), j))
        np.testing.assert_array_equal(ranked[i], ids[i][order])
        np.testing.assert_allclose(f[i], ref[order], rtol=1e-5, atol=1e-9)


def test_diffusion_unreached_keep_order_and_missing_last():
    # two tight groups: A = {query-like results 0,1,2}, B = {results 3,4} orthogonal to the query
    e = np.eye(4)
    q = e[0]
    X = np.array([
        0.9 * e[0] + 0.1 * e[1], e[2], 0.95 * e[0] + 0.05 * e[1],
        0.8 * e[0] + 0.2 * e[1], 0.9 * e[2] + 0.1 * e[3], np.zeros(4),
    ])
    X[:5] /= np.linalg.norm(X[:5], axis=1, keepdims=True)
    ids = np.array([10, 11, 12, 13, 14, -1])
    f, ranked = qe.diffusion_rerank(q[None], X[None], ids[None], k=3, alpha=0.5, beta=1.0)
    # reached: the query's group {10, 12, 13}; then 11, 14 (unreached, original order); -1 last
    assert set(ranked[0, :3]) == {10, 12, 13}
    np.testing.assert_array_equal(ranked[0, 3:], [11, 14, -1])
    assert np.all(f[0, :3] > 0) and np.all(f[0, 3:5] == 0) and np.isneginf(f[0, 5])


def test_diffusion_bad_alpha():
    with pytest.raises(ValueError):
        qe.diffusion_rerank(np.ones((1, 2)), np.ones((1, 3, 2)), alpha=1.0)
