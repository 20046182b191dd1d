"""EGM region detection (seed 001 §3.4): exact EM steps, overlap, purge, blobs, and one real photo."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.egm import BOX_SCALE, FS_EGM, OS_EGM, EGMParams, detect_regions_with, egm, gaussian_overlap
from pipeline.regions import box_iou

torch.set_num_threads(1)


def _grid(H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W]
    return xx + 0.5, yy + 0.5


def _blob(H: int, W: int, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    xx, yy = _grid(H, W)
    return np.exp(-0.5 * ((xx - cx) ** 2 / sx ** 2 + (yy - cy) ** 2 / sy ** 2))


def test_empty_map_gives_no_region() -> None:
    boxes, scores = egm(np.zeros((5, 6)), sigma=2.0)
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_single_position_box_is_sqrt3_sigma_around_the_cell() -> None:
    S = np.zeros((20, 20))
    S[9, 12] = 0.7
    boxes, scores = egm(S, sigma=1.5)
    # one sample: mu = its cell centre (12.5, 9.5), Sigma = sigma^2 I, half-side sqrt(3) * sigma
    h = math.sqrt(3.0) * 1.5
    np.testing.assert_allclose(boxes, [[12.5 - h, 9.5 - h, 12.5 + h, 9.5 + h]], atol=1e-9)
    np.testing.assert_allclose(scores, [1.0])


def _one_em_step_by_loops(S: np.ndarray, sigma: float):
    """Independent E+M step from the initialisation, with explicit loops over samples and components."""
    H, W = S.shape
    pts = [(x + 0.5, y + 0.5, S[y, x]) for y in range(H) for x in range(W) if S[y, x] > 0]
    n = len(pts)
    total = sum(p[2] for p in pts)
    s2 = sigma ** 2

    def inner(px, py, mx, my, vx, vy):  # N(p | m, diag(vx, vy))
        return math.exp(-0.5 * ((px - mx) ** 2 / vx + (py - my) ** 2 / vy)) / (2 * math.pi * math.sqrt(vx * vy))

    comps = [(p[2] / total, p[0], p[1], s2, s2) for p in pts]
    gamma = np.zeros((n, n))
    for i, (px, py, _) in enumerate(pts):
        row = [pk * inner(px, py, mx, my, vx + s2, vy + s2) for pk, mx, my, vx, vy in comps]
        gamma[i] = np.array(row) / sum(row)
    out = []
    for k in range(n):
        lk = sum(pts[i][2] * gamma[i, k] for i in range(n))
        mx = sum(pts[i][2] * gamma[i, k] * pts[i][0] for i in range(n)) / lk
        my = sum(pts[i][2] * gamma[i, k] * pts[i][1] for i in range(n)) / lk
        vx = s2 + sum(pts[i][2] * gamma[i, k] * (pts[i][0] - mx) ** 2 for i in range(n)) / lk
        vy = s2 + sum(pts[i][2] * gamma[i, k] * (pts[i][1] - my) ** 2 for i in range(n)) / lk
        out.append((lk / total, mx, my, vx, vy))
    return sorted(out, key=lambda c: -c[0])


def test_one_em_step_matches_explicit_loops() -> None:
    rng = np.random.default_rng(3)
    S = rng.random((4, 5)) * (rng.random((4, 5)) > 0.3)
    # threshold above the maximum overlap: the purge keeps everything, so one iteration is pure E+M
    boxes, pi, (mu, var, n_iter) = egm(S, sigma=1.3, max_iter=1, overlap_threshold=1.0 + 1e-9,
                                       min_weight=0.0, return_components=True)
    ref = np.array(_one_em_step_by_loops(S, 1.3))
    assert n_iter == 1 and pi.shape[0] == ref.shape[0]
    np.testing.assert_allclose(pi, ref[:, 0], rtol=1e-9)
    np.testing.assert_allclose(mu, ref[:, 1:3], rtol=1e-9)
    np.testing.assert_allclose(var, ref[:, 3:5], rtol=1e-9)
    np.testing.assert_allclose(boxes[:, :2], np.clip(mu - BOX_SCALE * np.sqrt(var), 0, [5, 4]), rtol=1e-9)


def test_gaussian_overlap_matches_numerical_integration() -> None:
    mu = np.array([[0.0, 0.0], [1.5, -0.7], [4.0, 3.0]])
    var = np.array([[1.0, 2.0], [0.6, 1.5], [2.5, 0.4]])
    xs = np.linspace(-12, 16, 561)
    X, Y = np.meshgrid(xs, xs)

    def g(k):
        return np.exp(-0.5 * ((X - mu[k, 0]) ** 2 / var[k, 0] + (Y - mu[k, 1]) ** 2 / var[k, 1]))

    got = gaussian_overlap(mu, var)
    for a in range(3):
        for b in range(3):
            ga, gb = g(a), g(b)
            expected = (ga * gb).sum() / math.sqrt((ga * ga).sum() * (gb * gb).sum())
            assert got[a, b] == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(np.diag(got), 1.0)


def _three_blobs() -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    H, W = 24, 32
    spec = [(8.0, 8.0, 2.0, 3.0, 1.0), (24.0, 16.0, 3.0, 2.0, 0.8), (21.0, 4.5, 2.0, 1.5, 0.6)]
    S = sum(a * _blob(H, W, cx, cy, sx, sy) for cx, cy, sx, sy, a in spec)
    # true extent: centre +- 2 std
    extents = [(cx - 2 * sx, cy - 2 * sy, cx + 2 * sx, cy + 2 * sy) for cx, cy, sx, sy, _ in spec]
    return S / S.max(), extents


@pytest.mark.parametrize("preset", [FS_EGM, OS_EGM])
def test_one_box_per_blob_and_none_elsewhere(preset: EGMParams) -> None:
    S, extents = _three_blobs()
    boxes, scores = detect_regions_with(S, preset)
    assert boxes.shape[0] == 3, boxes
    iou = box_iou(np.array(extents), boxes)
    assert (iou.max(axis=1) >= 0.5).all(), iou
    assert sorted(iou.argmax(axis=1).tolist()) == [0, 1, 2]  # a different box for each blob
    # no box is centred in the empty lower-left corner / right edge, and the strongest blob scores highest
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert not ((centres[:, 0] < 10) & (centres[:, 1] > 16)).any()
    assert int(np.argmax(scores)) == int(iou[0].argmax())
    assert np.all(np.diff(scores) <= 0)


def test_two_flat_rectangles_on_zero_background() -> None:
    S = np.zeros((24, 32))
    S[3:11, 2:12] = 1.0
    S[14:22, 18:30] = 0.7
    truth = np.array([[2, 3, 12, 11], [18, 14, 30, 22]], dtype=float)
    boxes, scores = detect_regions_with(S, FS_EGM)
    assert boxes.shape[0] == 2
    iou = box_iou(truth, boxes)
    assert iou[0, 0] >= 0.5 and iou[1, 1] >= 0.5, iou
    # nothing from the empty quadrants: every box centre lies inside a rectangle
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = ((centres[:, None, 0] >= truth[None, :, 0]) & (centres[:, None, 0] <= truth[None, :, 2])
              & (centres[:, None, 1] >= truth[None, :, 1]) & (centres[:, None, 1] <= truth[None, :, 3]))
    assert inside.any(axis=1).all()
    # mixing weights are the masses of the two rectangles (80 * 1 and 96 * 0.7^5 after sharpening), up
    # to the little mass the soft E-step lets one component take from the other rectangle
    m1, m2 = 80.0, 96 * 0.7 ** 5
    np.testing.assert_allclose(scores, [m1 / (m1 + m2), m2 / (m1 + m2)], atol=5e-3)


def test_purge_keeps_higher_weight_of_two_close_components() -> None:
    S = np.zeros((10, 30))
    S[4, 4] = 1.0
    S[4, 5] = 0.5  # adjacent: merged into the stronger one
    S[5, 25] = 0.8  # far away: kept
    boxes, scores = egm(S, sigma=1.0)
    assert boxes.shape[0] == 2
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert 4.5 < centres[0, 0] < 5.5 and centres[1, 0] == pytest.approx(25.5)


def test_fs_egm_on_a_real_photo(museum: Path) -> None:
    jpg = museum / "jpg" / "qsd2_w3_00006.jpg"
    from pipeline.backbone import build_backbone
    from pipeline.preprocess import to_network_input
    from pipeline.saliency import feature_saliency
    from storage.images import decode_image
    from storage.weights import load_state_dict

    try:
        state = load_state_dict("builtin:mobilenet_v2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    bb = build_backbone("mobilenet_v2", state)
    x = to_network_input(decode_image(jpg.read_bytes()), max_side=512)
    A = bb(x[None])[0]
    F = feature_saliency(A)
    h, w = F.shape
    boxes, scores = detect_regions_with(F.numpy(), FS_EGM)
    assert 1 <= boxes.shape[0] <= 20
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # this photo shows two paintings: at least one detected box overlaps one of them well
    gnd = json.loads((museum / "gnd.json").read_text())
    gt = np.array([g["bbx"] for q, g in zip(gnd["qimlist"], gnd["gnd"]) if q == "qsd2_w3_00006"])
    from PIL import Image

    with Image.open(jpg) as im:
        W, H = im.size
    px = boxes * np.array([W / w, H / h, W / w, H / h])
    assert box_iou(gt, px).max() >= 0.3
