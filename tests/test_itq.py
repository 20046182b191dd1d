"""ITQ hashing (Gong & Lazebnik) and the Hamming prefilter + exact re-rank of seed 000 §4.2."""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from pipeline.itq import (ITQ, build_binary_index, default_nlist, hamming_distances, hamming_search, learn_itq,
                          prefilter_rerank)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    """Clustered, anisotropic 64-d descriptors (L2-normalised), 3000 rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 64)) * np.linspace(2.0, 0.2, 64)
    X = centres[rng.integers(0, 30, 3000)] + 0.5 * rng.normal(size=(3000, 64))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32)


@pytest.fixture(scope="module")
def model(data: np.ndarray) -> ITQ:
    with threadpool_limits(1):
        return learn_itq(data, bits=32, iterations=50, seed=0)


def test_rotation_is_orthogonal_and_projection_is_pca(model: ITQ, data: np.ndarray) -> None:
    R = model.rotation.astype(np.float64)
    np.testing.assert_allclose(R @ R.T, np.eye(32), atol=1e-5)
    P = model.projection.astype(np.float64)
    np.testing.assert_allclose(P.T @ P, np.eye(32), atol=1e-5)
    # the PCA axes are the leading eigenvectors of the covariance: same captured variance as numpy's
    Xc = data.astype(np.float64) - data.mean(0)
    lam = np.sort(np.linalg.eigvalsh(Xc.T @ Xc / len(Xc)))[::-1]
    np.testing.assert_allclose(np.trace(P.T @ (Xc.T @ Xc / len(Xc)) @ P), lam[:32].sum(), rtol=1e-4)


def test_bits_are_balanced_on_training_data(model: ITQ, data: np.ndarray) -> None:
    codes = model.encode(data)
    assert codes.dtype == np.uint8 and codes.shape == (len(data), 4)
    ones = np.unpackbits(codes, axis=1).mean(axis=0)
    assert ones.shape == (32,)
    assert (np.abs(ones - 0.5) < 0.1).all(), ones


def test_quantisation_loss_decreases_and_beats_the_random_start(model: ITQ) -> None:
    loss = model.loss
    assert len(loss) == 50
    assert (np.diff(loss) <= 1e-6 * loss[0]).all()
    assert loss[-1] < 0.97 * loss[0]


def test_codes_are_signs_of_the_rotated_projection(model: ITQ, data: np.ndarray) -> None:
    V = (data.astype(np.float64) - model.mean) @ model.projection.astype(np.float64) @ model.rotation.astype(np.float64)
    bits = np.unpackbits(model.encode(data), axis=1).astype(bool)
    clear = np.abs(V) > 1e-5  # away from the threshold float32 rounding cannot flip a bit
    np.testing.assert_array_equal(bits[clear], (V >= 0)[clear])


def test_hamming_ranking_equals_numpy_popcount_of_xor(model: ITQ, data: np.ndarray) -> None:
    codes = model.encode(data)
    q = codes[::150]
    # reference: unpack both and count differing bits (independent of np.bitwise_count)
    ref = (np.unpackbits(q, axis=1)[:, None, :] != np.unpackbits(codes, axis=1)[None, :, :]).sum(axis=2)
    np.testing.assert_array_equal(hamming_distances(q, codes), ref)
    D, I = hamming_search(build_binary_index(codes), q, 50)
    np.testing.assert_array_equal(D, np.sort(ref, axis=1)[:, :50])
    np.testing.assert_array_equal(np.take_along_axis(ref, I, 1), D)  # each returned id has that distance
    assert (ref[np.arange(len(q)), np.arange(0, len(data), 150)] == 0).all()  # a code is its own neighbour


def test_prefilter_rerank_is_exact_when_the_prefilter_keeps_everything(model: ITQ, data: np.ndarray, tmp_path) -> None:
    rng = np.random.default_rng(5)
    q = data[rng.choice(len(data), 12)] + 0.05 * rng.normal(size=(12, 64)).astype(np.float32)
    index = build_binary_index(model.encode(data))
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=data.shape)
    mm[:] = data
    s, i = prefilter_rerank(index, mm, q, model.encode(q), prefilter=len(data), k=20)
    exact = q @ data.T
    want_i = np.argsort(-exact, axis=1, kind="stable")[:, :20]
    np.testing.assert_allclose(s, np.take_along_axis(exact, want_i, 1), rtol=1e-5)
    np.testing.assert_array_equal(i, want_i)
    # a shallow prefilter returns only prefiltered ids, re-ranked by their exact score
    s2, i2 = prefilter_rerank(index, data, q, model.encode(q), prefilter=100, k=20)
    _, cand = hamming_search(index, model.encode(q), 100)
    for r in range(len(q)):
        assert set(i2[r]) <= set(cand[r])
        np.testing.assert_allclose(s2[r], np.sort(exact[r, cand[r]])[::-1][:20], rtol=1e-5)
    # prefilter shorter than k: padded
    s3, i3 = prefilter_rerank(index, data, q[:2], model.encode(q[:2]), prefilter=5, k=8)
    assert (i3[:, 5:] == -1).all() and np.isneginf(s3[:, 5:]).all()


def test_binary_ivf_returns_true_hamming_distances(model: ITQ, data: np.ndarray) -> None:
    codes = model.encode(data)
    index = build_binary_index(codes, nlist=16, nprobe=16)  # every list probed -> exhaustive
    D, I = hamming_search(index, codes[:5], 10)
    np.testing.assert_array_equal(D, np.sort(hamming_distances(codes[:5], codes), axis=1)[:, :10])


@pytest.mark.parametrize("nlist", [0, 16])
def test_deep_hamming_search_counting_scanner_equals_numpy(model: ITQ, data: np.ndarray, nlist: int) -> None:
    """k >= COUNTING_MIN_K takes FAISS's counting scanner (for IVF with the max_codes fix of faiss#5555, without
    which it returns no neighbour at all): the same sorted distances as numpy, every id at its distance, and the
    same neighbours as the heap below the k-th distance (ties at the cut may differ), also after a round trip
    through serialisation (the service's case)."""
    import faiss

    from pipeline.itq import COUNTING_MIN_K

    codes = model.encode(data)
    k = COUNTING_MIN_K + 200
    ref = hamming_distances(codes[:6], codes)
    index = faiss.deserialize_index_binary(faiss.serialize_index_binary(
        build_binary_index(codes, nlist=nlist, nprobe=16)))  # nprobe = nlist: exhaustive
    D, I = hamming_search(index, codes[:6], k)
    assert not index.use_heap
    np.testing.assert_array_equal(D, np.sort(ref, axis=1)[:, :k])
    np.testing.assert_array_equal(np.take_along_axis(ref, I, 1), D)
    index.use_heap = True
    D_heap, I_heap = index.search(codes[:6], k)
    for r in range(6):
        below = D[r] < D[r, -1]
        assert set(I[r][below]) == set(I_heap[r][D_heap[r] < D_heap[r, -1]])


def test_arrays_round_trip_and_dimension_checks(model: ITQ, data: np.ndarray) -> None:
    back = ITQ.from_arrays({k: v.copy() for k, v in model.to_arrays().items()})
    np.testing.assert_array_equal(back.encode(data), model.encode(data))
    with pytest.raises(ValueError, match="dimension"):
        learn_itq(data, bits=128)  # 64-d descriptors cannot give 128 PCA bits
    with pytest.raises(ValueError):
        learn_itq(data, bits=20)  # not a multiple of 8


def test_prefilter_keeps_most_exact_neighbours_on_clustered_data(model: ITQ, data: np.ndarray) -> None:
    # a 100-of-3000 Hamming shortlist (3 %) re-ranked exactly recovers most of the exact top-20 (0.97 measured);
    # codes of queries and database that disagreed (e.g. a different mean or rotation) would drop this to ~0.03
    rng = np.random.default_rng(7)
    q = data[rng.choice(len(data), 50)] + 0.05 * rng.normal(size=(50, 64)).astype(np.float32)
    _, I = prefilter_rerank(build_binary_index(model.encode(data)), data, q, model.encode(q), prefilter=100, k=20)
    exact = np.argsort(-(q @ data.T), axis=1)[:, :20]
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(I, exact)])
    assert recall > 0.9


def test_default_nlist() -> None:
    assert default_nlist(50_000) == 0  # flat below 100k codes
    assert default_nlist(1_000_000) == 1024
    assert default_nlist(4_000_000) == 2048
