"""Object-saliency stage (seed 001 §3.8-3.9): a second Ray pass over the images.

Each actor recomputes an image's activations, builds its patch descriptors ``u_p = w(m_A(R_p))``, finds
their k nearest neighbours among the graph's region descriptors ``V`` (the FAISS index stored by the graph
stage), forms the object-saliency map ``S`` (eq. 14) with the regions' saliency ``f`` and Katz centrality
``g``, detects OS.EGM regions on it and writes them to ``regions`` (``source = os_egm``) together with the
``os_egm_sum`` / ``os_egm4_sum`` globals (whitened later by the descriptors stage). Only ``V``, ``f``, ``g``
are needed, so an image that was not in the graph (a new image, or a query) is handled the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from actors.extract import ExtractWorker, _Decoded
from pipeline import egm as egm_mod
from pipeline import pooling
from pipeline.extract import ImageFeatures
from pipeline.knn_graph import index_search_fn
from pipeline.object_saliency import object_saliency_map
from pipeline.regions import cells_to_pixels, to_cells
from pipeline.saliency import box_saliency, feature_saliency
from pipeline.whitening import Whitening


@dataclass
class OSParams:
    """Object-saliency parameters (ALGORITHMS.md §5 defaults)."""

    k: int = 50
    patch_side: int = 3
    beta: float = 3.0
    Theta: float = 2.0
    theta: float = 3.0
    rho: float = 2.0
    tau: float = 0.0
    sigma: float = 2.0


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
    """Pure per-image OS computation shared by the stage's actors and the query path."""

    def __init__(self, whitening: Whitening, f: np.ndarray, g: np.ndarray, index: faiss.Index,
                 params: OSParams) -> None:
        self.white, self.f, self.g, self.params = whitening, f, g, params
        self.search = index_search_fn(index)

    def saliency(self, A: torch.Tensor) -> np.ndarray:
        """Object-saliency map (H, W) of one activation map."""
        p = self.params
        fhat = feature_saliency(A)
        return object_saliency_map(A, fhat, self.f, self.g, search=self.search, whiten=self.white,
                                   side=p.patch_side, k=p.k, beta=p.beta, Theta=p.Theta, theta=p.theta)

    def features(self, A: torch.Tensor, image_hw: tuple[int, int], saliency: np.ndarray | None = None
                 ) -> ImageFeatures:
        """OS map (``saliency`` when the caller already has it) → OS.EGM regions with descriptors, and the
        two OS global sums."""
        p = self.params
        A = A.float()
        C, H, W = A.shape
        S = self.saliency(A) if saliency is None else saliency
        boxes, scores = egm_mod.detect_regions(S, tau=p.tau, rho=p.rho, sigma=p.sigma)
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


class ObjectSaliencyWorker(ExtractWorker):
    """Extraction worker whose per-image computation is object saliency + OS.EGM."""

    def __init__(self, job: Any, whitening_arrays: dict[str, np.ndarray], f: np.ndarray, g: np.ndarray,
                 index_bytes: np.ndarray, params: OSParams) -> None:
        super().__init__(job)
        faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
        index = faiss.deserialize_index(np.asarray(index_bytes))
        self.os = ObjectSaliencyComputer(Whitening.from_arrays(whitening_arrays), f, g, index, params)

    def compute(self, activations: list[torch.Tensor], decoded: _Decoded) -> ImageFeatures:
        return self.os.features(activations[0], decoded.image_hw)
