"""Box conversions between feature cells and image pixels, and box utilities."""
from __future__ import annotations

import numpy as np


def to_cells(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Round continuous cell boxes ``[x0,y0,x1,y1]`` outward to half-open int cells inside an H x W map.

    Every box keeps at least one cell, so pooling never sees an empty region.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty(b.shape, dtype=np.int64)
    out[:, 0] = np.clip(np.floor(b[:, 0]), 0, width - 1)
    out[:, 1] = np.clip(np.floor(b[:, 1]), 0, height - 1)
    out[:, 2] = np.clip(np.ceil(b[:, 2]), 1, width)
    out[:, 3] = np.clip(np.ceil(b[:, 3]), 1, height)
    out[:, 2] = np.maximum(out[:, 2], out[:, 0] + 1)
    out[:, 3] = np.maximum(out[:, 3], out[:, 1] + 1)
    return out


def cells_to_pixels(boxes: np.ndarray, feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """Map cell boxes (half-open, on an h x w grid) to float32 pixel boxes of an H x W image."""
    fh, fw = feat_hw
    ih, iw = image_hw
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([iw / fw, ih / fh, iw / fw, ih / fh])
    return (b * scale).astype(np.float32)


def pixels_to_cells(boxes: np.ndarray, feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """Map pixel boxes of an H x W image to half-open int cell boxes on an h x w grid."""
    fh, fw = feat_hw
    ih, iw = image_hw
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([fw / iw, fh / ih, fw / iw, fh / ih])
    return to_cells(b * scale, fh, fw)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of float boxes ``[x0,y0,x1,y1]``: (N,4) x (M,4) -> (N,M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
