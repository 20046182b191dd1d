"""Object saliency (OS) maps, seed 001 §3.8 eq. (14) (ALGORITHMS.md §5).

For every position ``p`` of an image with activation map ``A`` (C, H, W) and feature saliency ``F_hat``
(H, W), the descriptor ``u_p = w(m_A(R_p))`` of the square patch ``R_p`` of side ``a`` centred at ``p`` is
matched against the collection's region descriptors ``V`` (n, d); with ``N_p`` its k nearest neighbours,

    S[p] = F_hat[p]^Theta * sum_{i in N_p} s(v_i, u_p) f_i^theta g*_i,     s(v, u) = max(v.u, 0)^beta,

where ``f_i`` is the mean feature saliency of region ``i`` and ``g*`` its Katz centrality
(:mod:`pipeline.katz`). Only ``V``, ``f`` and ``g*`` are needed, not the graph, so a new image (not in the
graph) gets an OS map the same way. Defaults: ``Theta = 2``, ``theta = 3`` (paper §4.1), ``beta = 3`` as for
the graph, ``k = 50`` as the graph's k.

Patch side ``a``: the paper does not give a value for ``a``. We default to ``a = 3`` cells: the smallest odd
(hence truly centred) side that pools more than the single cell it is centred on, so neighbouring cells'
maps differ only by what the patch sees and the map keeps the feature-grid resolution that EGM then works
on; ``experiments.bench_saliency`` reports the OS box-mass precision for sides 3 and 5 so the choice is checked on
real images. An even ``a`` is allowed: the window then extends one more cell down/right.

Patch pooling is vectorised: the max over every ``a x a`` window is one ``max_pool2d`` with stride 1. The map
is zero-padded rather than ``-inf``-padded, which is exact for non-negative activations (a window that
crosses the border pools only the cells inside the map, i.e. the patch is clipped to the map).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from pipeline import egm as egm_mod
from pipeline import pooling
from pipeline.egm import OS_EGM, EGMParams
from pipeline.extract import ImageFeatures
from pipeline.knn_graph import SearchFn, exact_search_fn, index_search_fn
from pipeline.pooling import l2n
from pipeline.regions import cells_to_pixels, to_cells
from pipeline.saliency import box_saliency, feature_saliency

DEFAULT_PATCH_SIDE = 3
DEFAULT_K = 50
DEFAULT_BETA = 3.0
DEFAULT_THETA_MAP = 2.0  # Theta: exponent of the image's own F_hat
DEFAULT_THETA_REGION = 3.0  # theta: exponent of the neighbours' feature saliency f_i


@dataclass(frozen=True)
class ObjectSaliencyConfig:
    """The ``object_saliency`` stage (eq. 14 and OS.EGM; ALGORITHMS.md §5 defaults). ``beta`` is the graph's."""

    k: int = DEFAULT_K                  # neighbours of each patch descriptor among the graph's regions
    patch_side: int = DEFAULT_PATCH_SIDE  # side (feature cells) of the square patch R_p around each position
    Theta: float = DEFAULT_THETA_MAP
    theta: float = DEFAULT_THETA_REGION
    egm: EGMParams = OS_EGM             # OS map sharpening + EGM (seed 001 §4.2)

    def __post_init__(self) -> None:
        if self.k < 1 or self.patch_side < 1:
            raise ValueError("k and patch_side must be >= 1")


def apply_whitening(x: torch.Tensor, whiten: Any | None) -> torch.Tensor:
    """Region post-processing ``w(.)`` on rows of ``x`` (N, C) -> (N, d), L2-normalised.

    ``whiten`` is None (L2 only), an object with ``mean`` (C,) and ``projection`` (C, d) arrays
    (``pipeline.whitening.Whitening``; applied as ``l2n((l2n(x) - mean) @ projection)`` per
    ARCHITECTURE.md), or any callable mapping (N, C) -> (N, d) (tensor or array).
    """
    x = l2n(x)
    if whiten is None:
        return x
    if hasattr(whiten, "mean") and hasattr(whiten, "projection") and not callable(whiten):
        mean = torch.as_tensor(np.asarray(whiten.mean), dtype=x.dtype, device=x.device)
        proj = torch.as_tensor(np.asarray(whiten.projection), dtype=x.dtype, device=x.device)
        return l2n((x - mean) @ proj)
    out = whiten(x)
    if not torch.is_tensor(out):
        out = torch.as_tensor(np.asarray(out), device=x.device)
    return l2n(out.to(x.dtype))


