"""Feature saliency (seed 001 §3.3) against hand-computed values and straightforward loops."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.object_saliency import given_box_features
from pipeline.pooling import l2n
from pipeline.saliency import box_saliency, channel_weights, feature_saliency, sharpen

torch.set_num_threads(1)


def _hand_tensor() -> torch.Tensor:
    """3 channels on a 2x3 grid; channel j is non-zero at 1, 3 and 6 positions: a = (1/6, 1/2, 1)."""
    A = torch.zeros(3, 2, 3)
    A[0, 0, 0] = 6.0
    A[1, 0, :] = torch.tensor([1.0, 2.0, 3.0])
    A[2] = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    return A


def test_channel_weights_hand_values() -> None:
    A = _hand_tensor()
    # sum_k a_k = 1/6 + 1/2 + 1 = 5/3, so b = log(10), log(10/3), log(5/3) (eps negligible)
    expected = torch.tensor([math.log(10.0), math.log(10.0 / 3.0), math.log(5.0 / 3.0)])
    torch.testing.assert_close(channel_weights(A, eps=0.0), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(channel_weights(A), expected, rtol=1e-4, atol=1e-4)


def test_channel_weights_match_loop_on_random_sparse_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.relu(torch.randn(7, 4, 5, generator=g) - 0.5)
    A[3] = 0.0  # a dead channel stays finite
    eps = 1e-6
    C, H, W = A.shape
    a = [sum(1 for y in range(H) for x in range(W) if A[j, y, x] > 0) / (H * W) for j in range(C)]
    total = sum(ak + eps for ak in a)
    expected = torch.tensor([math.log(total / (aj + eps)) for aj in a])
    got = channel_weights(A, eps)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_feature_saliency_hand_map() -> None:
    A = _hand_tensor()
    b = [math.log(10.0), math.log(10.0 / 3.0), math.log(5.0 / 3.0)]
    F = np.zeros((2, 3))
    for j in range(3):
        for y in range(2):
            for x in range(3):
                F[y, x] += b[j] * float(A[j, y, x])
    F = np.sqrt(F / np.sqrt((F ** 2).sum()))
    F = F / F.max()
    got = feature_saliency(A, eps=0.0)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got.numpy(), F, rtol=1e-5, atol=1e-6)
    # position (0,0) carries the rare channel 0: 6*log(10) + 1*log(10/3) + 1*log(5/3) is the peak
    assert float(got[0, 0]) == pytest.approx(1.0)
    assert float(got.max()) == pytest.approx(1.0)


def test_feature_saliency_zero_map() -> None:
    S = feature_saliency(torch.zeros(4, 3, 3))
    assert torch.equal(S, torch.zeros(3, 3))


def test_sharpen_hand_values() -> None:
    S = torch.tensor([[1.0, 0.5, 0.3], [0.4, 0.0, 0.8]])
    got = sharpen(S, tau=0.4, rho=2.0)
    expected = torch.tensor([[1.0, 0.25, 0.0], [0.16, 0.0, 0.64]])
    torch.testing.assert_close(got, expected)
    # threshold is relative to the max
    np.testing.assert_allclose(sharpen((2 * S).numpy(), 0.4, 1.0), np.where(S.numpy() >= 0.4, 2 * S.numpy(), 0))


def test_box_saliency_matches_slices() -> None:
    g = torch.Generator().manual_seed(1)
    S = torch.rand(6, 7, generator=g)
    boxes = np.array([[0, 0, 7, 6], [1, 2, 3, 5], [6, 5, 7, 6], [2, 2, 2, 4]])  # last one is empty
    got = box_saliency(S, boxes)
    for r, (x0, y0, x1, y1) in enumerate(boxes):
        expected = S[y0:y1, x0:x1].mean() if (x1 > x0 and y1 > y0) else torch.tensor(0.0)
        assert float(got[r]) == pytest.approx(float(expected), abs=1e-6)
    assert box_saliency(S, np.zeros((0, 4), dtype=np.int64)).shape == (0,)


def test_a_given_query_box_is_the_queries_one_egm_region():
    """Seed 001: a query with a box uses the box as is: FS.EGM = OS.EGM = w(L2(MAC of the whole crop)), and
    OS.EGM-4 sums the box and its four quarters."""
    A = torch.zeros(3, 4, 6)
    A[0, 0, 0], A[1, 3, 5], A[2, 1, 2] = 2.0, 1.0, 4.0
    f = given_box_features(A, (40, 60))
    mac = np.array([2.0, 1.0, 4.0], np.float32)
    np.testing.assert_allclose(f.globals["fs_egm_sum"], mac / np.linalg.norm(mac), rtol=1e-6)
    np.testing.assert_allclose(f.globals["os_egm_sum"], f.globals["fs_egm_sum"])
    quarters = [A[:, :2, :3], A[:, :2, 3:], A[:, 2:, :3], A[:, 2:, 3:]]
    expect = l2n(torch.tensor(mac)) + sum(l2n(q.amax(dim=(1, 2))) for q in quarters)
    np.testing.assert_allclose(f.globals["os_egm4_sum"], expect.numpy(), rtol=1e-6)
    assert f.region_source == ["fs_egm", "os_egm"]
    np.testing.assert_allclose(f.region_boxes, [[0, 0, 60, 40]] * 2)
