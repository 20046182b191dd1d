"""Seed 004 in the paper's order (per-class whitening, then aggregation), OnA, and CAM-box re-ranking,
against hand-made activation maps, class weights and a hand-made whitening."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.cam import cam_ofa
from pipeline.cam_aggregation import (CamConfig, cam_box_descriptors, cam_class_vectors, cam_ofa_descriptor,
                                      cam_ofa_whitened, cam_predefined_whitened, cam_rerank, cam_rerank_regions,
                                      learn_cam_whitening, ona_descriptors, ona_query_classes, ona_scores,
                                      select_classes, whiten_class_vectors, whitening_sample)
from pipeline.whitening import Whitening

torch.set_num_threads(1)

# C = 2 channels on a 1 x 3 map. Q = (1/3, 1), so CroW weights CW = (log(4/3 / 1/3), log(4/3 / 1)) = (log 4, log 4/3)
A = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 2.0, 1.0]]])
L1, L2 = math.log(4.0), math.log(4.0 / 3.0)
# classes: w0 = (1, 0) -> CAM [1,0,0]; w1 = (0, 1) -> CAM [0,1,0]; w2 = (1,-1) -> raw [0,-2,-1] -> CAM [1,0,.5];
# w3 = (1, 1) -> raw [2,2,1] -> CAM [1,1,0]
WEIGHT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
# logits = W mean(A) + b with mean(A) = (1/3, 4/3): (1/3, 4/3, -1 + 2, 5/3 - 5) -> order 1, 2, 0, 3
BIAS = torch.tensor([0.0, 0.0, 2.0, -5.0])
F = {0: np.array([L1 * 1, L2 * 1]),           # sum A_k * CAM: channel 0: 1, channel 1: 1
     1: np.array([0.0, L2 * 2]),              # channel 0: 0, channel 1: 2
     2: np.array([L1 * 1, L2 * 1.5]),         # channel 0: 1, channel 1: 1 + 0.5
     3: np.array([L1 * 1, L2 * 3])}           # channel 0: 1, channel 1: 1 + 2
# a hand-made whitening: w(x) = L2((L2(x) - m) P)
M = np.array([0.1, 0.2])
P = np.array([[2.0, 0.0], [1.0, 1.0]])
WH = Whitening(mean=M, projection=P)


def _w(v: np.ndarray) -> np.ndarray:
    u = v / np.linalg.norm(v)
    z = (u - M) @ P
    return z / np.linalg.norm(z)


def _l2(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_class_selection_and_raw_class_vectors_by_hand() -> None:
    np.testing.assert_array_equal(select_classes(A, WEIGHT, BIAS, 3), [1, 2, 0])
    np.testing.assert_array_equal(select_classes(A, WEIGHT, BIAS, [3, 0]), [3, 0])
    V = cam_class_vectors(A, WEIGHT, BIAS, 3)                     # OfA: own top-3, best first
    np.testing.assert_allclose(V, np.stack([F[1], F[2], F[0]]), rtol=1e-6)
    Vp = cam_class_vectors(A, WEIGHT, None, [3, 0])               # predefined list, bias irrelevant
    np.testing.assert_allclose(Vp, np.stack([F[3], F[0]]), rtol=1e-6)
    assert V.dtype == np.float32


def test_ofa_whitens_each_class_vector_before_summing() -> None:
    expected = _l2(_w(F[1]) + _w(F[2]) + _w(F[0]))                # the paper's order, by hand
    got = cam_ofa_descriptor(A, WEIGHT, BIAS, WH, n_classes=3)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(cam_ofa_whitened(cam_class_vectors(A, WEIGHT, BIAS, 3), WH), expected, rtol=1e-5)
    # today's pipeline: L2 of the sum of L2 class vectors at extraction, whitened once later -> a different vector
    old = _w(_l2(_l2(F[1]) + _l2(F[2]) + _l2(F[0])))
    np.testing.assert_allclose(WH.apply(cam_ofa(A, WEIGHT, BIAS, n_classes=3).numpy()), old, rtol=1e-5)
    assert np.abs(got - old).max() > 0.05
    # batched: (N, N_C, C) -> (N, d)
    batch = np.stack([np.stack([F[1], F[2], F[0]]), np.stack([F[3], F[0], F[1]])]).astype(np.float32)
    np.testing.assert_allclose(cam_ofa_whitened(batch, WH),
                               np.stack([expected, _l2(_w(F[3]) + _w(F[0]) + _w(F[1]))]), rtol=1e-5)


def test_predefined_list_descriptor_by_hand() -> None:
    got = cam_predefined_whitened(A, WEIGHT, [3, 0, 2], WH)
    np.testing.assert_allclose(got, _l2(_w(F[3]) + _w(F[0]) + _w(F[2])), rtol=1e-5)


def test_zero_class_vector_stays_zero_after_whitening() -> None:
    # class (1, 1) on activations where both channels are constant -> constant CAM -> zero CAM -> zero vector
    Aflat = torch.ones(2, 1, 3)
    V = cam_class_vectors(Aflat, WEIGHT, None, [3])
    np.testing.assert_array_equal(V, 0.0)
    Z = whiten_class_vectors(np.stack([V[0], F[0]]), WH)
    np.testing.assert_array_equal(Z[0], 0.0)
    np.testing.assert_allclose(Z[1], _w(F[0]), rtol=1e-5)


def test_whitening_is_learned_on_per_class_vectors() -> None:
    per_image = [np.stack([F[1], F[2], F[0]]), np.stack([F[3], F[0]]), np.stack([np.zeros(2), F[1]])]
    S = whitening_sample(per_image, n_pca=1)
    np.testing.assert_allclose(S, np.stack([F[1], F[3]]), rtol=1e-6)   # top-1 of each image; the zero row dropped
    S2 = whitening_sample(per_image, n_pca=2)
    assert S2.shape == (5, 2)
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(400, 5))) * np.array([3.0, 1.0, 0.5, 0.2, 2.0])
    wh = learn_cam_whitening(whitening_sample(X[:, None, :], n_pca=1))
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Zc = (Xn - wh.mean) @ wh.projection                     # whitened coordinates of the training rows
    np.testing.assert_allclose(np.cov(Zc.T, bias=True), np.eye(wh.out_dim), atol=1e-3)
    assert whitening_sample(X[:, None, :], n_pca=1, max_rows=50).shape == (50, 5)


def test_ona_uses_the_query_classes_for_every_database_image() -> None:
    predefined = [0, 1, 2]
    pos = ona_query_classes(np.array([0.3, -1.0, 2.0, 9.0]), predefined, n_classes=2)  # class 3 not in the list
    np.testing.assert_array_equal(pos, [2, 0])
    Z = np.array([[[1, 0], [0, 1], [1, 0]],
                  [[0, 1], [1, 0], [0, 1]]], np.float32)          # stored whitened class vectors (N=2, |L|=3, d=2)
    np.testing.assert_allclose(ona_descriptors(Z, pos), [[1, 0], [0, 1]])
    np.testing.assert_allclose(ona_scores(np.array([1.0, 0.0]), Z, pos), [1.0, 0.0])
    np.testing.assert_allclose(ona_scores(np.array([1.0, 0.0]), Z, np.array([1])), [0.0, 1.0])


def test_ona_from_stored_vectors_equals_direct_aggregation() -> None:
    """Storing per-class whitened vectors of the list and summing the query's subset at search time gives the
    descriptor computed directly on the database image with the query's classes."""
    g = torch.Generator().manual_seed(0)
    Adb = [torch.relu(torch.randn(5, 3, 4, generator=g)) for _ in range(3)]
    Wt = torch.randn(7, 5, generator=g)
    rng = np.random.default_rng(1)
    wh = learn_cam_whitening(np.abs(rng.normal(size=(40, 5))))
    predefined = [6, 1, 4, 2]
    Z = np.stack([whiten_class_vectors(cam_class_vectors(a, Wt, None, predefined), wh) for a in Adb])
    logits_q = np.array([0.0, 5.0, 1.0, 0.0, 3.0, 0.0, -2.0])
    pos = ona_query_classes(logits_q, predefined, 2)             # classes 1 and 4
    np.testing.assert_array_equal(np.asarray(predefined)[pos], [1, 4])
    direct = np.stack([cam_ofa_whitened(cam_class_vectors(a, Wt, None, [1, 4]), wh) for a in Adb])
    np.testing.assert_allclose(ona_descriptors(Z, pos), direct, rtol=1e-5, atol=1e-6)


