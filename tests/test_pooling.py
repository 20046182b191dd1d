"""Pooling, R-MAC grid and box conversions against hand-computed values."""
from __future__ import annotations

import numpy as np
import torch

from pipeline import pooling
from pipeline.regions import box_iou, cells_to_pixels, pixels_to_cells, to_cells


def _act() -> torch.Tensor:
    # 2 channels, 2x3 map
    return torch.tensor([[[1.0, 0.0, 2.0], [0.0, 4.0, 0.0]],
                         [[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]]])


def test_mac_spoc_gem_hand_values() -> None:
    A = _act()
    mac = np.array([4.0, 3.0]) / 5.0
    np.testing.assert_allclose(pooling.mac(A).numpy(), mac, rtol=1e-6)
    spoc = np.array([7.0, 4.0]) / np.hypot(7.0, 4.0)
    np.testing.assert_allclose(pooling.spoc(A).numpy(), spoc, rtol=1e-6)
    g = np.array([((1 + 8 + 64) / 6) ** (1 / 3), ((27 + 1) / 6) ** (1 / 3)])
    np.testing.assert_allclose(pooling.gem(A, 3).numpy(), g / np.linalg.norm(g), rtol=1e-5)
    # batched input gives the same rows
    np.testing.assert_allclose(pooling.mac(A[None])[0].numpy(), mac, rtol=1e-6)


def test_l2n_keeps_zero_vectors() -> None:
    x = torch.zeros(2, 3)
    x[1, 0] = 2.0
    out = pooling.l2n(x)
    assert torch.all(out[0] == 0) and out[1, 0] == 1.0


def test_regional_mac_matches_loop() -> None:
    rng = np.random.default_rng(0)
    A = torch.from_numpy(rng.random((5, 7, 9)).astype(np.float32))
    boxes = np.array([[0, 0, 9, 7], [2, 1, 5, 4], [8, 6, 9, 7], [3, 0, 4, 7]])
    got = pooling.regional_mac(A, boxes).numpy()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        np.testing.assert_allclose(got[i], A[:, y0:y1, x0:x1].amax(dim=(1, 2)).numpy())


def test_rmac_grid_square_map() -> None:
    boxes = pooling.rmac_grid(10, 10, levels=3)
    # full + 1 + 4 + 9 squares for a square map
    assert len(boxes) == 15
    np.testing.assert_array_equal(boxes[0], [0, 0, 10, 10])
    np.testing.assert_array_equal(boxes[1], [0, 0, 10, 10])  # level 1: side 10
    sides = boxes[:, 2] - boxes[:, 0]
    assert list(sides[2:6]) == [6] * 4 and list(sides[6:]) == [5] * 9  # floor(2*10/3)=6, floor(2*10/4)=5
    # level 2 starts: half=floor(6/2-1)=2, step=(10-6)/1=4 -> floor(2+[0,4])-2 = [0,4]
    assert sorted({int(b[0]) for b in boxes[2:6]}) == [0, 4]


def test_rmac_grid_landscape_4_3() -> None:
    # W=32, H=24: overlaps 1-b/24 for b=(32-24)/(steps-1) -> closest to 0.4 at steps=2 -> one extra region along W
    boxes = pooling.rmac_grid(24, 32, levels=3)
    assert len(boxes) == 1 + 2 + 6 + 12
    lvl1 = boxes[1:3]
    np.testing.assert_array_equal(lvl1, [[0, 0, 24, 24], [8, 0, 32, 24]])
    # level 3: side floor(48/4)=12, 4 positions along x, 3 along y
    lvl3 = boxes[9:]
    assert sorted({int(b[0]) for b in lvl3}) == [0, 6, 13, 20]
    assert sorted({int(b[1]) for b in lvl3}) == [0, 6, 12]
    assert (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 24).all()


def test_rmac_grid_portrait_is_transposed_landscape() -> None:
    land = pooling.rmac_grid(24, 32, levels=3)
    port = pooling.rmac_grid(32, 24, levels=3)
    as_land = {tuple(b) for b in port[:, [1, 0, 3, 2]].tolist()}
    assert as_land == {tuple(b) for b in land.tolist()}


def test_rmac_descriptor_equals_sum_of_normalised_regions() -> None:
    rng = np.random.default_rng(1)
    A = torch.from_numpy(rng.random((4, 6, 8)).astype(np.float32))
    boxes = pooling.rmac_grid(6, 8)
    reg = pooling.regional_mac(A, boxes)
    expected = sum(r / np.linalg.norm(r) for r in reg.numpy())
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(pooling.rmac_from_regions(reg).numpy(), expected, rtol=1e-5)


def test_box_conversions_roundtrip() -> None:
    cells = np.array([[0, 0, 4, 3], [1, 2, 3, 3]])
    px = cells_to_pixels(cells, (3, 4), (300, 400))
    np.testing.assert_allclose(px, [[0, 0, 400, 300], [100, 200, 300, 300]])
    np.testing.assert_array_equal(pixels_to_cells(px, (3, 4), (300, 400)), cells)
    # continuous boxes round outward and never become empty
    np.testing.assert_array_equal(to_cells(np.array([[1.2, 0.5, 1.3, 0.6]]), 3, 4), [[1, 0, 2, 1]])
    np.testing.assert_allclose(box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3], [5, 5, 6, 6]])),
                               [[1 / 7, 0.0]])
