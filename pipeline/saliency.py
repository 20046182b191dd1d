"""Feature saliency (FS) maps of seed 001 §3.3 (ALGORITHMS.md §2) and per-box saliency.

FS is CroW-like: an IDF-style weight per channel amplifies channels that fire at few positions, the
weighted channel sum is a 2-d map, and the CroW normalisation (divide by the L2 norm, square root) flattens
its dynamic range before it is scaled to max 1. Unlike CroW the channel weights are applied *before* the
spatial sum (the order of CAM), so rare channels shape the map.

Torch in / torch out (same device); ``A`` is ``(C, H, W)`` non-negative.
"""
from __future__ import annotations

import numpy as np
import torch

EPS = 1e-6


def channel_weights(A: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """IDF-like channel weights ``b_j = log(sum_k (a_k + eps) / (a_j + eps))``, ``a_j`` = non-zero fraction of
    channel j.

    Channels active at few positions get large weights. ``eps`` keeps an all-zero channel finite (its
    weight multiplies an all-zero map, so it has no effect on the saliency).
    """
    a = (A > 0).flatten(1).to(torch.float64).mean(dim=1)  # (C,)
    b = torch.log((a + eps).sum() / (a + eps))
    return b.to(A.dtype)


def feature_saliency(A: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """FS map ``F_hat`` (H, W): ``F = sum_j b_j A_j``, divided by its L2 norm, square-rooted, scaled to max 1.

    An all-zero activation map gives an all-zero saliency map.
    """
    b = channel_weights(A, eps)
    F = torch.einsum("c,chw->hw", b, A).clamp_min(0)
    F = (F / F.norm().clamp_min(1e-12)).sqrt()
    return F / F.max().clamp_min(1e-12)


def sharpen(S: torch.Tensor | np.ndarray, tau: float, rho: float) -> torch.Tensor | np.ndarray:
    """Zero the values below ``tau * max(S)``, then raise to the power ``rho`` (contrast before detection).

    Works on torch tensors and numpy arrays alike and returns the same kind.
    """
    if isinstance(S, np.ndarray):
        m = S.max() if S.size else 0.0
        out = np.where(S >= tau * m, S, 0.0).astype(S.dtype, copy=False)
        return np.power(np.clip(out, 0, None), rho)
    m = S.max() if S.numel() else S.new_zeros(())
    out = torch.where(S >= tau * m, S, torch.zeros_like(S))
    return out.clamp_min(0).pow(rho)


def box_saliency(S: torch.Tensor, cell_boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Mean of map ``S`` (H, W) over each half-open int cell box ``[x0, y0, x1, y1]`` -> (R,).

    Uses a summed-area table, so the cost is O(HW + R) whatever the box sizes. Empty boxes give 0.
    """
    H, W = S.shape
    b = torch.as_tensor(np.asarray(cell_boxes, dtype=np.int64) if not torch.is_tensor(cell_boxes)
                        else cell_boxes, device=S.device).reshape(-1, 4).long()
    if b.shape[0] == 0:
        return S.new_zeros((0,))
    x0 = b[:, 0].clamp(0, W)
    y0 = b[:, 1].clamp(0, H)
    x1 = b[:, 2].clamp(0, W)
    y1 = b[:, 3].clamp(0, H)
    sat = torch.zeros((H + 1, W + 1), dtype=torch.float64, device=S.device)
    sat[1:, 1:] = S.to(torch.float64).cumsum(0).cumsum(1)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = ((x1 - x0).clamp_min(0) * (y1 - y0).clamp_min(0)).to(torch.float64)
    mean = torch.where(area > 0, total / area.clamp_min(1), torch.zeros_like(total))
    return mean.to(S.dtype)
