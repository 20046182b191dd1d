"""Deep local features from conv activations (DELF-style, seed 002 §5 "Image representation").

A local feature is the activation vector ``A[:, i, j]`` at one position of a feature map; its strength is the
L2 norm of that vector (the attention-free analogue of DELF's attention score). The strongest ``n``
positions are kept, then descriptors are L2-normalised, PCA-reduced (to ``D = 128`` by default) and
L2-normalised again, as DELF does before ASMK aggregation.

Positions are returned in pixels of the *original* image (cell centres mapped with the same scaling as
:func:`pipeline.regions.cells_to_pixels`), so they can be tested against region boxes stored in pixels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

EPS = 1e-12


def _as_numpy(A: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(A, torch.Tensor):
        return A.detach().to("cpu", torch.float32).numpy()
    return np.asarray(A, dtype=np.float32)


def _cell_centres(h: int, w: int, stride: float | None, image_hw: tuple[int, int] | None) -> np.ndarray:
    """(h*w, 2) pixel centres ``(x, y)`` of the cells of an h x w map, row-major like ``A.reshape(C, -1)``."""
    if image_hw is not None:
        sy, sx = image_hw[0] / h, image_hw[1] / w
    elif stride is not None:
        sy = sx = float(stride)
    else:
        raise ValueError("give image_hw (original image size) or stride")
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.stack([(xs.ravel() + 0.5) * sx, (ys.ravel() + 0.5) * sy], axis=1).astype(np.float32)


def select_local_features(A: torch.Tensor | np.ndarray, n: int = 1000, stride: float | None = None,
                          image_hw: tuple[int, int] | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``n`` strongest positions of an activation map ``A`` (C, H, W).

    Strength is ``||A[:, i, j]||_2``; ties keep row-major order. Positions with zero strength are never
    kept (they carry no descriptor). Returns ``xy`` (m, 2) float32 pixel centres in the original image
    (``image_hw = (height, width)``; without it, ``stride`` maps cells to network-input pixels),
    ``strengths`` (m,) float32 in decreasing order and raw ``descriptors`` (m, C) float32, ``m <= n``.
    """
    a = _as_numpy(A)
    if a.ndim != 3:
        raise ValueError(f"A must be (C, H, W), got {a.shape}")
    C, H, W = a.shape
    flat = a.reshape(C, H * W).T  # (H*W, C)
    strength = np.linalg.norm(flat, axis=1)
    order = np.argsort(-strength, kind="stable")[: max(int(n), 0)]
    order = order[strength[order] > 0]
    xy = _cell_centres(H, W, stride, image_hw)[order]
    return xy, strength[order].astype(np.float32), np.ascontiguousarray(flat[order], dtype=np.float32)


def select_local_features_multiscale(maps: Sequence[tuple[torch.Tensor | np.ndarray, float]], n: int = 1000,
                                     image_hw: tuple[int, int] | None = None,
                                     strides: Sequence[float] | None = None
                                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``n`` features over several activation maps of one image computed at different input scales.

    ``maps`` holds ``(A, scale)`` pairs (``A`` (C, H_s, W_s) from the image resized by ``scale``); every map
    covers the whole image, so with ``image_hw`` all positions land in the same original pixel frame.
    Strengths are compared across scales (as DELF's image pyramid does). Returns ``xy`` (m, 2),
    ``scales`` (m,), ``strengths`` (m,) and ``descriptors`` (m, C).
    """
    xys, scs, sts, dss = [], [], [], []
    for k, (A, scale) in enumerate(maps):
        stride = None if strides is None else float(strides[k]) / float(scale)
        xy, st, ds = select_local_features(A, n=n, stride=stride, image_hw=image_hw)
        xys.append(xy)
        sts.append(st)
        dss.append(ds)
        scs.append(np.full(len(st), scale, dtype=np.float32))
    if not xys:
        raise ValueError("no activation maps given")
    xy, sc, st, ds = (np.concatenate(v) for v in (xys, scs, sts, dss))
    order = np.argsort(-st, kind="stable")[:n]
    return xy[order], sc[order], st[order], ds[order]


def learn_pca(X: np.ndarray, dim: int = 128, whiten: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Learn PCA on L2-normalised rows of ``X`` (N, C): returns ``mean`` (C,) and ``projection`` (C, dim).

    Columns of ``projection`` are the leading eigenvectors of the covariance (sign fixed so the largest
    absolute entry is positive, for reproducibility); with ``whiten`` each is divided by sqrt(eigenvalue).
    """
    x = np.asarray(X, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)
    if dim > x.shape[1]:
        raise ValueError(f"PCA dim {dim} exceeds input dim {x.shape[1]}")
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(len(x) - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    idx = np.argsort(evals)[::-1][:dim]
    evals, evecs = evals[idx], evecs[:, idx]
    signs = np.sign(evecs[np.abs(evecs).argmax(axis=0), np.arange(dim)])
    evecs = evecs * np.where(signs == 0, 1.0, signs)
    if whiten:
        evecs = evecs / np.sqrt(np.maximum(evals, EPS))
    return mean.astype(np.float32), evecs.astype(np.float32)


def apply_pca(X: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``l2n((l2n(X) - mean) @ projection)``: the D-dimensional local descriptors ASMK aggregates."""
    x = np.asarray(X, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)
    y = (x - mean) @ projection
    return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), EPS)).astype(np.float32)
