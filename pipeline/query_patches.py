"""Query-time patch search of seed 000 (§4.2; ALGORITHMS.md §9): its typed parameters and the array functions
that connect patch proposals (:mod:`pipeline.query_regions`) with the learned scorer, the diverse top-k selection
and the patch voting (:mod:`pipeline.region_scoring`).

At query time a query image becomes ~2000 patches (:func:`encode_patches`); the scorer predicts each patch's
usefulness ``psi``; :func:`select_patches` picks ``k`` of them greedily for ``sum psi + lambda max sim``; each
chosen patch and the full image retrieve from the regional index (items = every database image's full view and
its regions, as in ``regional:<source>``), and a database image scores
``sim_img(q, im) + sum_{chosen p} sim_patch_img(p, im)`` (:func:`vote_rankings`), with ``sim_img`` the full
query image taken as one more patch (seed 000 §4.2: "taking the full image as a patch").

Training helpers: :func:`noboxfree_queries` (the protocol that keeps the no-box evaluation photos out of the
training set), :func:`out_of_fold_scores` (unaries for ``lambda`` from models that never saw the photo) and
:func:`lambda_aps` (per-query AP of every ``lambda`` on the grid, cheap enough for a Ray task per query).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from pipeline.evaluation import compute_map
from pipeline.query_regions import ProposalConfig, patch_descriptors, patch_features, propose
from pipeline.ranking import rank_scores
from pipeline.region_scoring import (LAMBDA_GRID, TOP_K_PATCHES, RegionScorer, ScorerConfig, dense_from_topk,
                                     greedy_diverse_topk, grouped_folds, sim_patch_img)

PAPER_LAMBDA = -0.4  # seed 000 §4.2: the lambda learned on PAL; used until a scorer brings its own


@dataclass(frozen=True)
class PatchSearchConfig:
    """Query-time parameters of the ``patches[:k]`` method (not an index-time setting: the index only needs
    its ``regional_<source>`` snapshot, so this is passed to the search service, and a trained scorer stores the
    config it was trained with).

    ``proposals``: where the query's patches come from (selective search, fast mode, ~2000 patches, seed 000
    §3.1); ``k = 5`` patches (§4.2); ``lam``: the diversity trade-off (-0.4, the paper's learned value, until
    ``jobs.train_query_scorer`` grid-searches it); ``source``: the regional index ``regional_<source>`` whose
    items the patches are matched against (OS.EGM regions, the best regional source on no-box in this
    project's benchmark); ``item_depth``: images each item retrieves from an *approximate* index (exact indexes
    score every image); the query side then re-scores every image some item reached exactly for every item, and
    the images none reached get each item's lowest score among those (:func:`dense_from_topk`).
    """

    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    k: int = TOP_K_PATCHES
    lam: float = PAPER_LAMBDA
    source: str = "os_egm"
    item_depth: int = 1000

    def __post_init__(self) -> None:
        if self.k < 1 or self.item_depth < 1:
            raise ValueError("k >= 1 and item_depth >= 1 are required")


# ----------------------------------------------------------------------------------------------------------
# query side
# ----------------------------------------------------------------------------------------------------------
def encode_patches(A: torch.Tensor, image_hw: tuple[int, int], whiten, cfg: ProposalConfig,
                   image_rgb: np.ndarray | None = None, saliency_maps: Sequence[np.ndarray | torch.Tensor] = ()
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (P, 4) pixels, descriptors (P, d), scorer features (P, F)) of one image's patches.

    ``A`` (C, h, w) the scale-1 activation map the database's regions are pooled from; ``whiten`` the regional
    whitening (so a patch lives in the regional index's space); ``saliency_maps`` in the order of the scorer's
    feature names (FS, then OS when the run has a region graph)."""
    boxes = propose(cfg, image_hw, image_rgb=image_rgb, A=A)
    desc = patch_descriptors(A, boxes, image_hw, whiten)
    feats = patch_features(desc, boxes, image_hw, (A.shape[1], A.shape[2]), saliency_maps)
    return boxes.astype(np.float32), desc.astype(np.float32), feats.astype(np.float32)


def proposal_tag(cfg: ProposalConfig) -> str:
    """Short hash of a proposal config: names cached query encodings whose patches were proposed that way."""
    return hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]


