"""Region k-NN graph, Katz centrality, object saliency (seed 001 §3.6-3.8) and their Ray versions."""
from __future__ import annotations


import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.katz import katz_centrality, katz_centrality_operator
from pipeline.knn_graph import (build_knn_index, choose_index_factory, exact_search_fn, graph_from_arrays,
                                graph_to_arrays, knn_graph, knn_search, mutual_knn_graph, normalize_graph)
from pipeline.object_saliency import object_saliency, patch_descriptors, patch_max
from pipeline.pooling import l2n, regional_mac

torch.set_num_threads(1)

# Six unit vectors with hand-checkable inner products (rows of the Gram matrix):
#   v0.v1 = .8, v0.v2 = .6, v1.v2 = .96, v1.v3 = .6, v2.v3 = .8, v4.v5 = .96, v1.v5 = .168, v2.v5 = .224,
#   v3.v5 = .28, every other pair 0.
V6 = np.array([[1, 0, 0], [.8, .6, 0], [.6, .8, 0], [0, 1, 0], [0, 0, 1], [0, .28, .96]], np.float32)


def _dense(W: sp.spmatrix) -> np.ndarray:
    return np.asarray(W.todense(), dtype=np.float64)


def test_mutual_knn_graph_hand_made_k2():
    # 2-NN lists (self excluded): 0:{1,2} 1:{2,0} 2:{1,3} 3:{2,1} 4:{5,any} 5:{4,3}
    # mutual pairs: 0-1, 1-2, 2-3, 4-5; weights .8^3, .96^3, .8^3, .96^3
    sims, ids = knn_search(V6, V6, 3)
    assert (ids[:, 0] == np.arange(6)).all()  # self first
    W = mutual_knn_graph(ids, sims, beta=3, k=2)
    a, b = 0.8 ** 3, 0.96 ** 3
    expected = np.zeros((6, 6))
    for i, j, w in [(0, 1, a), (1, 2, b), (2, 3, a), (4, 5, b)]:
        expected[i, j] = expected[j, i] = w
    np.testing.assert_allclose(_dense(W), expected, rtol=1e-6, atol=1e-7)
    assert W.dtype == np.float32 and (W != W.T).nnz == 0

    # degrees a, a+b, a+b, a, b, b
    Wn = normalize_graph(W)
    en = np.zeros((6, 6))
    e01 = a / np.sqrt(a * (a + b))
    for i, j, w in [(0, 1, e01), (1, 2, b / (a + b)), (2, 3, e01), (4, 5, 1.0)]:
        en[i, j] = en[j, i] = w
    np.testing.assert_allclose(_dense(Wn), en, rtol=1e-6, atol=1e-7)


def test_mutual_knn_graph_k1_isolated_vertices_and_beta():
    # 1-NN: 0->1, 1->2, 2->1, 3->2, 4->5, 5->4: mutual only 1-2 and 4-5; 0 and 3 isolated (0/0 = 0 in Wn)
    sims, ids = knn_search(V6, V6, 2)
    W = mutual_knn_graph(ids, sims, beta=1, k=1)
    expected = np.zeros((6, 6))
    expected[1, 2] = expected[2, 1] = 0.96
    expected[4, 5] = expected[5, 4] = 0.96
    np.testing.assert_allclose(_dense(W), expected, rtol=1e-6)
    Wn = normalize_graph(W)
    en = np.zeros((6, 6))
    en[1, 2] = en[2, 1] = en[4, 5] = en[5, 4] = 1.0
    assert np.isfinite(Wn.data).all()
    np.testing.assert_allclose(_dense(Wn), en, rtol=1e-6)


def test_mutual_knn_graph_drops_self_missing_and_negative():
    # hand-written lists: row 0 misses itself and has a -1; negative similarity gives weight 0 (dropped)
    ids = np.array([[1, 2, -1], [1, 0, 2], [2, 0, 1]])
    sims = np.array([[0.5, -0.2, 0.0], [1.0, 0.5, 0.3], [1.0, -0.2, 0.3]], np.float32)
    W = mutual_knn_graph(ids, sims, beta=2, n=3)
    expected = np.zeros((3, 3))
    expected[0, 1] = expected[1, 0] = 0.25
    expected[1, 2] = expected[2, 1] = 0.09  # 0-2 mutual but max(-0.2, 0)^2 = 0
    np.testing.assert_allclose(_dense(W), expected, rtol=1e-6)
    # with k=1 only the first non-self neighbour counts: 0->1, 1->0, 2->0: mutual 0-1 only
    W1 = mutual_knn_graph(ids, sims, beta=2, n=3, k=1)
    expected1 = np.zeros((3, 3))
    expected1[0, 1] = expected1[1, 0] = 0.25
    np.testing.assert_allclose(_dense(W1), expected1, rtol=1e-6)