def patch_max(A: torch.Tensor, side: int = DEFAULT_PATCH_SIDE) -> torch.Tensor:
    """``m_A(R_p)`` for every position: (C, H, W) -> (C, H, W), max over the ``side x side`` patch at ``p``.

    The patch covers rows ``y - (side-1)//2 .. y + side//2`` (same for columns), clipped to the map.
    """
    if side < 1:
        raise ValueError("patch side must be >= 1")
    if side == 1:
        return A
    lo, hi = (side - 1) // 2, side // 2
    padded = F.pad(A[None], (lo, hi, lo, hi))  # zeros: exact for non-negative A
    return F.max_pool2d(padded, kernel_size=side, stride=1)[0]


def patch_descriptors(A: torch.Tensor, side: int = DEFAULT_PATCH_SIDE, whiten: Any | None = None) -> torch.Tensor:
    """``u_p = w(m_A(R_p))`` for all ``H*W`` positions in row-major order (p = y*W + x): (H*W, d) tensor."""
    A = torch.as_tensor(A)
    C, H, W = A.shape
    pooled = patch_max(A, side).reshape(C, H * W).T
    return apply_whitening(pooled, whiten)


def object_saliency(F_hat: torch.Tensor | np.ndarray, u: torch.Tensor | np.ndarray, f: np.ndarray, g: np.ndarray,
                    V: np.ndarray | None = None, search: SearchFn | None = None, k: int = DEFAULT_K,
                    beta: float = DEFAULT_BETA, Theta: float = DEFAULT_THETA_MAP,
                    theta: float = DEFAULT_THETA_REGION, normalize: bool = True) -> np.ndarray:
    """OS map (H, W) float32 by eq. (14) from patch descriptors ``u`` (H*W, d) of one image.

    Neighbours come from ``search(u, k) -> (sims, ids)`` (e.g. ``knn_graph.index_search_fn(index)`` built
    once for the collection), or, without ``search``, from an exact search over ``V`` (n, d). ``f`` (n,) and
    ``g`` (n,) are the regions' feature saliency and Katz centrality. ``normalize`` scales the map to max 1
    (the saliency-map convention; an all-zero map stays zero); pass False for the raw eq. (14) values.
    """
    Fh = np.asarray(F_hat.detach().cpu() if torch.is_tensor(F_hat) else F_hat, dtype=np.float64)
    U = np.ascontiguousarray(np.asarray(u.detach().cpu() if torch.is_tensor(u) else u, dtype=np.float32))
    H, W = Fh.shape
    if U.shape[0] != H * W:
        raise ValueError(f"u has {U.shape[0]} rows, expected H*W = {H * W}")
    if search is None:
        if V is None:
            raise ValueError("object_saliency needs V or a search function")
        search = exact_search_fn(V)
    sims, ids = search(U, k)
    f = np.asarray(f, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    s = np.maximum(sims.astype(np.float64), 0.0) ** beta
    weight = np.where(valid, s * f[safe] ** theta * g[safe], 0.0)
    S = (np.clip(Fh, 0, None).ravel() ** Theta * weight.sum(axis=1)).reshape(H, W)
    if normalize and S.max() > 0:
        S = S / S.max()
    return S.astype(np.float32)


def object_saliency_map(A: torch.Tensor, F_hat: torch.Tensor | np.ndarray, f: np.ndarray, g: np.ndarray,
                        V: np.ndarray | None = None, search: SearchFn | None = None,
                        whiten: Any | None = None, side: int = DEFAULT_PATCH_SIDE, **kwargs) -> np.ndarray:
    """Convenience: :func:`patch_descriptors` then :func:`object_saliency` for one activation map ``A``."""
    u = patch_descriptors(A, side=side, whiten=whiten)
    return object_saliency(F_hat, u, f, g, V=V, search=search, **kwargs)


def subgrid_cells(cells: np.ndarray) -> np.ndarray:
    """OS.EGM-4's 2-scale grid inside each region: the region itself plus its 2 x 2 sub-regions."""
    out = []
    for x0, y0, x1, y1 in np.asarray(cells, np.int64).reshape(-1, 4):
        out.append((x0, y0, x1, y1))
        xm, ym = (x0 + x1 + 1) // 2, (y0 + y1 + 1) // 2
        for a, b in ((x0, xm), (xm, x1)):
            for c, d in ((y0, ym), (ym, y1)):
                if b > a and d > c:
                    out.append((a, c, b, d))
    return np.asarray(out, np.int64).reshape(-1, 4)


class ObjectSaliencyComputer:
    """Per-image OS computation (seed 001 §3.8-3.9), shared by the stage's actors and the query side.

    Only the collection's region index (over ``V``), saliencies ``f`` and centralities ``g`` are needed, so an
    image that is not in the graph (a new image, a query) is handled the same way as a database image.
    """

    def __init__(self, whitening: Any, f: np.ndarray, g: np.ndarray, index: faiss.Index,
                 config: ObjectSaliencyConfig, beta: float) -> None:
        self.white, self.f, self.g, self.config, self.beta = whitening, f, g, config, beta
        self.search = index_search_fn(index)

    def saliency(self, A: torch.Tensor) -> np.ndarray:
        """Object-saliency map (H, W) of one activation map."""
        c = self.config
        fhat = feature_saliency(A)
        return object_saliency_map(A, fhat, self.f, self.g, search=self.search, whiten=self.white,
                                   side=c.patch_side, k=c.k, beta=self.beta, Theta=c.Theta, theta=c.theta)

    def features(self, A: torch.Tensor, image_hw: tuple[int, int], saliency: np.ndarray | None = None
                 ) -> ImageFeatures:
        """OS map (``saliency`` when the caller already has it) -> OS.EGM regions with descriptors, and the
        two OS global sums (``os_egm_sum``, ``os_egm4_sum``; whitened later by the descriptors stage)."""
        A = A.float()
        C, H, W = A.shape
        S = self.saliency(A) if saliency is None else saliency
        boxes, scores = egm_mod.detect_regions_with(S, self.config.egm)
        out = ImageFeatures(feat_hw=(H, W), proc_hw=(0, 0), sparsity=np.zeros(C, np.float32),
                            act_mean=float(A.mean()), act_max=float(A.max()))
        if len(boxes) == 0:  # nothing salient: fall back to the whole image so every image gets a descriptor
            boxes, scores = np.array([[0.0, 0.0, W, H]]), np.array([1.0])
        cells = to_cells(boxes, H, W)
        desc = pooling.regional_mac(A, cells)
        out.region_desc = desc.cpu().numpy().astype(np.float32)
        out.region_source = ["os_egm"] * len(cells)
        out.region_level = np.zeros(len(cells), np.int16)
        out.region_score = np.asarray(scores, np.float32)
        out.region_saliency = box_saliency(torch.from_numpy(S), cells).numpy().astype(np.float32)
        out.region_boxes = cells_to_pixels(cells, (H, W), image_hw)
        out.globals["os_egm_sum"] = pooling.l2n(desc).sum(0).cpu().numpy().astype(np.float32)
        sub = pooling.regional_mac(A, subgrid_cells(cells))
        out.globals["os_egm4_sum"] = pooling.l2n(sub).sum(0).cpu().numpy().astype(np.float32)
        return out


def given_box_features(A: torch.Tensor, image_hw: tuple[int, int]) -> ImageFeatures:
    """Seed 001's query side: a query given with a box is not searched for regions -- the box (the whole cropped
    query) is its one FS.EGM and OS.EGM region. Returns that region for both sources and the raw sums of
    ``fs_egm`` / ``os_egm`` / ``os_egm4`` computed over it (OS.EGM-4 pools the box's 2-scale grid)."""
    A = A.float()
    C, H, W = A.shape
    cells = np.array([[0, 0, W, H]], np.int64)
    desc = pooling.regional_mac(A, cells)
    out = ImageFeatures(feat_hw=(H, W), proc_hw=(0, 0), sparsity=np.zeros(C, np.float32),
                        act_mean=float(A.mean()), act_max=float(A.max()))
    box = cells_to_pixels(cells, (H, W), image_hw)
    out.region_desc = np.repeat(desc.cpu().numpy().astype(np.float32), 2, axis=0)
    out.region_source = ["fs_egm", "os_egm"]
    out.region_level = np.zeros(2, np.int16)
    out.region_score = np.ones(2, np.float32)
    out.region_saliency = np.ones(2, np.float32)
    out.region_boxes = np.repeat(box, 2, axis=0)
    total = pooling.l2n(desc).sum(0).cpu().numpy().astype(np.float32)
    out.globals = {"fs_egm_sum": total, "os_egm_sum": total.copy(),
                   "os_egm4_sum": pooling.l2n(pooling.regional_mac(A, subgrid_cells(cells))).sum(0)
                   .cpu().numpy().astype(np.float32)}
    return out