def select_patches(psi: np.ndarray, desc: np.ndarray, k: int, lam: float) -> np.ndarray:
    """Greedy diverse top-``k`` (seed 000 §4.2) with ``sim`` = cosine of the (unit) patch descriptors."""
    D = np.asarray(desc, np.float32)
    return greedy_diverse_topk(psi, D @ D.T, k, lam)


def vote_rankings(item_scores: np.ndarray, item_ids: np.ndarray, n_images: int, depth: int | None,
                  allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One query's ranking by patch voting: (scores (depth,), image ids (depth,)), -1 padded.

    ``item_scores``/``item_ids`` (n_items, K): each item's (full image first, then the chosen patches) top-K
    images by ``sim_patch_img``, -1 padded; turned dense with :func:`dense_from_topk` (exact when the lists cover
    every image) and summed, which is ``sim_img + sum_p sim_patch_img(p, .)``. ``allowed`` (n_images,) bool
    restricts the database; ``depth=None`` ranks every allowed image.
    """
    votes = dense_from_topk(item_scores, item_ids, n_images).sum(axis=0)
    if allowed is not None:
        votes = np.where(allowed, votes, -np.inf)
    n_ok = n_images if allowed is None else int(allowed.sum())
    S, I = rank_scores(votes[None, :], n_ok if depth is None else min(int(depth), n_ok))
    return S[0], I[0]


# ----------------------------------------------------------------------------------------------------------
# training protocol
# ----------------------------------------------------------------------------------------------------------
def source_photo(query_id: str) -> str:
    """The photo a query comes from. A query box crops its photo without renaming it (museum-landmarks: the root
    track's ``qsd2_*`` queries are the no-box track's wall photos cropped to one painting each, under the same
    id; a photo with two paintings is listed twice), so the photo is the query's image id."""
    return str(query_id)


def object_groups(photos: Sequence[str], positives: Sequence[np.ndarray | Sequence[int]]) -> np.ndarray:
    """Cross-validation group of each training query: connected components of "same source photo" and "share a
    positive database image" (``g<n>``, numbered by first appearance).

    Grouping by photo alone keeps one photo's patches on one side of a fold; two *different* photos of the same
    painting or landmark would still sit on both sides, and a scorer whose features include the patch descriptor
    can learn that object's look. Grouping by object closes that leak (seed 000 does not say how it split).
    """
    photos = [str(p) for p in photos]
    n = len(photos)
    pos = [np.asarray(p, np.int64).ravel() for p in positives]
    if len(pos) != n:
        raise ValueError("one positives list per photo is required")
    _, photo_node = np.unique(photos, return_inverse=True)
    n_photo_nodes = int(photo_node.max()) + 1 if n else 0
    rows = np.repeat(np.arange(n), [len(p) for p in pos])
    cols = np.concatenate(pos) if n else np.zeros(0, np.int64)
    # nodes: queries, then photos, then database images; edges query-photo and query-positive
    n_img = int(cols.max()) + 1 if len(cols) else 0
    a = np.r_[np.arange(n), rows]
    b = np.r_[n + photo_node.reshape(-1), n + n_photo_nodes + cols]
    size = n + n_photo_nodes + n_img
    graph = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(size, size))
    _, comp = connected_components(graph, directed=False)
    first = {c: i for i, c in reversed(list(enumerate(comp[:n])))}
    order = {c: r for r, c in enumerate(sorted(first, key=first.get))}
    return np.array([f"g{order[c]}" for c in comp[:n]])


def noboxfree_queries(query_ids: Sequence[str], nobox_query_ids: Sequence[str]) -> np.ndarray:
    """Indices of the queries whose source photo is not one of the no-box track's query photos (museum-landmarks:
    the landmark and ``qsd1_*`` queries), so a scorer trained on them can be evaluated on no-box without having
    seen any of its photos."""
    held_out = {source_photo(q) for q in nobox_query_ids}
    return np.array([i for i, q in enumerate(query_ids) if source_photo(q) not in held_out], np.int64)


