"""Query patch proposals and patch features (seed 000 §3.1): selective search boxes on a real and a synthetic
image, the database's region descriptor pipeline, geometry and saliency mass computed by hand."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from pipeline.pooling import regional_mac
from pipeline.query_regions import (GEOMETRY_NAMES, ProposalConfig, box_geometry, egm_boxes, feature_names,
                                    grid_boxes, patch_descriptors, patch_features, propose, range_max_pool,
                                    saliency_mass, selective_search_boxes)
from pipeline.regions import box_iou, pixels_to_cells
from pipeline.whitening import learn_pca_whitening

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def _assert_valid(boxes: np.ndarray, H: int, W: int, min_side: int) -> None:
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= min_side).all() and ((boxes[:, 3] - boxes[:, 1]) >= min_side).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_selective_search_on_real_photo(museum) -> None:
    bgr = cv2.imread(str(museum / "jpg" / "sacre_coeur_0000.jpg"))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    H, W = rgb.shape[:2]
    cfg = ProposalConfig(ss_max_side=256, max_proposals=0)
    boxes = selective_search_boxes(rgb, cfg)
    _assert_valid(boxes, H, W, 25)
    assert len(boxes) > 100
    # the 25 px rule is what removed the small boxes: without it some proposals are smaller
    loose = selective_search_boxes(rgb, ProposalConfig(ss_max_side=256, max_proposals=0, min_side=1))
    small = ((loose[:, 2] - loose[:, 0]) < 25) | ((loose[:, 3] - loose[:, 1]) < 25)
    assert small.any() and len(loose) - small.sum() == len(boxes)
    # proposals reach the far corner: boxes were mapped back from the 256-px image to full resolution
    assert boxes[:, 2].max() > 0.95 * W and boxes[:, 3].max() > 0.95 * H
    # deterministic despite OpenCV's random rank order, and the cap keeps a subset
    np.testing.assert_array_equal(boxes, selective_search_boxes(rgb, cfg))
    capped = selective_search_boxes(rgb, ProposalConfig(ss_max_side=256, max_proposals=50))
    assert len(capped) == 50 and np.isin(capped.view("V16"), boxes.view("V16")).all()


def test_selective_search_finds_synthetic_objects_at_original_scale() -> None:
    rng = np.random.default_rng(0)
    H, W = 300, 400
    img = np.full((H, W, 3), 200, np.uint8) + rng.integers(0, 8, (H, W, 3), dtype=np.uint8)
    objects = np.array([[40, 30, 160, 130], [220, 150, 370, 280], [60, 200, 120, 270]], np.float64)
    for (x0, y0, x1, y1), colour in zip(objects.astype(int), [(220, 30, 30), (30, 30, 220), (30, 180, 30)]):
        img[y0:y1, x0:x1] = colour
    cfg = ProposalConfig(ss_max_side=200, max_proposals=0)  # downscaled 2x, boxes mapped back
    boxes = selective_search_boxes(img, cfg)
    _assert_valid(boxes, H, W, 25)
    best = box_iou(objects, boxes).max(axis=1)
    assert (best > 0.85).all(), best
    # the 60 x 70 px object survives min_side=25 but not min_side=80
    big = selective_search_boxes(img, ProposalConfig(ss_max_side=200, max_proposals=0, min_side=80))
    _assert_valid(big, H, W, 80)
    assert box_iou(objects[2:], big).max() < 0.85


def test_grid_and_egm_proposals_are_valid_pixel_boxes() -> None:
    H, W = 480, 640
    A = torch.zeros(8, 15, 20)
    A[:, 4:9, 5:11] = 1.0  # one blob of activity
    cfg = ProposalConfig(source="egm")
    eb = egm_boxes(A, (H, W), cfg)
    _assert_valid(eb, H, W, 25)
    assert len(eb) >= 1
    # one component fits the flat blob (cells x 5..10, y 4..8): centre (8, 6.5) cells, variance sigma^2 plus the
    # positions' variance (n^2 - 1) / 12, half-side sqrt(3 var) (pipeline.egm); 32 px per cell
    hx = np.sqrt(3 * (2.5 ** 2 + (6 ** 2 - 1) / 12))
    hy = np.sqrt(3 * (2.5 ** 2 + (5 ** 2 - 1) / 12))
    want = 32 * np.array([8 - hx, 6.5 - hy, 8 + hx, 6.5 + hy])
    assert len(eb) == 1
    np.testing.assert_allclose(eb[0], want, rtol=1e-4)
    gb = grid_boxes((15, 20), (H, W), ProposalConfig(source="grid"))
    _assert_valid(gb, H, W, 25)
    assert len(gb) > 5
    np.testing.assert_array_equal(propose(ProposalConfig(source="grid"), (H, W), A=A), gb)
    with pytest.raises(ValueError):
        propose(ProposalConfig(), (H, W), A=A)  # selective search needs the image


def test_sparse_table_pooling_equals_masked_regional_mac() -> None:
    rng = np.random.default_rng(3)
    A = torch.as_tensor(np.maximum(rng.normal(size=(32, 13, 17)), 0), dtype=torch.float32)
    x0, y0 = rng.integers(0, 17, 300), rng.integers(0, 13, 300)
    x1 = np.minimum(17, x0 + 1 + rng.integers(0, 17, 300))
    y1 = np.minimum(13, y0 + 1 + rng.integers(0, 13, 300))
    cells = np.concatenate([np.stack([x0, y0, x1, y1], 1), [[0, 0, 17, 13], [16, 12, 17, 13], [3, 0, 4, 13]]])
    torch.testing.assert_close(range_max_pool(A, cells), regional_mac(A, cells), rtol=0, atol=0)
    with pytest.raises(ValueError):
        range_max_pool(A, np.array([[2, 2, 2, 5]]))  # empty box


def test_patch_descriptors_follow_the_database_region_pipeline() -> None:
    rng = np.random.default_rng(1)
    A = torch.as_tensor(np.maximum(rng.normal(size=(16, 12, 16)), 0), dtype=torch.float32)
    image_hw = (384, 512)  # 32 px per cell
    boxes = np.array([[0, 0, 512, 384], [40, 40, 100, 90], [40, 40, 100, 90], [300, 100, 511, 383],
                      [33, 65, 64, 96]], np.float32)
    white = learn_pca_whitening(np.maximum(rng.normal(size=(200, 16)), 0), dim=8)
    got = patch_descriptors(A, boxes, image_hw, white)
    # the database path, one box at a time: pixels -> cells -> regional MAC -> whitening
    cells = pixels_to_cells(boxes, (12, 16), image_hw)
    want = np.stack([white.apply(regional_mac(A, c[None]).numpy())[0] for c in cells])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # box 4 (x 33..64, y 65..96) covers exactly cell x=1, y=2 -> its MAC is that cell's activation vector
    np.testing.assert_array_equal(cells[4], [1, 2, 2, 3])
    np.testing.assert_allclose(patch_descriptors(A, boxes[4:], image_hw, None)[0],
                               A[:, 2, 1].numpy() / np.linalg.norm(A[:, 2, 1].numpy()), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_geometry_saliency_and_feature_layout_by_hand() -> None:
    H, W = 200, 400
    g = box_geometry(np.array([[100, 50, 300, 150]]), (H, W))[0]
    # x0 = 100/400, y0 = 50/200, x1 = 300/400, y1 = 150/200; sides 0.5, 0.5; area 0.25; aspect 200/100
    want = [0.25, 0.25, 0.75, 0.75, 0.5, 0.5, 0.25, 0.5, np.log(2.0), 0.5, 0.5, 0.0]
    np.testing.assert_allclose(g, want, rtol=1e-12)
    S = np.zeros((4, 8))
    S[1, 2] = 3.0
    S[3, 7] = 1.0
    m = saliency_mass(S, np.array([[2, 1, 4, 2], [0, 0, 8, 4]]))
    # box 0 covers cells (2,1),(3,1): mean 3/2, share 3/4 of the total 4; box 1 is the whole map
    np.testing.assert_allclose(m, [[1.5, 0.75], [4 / 32, 1.0]])
    desc = np.eye(3, dtype=np.float32)
    boxes = np.array([[0, 0, 100, 50], [100, 50, 300, 150], [0, 0, 400, 200]], np.float32)
    X = patch_features(desc, boxes, (H, W), (4, 8), [S, 2 * S])
    assert X.shape == (3, 3 + len(GEOMETRY_NAMES) + 4) and len(feature_names(3)) == X.shape[1]
    np.testing.assert_allclose(X[1, 3:15], want, rtol=1e-6)
    # box 1 -> cells x 2..6, y 1..3: holds the 3.0 -> share 3/4, mean 3/8 (FS) and 6/8 (OS = 2 S)
    np.testing.assert_allclose(X[1, 15:], [3 / 8, 0.75, 6 / 8, 0.75], rtol=1e-6)
