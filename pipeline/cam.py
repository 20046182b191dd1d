"""Class activation maps (CAM) and class-weighted descriptors of seed 004 (ALGORITHMS.md §7).

For a CNN whose activations ``A`` (C, H, W) feed global average pooling then a linear classifier with
``weight`` (K classes, C) and ``bias`` (K,):

* ``CAM_c = sum_k A_k w_{c,k}``, min-max normalised to [0, 1] as in Zhou et al.'s CAM (the map is on the
  feature grid already, so the "resize to the feature map" of the paper is the identity);
* class vector ``f^(c)_k = CW_k sum_ij A_kij CAM_c,ij`` with CroW channel weights ``CW`` (sum pooling, to
  cover the object's extent rather than its most discriminative part);
* OfA descriptor: for the image's own top-``N_C`` classes, each class vector L2 / whiten / L2, then summed
  and L2-normalised. The predefined-class variant uses a fixed class list for every image (this is the
  offline equivalent of the paper's OnA, which uses the query's classes for all database images);
* regions for re-ranking: the box of the largest connected component of the (top-2 averaged) CAM
  thresholded at 1, 10, 20, 30, 40 % of its max.

``A`` is a torch tensor; ``weight``/``bias`` may be torch or numpy and are moved to ``A``'s device.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from pipeline.crow import crow_channel_weights
from pipeline.pooling import l2n

CAM_THRESHOLDS = (0.01, 0.1, 0.2, 0.3, 0.4)

Whiten = Callable[[torch.Tensor], torch.Tensor]


def _as(t: torch.Tensor | np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(t) if not torch.is_tensor(t) else t).to(device=like.device, dtype=like.dtype)


def class_activation_maps(A: torch.Tensor, weight: torch.Tensor | np.ndarray,
                          classes: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
    """CAMs of ``classes``: ``(len(classes), H, W)``, each ``sum_k A_k w_{c,k}`` min-max normalised to [0, 1].

    A constant map (e.g. all-zero activations) becomes all zeros.
    """
    w = _as(weight, A)
    idx = torch.as_tensor(np.asarray(classes, dtype=np.int64) if not torch.is_tensor(classes) else classes,
                          device=A.device).long().reshape(-1)
    cams = torch.einsum("nc,chw->nhw", w[idx], A)
    lo = cams.amin(dim=(1, 2), keepdim=True)
    hi = cams.amax(dim=(1, 2), keepdim=True)
    rng = hi - lo
    return torch.where(rng > 0, (cams - lo) / rng.clamp_min(1e-12), torch.zeros_like(cams))


def class_logits(A: torch.Tensor, weight: torch.Tensor | np.ndarray,
                 bias: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    """Classifier logits (K,) of the GAP + linear head: ``W mean_hw(A) + b``."""
    logits = _as(weight, A) @ A.mean(dim=(1, 2))
    if bias is not None:
        logits = logits + _as(bias, A)
    return logits


def top_classes(A: torch.Tensor, weight: torch.Tensor | np.ndarray,
                bias: torch.Tensor | np.ndarray | None, n: int) -> torch.Tensor:
    """Indices (n,) of the ``n`` highest-scoring classes, best first."""
    logits = class_logits(A, weight, bias)
    return torch.topk(logits, min(n, logits.numel())).indices


def cam_class_vectors(A: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """Class vectors ``(N_C, C)``: ``f^(c)_k = CW_k * sum_ij A_kij CAM_c,ij`` (CroW channel weights, not normalised)."""
    return crow_channel_weights(A)[None, :] * torch.einsum("chw,nhw->nc", A, cams)


def _aggregate(vectors: torch.Tensor, whiten: Whiten | None) -> torch.Tensor:
    x = l2n(vectors)
    if whiten is not None:
        x = whiten(x)
    return l2n(l2n(x).sum(dim=0))


def cam_ofa(A: torch.Tensor, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None,
            n_classes: int = 64, whiten: Whiten | None = None) -> torch.Tensor:
    """Offline-aggregation descriptor: the image's top-``n_classes`` class vectors, each L2 / whiten / L2, summed, L2.

    ``whiten`` maps (N, C) -> (N, d) (e.g. ``Whitening.apply``); None keeps the C-dim L2-normalised vectors.
    """
    classes = top_classes(A, weight, bias, n_classes)
    return _aggregate(cam_class_vectors(A, class_activation_maps(A, weight, classes)), whiten)


def cam_predefined(A: torch.Tensor, weight: torch.Tensor | np.ndarray,
                   class_ids: Sequence[int] | torch.Tensor | np.ndarray, whiten: Whiten | None = None) -> torch.Tensor:
    """Descriptor aggregated over a fixed class list (same classes for every image), like :func:`cam_ofa`."""
    return _aggregate(cam_class_vectors(A, class_activation_maps(A, weight, class_ids)), whiten)


def top_cam_map(A: torch.Tensor, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None,
                k: int = 2) -> torch.Tensor:
    """Average of the normalised CAMs of the top-``k`` classes (H, W); seed 004 uses ``k = 2`` for its boxes."""
    return class_activation_maps(A, weight, top_classes(A, weight, bias, k)).mean(dim=0)


_EIGHT = np.ones((3, 3), dtype=bool)


def cam_boxes(cam: torch.Tensor | np.ndarray, thresholds: Sequence[float] = CAM_THRESHOLDS) -> np.ndarray:
    """Box of the largest 8-connected component of ``cam >= t * max(cam)`` for each threshold ``t``.

    Returns float64 ``(T, 4)`` ``[x0, y0, x1, y1]`` in continuous cell coordinates (the component's cells
    ``[xmin, xmax] x [ymin, ymax]`` become ``[xmin, ymin, xmax + 1, ymax + 1]``). Ties in component size go
    to the component with the larger CAM mass. A map with a non-positive max gives the whole map.
    """
    m = cam.detach().cpu().numpy() if torch.is_tensor(cam) else np.asarray(cam)
    m = m.astype(np.float64, copy=False)
    H, W = m.shape
    top = m.max()
    out = np.empty((len(thresholds), 4), dtype=np.float64)
    for i, t in enumerate(thresholds):
        if not top > 0:
            out[i] = (0, 0, W, H)
            continue
        labels, n = ndimage.label(m >= t * top, structure=_EIGHT)
        flat = labels.ravel()
        size = np.bincount(flat, minlength=n + 1)[1:]
        mass = np.bincount(flat, weights=m.ravel(), minlength=n + 1)[1:]
        best = 1 + int(np.lexsort((-mass, -size))[0])
        ys, xs = np.nonzero(labels == best)
        out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out
