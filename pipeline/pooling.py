"""Global and regional pooling of conv activations (ALGORITHMS.md §1).

All functions take an activation map ``A`` of shape ``(C, H, W)`` (or ``(B, C, H, W)`` where noted) as a
torch tensor on any device and return tensors on that device.
"""
from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-12


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalise along ``dim``; all-zero vectors stay zero instead of becoming NaN."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(EPS)


def l2n_np(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numpy twin of :func:`l2n`."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, EPS)


def mac(A: torch.Tensor) -> torch.Tensor:
    """MAC: channel-wise spatial max, L2-normalised. ``A``: (C,H,W) or (B,C,H,W)."""
    return l2n(A.amax(dim=(-2, -1)))


def spoc(A: torch.Tensor) -> torch.Tensor:
    """SPoC: channel-wise spatial sum, L2-normalised."""
    return l2n(A.sum(dim=(-2, -1)))


def gem(A: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """GeM: generalised mean ``(mean_p A^p)^(1/p)`` per channel, L2-normalised."""
    pooled = A.clamp_min(0).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    return l2n(pooled)


def regional_mac(A: torch.Tensor, boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Max-pool ``A`` (C,H,W) inside each half-open cell box ``[x0,y0,x1,y1]``; returns (R, C), not normalised.

    Boxes are clipped to the map; an empty box pools to 0 (activations are non-negative, so clamping at 0 is
    exact). The max is separable: boxes that share a row range share one max over those rows (C, W), and each
    box then takes the max of its columns of it. This reads each region's cells once; the former masked max
    over an (R, C, H*W) tensor moved R full maps through memory and was 10 ms of an image's 26 ms of features
    at 1,024 px (``experiments/profile_extract.py``). Differentiable (slices and ``amax``).
    """
    C, H, W = A.shape
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.int64).reshape(-1, 4)
    if b.shape[0] == 0:
        return A.new_zeros((0, C))
    x0, x1 = np.clip(b[:, 0], 0, W), np.clip(b[:, 2], 0, W)
    y0, y1 = np.clip(b[:, 1], 0, H), np.clip(b[:, 3], 0, H)
    zero = A.new_zeros((C,))
    out: list[torch.Tensor] = [zero] * b.shape[0]
    rows_max: dict[tuple[int, int], torch.Tensor] = {}
    for i in range(b.shape[0]):
        if x1[i] <= x0[i] or y1[i] <= y0[i]:
            continue
        key = (int(y0[i]), int(y1[i]))
        rows = rows_max.get(key)
        if rows is None:
            rows = rows_max[key] = A[:, key[0]:key[1], :].amax(dim=1)      # (C, W)
        out[i] = rows[:, int(x0[i]):int(x1[i])].amax(dim=1).clamp_min(0)
    return torch.stack(out)


def _grid_starts(extent: int, n_extra: int, level: int, side: int, half: int) -> np.ndarray:
    """Start offsets of the ``level + n_extra`` regions of side ``side`` placed uniformly along ``extent``."""
    n = level + n_extra
    step = 0.0 if n == 1 else (extent - side) / (n - 1)
    return (np.floor(half + np.arange(n) * step) - half).astype(np.int64)


def rmac_grid(height: int, width: int, levels: int = 3, overlap: float = 0.4,
              include_full: bool = True) -> np.ndarray:
    """The rigid multi-scale R-MAC grid of Tolias et al. (used by seed 003) on an H x W feature map.

    At level ``l`` (1..levels) square regions of side ``floor(2*min(H,W)/(l+1))`` are placed uniformly;
    the number of positions along the long side is chosen among 2..7 so that neighbouring regions
    overlap closest to ``overlap``. Returns int64 half-open cell boxes ``[x0, y0, x1, y1]``; the full map
    comes first when ``include_full``.
    """
    short = min(height, width)
    steps = np.arange(2, 8, dtype=np.float64)
    b = (max(height, width) - short) / (steps - 1)
    extra = int(np.argmin(np.abs((short ** 2 - short * b) / short ** 2 - overlap))) + 1
    extra_w = extra if height < width else 0
    extra_h = extra if height > width else 0
    boxes: list[tuple[int, int, int, int]] = []
    if include_full:
        boxes.append((0, 0, width, height))
    for level in range(1, levels + 1):
        side = int(math.floor(2 * short / (level + 1)))
        if side == 0:
            continue
        half = int(math.floor(side / 2 - 1))

        for y0 in _grid_starts(height, extra_h, level, side, half):
            for x0 in _grid_starts(width, extra_w, level, side, half):
                boxes.append((int(x0), int(y0), int(x0) + side, int(y0) + side))
    out = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    return out


def rmac_from_regions(region_descriptors: torch.Tensor, whiten=None) -> torch.Tensor:
    """R-MAC: ``L2(sum_R w(m_A(R)))`` over regional MACs (R, C); ``whiten`` maps (R,C)->(R,d) or None (L2 only)."""
    x = l2n(region_descriptors)
    if whiten is not None:
        x = whiten(x)
    return l2n(x.sum(dim=0))
