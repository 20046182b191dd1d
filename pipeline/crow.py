"""CroW: cross-dimensional weighting and pooling (Kalantidis, Mellina, Osindero, ECCV-W 2016).

Used directly as a global descriptor and, through :func:`crow_channel_weights`, by the CAM class vectors of
seed 004 (ALGORITHMS.md §7). ``A`` is a non-negative ``(C, H, W)`` torch tensor.

* Spatial weights: ``S' = sum_k A_k``; ``alpha = (S' / ||S'||_a)^(1/b)`` with the paper's ``a = 2, b = 2``
  (power normalisation: divide by the L2 norm, then square root).
* Channel weights: ``Q_k`` = fraction of non-zero positions of channel ``k``,
  ``beta_k = log(sum_n Q_n / Q_k)`` (an IDF of channel sparsity), 0 for a never-active channel (as in the
  authors' code: such a channel contributes 0 to the descriptor anyway).
* Descriptor: ``f_k = beta_k * sum_ij alpha_ij A_kij``, L2-normalised. PCA-whitening is applied afterwards by
  :class:`pipeline.whitening.Whitening`, as in the paper.
"""
from __future__ import annotations

import torch

from pipeline.pooling import l2n


def crow_spatial_weights(A: torch.Tensor, a: float = 2.0, b: float = 2.0) -> torch.Tensor:
    """CroW spatial weights (H, W): channel sum, divided by its ``L_a`` norm, to the power ``1/b``."""
    S = A.sum(dim=0)
    z = S.pow(a).sum().pow(1.0 / a).clamp_min(1e-12)
    return (S / z).pow(1.0 / b)


def crow_channel_weights(A: torch.Tensor) -> torch.Tensor:
    """CroW channel weights (C,): ``log(sum_n Q_n / Q_k)`` with ``Q_k`` the non-zero fraction; 0 where ``Q_k = 0``."""
    Q = (A > 0).flatten(1).to(torch.float64).mean(dim=1)
    total = Q.sum()
    w = torch.where(Q > 0, torch.log(total / Q.clamp_min(1e-300)), torch.zeros_like(Q))
    return w.to(A.dtype)


def crow(A: torch.Tensor, a: float = 2.0, b: float = 2.0) -> torch.Tensor:
    """CroW global descriptor (C,): channel-weighted, spatially-weighted sum pooling, L2-normalised."""
    alpha = crow_spatial_weights(A, a, b)
    pooled = torch.einsum("chw,hw->c", A, alpha)
    return l2n(crow_channel_weights(A) * pooled)
