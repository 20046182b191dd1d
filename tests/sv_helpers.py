"""Synthetic images for the keypoint / verification tests (fixed seeds, built in memory)."""
from __future__ import annotations

import cv2
import numpy as np


def texture(width: int = 512, height: int = 384, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 'poster': random filled shapes, lines and text on smooth noise -- plenty
    of corners and blobs at several scales, none repeated, so keypoints are distinctive."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8),
                      (width, height), interpolation=cv2.INTER_CUBIC)
    img = np.ascontiguousarray(base)
    for _ in range(60):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 4)
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if kind == 0:
            cv2.circle(img, (x, y), int(rng.integers(4, 30)), color, -1)
        elif kind == 1:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(6, 60)), y + int(rng.integers(6, 60))), color, -1)
        elif kind == 2:
            cv2.line(img, (x, y), (int(rng.integers(0, width)), int(rng.integers(0, height))), color, 2)
        else:
            cv2.putText(img, str(int(rng.integers(10, 999))), (x, y), cv2.FONT_HERSHEY_SIMPLEX,
                        float(rng.uniform(0.5, 1.5)), color, 2)
    return img


def warp(img: np.ndarray, H: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """``img`` warped by the homography ``H`` (source pixel -> target pixel), grey border."""
    w, h = size or (img.shape[1], img.shape[0])
    return cv2.warpPerspective(img, H, (w, h), flags=cv2.INTER_LINEAR, borderValue=(128, 128, 128))


# a moderate viewpoint change: rotation ~8 deg, scale ~0.9, some perspective, shift
H_TRUE = np.array([[0.88, -0.12, 40.0], [0.13, 0.90, 10.0], [1.5e-4, -1.0e-4, 1.0]])