def test_box_descriptor_uses_crop_channel_weights_and_cropped_cams() -> None:
    # box x in [0, 2): crop A_0 = [1, 0], A_1 = [1, 2]: Q = (1/2, 1), CW = (log 3, log 1.5)
    # cropped CAMs: class 1 [0, 1], class 2 [1, 0] (from the full-map CAMs [0,1,0] and [1,0,.5])
    c1 = np.array([0.0, math.log(1.5) * 2])
    c2 = np.array([math.log(3.0) * 1, math.log(1.5) * 1])
    got = cam_box_descriptors(A, WEIGHT, [1, 2], np.array([[0, 0, 2, 1], [0, 0, 3, 1]]), WH)
    np.testing.assert_allclose(got[0], _l2(_w(c1) + _w(c2)), rtol=1e-5)
    np.testing.assert_allclose(got[1], _l2(_w(F[1]) + _w(F[2])), rtol=1e-5)   # the whole map: the image's vectors


def test_rerank_regions_boxes_from_top2_cam_and_descriptors() -> None:
    cfg = CamConfig(rerank_classes=2, box_classes=2, thresholds=(0.01, 0.6))
    cells, desc = cam_rerank_regions(A, WEIGHT, BIAS, WH, cfg)
    # top-2 classes 1, 2: mean CAM = ([0,1,0] + [1,0,.5]) / 2 = [.5, .5, .25]; >= 1 %: all 3 cells; >= 60 % of .5
    # (0.3): cells 0-1
    np.testing.assert_array_equal(cells, [[0, 0, 3, 1], [0, 0, 2, 1]])
    np.testing.assert_allclose(desc, cam_box_descriptors(A, WEIGHT, [1, 2], cells, WH), rtol=1e-6)
    cells_p, desc_p = cam_rerank_regions(A, WEIGHT, BIAS, WH, CamConfig(rerank_classes=1, predefined_classes=(3, 0),
                                                                        thresholds=(0.01,)))
    np.testing.assert_allclose(desc_p[0], _w(F[3]), rtol=1e-5)   # first predefined class only, whole map


