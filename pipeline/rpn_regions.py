"""Learned region proposals as a region source (seed 003 §3.2 "proposal pooling"; issue 17).

A trained :class:`pipeline.rpn.RPNHead` proposes boxes on an image's scale-1 activation map; they become
``regions`` rows with ``source = rpn`` (regional MACs, pixel boxes), so R-MAC pools them (``rmac_rpn``, and
``rmac_learned_rpn`` with the learned projection) and the faiss stage indexes them for regional search
(``regional:rpn``). Targets for training are the boxes the corpus discovered itself (OS.EGM rows),
converted from pixels to feature cells by :func:`pixels_to_cells`.

* :class:`RegionSourceConfig` — the ``regions`` section of the index config: ``source: grid`` (default: only the
  rigid R-MAC grid, nothing changes) or ``rpn`` (adds the ``rpn`` stage and the RPN-based methods);
  ``rpn``: the folder (or run) of ``jobs.train_rpn``; ``proposals``: boxes kept per image.
* :func:`rpn_features` — the ``rpn`` stage's compute function (same role as
  ``pipeline.object_saliency.ObjectSaliencyComputer.features``), also the query side's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline import pooling
from pipeline.extract import ImageFeatures
from pipeline.regions import cells_to_pixels, to_cells
from pipeline.rpn import RPNConfig, RPNHead, propose
from pipeline.saliency import box_saliency, feature_saliency

RPN_SOURCE = "rpn"
REGION_SOURCE_KINDS = ("grid", RPN_SOURCE)


@dataclass(frozen=True)
class RegionSourceConfig:
    """Where R-MAC's regions come from: the rigid grid only, or also a trained RPN (``regions`` section)."""

    source: str = "grid"
    rpn: str | None = None        # folder of jobs.train_rpn (or a run holding one); None: the run's own
    proposals: int = 32           # seed 003 Table 2: 32-64 proposals already beat the grid

    def __post_init__(self) -> None:
        if self.source not in REGION_SOURCE_KINDS:
            raise ValueError(f"source must be one of {list(REGION_SOURCE_KINDS)}, got {self.source!r}")
        if self.proposals < 1:
            raise ValueError("proposals must be >= 1")


def pixels_to_cells(boxes: np.ndarray, feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`pipeline.regions.cells_to_pixels`: float pixel boxes of an H x W image -> continuous
    cell boxes on an h x w map."""
    fh, fw = feat_hw
    ih, iw = image_hw
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (b * np.array([fw / iw, fh / ih, fw / iw, fh / ih])).astype(np.float32)


def rpn_features(head: RPNHead, cfg: RPNConfig, A: torch.Tensor, image_hw: tuple[int, int],
                 proposals: int) -> ImageFeatures:
    """The RPN's proposals of one image as ``rpn`` regions (regional MACs, pixel boxes, objectness as score).
    An image without any proposal gets its whole frame, so every image keeps an ``rpn`` region. The head is
    moved to the map's device on first use (a GPU actor proposes on its GPU)."""
    A = A.float()
    if next(head.parameters()).device != A.device:
        head.to(A.device)
    C, H, W = A.shape
    boxes, scores = propose(head, A, replace(cfg, post_nms_top_n=proposals))
    if len(boxes) == 0:
        boxes, scores = np.array([[0.0, 0.0, W, H]], np.float32), np.ones(1, np.float32)
    cells = to_cells(boxes, H, W)
    out = ImageFeatures(feat_hw=(H, W), proc_hw=(0, 0), sparsity=np.zeros(C, np.float32),
                        act_mean=float(A.mean()), act_max=float(A.max()))
    out.region_desc = pooling.regional_mac(A, cells).cpu().numpy().astype(np.float32)
    out.region_source = [RPN_SOURCE] * len(cells)
    out.region_level = np.zeros(len(cells), np.int16)
    out.region_score = np.asarray(scores, np.float32)
    out.region_saliency = box_saliency(feature_saliency(A).cpu(), cells).numpy().astype(np.float32)
    out.region_boxes = cells_to_pixels(cells, (H, W), image_hw)
    return out


__all__ = ["RegionSourceConfig", "rpn_features", "pixels_to_cells", "RPN_SOURCE"]
