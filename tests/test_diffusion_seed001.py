"""Seed 001's diffusion (Iscen et al. 2017) against a dense numpy construction and a dense solve."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.diffusion import (DiffusionConfig, affinity_from_knn, build_diffusion_graph, diffuse_query,
                                diffusion_scores, gmp_weights, image_scores, query_vector, query_vector_exact, rank,
                                restrict_graph)
from pipeline.katz import ConvergenceError
from pipeline.knn_graph import graph_from_arrays


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clusters(seed: int = 0, n_per: int = 12, d: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(3, d)))
    return _unit(np.concatenate([c + 0.35 * rng.normal(size=(n_per, d)) for c in centres]))


def _dense_S(X: np.ndarray, k: int, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Independent brute force: mutual k-NN (self excluded) affinity max(s,0)^gamma, symmetric normalisation."""
    n = len(X)
    s = X @ X.T
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1)[:, :k]
    B = np.zeros((n, n), bool)
    B[np.repeat(np.arange(n), k), nn.ravel()] = True
    M = B & B.T
    np.fill_diagonal(s, 0.0)
    W = np.where(M, np.maximum(s, 0.0) ** gamma, 0.0)
    d = W.sum(1)
    dinv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0.0)
    return dinv[:, None] * W * dinv[None, :], W


def test_graph_matches_dense_mutual_knn_construction() -> None:
    X = _clusters()
    cfg = DiffusionConfig(k=5)
    g = build_diffusion_graph(X, cfg)
    S_ref, W_ref = _dense_S(X, 5, 3.0)
    S = graph_from_arrays(g).toarray()
    np.testing.assert_allclose(S, S_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(S, S.T, atol=1e-7)
    np.testing.assert_allclose(g["deg"], W_ref.sum(1), rtol=1e-5)
    assert set(g) == {"indptr", "indices", "data", "shape", "deg"}


def test_affinity_from_external_knn_lists() -> None:
    """The entry point for a distributed k-NN search: lists that contain the vertex itself."""
    X = _clusters(seed=6)
    s = X @ X.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :6]           # self first, then 5 neighbours
    W = affinity_from_knn(ids, np.take_along_axis(s, ids, axis=1), len(X), DiffusionConfig(k=5))
    np.testing.assert_allclose(W.toarray(), _dense_S(X, 5, 3.0)[1], rtol=1e-5, atol=1e-7)


def test_query_vector_keeps_kq_largest_summed_similarities_to_the_gamma() -> None:
    # two query vectors (regional query): their similarities to database vector 3 add up
    sims = np.array([[0.9, 0.5, 0.4], [0.6, 0.5, 0.2]])
    ids = np.array([[1, 3, 4], [3, 2, -1]])
    y = query_vector(sims, ids, n=6, cfg=DiffusionConfig(kq=2, gamma=3.0))
    expected = np.zeros(6)
    expected[3] = (0.5 + 0.6) ** 3    # 1.1 -> first
    expected[1] = 0.9 ** 3            # 0.9 -> second; vertex 2 (0.5) and 4 (0.4) are cut by kq = 2
    np.testing.assert_allclose(y, expected)


def test_query_vector_clips_negative_similarities() -> None:
    y = query_vector(np.array([[0.3, -0.2]]), np.array([[0, 1]]), n=3, cfg=DiffusionConfig(kq=2, gamma=3.0))
    np.testing.assert_allclose(y, [0.027, 0.0, 0.0])


def test_cg_scores_equal_dense_solve() -> None:
    X = _clusters(seed=1)
    cfg = DiffusionConfig(k=5, kq=4, maxiter=500, tol=1e-12)
    g = build_diffusion_graph(X, cfg)
    q = _unit(X[2] + 0.05 * np.random.default_rng(3).normal(size=X.shape[1]))
    y = query_vector_exact(q, X, cfg)
    # y by hand: the 4 most similar vectors, similarity cubed
    s = X @ q
    top = np.argsort(-s)[:4]
    y_ref = np.zeros(len(X))
    y_ref[top] = s[top] ** 3
    np.testing.assert_allclose(y, y_ref, rtol=1e-10)
    S_ref, _ = _dense_S(X, 5, 3.0)
    f_ref = np.linalg.solve(np.eye(len(X)) - cfg.alpha * S_ref, y_ref)
    f, info = diffusion_scores(g, y, cfg)
    assert info["converged"] and info["residual"] <= 1e-10
    np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-8 * np.abs(f_ref).max())
    # several queries at once give the same columns
    F, _ = diffusion_scores(g, np.stack([y, 2 * y], axis=1), cfg)
    np.testing.assert_allclose(F[:, 1], 2 * F[:, 0], rtol=1e-9)


def test_diffusion_follows_the_manifold() -> None:
    """A chain of points bending away from the query is ranked above a closer point off the chain."""
    t = np.linspace(0.0, 1.6, 17)
    chain = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], axis=1)     # unit circle arc, 0.1 rad steps
    outlier = _unit(np.array([[np.cos(0.9), 0.0, np.sin(0.9)]]))           # cos sim 0.62 to the query
    X = np.concatenate([chain, outlier])
    cfg = DiffusionConfig(k=2, kq=1, gamma=3.0, maxiter=500, tol=1e-12)
    g = build_diffusion_graph(X, cfg)
    f, _ = diffusion_scores(g, query_vector_exact(chain[0], X, cfg), cfg)
    far_on_chain = 10                                                        # cos sim 0.54 to the query
    assert X[far_on_chain] @ chain[0] < X[-1] @ chain[0]
    assert f[far_on_chain] > f[-1] == 0.0
    # beyond the query's neighbourhood the scores decay along the chain
    assert np.all(np.diff(f[2:17]) < 0)
    assert set(rank(f, 3)) == {0, 1, 2}


