"""Multi-scale global descriptors: pool the activations of several resized copies of an image.

``L2( sum_s L2(pool(forward(resize(image, s)))) )`` with the usual retrieval scales ``1, 1/sqrt(2), 1/2``
(Radenović et al.; Gordo et al. use a similar multi-resolution sum). Resizing is bilinear with
antialiasing, so downscaled copies do not alias.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.pooling import l2n

DEFAULT_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)


def resize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear, antialiased resize of a (3, H, W) tensor by ``scale`` (sides rounded, at least 1 px)."""
    if scale == 1.0:
        return image
    H, W = image.shape[-2:]
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def multiscale_global(forward_fn: Callable[[torch.Tensor], torch.Tensor], image_tensor: torch.Tensor,
                      scales: Sequence[float] = DEFAULT_SCALES,
                      pool_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Multi-scale descriptor (C,): L2 of the sum over ``scales`` of the L2-normalised pooled activations.

    ``forward_fn`` maps a batch (1, 3, h, w) to activations (1, C, h', w') (or (C, h', w')); ``pool_fn``
    maps (C, h', w') to (C,) (default: MAC, i.e. the spatial max).
    """
    total = None
    for s in scales:
        x = resize_image(image_tensor, float(s))
        A = forward_fn(x[None])
        if A.dim() == 4:
            A = A[0]
        v = pool_fn(A) if pool_fn is not None else A.amax(dim=(-2, -1))
        v = l2n(v.reshape(-1))
        total = v if total is None else total + v
    if total is None:
        raise ValueError("at least one scale is needed")
    return l2n(total)
