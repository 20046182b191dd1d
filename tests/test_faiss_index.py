"""Tests for pipeline.faiss_index: exact search, sharding/merging, regional max pooling, tuning, serialisation."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline import faiss_index as fi
from pipeline import faiss_tuning

faiss.omp_set_num_threads(1)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _clustered(rng: np.random.Generator, n: int, d: int, c: int, noise: float = 0.6) -> np.ndarray:
    C = _unit(rng, c, d)
    X = C[rng.integers(0, c, n)] + noise / np.sqrt(d) * rng.standard_normal((n, d)).astype(np.float32)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def _numpy_topk(X: np.ndarray, ids: np.ndarray, Q: np.ndarray, k: int, metric: int):
    """Independent exact search: full score matrix, full argsort."""
    if metric == fi.METRIC_IP:
        S = Q.astype(np.float64) @ X.T.astype(np.float64)
        order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    else:
        S = ((Q[:, None, :].astype(np.float64) - X[None].astype(np.float64)) ** 2).sum(-1)
        order = np.argsort(S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, order, 1), ids[order]


@pytest.mark.parametrize("metric", [fi.METRIC_IP, fi.METRIC_L2])
def test_exact_flat_search_equals_numpy(metric):
    rng = np.random.default_rng(0)
    X, Q = _unit(rng, 500, 24), _unit(rng, 20, 24)
    ids = rng.permutation(10_000)[:500].astype(np.int64) * 7 + 3  # arbitrary int64 ids
    index = fi.train_index("IDMap2,Flat", X, 24, metric)
    fi.add_shard(index, X, ids)
    D, I = index.search(Q, 10)
    Dn, In = _numpy_topk(X, ids, Q, 10, metric)
    np.testing.assert_array_equal(I, In)
    np.testing.assert_allclose(D, Dn, rtol=1e-4, atol=1e-4)
    # ids survive reconstruction through IndexIDMap2
    np.testing.assert_allclose(index.reconstruct(int(ids[5])), X[5])


@pytest.mark.parametrize("metric", [fi.METRIC_IP, fi.METRIC_L2])
def test_brute_force_knn_blocks_equal_numpy(metric):
    rng = np.random.default_rng(1)
    X, Q = _unit(rng, 700, 16), _unit(rng, 9, 16)
    ids = np.arange(700, dtype=np.int64) + 1000
    D, I = fi.brute_force_knn(X, Q, 15, metric, block=64, ids=ids)
    Dn, In = _numpy_topk(X, ids, Q, 15, metric)
    np.testing.assert_array_equal(I, In)
    np.testing.assert_allclose(D, Dn, rtol=1e-4, atol=1e-4)


def _ivf_shards(n_shards: int = 4):
    rng = np.random.default_rng(2)
    X = _clustered(rng, 6000, 32, 40)
    Q = _clustered(rng, 40, 32, 40)
    ids = rng.permutation(6000).astype(np.int64) + 100_000
    trained = fi.train_index("IVF32,Flat", X[:2000], 32)
    blob = fi.serialize(trained)
    parts = np.array_split(np.arange(6000), n_shards)
    shards = [fi.add_shard(blob, X[p], ids[p]) for p in parts]
    single = fi.add_shard(fi.deserialize(blob), X, ids)
    return X, Q, ids, shards, single


def test_sharded_and_merged_ivf_equal_single_index():
    X, Q, ids, shards, single = _ivf_shards()
    searcher = fi.ShardedSearcher(shards, use_gpu=False)
    merged = fi.merge_indexes(shards)
    assert merged.ntotal == searcher.ntotal == single.ntotal == 6000
    assert all(s.ntotal > 0 for s in shards)  # merge copied, shards intact
    for nprobe in (1, 3, 32):
        for obj in (searcher, merged, single):
            fi.set_search_params(obj, nprobe=nprobe)
        D0, I0 = fi.merge_topk(*single.search(Q, 25), 25)
        D1, I1 = searcher.search(Q, 25)
        D2, I2 = fi.merge_topk(*merged.search(Q, 25), 25)
        np.testing.assert_array_equal(I1, I0)
        np.testing.assert_array_equal(I2, I0)
        np.testing.assert_allclose(D1, D0, rtol=1e-5, atol=1e-6)
    # with all lists probed, IVF-Flat is exact
    Dn, In = _numpy_topk(X, ids, Q, 25, fi.METRIC_IP)
    np.testing.assert_array_equal(I1, In)


def test_sharded_flat_and_hnsw_merge():
    rng = np.random.default_rng(3)
    X, Q = _unit(rng, 900, 16), _unit(rng, 12, 16)
    ids = np.arange(900, dtype=np.int64) * 3
    Dn, In = _numpy_topk(X, ids, Q, 10, fi.METRIC_IP)
    for factory in ("IDMap2,Flat", "IDMap2,HNSW16"):
        trained = fi.train_index(factory, X, 16)
        shards = [fi.add_shard(fi.deserialize(fi.serialize(trained)), X[i::3], ids[i::3]) for i in range(3)]
        merged = fi.merge_indexes(shards)
        assert merged.ntotal == 900
        fi.set_search_params(merged, **({"efSearch": 900} if "HNSW" in factory else {}))
        _, I = merged.search(Q, 10)
        np.testing.assert_array_equal(I, In)
        s = fi.ShardedSearcher(shards, use_gpu=False)
        if "HNSW" in factory:
            s.set_search_params(efSearch=300)
        _, I = s.search(Q, 10)
        np.testing.assert_array_equal(I, In)


def test_merge_consume_empties_inputs():
    _, Q, _, shards, single = _ivf_shards(3)
    n = [s.ntotal for s in shards]
    merged = fi.merge_indexes(shards, consume=True)
    assert merged.ntotal == sum(n) and all(s.ntotal == 0 for s in shards[1:])


def test_merge_topk_ties_by_id_and_shard_order():
    D = np.array([[0.9, 0.5, 0.5, 0.1, 0.5, 0.9]], np.float32)
    I = np.array([[7, 4, 2, -1, 9, 3]])
    Dk, Ik = fi.merge_topk(D, I, 5)
    np.testing.assert_array_equal(Ik, [[3, 7, 2, 4, 9]])
    perm = [5, 3, 1, 0, 4, 2]
    Dp, Ip = fi.merge_topk(D[:, perm], I[:, perm], 5)
    np.testing.assert_array_equal(Ip, Ik)
    np.testing.assert_array_equal(Dp, Dk)
    # L2: smaller first; -1 last even with a small distance; padding when k > candidates
    Dl, Il = fi.merge_topk(np.array([[0.3, 0.0, 0.1]]), np.array([[5, -1, 6]]), 4, fi.METRIC_L2)
    np.testing.assert_array_equal(Il, [[6, 5, -1, -1]])


def test_serialize_roundtrip_and_add_from_bytes():
    X, Q, ids, shards, single = _ivf_shards(2)
    blob = fi.serialize(single)
    assert blob.dtype == np.uint8 and blob.ndim == 1
    back = fi.deserialize(blob.tobytes())
    fi.set_search_params(single, nprobe=4)
    fi.set_search_params(back, nprobe=4)
    np.testing.assert_array_equal(back.search(Q, 10)[1], single.search(Q, 10)[1])
    with pytest.raises(ValueError):
        fi.add_shard(back, X[:3], ids[:2])
    with pytest.raises(ValueError):
        fi.add_shard(faiss.index_factory(32, "IVF8,Flat", fi.METRIC_IP), X[:3], ids[:3])


def _loop_regional(S_row_ids, S_row_scores, region_to_image, k):
    best: dict[int, float] = {}
    for rid, s in zip(S_row_ids, S_row_scores):
        if rid < 0:
            continue
        img = int(region_to_image[rid])
        best[img] = max(best.get(img, -np.inf), float(s))
    ranked = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:k]
    return [i for i, _ in ranked], [s for _, s in ranked]


def test_regional_search_max_pooling_vs_loop():
    rng = np.random.default_rng(4)
    R, n_img = 600, 90
    V, Q = _unit(rng, R, 12), _unit(rng, 7, 12)
    region_to_image = np.sort(rng.integers(0, n_img, R)) * 10 + 5  # image ids not contiguous
    index = fi.add_shard(fi.train_index("IDMap2,Flat", V, 12), V, np.arange(R))
    # all regions retrieved: exact per-image max over every region
    S, I = fi.regional_search(index, Q, 8, region_to_image, k_regions=R)
    Sfull = Q @ V.T
    for q in range(len(Q)):
        imgs, scores = _loop_regional(np.arange(R), Sfull[q], region_to_image, 8)
        np.testing.assert_array_equal(I[q], imgs)
        np.testing.assert_allclose(S[q], scores, rtol=1e-5)
    # limited candidate list: max over the retrieved regions only
    D, Ir = index.search(Q, 30)
    S, I = fi.regional_search(index, Q, 20, region_to_image, k_regions=30)
    for q in range(len(Q)):
        imgs, scores = _loop_regional(Ir[q], D[q], region_to_image, 20)
        m = len(imgs)
        np.testing.assert_array_equal(I[q, :m], imgs)
        np.testing.assert_allclose(S[q, :m], scores, rtol=1e-6)
        assert np.all(I[q, m:] == -1) and np.all(np.isneginf(S[q, m:]))


def test_choose_factory_rule_and_memory_model():
    GB = 1 << 30
    assert fi.choose_factory(10_000, 512, 16 * GB) == "IDMap2,Flat"
    assert fi.choose_factory(200_000, 512, 16 * GB) == "IVF2048,Flat"
    assert fi.choose_factory(200_000, 512, 16 * GB, prefer_hnsw=True) == "IDMap2,HNSW32"
    assert fi.choose_factory(200_000, 512, 0.5 * GB, prefer_hnsw=True) == "IVF2048,Flat"  # HNSW too big
    assert fi.choose_factory(1_000_000, 512, 16 * GB) == "IVF4096,Flat"
    assert fi.choose_factory(5_000_000, 128, 16 * GB) == "IVF8192,Flat"
    assert fi.choose_factory(1_000_000, 512, 1 * GB) == "IVF4096,SQ8"
    f = fi.choose_factory(1_000_000, 512, 0.1 * GB)
    assert f.startswith("OPQ") and fi.estimate_bytes(f, 1_000_000, 512) <= 0.08 * GB
    assert fi.choose_factory(200_000_000, 128, 64 * GB).startswith("IVF65536_HNSW32")
    with pytest.raises(ValueError):
        fi.choose_factory(1_000_000, 512, 1e6)
    # the memory model matches the serialised size of a real IVF-Flat index (large-n term dominates)
    rng = np.random.default_rng(5)
    X = _unit(rng, 20_000, 32)
    idx = fi.add_shard(fi.train_index("IVF64,Flat", X[:4000], 32), X, np.arange(20_000))
    est = fi.estimate_bytes("IVF64,Flat", 20_000, 32)
    assert abs(fi.serialize(idx).nbytes - est) / est < 0.05


def test_set_search_params():
    X = _unit(np.random.default_rng(6), 3000, 16)
    idx = fi.train_index("PCA8,IVF32,SQ8", X, 16)  # through a pre-transform wrapper
    fi.set_search_params(idx, nprobe=7)
    assert faiss.extract_index_ivf(idx).nprobe == 7
    assert faiss.extract_index_ivf(fi.train_index("IVF64,Flat", X, 16)).nprobe == 8  # default max(8, nlist/16)
    assert fi.default_search_params(faiss.index_factory(16, "IVF256,Flat")) == {"nprobe": 16}
    with pytest.raises(ValueError):
        fi.set_search_params(fi.train_index("IDMap2,Flat", X, 16), nprobe=4)


def test_tune_picks_smallest_nprobe_meeting_target():
    X, Q, ids, shards, single = _ivf_shards(1)
    _, gt = fi.brute_force_knn(X, Q, 20, ids=ids)
    recalls = {}
    for p in (1, 2, 4, 8, 16, 32):
        fi.set_search_params(single, nprobe=p)
        recalls[p] = faiss_tuning.recall_at_k(single.search(Q, 20)[1], gt, 20)
    assert recalls[1] < 0.9 and recalls[32] == 1.0
    # a target strictly between two consecutive recall levels
    ps = sorted(recalls)
    j = next(i for i in range(2, len(ps)) if recalls[ps[i]] > recalls[ps[i - 1]])  # not the first candidate
    target = (recalls[ps[j - 1]] + recalls[ps[j]]) / 2
    expected = min(p for p in ps if recalls[p] >= target)
    res = faiss_tuning.tune(single, Q, gt, 20, target_recall=target)
    assert res["param"] == "nprobe" and res["nprobe"] == expected and res["met"]
    assert res["recall"] == pytest.approx(recalls[expected])
    assert faiss.extract_index_ivf(single).nprobe == expected  # applied
    # unreachable target -> best recall, smallest such value, met=False
    res = faiss_tuning.tune(single, Q, gt, 20, target_recall=1.01, values=[1, 2, 4, 8, 16, 32])
    assert not res["met"] and res["recall"] == 1.0
    assert res["nprobe"] == min(p for p in ps if recalls[p] == 1.0)
    # generous latency budget -> best recall
    res = faiss_tuning.tune(single, Q, gt, 20, latency_budget_ms=1e6, values=[1, 4, 32])
    assert res["nprobe"] == 32 and res["met"]
    # sharded searcher tunes all shards
    s = fi.ShardedSearcher(_ivf_shards(3)[3], use_gpu=False)
    res = faiss_tuning.tune(s, Q, gt, 20, target_recall=target)
    assert res["nprobe"] == expected
    # exact index: nothing to tune
    flat = fi.add_shard(fi.train_index("IDMap2,Flat", X, 32), X, ids)
    res = faiss_tuning.tune(flat, Q, gt, 20, target_recall=0.99)
    assert res["param"] is None and res["recall"] == 1.0


def test_recall_at_k_by_hand():
    I = np.array([[1, 2, 3], [4, 5, 6]])
    G = np.array([[3, 9, 1], [7, 8, -1]])
    assert faiss_tuning.recall_at_k(I, G, 3) == pytest.approx(2 / 5)


def test_gpu_copy_falls_back_to_cpu(monkeypatch):
    """With a GPU reported but the copy impossible (CPU build / unsupported index), search runs on CPU."""
    X = _unit(np.random.default_rng(7), 200, 8)
    idx = fi.add_shard(fi.train_index("IDMap2,Flat", X, 8), X, np.arange(200))
    monkeypatch.setattr(fi, "num_gpus", lambda: 1)

    def boom(index):
        raise RuntimeError("no GPU twin")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", boom, raising=False)
    assert fi.to_gpu(idx) is idx
    s = fi.ShardedSearcher([idx])
    np.testing.assert_array_equal(s.search(X[:3], 1)[1][:, 0], [0, 1, 2])