def out_of_fold_scores(X: np.ndarray, y: np.ndarray, groups: np.ndarray, C: float, X_all: np.ndarray,
                       groups_all: np.ndarray, cfg: ScorerConfig = ScorerConfig()) -> np.ndarray:
    """Unaries for every row of ``X_all`` from grouped-CV models that never saw its photo (seed 000 §4.2).

    The folds are those of the scorer's CV over the training rows ``(X, y, groups)``; each fold's model (fixed
    ``C``) predicts the rows of ``X_all`` whose photo is held out in that fold. ``X_all`` may hold more patches
    per photo than the training rows (the SVR is trained on a per-photo sample; ``lambda`` is searched on all
    patches, as at query time). Rows of a photo absent from ``groups`` are an error.
    """
    groups_all = np.asarray(groups_all)
    out = np.full(len(X_all), np.nan)
    for held_out, model in fold_scorers(X, y, groups, C, cfg):
        rows = np.flatnonzero(np.isin(groups_all, held_out))
        out[rows] = model.predict(X_all[rows])
    if np.isnan(out).any():
        raise ValueError("some rows belong to photos without training rows")
    return out


def fold_scorers(X: np.ndarray, y: np.ndarray, groups: np.ndarray, C: float, cfg: ScorerConfig = ScorerConfig()
                 ) -> list[tuple[np.ndarray, RegionScorer]]:
    """(held-out photos, model fitted at ``C`` without them) of each fold of the scorer's grouped CV."""
    groups = np.asarray(groups)
    return [(np.unique(groups[te]), RegionScorer.fit_fixed(X[tr], y[tr], C, cfg))
            for tr, te in grouped_folds(groups, cfg.n_folds)]


def lambda_aps(psi: np.ndarray, desc: np.ndarray, full: np.ndarray, X: np.ndarray, region_image: np.ndarray,
               n_images: int, positives: Sequence[int], junk: Sequence[int] = (),
               lambdas: Sequence[float] = LAMBDA_GRID, k: int = TOP_K_PATCHES) -> np.ndarray:
    """Average precision of one training query for every ``lambda`` (L,): the summand of the mAP that
    :func:`pipeline.region_scoring.select_lambda` maximises, computed without its dense (P, n_images) matrix.

    ``psi`` (P,) out-of-fold unaries, ``desc`` (P, d) patch descriptors, ``full`` (d,) the full query image's
    item, ``X``/``region_image`` the database items (rows grouped by image). Only the patches some ``lambda``
    chooses are matched against the database (one greedy run per ``lambda`` needs the P x P patch similarities
    only), so the cost is that of ~k x L patches, not P.
    """
    D = np.asarray(desc, np.float32)
    S = (D @ D.T).astype(np.float64)  # greedy works in float64: convert once, not once per lambda
    chosen = [greedy_diverse_topk(psi, S, k, float(lam)) for lam in lambdas]
    used = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    spi = sim_patch_img(np.concatenate([np.asarray(full, np.float32).reshape(1, -1), D[used]]), X, region_image,
                        n_images).astype(np.float64)
    row = {int(p): r + 1 for r, p in enumerate(used)}
    gnd = [{"ok": np.asarray(positives, np.int64), "junk": np.asarray(junk, np.int64)}]
    aps = np.empty(len(chosen))
    for li, ch in enumerate(chosen):
        votes = spi[0] + spi[[row[int(p)] for p in ch]].sum(axis=0)
        aps[li] = compute_map([np.argsort(-votes, kind="stable")], gnd)[1][0]
    return aps


def pick_lambda(lambdas: Sequence[float], maps: Sequence[float]) -> float:
    """The ``lambda`` of the best mAP; ties go to the one closest to 0, then the smaller (as ``select_lambda``)."""
    lam = np.asarray(list(lambdas), np.float64)
    m = np.nan_to_num(np.asarray(list(maps), np.float64), nan=-np.inf)
    return float(lam[np.lexsort((lam, np.abs(lam), -np.round(m, 12)))[0]])


__all__ = ["PatchSearchConfig", "PAPER_LAMBDA", "encode_patches", "proposal_tag", "select_patches", "vote_rankings",
           "source_photo", "object_groups", "noboxfree_queries", "out_of_fold_scores", "fold_scorers", "lambda_aps",
           "pick_lambda"]
