"""CroW, CAM (seed 004) and multi-scale global descriptors against hand values and explicit loops."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cam import (cam_boxes, cam_class_vectors, cam_ofa, cam_predefined, class_activation_maps,
                          top_cam_map, top_classes)
from pipeline.crow import crow, crow_channel_weights, crow_spatial_weights
from pipeline.multiscale import multiscale_global

torch.set_num_threads(1)


def test_crow_tiny_tensor_hand_values() -> None:
    A = torch.tensor([[[1.0, 0.0]], [[1.0, 2.0]]])  # C=2, H=1, W=2
    # S' = (2, 2), ||S'|| = sqrt(8), alpha = sqrt(2 / sqrt(8)) = 2^-1/4 at both positions
    torch.testing.assert_close(crow_spatial_weights(A), torch.full((1, 2), 2 ** -0.25))
    # Q = (1/2, 1): beta = (log 3, log 1.5)
    torch.testing.assert_close(crow_channel_weights(A), torch.tensor([math.log(3.0), math.log(1.5)]))
    f = np.array([math.log(3.0) * 1.0, math.log(1.5) * 3.0]) * 2 ** -0.25
    torch.testing.assert_close(crow(A), torch.tensor(f / np.linalg.norm(f), dtype=torch.float32))


def test_crow_dead_channel_has_zero_weight() -> None:
    A = torch.rand(3, 4, 4)
    A[1] = 0
    w = crow_channel_weights(A)
    assert float(w[1]) == 0.0 and torch.isfinite(w).all()
    assert float(crow(A)[1]) == 0.0


def _random_net(C: int = 6, K: int = 5, H: int = 4, W: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.relu(torch.randn(C, H, W, generator=g))
    weight = torch.randn(K, C, generator=g)
    bias = torch.randn(K, generator=g)
    return A, weight, bias


def test_cam_is_the_linear_combination_of_feature_maps() -> None:
    A, weight, _ = _random_net()
    classes = [3, 0, 4]
    got = class_activation_maps(A, weight, classes)
    for n, c in enumerate(classes):
        cam = torch.zeros(A.shape[1:])
        for k in range(A.shape[0]):
            cam += A[k] * weight[c, k]
        expected = (cam - cam.min()) / (cam.max() - cam.min())
        torch.testing.assert_close(got[n], expected, rtol=1e-5, atol=1e-6)
    assert float(got.amin()) == 0.0 and float(got.amax()) == pytest.approx(1.0)


def test_top_classes_follow_gap_linear_logits() -> None:
    A, weight, bias = _random_net(K=9)
    logits = [float(sum(weight[c, k] * A[k].mean() for k in range(A.shape[0])) + bias[c]) for c in range(9)]
    expected = sorted(range(9), key=lambda c: -logits[c])[:4]
    assert top_classes(A, weight, bias, 4).tolist() == expected


def test_class_vectors_and_ofa_descriptor() -> None:
    A, weight, bias = _random_net()
    cams = class_activation_maps(A, weight, [1, 2])
    cw = crow_channel_weights(A)
    vec = cam_class_vectors(A, cams)
    for n in range(2):
        for k in range(A.shape[0]):
            assert float(vec[n, k]) == pytest.approx(float(cw[k] * (A[k] * cams[n]).sum()), rel=1e-5, abs=1e-6)
    # OfA with a whitening callable: L2, whiten, L2 per class vector, sum, L2
    M = torch.randn(A.shape[0], 3, generator=torch.Generator().manual_seed(5))

    def whiten(x: torch.Tensor) -> torch.Tensor:
        return x @ M

    classes = top_classes(A, weight, bias, 3)
    v = cam_class_vectors(A, class_activation_maps(A, weight, classes))
    parts = [(vi / vi.norm()) @ M for vi in v]
    expected = sum(p / p.norm() for p in parts)
    expected = expected / expected.norm()
    torch.testing.assert_close(cam_ofa(A, weight, bias, n_classes=3, whiten=whiten), expected)
    torch.testing.assert_close(cam_predefined(A, weight, classes.tolist(), whiten=whiten), expected)
    plain = cam_ofa(A, weight, bias, n_classes=3)
    assert plain.shape == (A.shape[0],) and float(plain.norm()) == pytest.approx(1.0)


def test_cam_boxes_hand_map() -> None:
    cam = np.zeros((6, 8))
    cam[1:3, 1:4] = 0.25  # large weak component: 6 cells
    cam[4, 6] = 1.0  # strong single cell
    cam[5, 7] = 0.5  # diagonal neighbour of the peak (8-connected)
    cam[0, 7] = 0.05
    boxes = cam_boxes(cam, thresholds=(0.01, 0.1, 0.2, 0.3, 0.4))
    expected = np.array([
        [1, 1, 4, 3],  # t=0.01: components {6 cells}, {2 cells}, {1 cell} -> the weak block
        [1, 1, 4, 3],  # t=0.1: same
        [1, 1, 4, 3],  # t=0.2: 0.25 >= 0.2 still
        [6, 4, 8, 6],  # t=0.3: only the peak and its diagonal neighbour remain
        [6, 4, 8, 6],  # t=0.4
    ], dtype=float)
    np.testing.assert_array_equal(boxes, expected)
    np.testing.assert_array_equal(cam_boxes(np.zeros((3, 4)), (0.1,)), [[0, 0, 4, 3]])


def test_top2_cam_map_is_the_mean_of_the_two_best_classes() -> None:
    A, weight, bias = _random_net(K=7)
    best = top_classes(A, weight, bias, 2)
    torch.testing.assert_close(top_cam_map(A, weight, bias), class_activation_maps(A, weight, best).mean(0))


def test_multiscale_matches_explicit_resizes() -> None:
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.zero_()
    image = torch.rand(3, 40, 30, generator=g)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.relu(conv(x))

    scales = (1.0, 1 / math.sqrt(2), 0.5)
    total = torch.zeros(4)
    for s, size in zip(scales, [(40, 30), (28, 21), (20, 15)]):
        x = image[None] if s == 1.0 else F.interpolate(image[None], size=size, mode="bilinear",
                                                       antialias=True, align_corners=False)
        v = forward(x)[0].amax(dim=(1, 2))
        total += v / v.norm()
    torch.testing.assert_close(multiscale_global(forward, image, scales), total / total.norm())
    # a custom pooling is used at every scale
    gem = multiscale_global(forward, image, scales, pool_fn=lambda A: A.pow(3).mean((1, 2)).pow(1 / 3))
    assert not torch.allclose(gem, total / total.norm()) and float(gem.norm()) == pytest.approx(1.0)