def test_graph_arrays_roundtrip(tmp_path):
    sims, ids = knn_search(V6, V6, 3)
    W = mutual_knn_graph(ids, sims, k=2)
    path = tmp_path / "g.npz"
    np.savez(path, **graph_to_arrays(W))
    with np.load(path, allow_pickle=False) as z:
        W2 = graph_from_arrays(dict(z))
    assert W2.shape == W.shape
    np.testing.assert_array_equal(_dense(W2), _dense(W))


def _clustered(n_clusters: int, per: int, d: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    X = np.repeat(centres, per, axis=0) + noise * rng.standard_normal((n_clusters * per, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_index_with_all_lists_probed_is_exact_and_accepts_shards():
    X = _clustered(20, 30, 16, 0.5, 0)
    assert choose_index_factory(600, exact_threshold=100, nlist=16) == "IVF16,Flat"
    assert choose_index_factory(600, exact_threshold=1000) == "Flat"
    ivf = build_knn_index([X[:250], X[250:]], exact_threshold=100, nlist=16, nprobe=16, use_gpu=False)
    assert ivf.ntotal == 600
    s1, i1 = knn_search(X, None, 6, index=ivf)
    ex = exact_search_fn(X)
    s0, i0 = ex(X, 6)
    np.testing.assert_allclose(s1, s0, atol=1e-5)
    # ids equal up to ties: compare the similarity of each returned id
    np.testing.assert_allclose((X[i1] * X[:, None, :]).sum(-1), s0, atol=1e-5)
    W_ivf = knn_graph(X, k=5, exact_threshold=100, nlist=16, nprobe=16, use_gpu=False)
    W_ex = knn_graph(X, k=5)
    np.testing.assert_allclose(_dense(W_ivf), _dense(W_ex), atol=1e-5)


def test_katz_cg_equals_dense_solve():
    rng = np.random.default_rng(1)
    n = 80
    M = sp.random(n, n, density=0.08, random_state=rng, dtype=np.float64)
    W = (M + M.T).tocsr()
    W.setdiag(0)
    W.eliminate_zeros()
    Wn = normalize_graph(W)
    for alpha in (0.5, 0.99):
        g, info = katz_centrality(Wn, alpha=alpha, tol=1e-10)
        dense = np.linalg.solve(np.eye(n) - alpha * _dense(Wn), np.full(n, 1 - alpha))
        np.testing.assert_allclose(g, dense, rtol=1e-7, atol=1e-9)
        assert info["converged"] and info["residual"] <= 1e-9 and info["iterations"] >= 1
    # isolated vertices (no edges) have g = 1 - alpha exactly
    deg = np.asarray(W.sum(1)).ravel()
    if (deg == 0).any():
        np.testing.assert_allclose(g[deg == 0], 0.01, rtol=1e-8)
    # the operator form on the same matvec gives the same vector
    g2, _ = katz_centrality_operator(lambda x: Wn @ x, n, alpha=0.99, tol=1e-10)
    np.testing.assert_allclose(g2, g, rtol=1e-12)


def test_katz_cluster_nodes_most_central():
    # 25 members of one dense cluster plus 10 outliers that lean towards the cluster (their k-NN are cluster
    # members, cosine ~0.43) but are far from one another (~0.2): an outlier's k-NN relation is never
    # mutual, so outliers are isolated and keep g = 1 - alpha, while the cluster forms a connected
    # component with g around 1. Mutual k-NN may also leave a peripheral member or two without a mutual
    # neighbour (a known property of mutual k-NN); those tie with the outliers.
    rng = np.random.default_rng(3)
    d = 64
    centre = rng.standard_normal(d)
    centre /= np.linalg.norm(centre)
    cluster = centre + 0.3 * rng.standard_normal((25, d)) / np.sqrt(d)  # pairwise cosine ~0.92
    outliers = 0.5 * centre + rng.standard_normal((10, d)) / np.sqrt(d)
    X = np.vstack([cluster, outliers])
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    W = knn_graph(X, k=10, beta=3)
    deg = np.asarray(W.sum(axis=1)).ravel()
    g, _ = katz_centrality(normalize_graph(W), alpha=0.99, tol=1e-10)
    np.testing.assert_allclose(g[25:], 0.01, rtol=1e-8)  # isolated outliers
    connected = np.flatnonzero(deg[:25] > 0)
    assert len(connected) >= 22
    assert g[connected].min() > 20 * g[25:].max()
    assert set(np.argsort(-g)[:len(connected)]) == set(connected.tolist())
    assert np.median(g[:25]) > 0.5


def test_patch_descriptors_equal_explicit_pooling():
    rng = np.random.default_rng(4)
    C, H, W = 6, 4, 5
    A = torch.as_tensor(rng.random((C, H, W)) * (rng.random((C, H, W)) > 0.4), dtype=torch.float32)
    for side in (1, 2, 3, 4):
        lo, hi = (side - 1) // 2, side // 2
        boxes = [[max(0, x - lo), max(0, y - lo), min(W, x + hi + 1), min(H, y + hi + 1)]
                 for y in range(H) for x in range(W)]
        expected = l2n(regional_mac(A, np.array(boxes)))
        np.testing.assert_allclose(patch_descriptors(A, side).numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
        # spot check one window by hand
        if side == 3:
            np.testing.assert_allclose(patch_max(A, 3)[:, 2, 3].numpy(), A[:, 1:4, 2:5].amax(dim=(1, 2)).numpy())

    class Wh:  # duck-typed pipeline.whitening.Whitening
        mean = rng.standard_normal(C).astype(np.float32) * 0.1
        projection = rng.standard_normal((C, 3)).astype(np.float32)

    u = patch_descriptors(A, 3, Wh()).numpy()
    z = patch_max(A, 3).reshape(C, -1).T.numpy()
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    y = (z - Wh.mean) @ Wh.projection
    np.testing.assert_allclose(u, y / np.linalg.norm(y, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    # a plain callable is applied and the result L2-normalised
    u2 = patch_descriptors(A, 3, lambda x: x[:, :2] * 3.0).numpy()
    np.testing.assert_allclose(np.linalg.norm(u2, axis=1), 1.0, rtol=1e-6)


def test_object_saliency_equals_loop():
    rng = np.random.default_rng(5)
    n, d, H, W, k = 9, 4, 2, 3, 3
    V = rng.standard_normal((n, d))
    V = (V / np.linalg.norm(V, axis=1, keepdims=True)).astype(np.float32)
    u = rng.standard_normal((H * W, d))
    u = (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)
    f = rng.random(n)
    g = rng.random(n) + 0.5
    Fh = rng.random((H, W))
    beta, Theta, theta = 3.0, 2.0, 3.0

    expected = np.zeros((H, W))
    for p in range(H * W):
        dots = V.astype(np.float64) @ u[p].astype(np.float64)
        total = 0.0
        for i in np.argsort(-dots)[:k]:
            total += max(dots[i], 0.0) ** beta * f[i] ** theta * g[i]
        expected[p // W, p % W] = Fh[p // W, p % W] ** Theta * total

    S = object_saliency(Fh, u, f, g, V=V, k=k, beta=beta, Theta=Theta, theta=theta, normalize=False)
    np.testing.assert_allclose(S, expected, rtol=1e-5)
    S2 = object_saliency(torch.as_tensor(Fh), torch.as_tensor(u), f, g, search=exact_search_fn(V), k=k)
    np.testing.assert_allclose(S2, expected / expected.max(), rtol=1e-5)
    assert S.dtype == np.float32 and S.shape == (H, W)
    # a position with zero feature saliency has zero object saliency
    Fh0 = Fh.copy()
    Fh0[1, 2] = 0
    assert object_saliency(Fh0, u, f, g, V=V, k=k, normalize=False)[1, 2] == 0


# ----------------------------------------------------------------------------------------------- Ray versions

@pytest.fixture(scope="module")
def local_ray(ray_local):
    """The session's local Ray (tests/conftest.py): one Ray per pytest run, shared with the other modules."""
    return ray_local


def test_ray_knn_graph_and_katz_equal_single_process(local_ray):
    from actors.graph import build_knn_graph_ray, katz_centrality_ray, row_blocks

    X = _clustered(12, 25, 16, 0.6, 7)
    W_ref = knn_graph(X, k=6, beta=3)
    # exact index, two unequal shards, blocks smaller than a shard
    W_exact = build_knn_graph_ray([X[:130], X[130:]], k=6, beta=3, block_rows=50, num_workers=2, num_cpus=0.5)
    np.testing.assert_allclose(_dense(W_exact), _dense(W_ref), atol=1e-6)
    # serialised IVF index with every list probed is exact too
    W_ivf = build_knn_graph_ray(X, k=6, beta=3, block_rows=64, num_workers=2, num_cpus=1,
                                exact_threshold=100, nlist=8, nprobe=8)
    np.testing.assert_allclose(_dense(W_ivf), _dense(W_ref), atol=1e-5)
    # a pre-built index is reused as is
    ivf = build_knn_index(X, exact_threshold=100, nlist=8, nprobe=8, use_gpu=False)
    W_pre = build_knn_graph_ray(X, k=6, beta=3, block_rows=100, num_workers=2, num_cpus=0.5, index=ivf)
    np.testing.assert_allclose(_dense(W_pre), _dense(W_ref), atol=1e-5)

    Wn = normalize_graph(W_ref)
    g_ref, info_ref = katz_centrality(Wn, alpha=0.99, tol=1e-10)
    g, info = katz_centrality_ray(Wn, alpha=0.99, n_blocks=3, tol=1e-10, num_cpus=0.5)
    np.testing.assert_allclose(g, g_ref, rtol=1e-10)
    assert info["n_blocks"] == 3 and info["iterations"] == info_ref["iterations"]
    # pre-split row blocks give the same answer
    g2, _ = katz_centrality_ray(row_blocks(Wn, 2), alpha=0.99, tol=1e-10, num_cpus=0.5)
    np.testing.assert_allclose(g2, g_ref, rtol=1e-10)