def test_cam_rerank_by_best_region() -> None:
    e = np.eye(3)
    q = e[0]
    first = np.array([10, 11, 12, 13, 14])
    regions = {10: np.stack([e[1], _l2(e[0] + e[1])]),            # best 0.707 (box 1)
               11: np.stack([e[0], e[2]]),                         # best 1.0 (box 0)
               12: np.zeros((0, 3)),                               # no box
               13: np.stack([_l2(e[0] + e[1])]),                   # ties with 10 -> keeps first-stage order
               14: np.stack([e[0]])}                               # beyond R: untouched
    ids, scores, best = cam_rerank(q, first, regions, R=4, first_stage_scores=np.array([.9, .8, .75, .7, .6]),
                                   return_best=True)
    np.testing.assert_array_equal(ids, [11, 12, 10, 13, 14])      # 12 keeps its first-stage 0.75 (> 0.707)
    np.testing.assert_allclose(scores, [1.0, 0.75, 2 ** -0.5, 2 ** -0.5, 0.6], rtol=1e-6)
    np.testing.assert_array_equal(best, [0, -1, 1, 0, -1])
    # without first-stage scores a box-less image drops to the end of the re-ranked block
    ids2, scores2 = cam_rerank(q, first, [regions[i] for i in first], R=4)
    np.testing.assert_array_equal(ids2, [11, 10, 13, 12, 14])
    assert scores2[3] == -np.inf and np.isnan(scores2[4])
    # R = 0 leaves the first-stage list alone
    np.testing.assert_array_equal(cam_rerank(q, first, regions, R=0)[0], first)


def test_config_defaults_follow_the_paper() -> None:
    cfg = CamConfig()
    assert (cfg.n_classes, cfg.n_pca, cfg.rerank_classes, cfg.box_classes) == (64, 1, 6, 2)
    assert cfg.thresholds == (0.01, 0.1, 0.2, 0.3, 0.4) and (cfg.rerank_top, cfg.rerank_qe) == (1000, 5)
    with pytest.raises(ValueError):
        CamConfig(predefined_classes=(1, 1))
