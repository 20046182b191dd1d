"""Query-side patch proposals and patch features for learned region scoring (seed 000 §3.1, ALGORITHMS.md §9).

A query image is decomposed into rectangular patches; each patch gets

* the *same* descriptor as a database region (``extract`` + ``descriptors`` stages): the pixel box is mapped
  to feature cells (:func:`pipeline.regions.pixels_to_cells`), max-pooled (the regional MAC of
  :func:`pipeline.pooling.regional_mac`, computed for thousands of boxes with a sparse table,
  :func:`range_max_pool`) and post-processed with the regional whitening ``w(.)``
  (:class:`pipeline.whitening.Whitening`), so a patch can be matched against the regional index directly;
* a feature vector for the region scorer (:mod:`pipeline.region_scoring`): that descriptor, the box geometry
  normalised by the image size, and the feature-saliency (FS) / object-saliency (OS) mass inside the box.

Departures from seed 000, with reasons:

* The paper learns on fc7 activations of the warped patch (one extra CNN forward per patch, ~2000 per image)
  and matches with pool5. We use the whitened regional MAC of the conv map for both: one forward per image,
  the descriptor that is matched is the one that is scored, and it lives in the database's region space.
  Geometry and saliency mass are added because a pooled descriptor alone does not say how large or how
  salient the patch is (the paper's fc7 of a warped patch partly encodes scale through blur/texture).
* Proposals: selective search in fast mode as in the paper; the EGM boxes of the FS map (seed 001) and the
  R-MAC grid (seed 003) are offered as cheaper alternative sources, selected with ``ProposalConfig.source``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from pipeline import egm as egm_mod
from pipeline import pooling
from pipeline import saliency as sal_mod
from pipeline.regions import cells_to_pixels, pixels_to_cells

PROPOSAL_SOURCES = ("selective_search", "egm", "grid")


@dataclass(frozen=True)
class ProposalConfig:
    """Where query patches come from.

    Defaults from seed 000 §3.1: selective search in fast mode (about 2000 proposals per image), proposals
    smaller than 25 x 25 pixels dropped. ``ss_base_k``, ``ss_inc_k``, ``ss_sigma`` are OpenCV's fast-mode
    defaults (those of Uijlings et al.'s fast mode). ``ss_max_side``: the image is downscaled so its longest
    side is at most this before selective search (its cost grows faster than linearly with the pixel count;
    at 500 px a museum-landmarks photo gives ~2000 proposals in ~2 s on one core, the paper's count) and the
    boxes are mapped back to the original pixels. ``max_proposals`` caps the count (0 = no cap) with a
    seeded uniform subsample, see :func:`selective_search_boxes`. ``grid_levels``/``egm`` settings are those of
    the database's regions (R-MAC L = 3; FS preset of seed 001 §4.2).
    """

    source: str = "selective_search"
    min_side: int = 25
    max_proposals: int = 2000
    ss_max_side: int = 500
    ss_base_k: int = 150
    ss_inc_k: int = 150
    ss_sigma: float = 0.8
    grid_levels: int = 3
    egm_tau: float = egm_mod.FS_EGM.tau
    egm_rho: float = egm_mod.FS_EGM.rho
    egm_sigma: float = egm_mod.FS_EGM.sigma
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in PROPOSAL_SOURCES:
            raise ValueError(f"unknown proposal source {self.source!r}; known: {PROPOSAL_SOURCES}")
        if self.min_side < 1 or self.ss_max_side < 16 or self.max_proposals < 0:
            raise ValueError("min_side >= 1, ss_max_side >= 16 and max_proposals >= 0 are required")


def _filter_boxes(boxes: np.ndarray, image_hw: tuple[int, int], min_side: int) -> np.ndarray:
    """Clip float pixel boxes to the image, drop those with a side under ``min_side``, de-duplicate (sorted)."""
    H, W = image_hw
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, W)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, H)
    keep = ((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side)
    b = b[keep].astype(np.float32)
    return np.unique(b, axis=0) if len(b) else b.reshape(0, 4)


def selective_search_boxes(image_rgb: np.ndarray, cfg: ProposalConfig = ProposalConfig()) -> np.ndarray:
    """Selective-search (fast mode) proposals of an RGB uint8 image (H, W, 3) as float32 pixel boxes ``[x0,y0,x1,y1]``.

    The image is downscaled to ``cfg.ss_max_side`` (never upscaled), OpenCV's
    ``ximgproc.segmentation`` runs in fast mode, and the boxes are mapped back to original pixels, clipped to
    the image and de-duplicated; boxes with a side below ``cfg.min_side`` (original pixels) are dropped.

    Determinism: OpenCV returns the same *set* of boxes on every call but in a randomised rank order
    (Uijlings et al. rank by hierarchy level times a random number) that ``cv2.setRNGSeed`` does not fix.
    So the set is sorted lexicographically and, when it exceeds ``cfg.max_proposals``, a uniform subsample
    seeded by ``cfg.seed`` is kept: the same image always gives the same patches.
    """
    img = np.asarray(image_rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {img.shape} {img.dtype}")
    H, W = img.shape[:2]
    scale = min(1.0, cfg.ss_max_side / max(H, W))
    small = img if scale >= 1.0 else cv2.resize(img, (max(1, round(W * scale)), max(1, round(H * scale))),
                                                interpolation=cv2.INTER_AREA)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2BGR))  # OpenCV's colour order
    ss.switchToSelectiveSearchFast(cfg.ss_base_k, cfg.ss_inc_k, cfg.ss_sigma)
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)  # (x, y, w, h) on the small image
    sx, sy = W / small.shape[1], H / small.shape[0]
    boxes = np.stack([rects[:, 0] * sx, rects[:, 1] * sy,
                      (rects[:, 0] + rects[:, 2]) * sx, (rects[:, 1] + rects[:, 3]) * sy], axis=1)
    boxes = _filter_boxes(boxes, (H, W), cfg.min_side)
    return _cap(boxes, cfg)


def _cap(boxes: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    if cfg.max_proposals and len(boxes) > cfg.max_proposals:
        keep = np.random.default_rng(cfg.seed).choice(len(boxes), cfg.max_proposals, replace=False)
        boxes = boxes[np.sort(keep)]
    return boxes


def egm_boxes(A: torch.Tensor, image_hw: tuple[int, int], cfg: ProposalConfig = ProposalConfig()) -> np.ndarray:
    """EGM regions of the FS map of activations ``A`` (C, h, w) (seed 001 §3.4) as pixel boxes, size-filtered."""
    _, h, w = A.shape
    fhat = sal_mod.feature_saliency(A.float())
    boxes, _ = egm_mod.detect_regions(fhat, tau=cfg.egm_tau, rho=cfg.egm_rho, sigma=cfg.egm_sigma)
    px = cells_to_pixels(boxes, (h, w), image_hw) if len(boxes) else np.zeros((0, 4), np.float32)
    return _cap(_filter_boxes(px, image_hw, cfg.min_side), cfg)


def grid_boxes(feat_hw: tuple[int, int], image_hw: tuple[int, int],
               cfg: ProposalConfig = ProposalConfig()) -> np.ndarray:
    """R-MAC grid regions (without the full image, which votes separately as ``sim_img``) as pixel boxes."""
    cells = pooling.rmac_grid(feat_hw[0], feat_hw[1], levels=cfg.grid_levels, include_full=False)
    return _cap(_filter_boxes(cells_to_pixels(cells, feat_hw, image_hw), image_hw, cfg.min_side), cfg)


def propose(cfg: ProposalConfig, image_hw: tuple[int, int], image_rgb: np.ndarray | None = None,
            A: torch.Tensor | None = None) -> np.ndarray:
    """Patch boxes (P, 4) float32 pixels from ``cfg.source``: selective search needs ``image_rgb``, egm and grid
    need ``A``."""
    if cfg.source == "selective_search":
        if image_rgb is None:
            raise ValueError("selective_search proposals need the RGB image")
        return selective_search_boxes(image_rgb, cfg)
    if A is None:
        raise ValueError(f"{cfg.source} proposals need the activation map")
    if cfg.source == "egm":
        return egm_boxes(A, image_hw, cfg)
    return grid_boxes((A.shape[1], A.shape[2]), image_hw, cfg)


def patch_cells(boxes_px: np.ndarray, feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """Pixel boxes -> half-open int cell boxes on the feature grid (every box keeps >= 1 cell)."""
    return pixels_to_cells(boxes_px, feat_hw, image_hw)


def range_max_pool(A: torch.Tensor, cells: np.ndarray) -> torch.Tensor:
    """Regional MAC of many half-open cell boxes at once: (R, C), equal to :func:`pooling.regional_mac`.

    :func:`pooling.regional_mac` builds an (R, C, h*w) masked tensor, fine for the ~20 regions of a database
    image but ~10^9 elements for 2000 query proposals. Here a 2-d sparse table answers each box in O(C): the
    max over every ``2^ky x 2^kx`` window is built by doubling (one elementwise max per level), and a box of
    height ``h`` and width ``w`` is the max of the four windows with ``2^ky <= h``, ``2^kx <= w`` anchored at
    its corners (they overlap, which max does not mind). Boxes must hold at least one cell (as
    :func:`pipeline.regions.to_cells` guarantees).
    """
    C, h, w = A.shape
    b = np.asarray(cells, dtype=np.int64).reshape(-1, 4)
    out = A.new_zeros((b.shape[0], C))
    if b.shape[0] == 0:
        return out
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if (bw < 1).any() or (bh < 1).any() or (b[:, :2] < 0).any() or (b[:, 2] > w).any() or (b[:, 3] > h).any():
        raise ValueError("cell boxes must be non-empty and inside the map")
    kx = np.floor(np.log2(bw)).astype(np.int64)
    ky = np.floor(np.log2(bh)).astype(np.int64)
    by_x = [A]  # by_x[k][:, y, x] = max over x .. x + 2^k - 1
    for k in range(1, int(kx.max()) + 1):
        prev, half = by_x[-1], 1 << (k - 1)
        by_x.append(torch.maximum(prev[:, :, :-half], prev[:, :, half:]))
    for kxv in np.unique(kx):
        table = by_x[kxv]  # grown along y below: table[:, y, x] = max over the 2^ky x 2^kx window at (y, x)
        ky_cur = 0
        sel_x = kx == kxv
        for kyv in np.unique(ky[sel_x]):
            while ky_cur < kyv:
                half = 1 << ky_cur
                table = torch.maximum(table[:, :-half, :], table[:, half:, :])
                ky_cur += 1
            idx = np.flatnonzero(sel_x & (ky == kyv))
            sx, sy = 1 << int(kxv), 1 << int(kyv)
            x0, y0 = b[idx, 0], b[idx, 1]
            x1, y1 = b[idx, 2] - sx, b[idx, 3] - sy
            xs = torch.as_tensor(np.stack([x0, x0, x1, x1]), device=A.device)
            ys = torch.as_tensor(np.stack([y0, y1, y0, y1]), device=A.device)
            corners = table[:, ys, xs]  # (C, 4, n)
            out[torch.as_tensor(idx, device=A.device)] = corners.amax(dim=1).T
    return out.clamp_min(0)  # as regional_mac: activations are non-negative


def pooled_patches(A: torch.Tensor, cells: np.ndarray) -> np.ndarray:
    """Regional MAC (not normalised) of every cell box: (P, C) float32, via :func:`range_max_pool`."""
    C = A.shape[0]
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 4)
    if len(cells) == 0:
        return np.zeros((0, C), np.float32)
    return range_max_pool(A.float(), cells).cpu().numpy().astype(np.float32)


def patch_descriptors(A: torch.Tensor, boxes_px: np.ndarray, image_hw: tuple[int, int], whiten) -> np.ndarray:
    """Whitened regional MAC of each pixel box: exactly the database's region descriptor ``w(m_A(R))``.

    ``whiten`` is the regional :class:`pipeline.whitening.Whitening` (``apply`` = L2, centre, project, L2) or
    None for L2-normalised raw MACs. Returns (P, d) float32 rows of unit norm.
    """
    _, h, w = A.shape
    raw = pooled_patches(A, patch_cells(boxes_px, (h, w), image_hw))
    if whiten is None:
        return pooling.l2n_np(raw).astype(np.float32)
    return np.asarray(whiten.apply(raw), dtype=np.float32)


GEOMETRY_NAMES = ("x0", "y0", "x1", "y1", "width", "height", "area", "sqrt_area", "log_aspect",
                  "centre_x", "centre_y", "centre_dist")


def box_geometry(boxes_px: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Box geometry normalised by the image size (P, 12), columns :data:`GEOMETRY_NAMES`.

    Coordinates and sides are fractions of the image width/height, ``area`` the fraction of the image,
    ``log_aspect = log(width_px / height_px)``, ``centre_dist`` the distance of the box centre from the image
    centre in those normalised units (0 .. ~0.71).
    """
    H, W = image_hw
    b = np.asarray(boxes_px, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = b[:, 0] / W, b[:, 1] / H, b[:, 2] / W, b[:, 3] / H
    bw, bh = x1 - x0, y1 - y0
    area = bw * bh
    log_aspect = np.log(np.maximum(b[:, 2] - b[:, 0], 1e-6) / np.maximum(b[:, 3] - b[:, 1], 1e-6))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    dist = np.hypot(cx - 0.5, cy - 0.5)
    return np.stack([x0, y0, x1, y1, bw, bh, area, np.sqrt(area), log_aspect, cx, cy, dist], axis=1)


def saliency_mass(S: torch.Tensor | np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Per cell box: mean of saliency map ``S`` (h, w) inside it and its share of the map's total mass -> (P, 2)."""
    St = torch.as_tensor(np.asarray(S, dtype=np.float64)) if not torch.is_tensor(S) else S.double().cpu()
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 4)
    mean = sal_mod.box_saliency(St, cells).numpy()
    area = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
    total = float(St.sum())
    share = mean * area / total if total > 0 else np.zeros_like(mean)
    return np.stack([mean, share], axis=1)


def feature_names(desc_dim: int, saliency_names: Sequence[str] = ("fs", "os")) -> list[str]:
    """Column names of :func:`patch_features`: descriptor dims, geometry, then ``<map>_mean``/``<map>_share``."""
    return ([f"desc_{i}" for i in range(desc_dim)] + list(GEOMETRY_NAMES)
            + [f"{n}_{s}" for n in saliency_names for s in ("mean", "share")])


def patch_features(desc: np.ndarray, boxes_px: np.ndarray, image_hw: tuple[int, int], feat_hw: tuple[int, int],
                   saliency_maps: Sequence[torch.Tensor | np.ndarray] = ()) -> np.ndarray:
    """Feature vector of each patch for the region scorer: ``[descriptor | geometry | saliency mass per map]``.

    ``desc`` (P, d) the patch descriptors (:func:`patch_descriptors`); ``boxes_px`` (P, 4) their pixel boxes;
    ``saliency_maps`` the (h, w) maps on the feature grid, by convention ``(FS, OS)`` (FS =
    :func:`pipeline.saliency.feature_saliency`, OS = :func:`pipeline.object_saliency.object_saliency_map`);
    pass the same maps in the same order at training and query time (:func:`feature_names`). Returns
    (P, d + 12 + 2 * len(saliency_maps)) float32.
    """
    desc = np.asarray(desc, dtype=np.float32).reshape(len(boxes_px), -1)
    cols = [desc, box_geometry(boxes_px, image_hw).astype(np.float32)]
    if saliency_maps:
        cells = patch_cells(boxes_px, feat_hw, image_hw)
        cols += [saliency_mass(S, cells).astype(np.float32) for S in saliency_maps]
    return np.concatenate(cols, axis=1)
