"""Training pairs discovered in the index itself (never from ground truth), for the learned projection.

Seed 003 §4 cleans a noisy landmark collection by matching image pairs with local features and spatial
verification, pruning weak edges and keeping connected components. Without any class labels we start one step
earlier: the region k-NN search of the graph stage (seed 001 §3.6) proposes which image pairs to look at.

* :func:`candidate_pairs` — directed region k-NN links ``i -> j`` (region ``i`` lists ``j``) are mapped to
  image pairs ``(a, b)``, ``a < b``, links inside one image dropped. Per pair: ``best_sim`` (the largest
  link similarity), ``links`` (directed links), ``mutual_links`` (directed links whose reverse exists too:
  2 per mutual region pair), ``best_mutual_sim`` (-inf when none) and the regions of the best link (where
  to verify). Directed counts are additive, so shards merge by summing. Adapters:
  :func:`candidates_from_knn` (k-NN lists, mutuality computed) and :func:`candidates_from_graph` (the
  stored mutual k-NN graph, a row block of it per shard); :func:`merge_candidates` combines shards that
  partition the links (row blocks do).
* :func:`cap_per_image` — bound the verification work: keep a pair if it is among the ``n`` most similar
  pairs of either of its images.
* :func:`classify_pairs` — with spatial-verification inlier counts: ``positive`` = mutual neighbours with at
  least ``min_inliers`` inliers; ``hard_negative`` = neighbours (similar by construction) with at most
  ``max_negative_inliers``; ``ambiguous`` in between. Without verification: ``weak_positive`` = mutual
  neighbours with ``best_mutual_sim >= weak_min_sim`` over ``weak_min_pairs`` or more region pairs (weaker
  evidence: a similar background or a near-duplicate distractor passes too); no negatives can be named.
* :func:`weak_negatives` — without verification, the weaker stand-in for hard negatives: pairs of images that
  are among each other's nearest regions (``best_sim`` within the ``rank`` most similar candidates of one of
  the images) without a single mutual region pair.
* :func:`candidates_from_links` — one shard of region k-NN lists whose mutuality is read from the stored
  mutual graph (so a shard never needs every list).

Thresholds: seed 003 only says it "prune[s] all edges which have a low score"; 15 inliers for a match and
at most 5 (what RANSAC finds among random matches) for a failure are conventional values, not the paper's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

POSITIVE = "positive"
WEAK_POSITIVE = "weak_positive"
HARD_NEGATIVE = "hard_negative"
AMBIGUOUS = "ambiguous"
UNVERIFIED = "unverified"
WEAK_NEGATIVE = "weak_negative"
LABELS = (POSITIVE, WEAK_POSITIVE, HARD_NEGATIVE, AMBIGUOUS, UNVERIFIED, WEAK_NEGATIVE)

CANDIDATE_COLUMNS = ("image_a", "image_b", "best_sim", "links", "mutual_links", "best_mutual_sim",
                     "region_a", "region_b")


@dataclass(frozen=True)
class MiningConfig:
    """Pair-mining thresholds (see the module docstring for where they come from). ``min_inliers``: None = the
    verification stage's own threshold (the run's ``verify.min_inliers``, 30 by default), as the issue asks: a
    positive pair is one that +sv would call verified. Measured on museum-landmarks (XFeat, 43k verified pairs,
    precision against the ground truth's groups, a check only): 15 inliers 0.36, 30 0.70, 40 0.83, 60 0.92.
    ``max_negative_inliers``: None = a third of ``min_inliers`` (10 at 30): similar pairs with at most that
    many inliers are hard negatives; measured, 5 % of the pairs under 10 inliers show the same object, 12 % at
    15-19."""

    min_inliers: int | None = None
    max_negative_inliers: int | None = None
    hard_negative_min_sim: float = 0.0
    weak_min_sim: float = 0.7
    weak_min_pairs: int = 2
    max_pairs_per_image: int | None = 20
    weak_negative_rank: int = 5

    @property
    def negative_inliers(self) -> int:
        """Most inliers of a hard negative (``max_negative_inliers``, default a third of ``min_inliers``)."""
        if self.max_negative_inliers is not None:
            return int(self.max_negative_inliers)
        if self.min_inliers is None:
            raise ValueError("MiningConfig: min_inliers is unset (the run's verify.min_inliers is applied by the job)")
        return int(self.min_inliers) // 3


def _empty() -> dict[str, np.ndarray]:
    return {"image_a": np.zeros(0, np.int64), "image_b": np.zeros(0, np.int64), "best_sim": np.zeros(0, np.float32),
            "links": np.zeros(0, np.int64), "mutual_links": np.zeros(0, np.int64),
            "best_mutual_sim": np.zeros(0, np.float32), "region_a": np.zeros(0, np.int64),
            "region_b": np.zeros(0, np.int64)}


def candidate_pairs(src: np.ndarray, dst: np.ndarray, sims: np.ndarray, mutual: np.ndarray,
                    region_image: np.ndarray) -> dict[str, np.ndarray]:
    """Image-pair candidates from directed region links ``src[e] -> dst[e]`` with similarity ``sims[e]`` and a
    ``mutual[e]`` flag; ``region_image`` (R,) maps regions to images. Columns: :data:`CANDIDATE_COLUMNS`,
    sorted by ``(image_a, image_b)``; ``region_a`` / ``region_b`` are the regions of the best link, ``region_a``
    in ``image_a``. ``mutual_links`` counts the directed links flagged mutual (a mutual region pair whose
    two directions are both among the links counts 2)."""
    src = np.asarray(src, dtype=np.int64).ravel()
    dst = np.asarray(dst, dtype=np.int64).ravel()
    sims = np.asarray(sims, dtype=np.float32).ravel()
    mutual = np.asarray(mutual, dtype=bool).ravel()
    region_image = np.asarray(region_image, dtype=np.int64).ravel()
    ia, ib = region_image[src], region_image[dst]
    keep = ia != ib
    src, dst, sims, mutual, ia, ib = src[keep], dst[keep], sims[keep], mutual[keep], ia[keep], ib[keep]
    if src.size == 0:
        return _empty()
    swap = ia > ib
    a, b = np.where(swap, ib, ia), np.where(swap, ia, ib)
    ra, rb = np.where(swap, dst, src), np.where(swap, src, dst)
    n = int(region_image.max()) + 1
    key = a * n + b
    # sort by pair, then by decreasing similarity: the first row of each group is its best link
    order = np.lexsort((-sims, key))
    key, sims, mutual, ra, rb = key[order], sims[order], mutual[order], ra[order], rb[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    group = np.cumsum(np.r_[False, key[1:] != key[:-1]])
    links = np.diff(np.r_[first, key.size])
    mutual_dir = np.bincount(group, weights=mutual, minlength=first.size).astype(np.int64)
    msims = np.where(mutual, sims, -np.inf).astype(np.float32)
    best_mutual = np.full(first.size, -np.inf, np.float32)
    np.maximum.at(best_mutual, group, msims)
    return {"image_a": key[first] // n, "image_b": key[first] % n, "best_sim": sims[first],
            "links": links.astype(np.int64), "mutual_links": mutual_dir, "best_mutual_sim": best_mutual,
            "region_a": ra[first], "region_b": rb[first]}


def candidates_from_knn(ids: np.ndarray, sims: np.ndarray, region_image: np.ndarray,
                        rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Candidates from region k-NN lists ``ids``/``sims`` (R, k) of *all* regions (self and -1 ignored).

    ``rows`` restricts the links to those *from* these query regions (a shard); mutuality is still checked
    against every list. Shards whose rows partition ``0..R-1`` combine with :func:`merge_candidates`.
    """
    ids = np.asarray(ids, dtype=np.int64)
    sims = np.asarray(sims, dtype=np.float32)
    R, k = ids.shape
    rows = np.arange(R, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    src = np.repeat(rows, k)
    dst = ids[rows].ravel()
    s = sims[rows].ravel()
    valid = (dst >= 0) & (dst != src)
    src, dst, s = src[valid], dst[valid], s[valid]
    # mutual iff src appears in dst's list: test the reversed key against the sorted keys of all links
    all_src = np.repeat(np.arange(R, dtype=np.int64), k)
    all_dst = ids.ravel()
    ok = all_dst >= 0
    keys = np.unique(all_src[ok] * R + all_dst[ok])
    rev = dst * R + src
    pos = np.searchsorted(keys, rev)
    mutual = (pos < keys.size) & (keys[np.minimum(pos, keys.size - 1)] == rev)
    return candidate_pairs(src, dst, s, mutual, region_image)


def candidates_from_graph(W: sp.spmatrix, region_image: np.ndarray, beta: float = 3.0,
                          row_start: int = 0, row_stop: int | None = None) -> dict[str, np.ndarray]:
    """Candidates from the mutual k-NN graph ``W`` (``pipeline.knn_graph.mutual_knn_graph``, weights
    ``max(s, 0)^beta``), rows ``row_start:row_stop`` (a shard). Every edge is mutual; ``s = W^(1/beta)``.
    Both directions of an edge are stored, so row blocks partition the directed links; combine shards
    with :func:`merge_candidates`."""
    W = sp.csr_matrix(W)
    row_stop = W.shape[0] if row_stop is None else row_stop
    block = W[row_start:row_stop].tocoo()
    src = block.row.astype(np.int64) + row_start
    s = np.power(np.maximum(block.data.astype(np.float64), 0.0), 1.0 / beta).astype(np.float32)
    return candidate_pairs(src, block.col, s, np.ones(src.size, bool), region_image)


def candidates_from_links(ids: np.ndarray, sims: np.ndarray, rows: np.ndarray, W_rows: sp.spmatrix,
                          region_image: np.ndarray) -> dict[str, np.ndarray]:
    """Candidates from the k-NN lists ``ids``/``sims`` (B, k) of the query regions ``rows`` (B,) (a shard),
    a link being mutual iff the stored mutual k-NN graph has that edge: ``W_rows`` (B, R) are the graph's rows
    of ``rows``. Shards whose rows partition ``0..R-1`` combine with :func:`merge_candidates`."""
    ids = np.asarray(ids, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    pos = np.repeat(np.arange(rows.size, dtype=np.int64), ids.shape[1])
    src, dst = rows[pos], ids.ravel()
    s = np.asarray(sims, dtype=np.float32).ravel()
    valid = (dst >= 0) & (dst != src)
    pos, src, dst, s = pos[valid], src[valid], dst[valid], s[valid]
    mutual = np.asarray(sp.csr_matrix(W_rows)[pos, dst]).ravel() > 0 if src.size else np.zeros(0, bool)
    return candidate_pairs(src, dst, s, mutual, region_image)


def merge_candidates(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine shard candidates (shards partition the directed links): counts add, similarities take the
    max, the best link follows ``best_sim``. Equals :func:`candidate_pairs` over all the links at once."""
    parts = [p for p in parts if p["image_a"].size]
    if not parts:
        return _empty()
    cat = {c: np.concatenate([p[c] for p in parts]) for c in CANDIDATE_COLUMNS}
    n = int(max(cat["image_a"].max(), cat["image_b"].max())) + 1
    key = cat["image_a"] * n + cat["image_b"]
    order = np.lexsort((-cat["best_sim"], key))
    cat = {c: v[order] for c, v in cat.items()}
    key = key[order]
    change = np.r_[True, key[1:] != key[:-1]]
    first = np.flatnonzero(change)
    group = np.cumsum(change) - 1
    out = {c: cat[c][first] for c in ("image_a", "image_b", "best_sim", "region_a", "region_b")}
    out["links"] = np.bincount(group, weights=cat["links"], minlength=first.size).astype(np.int64)
    out["mutual_links"] = np.bincount(group, weights=cat["mutual_links"], minlength=first.size).astype(np.int64)
    best_mutual = np.full(first.size, -np.inf, np.float32)
    np.maximum.at(best_mutual, group, cat["best_mutual_sim"])
    out["best_mutual_sim"] = best_mutual
    return {c: out[c] for c in CANDIDATE_COLUMNS}


def cap_per_image(cand: dict[str, np.ndarray], n: int | None) -> dict[str, np.ndarray]:
    """Keep a pair if it ranks among the ``n`` highest ``best_sim`` pairs of image_a or of image_b (ties by
    the other image's index), bounding the verification work at about ``n`` pairs per image."""
    m = cand["image_a"].size
    if n is None or m == 0:
        return cand
    img = np.concatenate([cand["image_a"], cand["image_b"]])
    other = np.concatenate([cand["image_b"], cand["image_a"]])
    sim = np.concatenate([cand["best_sim"], cand["best_sim"]])
    order = np.lexsort((other, -sim, img))
    img_sorted = img[order]
    start = np.flatnonzero(np.r_[True, img_sorted[1:] != img_sorted[:-1]])
    rank_sorted = np.arange(img_sorted.size) - np.repeat(start, np.diff(np.r_[start, img_sorted.size]))
    rank = np.empty_like(rank_sorted)
    rank[order] = rank_sorted
    keep = (rank[:m] < n) | (rank[m:] < n)
    return {c: v[keep] for c, v in cand.items()}


def classify_pairs(cand: dict[str, np.ndarray], inliers: np.ndarray | None, cfg: MiningConfig = MiningConfig()
                   ) -> np.ndarray:
    """Label of every candidate pair (str array, one of :data:`LABELS`).

    ``cand`` must hold every link (all shards merged), so a mutual region pair counts 2 in ``mutual_links``.
    With ``inliers`` (int per pair; negative = not verified): ``positive`` if the images have a mutual region
    pair and ``inliers >= min_inliers``; ``hard_negative`` if ``0 <= inliers <= max_negative_inliers`` and
    ``best_sim >= hard_negative_min_sim``; ``unverified`` if ``inliers < 0``; else ``ambiguous``. Without
    (``None``): ``weak_positive`` if at least ``weak_min_pairs`` mutual region pairs and ``best_mutual_sim
    >= weak_min_sim``, else ``unverified``.
    """
    m = cand["image_a"].size
    labels = np.full(m, UNVERIFIED, dtype=f"<U{max(map(len, LABELS))}")
    if inliers is None:
        weak = (cand["mutual_links"] >= 2 * cfg.weak_min_pairs) & (cand["best_mutual_sim"] >= cfg.weak_min_sim)
        labels[weak] = WEAK_POSITIVE
        return labels
    inl = np.asarray(inliers, dtype=np.int64).ravel()
    if inl.size != m:
        raise ValueError(f"{inl.size} inlier counts for {m} candidate pairs")
    if cfg.min_inliers is None:
        raise ValueError("MiningConfig.min_inliers: set it (e.g. to the run's verify.min_inliers) to label pairs")
    max_negative = cfg.negative_inliers
    verified = inl >= 0
    labels[verified] = AMBIGUOUS
    labels[verified & (inl >= cfg.min_inliers) & (cand["mutual_links"] >= 2)] = POSITIVE
    hard = verified & (inl <= max_negative) & (cand["best_sim"] >= cfg.hard_negative_min_sim)
    labels[hard] = HARD_NEGATIVE
    return labels


def weak_negatives(cand: dict[str, np.ndarray], labels: np.ndarray, rank: int) -> np.ndarray:
    """``labels`` with :data:`WEAK_NEGATIVE` on unverified pairs that share no mutual region pair although one
    image ranks the other among its ``rank`` most similar candidate images (by ``best_sim``): what the index
    finds similar but cannot back with a second, independent neighbour relation."""
    out = np.array(labels, copy=True)
    if cand["image_a"].size == 0 or rank < 1:
        return out
    kept = cap_per_image({**cand, "_row": np.arange(cand["image_a"].size)}, rank)["_row"]
    sel = np.zeros(out.size, bool)
    sel[kept] = True
    out[sel & (cand["mutual_links"] == 0) & (out == UNVERIFIED)] = WEAK_NEGATIVE
    return out


def training_pairs(cand: dict[str, np.ndarray], labels: np.ndarray,
                   accept: tuple[str, ...] = (POSITIVE, WEAK_POSITIVE)) -> np.ndarray:
    """(P, 2) image pairs whose label is in ``accept``: the ``positives`` of ``pipeline.projection.TripletData``."""
    sel = np.isin(labels, accept)
    return np.stack([cand["image_a"][sel], cand["image_b"][sel]], axis=1).astype(np.int64)
