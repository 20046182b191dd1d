"""ASMK family, D2R regional variants, inverted file, codebook and local features (seed 002 §4).

References here are written independently of pipeline.asmk: per-word Python loops over dicts on tiny data,
hand-computed constants, and the seed's equalities (eq. 4-8).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from pipeline.asmk import (ASMKConfig, InvertedFile, aggregate_queries, binarize,
                           build_index, hamming_similarity, merge_inverted_files, region_membership,
                           selectivity)
from pipeline.codebook import assign, train_codebook
from pipeline.local_features import (apply_pca, learn_pca, select_local_features,
                                     select_local_features_multiscale)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ brute-force reference

def ref_sigma(u: float, kernel: str, alpha: float = 3.0, tau: float = 0.0) -> float:
    if kernel == "vlad":
        return u
    if u > tau:
        return math.copysign(abs(u) ** alpha, u)
    return 0.0


def ref_residuals(des, words, C):
    """{word: V} with a Python loop over descriptors (words: list of lists for multiple assignment)."""
    V = {}
    for x, ws in zip(des, words):
        for w in np.atleast_1d(ws):
            V[int(w)] = V.get(int(w), np.zeros(len(x))) + (np.asarray(x, float) - C[int(w)])
    return V


def ref_phi(V, kernel):
    if kernel == "vlad":
        return {w: v.copy() for w, v in V.items()}
    if kernel == "asmk":
        return {w: v / np.linalg.norm(v) for w, v in V.items()}
    return {w: np.where(v > 0, 1.0, -1.0) for w, v in V.items()}  # ASMK*: +-1 vectors


def ref_dot(a, b, kernel):
    return float(a @ b) / (len(a) if kernel == "asmk_star" else 1.0)


def ref_gamma(P, kernel, idf=None, alpha=3.0):
    s = sum((1.0 if idf is None else idf[w]) * ref_sigma(ref_dot(v, v, kernel), kernel, alpha) for w, v in P.items())
    return 1.0 / math.sqrt(s) if s > 0 else 0.0


def ref_kernel(PX, PY, kernel, idf=None, alpha=3.0, tau=0.0):
    """seed 002 eq. 1 on per-word representations."""
    tot = sum((1.0 if idf is None else idf[w]) * ref_sigma(ref_dot(PX[w], PY[w], kernel), kernel, alpha, tau)
              for w in PX if w in PY)
    return ref_gamma(PX, kernel, idf, alpha) * ref_gamma(PY, kernel, idf, alpha) * tot


def inside(xy, box):
    return (xy[:, 0] >= box[0]) & (xy[:, 0] < box[2]) & (xy[:, 1] >= box[1]) & (xy[:, 1] < box[3])


def toy(seed=0, n_img=5, per=12, D=8, K=6, n_boxes=3):
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(K, D)).astype(np.float32)
    des = (C[rng.integers(0, K, n_img * per)] + 0.5 * rng.normal(size=(n_img * per, D))).astype(np.float32)
    img = np.repeat(np.arange(n_img) * 10 + 3, per)  # non-contiguous image ids
    perm = rng.permutation(len(des))  # descriptors of an image need not be contiguous
    des, img = des[perm], img[perm]
    xy = rng.uniform(0, 100, size=(len(des), 2)).astype(np.float32)
    boxes, bimg = [], []
    for i in np.unique(img):
        for _ in range(n_boxes):
            x0, y0 = rng.uniform(0, 60, 2)
            boxes.append([x0, y0, x0 + rng.uniform(20, 60), y0 + rng.uniform(20, 60)])
            bimg.append(i)
    boxes.append([0, 0, 1e-3, 1e-3])  # an empty region
    bimg.append(img[0])
    return C, des, img, xy, np.asarray(boxes, np.float32), np.asarray(bimg)


# ------------------------------------------------------------------------------------------ kernels by hand

def test_selectivity_hand_values():
    u = np.array([-0.5, 0.0, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(selectivity(u), [0, 0, 0.125, 1, 8])
    np.testing.assert_allclose(selectivity(u, alpha=3, tau=-1.0), [-0.125, 0, 0.125, 1, 8])
    np.testing.assert_allclose(selectivity(u, alpha=1, tau=0.5), [0, 0, 0, 1, 2])


@pytest.mark.parametrize("D", [128, 10])
def test_binarised_similarity_from_hamming(D):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, D)), rng.normal(size=(7, D))
    a[0, :3] = 0.0  # zeros binarise to -1
    sa, sb = np.where(a > 0, 1, -1), np.where(b > 0, 1, -1)
    expected = (sa * sb).sum(axis=1) / D
    got = hamming_similarity(binarize(a), binarize(b), D)
    np.testing.assert_allclose(got, expected)
    assert binarize(a).shape == (7, (D + 7) // 8) and binarize(a).dtype == np.uint8
    # hand case: 16 dims, 3 differing signs -> (16 - 6) / 16
    x = np.ones(16)
    y = x.copy()
    y[[0, 7, 15]] = -1
    assert hamming_similarity(binarize(x[None]), binarize(y[None]), 16)[0] == pytest.approx(10 / 16)


def _hand_index(kernel, des_y, tau=0.0):
    C = np.array([[0.0, 0.0], [10.0, 0.0]], np.float32)
    w = assign(des_y, C)[0]
    cfg = ASMKConfig(kernel=kernel, dtype="float32", tau=tau)
    return C, build_index(des_y, w, np.zeros(len(des_y), int), C, cfg)


def test_asmk_kernel_tiny_hand_example():
    # X: word 0 gets (1,0),(0,1) -> V=(1,1); word 1 gets (11,0) -> V=(1,0)
    X = np.array([[1, 0], [0, 1], [11, 0]], np.float32)
    # Y: word 0 gets (1,0) -> V=(1,0); word 1 gets (10.6,-0.8) -> V=(0.6,-0.8)
    Y = np.array([[1, 0], [10.6, -0.8]], np.float32)
    expected = {
        # ASMK: gamma = 1/sqrt(2) each; sigma(1/sqrt 2) = 2^-1.5, sigma(0.6) = 0.216
        "asmk": 0.5 * (2 ** -1.5 + 0.6 ** 3),
        # VLAD: gamma_X = 1/sqrt(3), gamma_Y = 1/sqrt(2); dots 1 and 0.6
        "vlad": 1.6 / math.sqrt(6),
        # ASMK*: word 0 (+,+)vs(+,-) -> 0, word 1 (+,-)vs(+,-) -> 1
        "asmk_star": 0.5,
    }
    for kernel, value in expected.items():
        C, idx = _hand_index(kernel, Y)
        q = aggregate_queries(X, assign(X, C)[0], np.zeros(3, int), C, idx)
        assert idx.item_scores(q)[0, 0] == pytest.approx(value, rel=1e-6), kernel


def test_gamma_makes_self_similarity_one():
    C, des, img, *_ = toy(2)
    w = assign(des, C)[0]
    for kernel in ("vlad", "asmk", "asmk_star"):
        for use_idf in (False, True):
            idx = build_index(des, w, img, C, ASMKConfig(kernel=kernel, dtype="float32", use_idf=use_idf))
            q = aggregate_queries(des, w, img, C, idx)
            S = idx.item_scores(q)
            np.testing.assert_allclose(np.diag(S), 1.0, rtol=1e-5, err_msg=f"{kernel} idf={use_idf}")
            assert (S <= 1 + 1e-6).all()


# ------------------------------------------------------------------------------------------ inverted file = brute force

@pytest.mark.parametrize("kernel", ["vlad", "asmk", "asmk_star"])
@pytest.mark.parametrize("use_idf", [False, True])
def test_inverted_file_equals_brute_force(kernel, use_idf):
    C, des, img, *_ = toy(3, n_img=6)
    rng = np.random.default_rng(4)
    qdes = des[rng.choice(len(des), 20, replace=False)] + 0.1 * rng.normal(size=(20, des.shape[1]))
    qdes = qdes.astype(np.float32)
    qimg = np.repeat([7, 2], 10)
    idx = build_index(des, assign(des, C)[0], img, C, ASMKConfig(kernel=kernel, dtype="float32",
                                                                 use_idf=use_idf))
    qw = assign(qdes, C, multiple=2)[0]  # multiple assignment on the query side
    q = aggregate_queries(qdes, qw, qimg, C, idx)
    S = idx.image_scores(q)
    images = np.unique(img)
    db = {i: ref_phi(ref_residuals(des[img == i], assign(des[img == i], C)[0], C), kernel) for i in images}
    idf = None
    if use_idf:
        df = {w: sum(w in P for P in db.values()) for w in range(len(C))}
        idf = {w: (math.log(len(images) / df[w]) ** 2 if df[w] else 0.0) for w in range(len(C))}
    for r, qi in enumerate(np.unique(qimg)):
        PX = ref_phi(ref_residuals(qdes[qimg == qi], qw[qimg == qi], C), kernel)
        ref = [ref_kernel(PX, db[i], kernel, idf) for i in images]
        np.testing.assert_allclose(S[r], ref, rtol=1e-5, atol=1e-9)
    ids, scores = idx.search(q, topk=3, max_scores=len(images))  # one query per scoring group
    for r in range(2):
        top = np.argsort(-S[r], kind="stable")[:3]
        np.testing.assert_array_equal(ids[r], images[top])
        np.testing.assert_allclose(scores[r], S[r][top], rtol=1e-5)  # float32 matmul blocking differs


@pytest.mark.parametrize("multiple", [1, 3])
def test_asmk_star_codes_equal_float32_residual_sums_near_zero(multiple):
    """ASMK* bits are those of float32 residuals ``x - c`` added one by one in row order (the ``asmk``
    package's arithmetic), also where the sum is within rounding of zero: pairs of descriptors mirrored
    around centroids far from the origin, so the fast ``sum x - n c`` path cannot tell the sign and the
    exact recomputation has to."""
    rng = np.random.default_rng(11)
    D, K, n = 16, 4, 400
    C = (rng.normal(size=(K, D)) * 50).astype(np.float32)
    w = np.repeat(rng.integers(0, K, n // 2), 2)
    r = (rng.normal(size=(n // 2, D)) * 1e-2).astype(np.float32)
    des = np.empty((n, D), np.float32)
    des[0::2] = C[w[0::2]] + r
    des[1::2] = C[w[1::2]] - r
    des[::7] += np.float32(1e-3)  # and some clear signs
    img = np.repeat(np.arange(20), 20)
    words = w[:, None]
    if multiple > 1:  # further words of each descriptor: other centroids (large residuals, clear signs)
        words = np.c_[w, (w + 1) % K, (w + 2) % K][:, :multiple]
    idx = build_index(des, words, img, C, ASMKConfig("asmk_star"))
    got = {}
    for word in range(K):
        for i, code in zip(idx.item_ids[idx.word_ptr[word]:idx.word_ptr[word + 1]],
                           idx.vecs[idx.word_ptr[word]:idx.word_ptr[word + 1]]):
            got[(int(i), word)] = code.tobytes()
    want = {}
    for i in range(20):
        V = {}
        for row in np.flatnonzero(img == i):
            for word in words[row]:
                V[int(word)] = V.get(int(word), np.zeros(D, np.float32)) + (des[row] - C[word])  # float32
        for word, v in V.items():
            want[(i, word)] = np.packbits(v > 0).tobytes()
    assert got == want


@pytest.mark.parametrize("kernel", ["asmk", "asmk_star"])
def test_sorted_image_ids_give_the_same_index_and_scores(kernel):
    """Descriptors grouped by image with sorted ids (the fast path that skips the sort) index as the shuffled
    layout does, and many queries sharing words score as one query at a time (the scatter of item_scores)."""
    C, des, img, *_ = toy(7, n_img=8, per=20)
    w = assign(des, C)[0]
    o = np.argsort(img, kind="stable")
    cfg = ASMKConfig(kernel, dtype="float32")
    shuffled, grouped = build_index(des, w, img, C, cfg), build_index(des[o], w[o], img[o], C, cfg)
    for k, v in shuffled.to_arrays().items():
        if k == "vecs":  # residual sums in another order: float rounding only
            np.testing.assert_allclose(np.asarray(grouped.vecs, float), np.asarray(v, float), atol=1e-6)
        else:
            np.testing.assert_array_equal(grouped.to_arrays()[k], v, err_msg=k)
    qw = assign(des, C, multiple=2)[0]
    q_all = aggregate_queries(des[o], qw[o], img[o], C, grouped)  # 8 queries, sorted ids
    S = grouped.image_scores(q_all)
    for r, i in enumerate(np.unique(img)):
        m = img == i
        np.testing.assert_allclose(S[r], grouped.image_scores(aggregate_queries(des[m], qw[m], img[m], C,
                                                                                grouped))[0], rtol=1e-5, atol=1e-9)

def test_shard_merge_equals_single_build_and_roundtrip(tmp_path):
    C, des, img, xy, boxes, bimg = toy(5, n_img=7)
    w = assign(des, C)[0]
    for cfg in (ASMKConfig("asmk_star"), ASMKConfig("asmk", use_idf=True), ASMKConfig("asmk_star", "d2r")):
        whole = build_index(des, w, img, C, cfg, xy, boxes, bimg)
        images = np.unique(img)
        parts = []
        for sh in np.array_split(images, 3):
            m = np.isin(img, sh)
            parts.append(build_index(des[m], w[m], img[m], C, cfg, xy[m], boxes[np.isin(bimg, sh)],
                                     bimg[np.isin(bimg, sh)]))
        merged = merge_inverted_files(parts)
        for k, v in whole.to_arrays().items():
            np.testing.assert_array_equal(merged.to_arrays()[k], v, err_msg=k)
        for k, v in merged.to_arrays().items():
            np.save(tmp_path / f"{k}.npy", v, allow_pickle=False)
        loaded = InvertedFile.from_arrays({k: np.load(tmp_path / f"{k}.npy", mmap_mode="r", allow_pickle=False)
                                           for k in whole.to_arrays()})
        q = aggregate_queries(des[:30], w[:30], img[:30], C, whole)
        np.testing.assert_allclose(loaded.image_scores(q), whole.image_scores(q))
        assert loaded.nbytes() == whole.nbytes() > 0


# ------------------------------------------------------------------------------------------ regional variants

def _regions_of(i, img, xy, boxes, bimg):
    """Descriptor masks of image i's regions: whole image first, then its boxes."""
    m = img == i
    return [m] + [m & inside(xy, b) for b in boxes[bimg == i]]


def test_region_membership_matches_loop():
    C, des, img, xy, boxes, bimg = toy(6)
    b, d = region_membership(xy, img, boxes, bimg)
    got = set(zip(b.tolist(), d.tolist()))
    ref = {(r, j) for r in range(len(boxes)) for j in np.flatnonzero((img == bimg[r]) & inside(xy, boxes[r]))}
    assert got == ref


@pytest.mark.parametrize("kernel", ["vlad", "asmk", "asmk_star"])
def test_d2r_max_and_avg_pooling_explicit(kernel):
    C, des, img, xy, boxes, bimg = toy(7)
    w = assign(des, C)[0]
    idx = build_index(des, w, img, C, ASMKConfig(kernel, "d2r", dtype="float32"), xy, boxes, bimg)
    assert idx.n_items == len(np.unique(img)) + len(boxes)
    q = aggregate_queries(des[:25], w[:25], np.zeros(25, int), C, idx)
    PX = ref_phi(ref_residuals(des[:25], w[:25], C), kernel)
    smax, savg = idx.image_scores(q, "max")[0], idx.image_scores(q, "avg")[0]
    for col, i in enumerate(idx.images()):
        ks = [ref_kernel(PX, ref_phi(ref_residuals(des[m], w[m], C), kernel), kernel) if m.any() else 0.0
              for m in _regions_of(i, img, xy, boxes, bimg)]
        assert smax[col] == pytest.approx(max(ks), rel=1e-5, abs=1e-9)
        assert savg[col] == pytest.approx(np.mean(ks), rel=1e-5, abs=1e-9)


def test_rvlad_equals_average_pooled_regional_vlad():
    """seed 002 eq. 4 = eq. 7: R-VLAD needs no per-region storage."""
    C, des, img, xy, boxes, bimg = toy(8)
    w = assign(des, C)[0]
    rv = build_index(des, w, img, C, ASMKConfig("vlad", "rvlad", dtype="float32"), xy, boxes, bimg)
    d2r = build_index(des, w, img, C, ASMKConfig("vlad", "d2r", dtype="float32"), xy, boxes, bimg)
    assert rv.n_items == len(np.unique(img)) < d2r.n_items
    qd = des[::3] + 0.05
    q = aggregate_queries(qd, assign(qd, C)[0], np.zeros(len(qd), int), C, rv)
    np.testing.assert_allclose(rv.image_scores(q), d2r.image_scores(q, "avg"), rtol=1e-5, atol=1e-9)


def test_naive_rasmk_without_selectivity_equals_avg_pooling():
    """With sigma = identity, Naive-R-ASMK is the average-pooled regional ASMK (eq. 6 with V_hat)."""
    C, des, img, xy, boxes, bimg = toy(9)
    w = assign(des, C)[0]
    ident = dict(alpha=1.0, tau=-np.inf, dtype="float32")
    nv = build_index(des, w, img, C, ASMKConfig("asmk", "naive_rasmk", **ident), xy, boxes, bimg)
    d2r = build_index(des, w, img, C, ASMKConfig("asmk", "d2r", **ident), xy, boxes, bimg)
    q = aggregate_queries(des[:30], w[:30], np.zeros(30, int), C, nv)
    np.testing.assert_allclose(nv.image_scores(q), d2r.image_scores(q, "avg"), rtol=1e-5, atol=1e-9)
    # with the ASMK selectivity the equality no longer holds (the reason R-ASMK exists)
    nv3 = build_index(des, w, img, C, ASMKConfig("asmk", "naive_rasmk", dtype="float32"), xy, boxes, bimg)
    d3 = build_index(des, w, img, C, ASMKConfig("asmk", "d2r", dtype="float32"), xy, boxes, bimg)
    assert not np.allclose(nv3.image_scores(q), d3.image_scores(q, "avg"))


@pytest.mark.parametrize("kernel", ["asmk", "asmk_star"])
def test_rasmk_explicit(kernel):
    """eq. 8-9: V_R from per-region VLAD-normalised residuals, per-word normalisation, ASMK kernel."""
    C, des, img, xy, boxes, bimg = toy(10)
    w = assign(des, C)[0]
    idx = build_index(des, w, img, C, ASMKConfig(kernel, "rasmk", dtype="float32"), xy, boxes, bimg)
    q = aggregate_queries(des[:30], w[:30], np.zeros(30, int), C, idx)
    S = idx.image_scores(q)[0]
    PX = ref_phi(ref_residuals(des[:30], w[:30], C), kernel)
    for col, i in enumerate(idx.images()):
        masks = _regions_of(i, img, xy, boxes, bimg)
        VR = {}
        for m in masks:
            Vr = ref_residuals(des[m], w[m], C)
            g = 1.0 / math.sqrt(sum(float(v @ v) for v in Vr.values())) if Vr else 0.0
            for k, v in Vr.items():
                VR[k] = VR.get(k, 0) + g * v / len(masks)
        PY = ref_phi(VR, kernel)
        assert S[col] == pytest.approx(ref_kernel(PX, PY, kernel), rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------------------ codebook

def test_assign_matches_numpy_argmin():
    rng = np.random.default_rng(11)
    X, C = rng.normal(size=(200, 16)).astype(np.float32), rng.normal(size=(12, 16)).astype(np.float32)
    d2 = ((X[:, None, :] - C[None]) ** 2).sum(-1)
    ids, dist = assign(X, C)
    np.testing.assert_array_equal(ids[:, 0], d2.argmin(1))
    np.testing.assert_allclose(dist[:, 0], d2.min(1), rtol=1e-4, atol=1e-4)
    ids3, _ = assign(X, C, multiple=3, batch=17)
    np.testing.assert_array_equal(ids3, np.argsort(d2, axis=1)[:, :3])


def test_train_codebook_recovers_separated_clusters():
    rng = np.random.default_rng(12)
    centres = np.eye(8, dtype=np.float32)[:4] * 10
    X = np.concatenate([c + 0.1 * rng.normal(size=(100, 8)) for c in centres]).astype(np.float32)
    cb = train_codebook(X, 4, niter=10, seed=0)
    assert cb.shape == (4, 8)
    d = np.linalg.norm(cb[:, None] - centres[None], axis=-1)
    assert sorted(d.argmin(1).tolist()) == [0, 1, 2, 3] and d.min(1).max() < 0.1


# ------------------------------------------------------------------------------------------ local features

def test_select_local_features_positions_and_order():
    A = torch.zeros(2, 2, 3)
    A[0, 0, 0] = 3.0  # strength 3 at cell (0,0)
    A[:, 1, 2] = torch.tensor([3.0, 4.0])  # strength 5 at cell (1,2)
    A[1, 0, 1] = 1.0  # strength 1 at cell (0,1)
    xy, st, ds = select_local_features(A, n=2, image_hw=(64, 96))
    np.testing.assert_allclose(st, [5.0, 3.0])
    np.testing.assert_allclose(xy, [[2.5 * 32, 1.5 * 32], [0.5 * 32, 0.5 * 32]])
    np.testing.assert_allclose(ds, [[3.0, 4.0], [3.0, 0.0]])
    xy_s, _, _ = select_local_features(A, n=10, stride=16)
    assert len(xy_s) == 3  # zero-strength cells are dropped
    np.testing.assert_allclose(xy_s[0], [2.5 * 16, 1.5 * 16])
    B = torch.zeros(2, 4, 6)
    B[1, 3, 5] = 9.0
    xy2, sc2, st2, _ = select_local_features_multiscale([(A, 1.0), (B, 2.0)], n=2, image_hw=(64, 96))
    np.testing.assert_allclose(st2, [9.0, 5.0])
    np.testing.assert_allclose(sc2, [2.0, 1.0])
    np.testing.assert_allclose(xy2[0], [5.5 * 16, 3.5 * 16])


def test_extract_features_takes_locals_from_the_local_only_scale():
    """An upscaled local-only scale costs one more activation map: globals ignore it, locals pool over both maps
    (strongest first, positions in original pixels), and the decode side grows with it."""
    from pipeline.extract import ExtractConfig, extract_features, scaled_sizes

    cfg = ExtractConfig(max_side=96, globals=("mac",), regions=("full",), local_features=2,
                        local_scales=(1.0, 2.0))
    assert cfg.forward_scales == (1.0, 2.0) and cfg.decode_side == 192
    assert scaled_sizes(300, 200, cfg) == [(96, 64), (192, 128)]
    assert ExtractConfig(max_side=96, local_scales=(1.0, 2.0)).forward_scales == (1.0,)  # locals off: no extra
    A = torch.zeros(2, 2, 3)
    A[:, 1, 2] = torch.tensor([3.0, 4.0])  # strength 5 at cell (1, 2) of the 2x3 map
    B = torch.zeros(2, 4, 6)
    B[1, 3, 5] = 9.0                        # strength 9 at cell (3, 5) of the 4x6 map
    f = extract_features([A, B], cfg, image_hw=(64, 96))
    np.testing.assert_allclose(f.globals["mac"], [0.6, 0.8], rtol=1e-6)  # MAC of A alone, L2-normalised
    np.testing.assert_allclose(f.local_strength, [9.0, 5.0])
    np.testing.assert_allclose(f.local_scale, [2.0, 1.0])
    np.testing.assert_allclose(f.local_xy, [[5.5 * 16, 3.5 * 16], [2.5 * 32, 1.5 * 32]])
    with pytest.raises(ValueError, match="expected 2 activation maps"):
        extract_features([A], cfg, image_hw=(64, 96))
    with pytest.raises(ValueError, match="local_scales"):
        ExtractConfig(local_scales=(3.0,))


def test_pca_matches_svd_and_recovers_subspace():
    rng = np.random.default_rng(13)
    basis = np.linalg.qr(rng.normal(size=(10, 3)))[0]
    X = (rng.normal(size=(500, 3)) * [3, 2, 1]) @ basis.T + 5 * np.ones(10) / np.sqrt(10)
    mean, P = learn_pca(X, dim=4)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(mean, Xn.mean(0), atol=1e-6)
    np.testing.assert_allclose(P.T @ P, np.eye(4), atol=1e-5)
    Vt = np.linalg.svd(Xn - Xn.mean(0), full_matrices=False)[2][:4]
    np.testing.assert_allclose(P @ P.T, Vt.T @ Vt, atol=1e-4)  # same principal subspace
    # normalised points of a 3-d affine subspace span 4 linear dims: 4 components keep all the variance
    Y = (Xn - mean) @ P
    assert (Y ** 2).sum() / ((Xn - mean) ** 2).sum() > 0.9999
    Z = apply_pca(X, mean, P)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(Z, Y / np.linalg.norm(Y, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ Ray tasks

def test_ray_shard_build_and_merge_equals_single_build():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from actors.asmk import build_sharded_index

    C, des, img, xy, boxes, bimg = toy(14, n_img=6)
    w = assign(des, C)[0]
    cfg = ASMKConfig("asmk_star", "rasmk")
    whole = build_index(des, w, img, C, cfg, xy, boxes, bimg)
    shards = []
    for sh in np.array_split(np.unique(img), 2):
        m, mb = np.isin(img, sh), np.isin(bimg, sh)
        shards.append({"descriptors": des[m], "image_ids": img[m], "xy": xy[m], "boxes": boxes[mb],
                       "box_image": bimg[mb]})
    started = not ray.is_initialized()
    if started:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": root}})
    try:
        merged = build_sharded_index(shards, C, cfg)
    finally:
        if started:
            ray.shutdown()
    for k, v in whole.to_arrays().items():
        np.testing.assert_array_equal(merged.to_arrays()[k], v, err_msg=k)