def test_paper_defaults() -> None:
    cfg = DiffusionConfig()
    assert (cfg.alpha, cfg.gamma, cfg.k, cfg.kq, cfg.maxiter, cfg.tol) == (0.99, 3.0, 50, 10, 20, 1e-6)
    reg = DiffusionConfig.regional()
    assert (reg.k, reg.kq, reg.pooling) == (200, 200, "gmp")
    with pytest.raises(ValueError):
        DiffusionConfig(alpha=1.0)


def test_unconverged_cg_reported_and_raises_on_request() -> None:
    X = _clusters(seed=2, n_per=30)
    cfg = DiffusionConfig(k=8, kq=5, maxiter=2, tol=1e-12)
    g = build_diffusion_graph(X, cfg)
    y = query_vector_exact(X[0], X, cfg)
    f, info = diffusion_scores(g, y, cfg)
    assert not info["converged"] and info["iterations"] == 2 and info["residual"] > cfg.tol
    with pytest.raises(ConvergenceError, match=r"diffusion\.maxiter"):
        diffusion_scores(g, y, cfg, check=True)


def test_gmp_weights_hand_values() -> None:
    e = np.eye(3)
    X = np.stack([e[0], e[0], e[1], e[2], e[0]])   # image 0: two identical regions; image 1: orthogonal; image 2: one
    img = np.array([0, 0, 1, 1, 2])
    w = gmp_weights(X, img, lam=1.0)
    # (V V^T + I)^-1 1: [[2,1],[1,2]]^-1 1 = 1/3 each; (2 I)^-1 1 = 1/2 each; (1 + 1)^-1 = 1/2
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 0.5, 0.5, 0.5])


def test_image_scores_pooling() -> None:
    f = np.array([0.2, 0.4, 1.0, 0.1, 0.3])
    img = np.array([0, 0, 1, 1, 2])
    w = np.array([1 / 3, 1 / 3, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(image_scores(f, img, 4, "gmp", w), [0.2, 0.55, 0.15, 0.0])
    np.testing.assert_allclose(image_scores(f, img, 3, "sum"), [0.6, 1.1, 0.3])
    np.testing.assert_allclose(image_scores(f, img, 3, "max"), [0.4, 1.0, 0.3])


def test_regional_query_end_to_end_matches_dense() -> None:
    X = _clusters(seed=4, n_per=10)
    img = np.arange(len(X)) // 3                      # 3 regions per image
    cfg = DiffusionConfig.regional(k=4, kq=6, maxiter=500, tol=1e-12)
    g = build_diffusion_graph(X, cfg)
    Q = X[[0, 1]] + 0.02                               # a two-region query
    Q = _unit(Q)
    s = Q @ X.T
    ids = np.argsort(-s, axis=1)[:, :6]
    sims = np.take_along_axis(s, ids, axis=1)
    w = gmp_weights(X, img)
    got, _ = diffuse_query(g, sims, ids, cfg, image_of_vertex=img, weights=w)
    # dense reference
    acc = np.zeros(len(X))
    np.add.at(acc, ids.ravel(), sims.ravel())
    keep = np.argsort(-acc, kind="stable")[:6]
    y = np.zeros(len(X))
    y[keep] = np.maximum(acc[keep], 0) ** 3
    S_ref, _ = _dense_S(X, 4, 3.0)
    f = np.linalg.solve(np.eye(len(X)) - 0.99 * S_ref, y)
    ref = np.zeros(img.max() + 1)
    for r in range(len(X)):
        V = X[img == img[r]]
        wr = np.linalg.solve(V @ V.T + np.eye(len(V)), np.ones(len(V)))
        ref[img[r]] += wr[np.flatnonzero(img == img[r]).tolist().index(r)] * f[r]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-9)


def test_restrict_graph_renormalises_the_subgraph() -> None:
    X = _clusters(seed=5)
    g = build_diffusion_graph(X, DiffusionConfig(k=5))
    sub = np.array([0, 1, 2, 3, 12, 13, 14])
    _, W_ref = _dense_S(X, 5, 3.0)
    Wsub = W_ref[np.ix_(sub, sub)]
    d = Wsub.sum(1)
    dinv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0.0)
    S_sub = graph_from_arrays(restrict_graph(g, sub)).toarray()
    np.testing.assert_allclose(S_sub, dinv[:, None] * Wsub * dinv[None, :], rtol=1e-4, atol=1e-6)


def test_isolated_vertex_and_empty_query() -> None:
    S = sp.csr_matrix((3, 3))
    f, info = diffusion_scores(S, np.array([0.0, 2.0, 0.0]), DiffusionConfig())
    np.testing.assert_allclose(f, [0.0, 2.0, 0.0])
    f0, _ = diffusion_scores(S, np.zeros(3), DiffusionConfig())
    np.testing.assert_array_equal(f0, 0.0)
