"""Ranking primitives shared by every query path: exact scoring, regional (D2R) max-pooling, re-ranking.

* :func:`rank_scores` turns a score matrix into rankings (ties by id, so results are deterministic);
* :class:`RegionSet` + :func:`regional_image_scores` are D2R regional search (seed 002 eq. 3): an image's
  score is the max over (query item, database item of the image) inner products, computed exactly in blocks;
* :func:`query_expand` (average QE, seed 003) and :func:`diffusion_reorder` (local diffusion over the top
  ``m`` results) re-rank a first ranking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.query_expansion import average_qe, diffusion_rerank, gather

AQE_N = 10              # average QE over the top 10 (seed 003)
DIFFUSION_M = 100       # results re-ranked by local diffusion
DIFFUSION_K = 10        # mutual k-NN inside those results
FULL_RANK_MAX = 200_000  # rank the whole database up to this size, else the top ``topk``


def trim_width(*mats: np.ndarray) -> list[np.ndarray]:
    """Drop the all-zero trailing columns the descriptor tables pad narrower methods with (same width for all)."""
    width = 1
    for M in mats:
        nz = np.flatnonzero(np.any(np.asarray(M) != 0, axis=0)) if np.asarray(M).size else np.empty(0)
        if nz.size:
            width = max(width, int(nz[-1]) + 1)
    return [fit_width(M, width) for M in mats]


def fit_width(M: np.ndarray, width: int) -> np.ndarray:
    """``M`` cut or zero-padded to ``width`` columns (float32, contiguous)."""
    M = np.asarray(M, np.float32)
    M = M[:, :width] if M.shape[1] >= width else np.pad(M, ((0, 0), (0, width - M.shape[1])))
    return np.ascontiguousarray(M)


def rank_depth(n_total: int, topk: int) -> int:
    """Ranking length: the whole database up to FULL_RANK_MAX images, else ``topk`` (default 1000)."""
    if topk and topk > 0:
        return int(min(topk, n_total))
    return int(n_total if n_total <= FULL_RANK_MAX else min(1000, n_total))


def rank_scores(S: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns of a score matrix (nq, n) by score, ties by id; -inf entries become id -1."""
    S = np.asarray(S)
    n = S.shape[1]
    cols = np.arange(n) if ids is None else np.asarray(ids, np.int64)
    k = int(min(k, n))
    key_ids = np.broadcast_to(cols, S.shape)
    order = np.lexsort((key_ids, -S.astype(np.float64)), axis=-1)[:, :k]
    sc = np.take_along_axis(S, order, axis=1).astype(np.float32)
    I = cols[order]
    I = np.where(np.isneginf(sc), -1, I)
    return sc, I


def query_expand(Q: np.ndarray, X: np.ndarray, I: np.ndarray, n: int = AQE_N) -> np.ndarray:
    """Average QE: ``L2(q + sum of the top n results' descriptors)``; ``X`` indexed by result id."""
    return average_qe(Q, gather(X, I[:, :n]), n=n)


def diffusion_reorder(Q: np.ndarray, X: np.ndarray, D: np.ndarray, I: np.ndarray, m: int = DIFFUSION_M,
                      k: int = DIFFUSION_K) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion re-ranking of the top ``m`` of each ranking; the rest keeps its order after them."""
    m = int(min(m, I.shape[1]))
    if m < 2:
        return D, I
    f, top = diffusion_rerank(Q, gather(X, I[:, :m]), I[:, :m], k=k)
    scores = np.concatenate([np.where(np.isfinite(f), f, -np.inf), D[:, m:]], axis=1).astype(np.float32)
    return scores, np.concatenate([top, I[:, m:]], axis=1)


@dataclass
class RegionSet:
    """Database items of a regional search, grouped by image: ``X`` (R, d) rows sorted by ``image``."""

    X: np.ndarray
    image: np.ndarray       # (R,) image index of each row (sorted)
    boxes: np.ndarray       # (R, 4) pixel boxes
    starts: np.ndarray      # first row of each distinct image
    images: np.ndarray      # distinct image indices (sorted)

    @classmethod
    def build(cls, X: np.ndarray, image: np.ndarray, boxes: np.ndarray | None = None) -> "RegionSet":
        image = np.asarray(image, np.int64)
        order = np.argsort(image, kind="stable")
        img = image[order]
        starts = np.flatnonzero(np.r_[True, img[1:] != img[:-1]]) if len(img) else np.empty(0, np.int64)
        b = np.zeros((len(img), 4), np.float32) if boxes is None else np.asarray(boxes, np.float32)[order]
        return cls(np.ascontiguousarray(np.asarray(X, np.float32)[order]), img, b, starts, img[starts])

    @property
    def nbytes(self) -> int:
        """Flat float32 region index + its row → image map."""
        return int(self.X.shape[0] * self.X.shape[1] * 4 + self.X.shape[0] * 8)


def regional_image_scores(items: Sequence[np.ndarray], rs: RegionSet, n_images: int,
                          budget: int = 1 << 25) -> np.ndarray:
    """(nq, n_images) D2R scores: max over (query item, database item of the image) of the inner product.

    ``items[q]`` (m_q, d) are query ``q``'s descriptors. Images without items score ``-inf``. Exact, blocked so
    that a score block holds at most ``budget`` floats.
    """
    nq = len(items)
    out = np.full((nq, n_images), -np.inf, np.float32)
    R = len(rs.X)
    if R == 0 or nq == 0:
        return out
    sizes = np.array([len(x) for x in items])
    cols = int(max(1024, min(R, budget // max(1, int(sizes.max())))))
    q0 = 0
    while q0 < nq:  # query batches whose stacked items fit the budget with one column block
        q1 = q0 + 1
        while q1 < nq and sizes[q0:q1 + 1].sum() * cols <= budget:
            q1 += 1
        batch = [np.asarray(x, np.float32) for x in items[q0:q1]]
        valid = np.array([len(x) > 0 for x in batch])
        Qs = np.concatenate([x for x in batch if len(x)]) if valid.any() else np.zeros((0, rs.X.shape[1]))
        qstarts = np.r_[0, np.cumsum([len(x) for x in batch if len(x)])[:-1]].astype(np.int64)
        best = np.full((q1 - q0, R), -np.inf, np.float32)
        if len(Qs):
            for c0 in range(0, R, cols):
                S = Qs @ rs.X[c0:c0 + cols].T
                best[valid, c0:c0 + cols] = np.maximum.reduceat(S, qstarts, axis=0)
        out[q0:q1, rs.images] = np.maximum.reduceat(best, rs.starts, axis=1)
        q0 = q1
    return out


def best_region(item: np.ndarray, rs: RegionSet, image: int) -> np.ndarray | None:
    """Pixel box of ``image``'s region that matches the query items best (for the report)."""
    i = np.searchsorted(rs.images, image)
    if i >= len(rs.images) or rs.images[i] != image or len(item) == 0:
        return None
    a = rs.starts[i]
    b = rs.starts[i + 1] if i + 1 < len(rs.starts) else len(rs.X)
    s = (np.asarray(item, np.float32) @ rs.X[a:b].T).max(axis=0)
    return rs.boxes[a + int(np.argmax(s))]


__all__ = ["trim_width", "fit_width", "rank_depth", "rank_scores", "query_expand", "diffusion_reorder", "RegionSet",
           "regional_image_scores", "best_region", "AQE_N", "DIFFUSION_M", "DIFFUSION_K"]
