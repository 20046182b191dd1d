"""Ray side of pair mining (issue 17): training pairs for the learned projection, from the index alone.

Inputs are the graph stage's artefacts (whitened regions ``V``, the FAISS index over them, the mutual k-NN graph
``W``, the image of every region) and, when the run has one, the ``keypoints`` table. Never a ground truth.

1. **Candidates** (a Ray task per row block of regions): the block's k-NN lists from the stored index, each
   link flagged mutual when ``W`` has the edge (:func:`pipeline.pair_mining.candidates_from_links`); the
   driver merges the blocks (:func:`pipeline.pair_mining.merge_candidates`).
2. **Verification** (with keypoints; a Ray task per block of pairs): the ``max_pairs_per_image`` most similar
   candidates of every image are matched (MNN) and fitted (MAGSAC, ``pipeline.verification``); the inlier
   counts label them ``positive`` / ``hard_negative`` / ``ambiguous`` (:func:`classify_pairs`). When the run's
   ``verify.rescore_matcher`` names a learned matcher (the ``+sv`` cascade), it re-verifies the pairs MNN labels
   ``positive`` or ``hard_negative`` and its inlier counts replace MNN's there, as at query time: MNN + MAGSAC
   verifies frame-like rectangles (a laptop, a bank note) against paintings, which the glue matchers reject.
   Without keypoints: ``weak_positive`` (mutual neighbours above a similarity) and ``weak_negative``
   (near neighbours with no mutual region pair), weaker evidence, labelled as such.
"""
from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import scipy.sparse as sp

from actors.common import Progress
from actors.graph import _cached_index
from pipeline.keypoints import Keypoints
from pipeline.knn_graph import DEFAULT_NPROBE, graph_from_arrays, graph_to_arrays
from pipeline.matching import build_matcher
from pipeline.pair_mining import (HARD_NEGATIVE, POSITIVE, UNVERIFIED, MiningConfig, cap_per_image,
                                  candidates_from_links, classify_pairs, merge_candidates, weak_negatives)
from pipeline.verification import VerifyConfig, verify_shortlist
from storage.keypoint_weights import load_keypoint_weights
from storage.readers import KeypointReader, has_keypoints
from storage.training import load_mining_graph


@ray.remote
def _candidates_block(token: str, index_bytes: np.ndarray, V: np.ndarray, W_rows: dict[str, np.ndarray],
                      start: int, region_image: np.ndarray, k: int, nprobe: int) -> dict[str, np.ndarray]:
    """Candidate image pairs of the links from regions ``start:start + rows`` (one block)."""
    index = _cached_index(token, index_bytes, nprobe)
    W = graph_from_arrays(W_rows)
    stop = start + W.shape[0]
    sims, ids = index.search(np.ascontiguousarray(V[start:stop], dtype=np.float32), k)
    return candidates_from_links(ids, sims, np.arange(start, stop), W, region_image)


@ray.remote
def _verify_block(root: str, image_a: list[str], image_b: list[str], cfg: VerifyConfig) -> np.ndarray:
    """Inlier counts of the pairs ``(image_a[i], image_b[i])`` from the run's keypoints (-1: no keypoints).

    The block's images are read through the per-shard :class:`storage.readers.KeypointReader` (their row groups
    only), and each image ``a`` is matched with all its partners in one batched product
    (:func:`pipeline.verification.verify_shortlist`: the same matches as pair by pair)."""
    reader = KeypointReader(root)
    kps = Keypoints.from_table_rows(reader.read(set(image_a) | set(image_b)), reader.size_of)
    m = cfg.matcher
    matcher = build_matcher(m, "cpu", None if m.name == "mnn" else load_keypoint_weights(m.name))
    out = np.full(len(image_a), -1, np.int64)
    by_a: dict[str, list[int]] = {}
    for t, (a, b) in enumerate(zip(image_a, image_b)):
        if a in kps and b in kps:
            by_a.setdefault(a, []).append(t)
    for a, rows in by_a.items():
        res = verify_shortlist(kps[a], [kps[image_b[t]] for t in rows], cfg, matcher)
        out[rows] = [r.inliers for r in res]
    return out


def mine_candidates(graph: dict[str, Any], region_image: np.ndarray, k: int, block_rows: int,
                    nprobe: int = DEFAULT_NPROBE) -> dict[str, np.ndarray]:
    """Merged candidate pairs over every region, one Ray task per block of ``block_rows`` regions."""
    W = sp.csr_matrix(graph_from_arrays(graph["W"]))
    n = W.shape[0]
    V_ref, index_ref, image_ref = ray.put(graph["V"]), ray.put(graph["index_bytes"]), ray.put(region_image)
    token = uuid.uuid4().hex
    refs = [_candidates_block.remote(token, index_ref, V_ref, graph_to_arrays(W[s:min(n, s + block_rows)]), s,
                                     image_ref, int(min(k + 1, n)), nprobe)
            for s in range(0, n, block_rows)]
    return merge_candidates(ray.get(refs))


def verify_candidates(root: str, cand: dict[str, np.ndarray], names: np.ndarray, cfg: VerifyConfig,
                      block_pairs: int) -> np.ndarray:
    """Inliers of every candidate pair (-1 where not verified), one Ray task per ``block_pairs`` pairs."""
    order = np.lexsort((cand["image_b"], cand["image_a"]))  # a block holds few images a, each with its partners
    a, b = names[cand["image_a"][order]].tolist(), names[cand["image_b"][order]].tolist()
    pending = {_verify_block.remote(root, a[s:s + block_pairs], b[s:s + block_pairs], cfg): s
               for s in range(0, len(a), block_pairs)}
    progress = Progress("mine_pairs verify", len(a), unit="pairs")
    out = np.full(len(a), -1, np.int64)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        s = pending.pop(ready[0])
        block = ray.get(ready[0])
        out[order[s:s + len(block)]] = block
        progress.update(len(block))
    return out


def mine_pairs(root: str, cfg: MiningConfig, k: int | None = None, block_rows: int = 20_000,
               block_pairs: int = 500, verify: VerifyConfig | None = None, use_keypoints: bool = True
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The labelled pairs of the run at ``root`` (columns of ``storage.schemas.pairs_schema``) and a summary.

    ``k``: neighbours per region (default: the graph's own k). Keypoints are used when the run has a
    ``keypoints`` table and ``use_keypoints``; otherwise the weak labels. Rows labelled ``unverified`` are
    dropped (they carry no evidence either way).
    """
    graph = load_mining_graph(root)
    names, region_image = np.unique(np.asarray(graph["image_id"], dtype=str), return_inverse=True)
    k = int(k or graph["info"].get("k", 50))
    cand = mine_candidates(graph, region_image.astype(np.int64), k, block_rows)
    verified = use_keypoints and has_keypoints(root)
    inliers = np.full(cand["image_a"].size, -1, np.int64)
    rescored = 0
    if verified:
        verify = verify or VerifyConfig()
        if cfg.min_inliers is None:  # the verification stage's threshold
            cfg = replace(cfg, min_inliers=verify.min_inliers)
        rows = cap_per_image({**cand, "_row": np.arange(inliers.size)}, cfg.max_pairs_per_image)["_row"]
        # models are accepted from the lower of the two thresholds, so that the inlier counts are kept as evidence
        vcfg = replace(verify, min_inliers=min(verify.min_inliers, cfg.min_inliers, cfg.negative_inliers + 1))
        inliers[rows] = verify_candidates(root, {c: v[rows] for c, v in cand.items()}, names, vcfg, block_pairs)
        labels = classify_pairs(cand, inliers, cfg)
        if verify.rescore_matcher != "none":
            again = np.flatnonzero(np.isin(labels, (POSITIVE, HARD_NEGATIVE)))
            gcfg = replace(vcfg, matcher=verify.rescorer_config())
            inliers[again] = verify_candidates(root, {c: v[again] for c, v in cand.items()}, names, gcfg,
                                               max(1, block_pairs // 10))
            rescored = int(again.size)
            labels = classify_pairs(cand, inliers, cfg)
    else:
        labels = weak_negatives(cand, classify_pairs(cand, None, cfg), cfg.weak_negative_rank)
    keep = labels != UNVERIFIED
    region_ids = np.asarray(graph["region_id"], np.int64)
    columns = {"image_a": names[cand["image_a"][keep]], "image_b": names[cand["image_b"][keep]],
               "kind": labels[keep], "verified": inliers[keep] >= 0, "inliers": inliers[keep].astype(np.int32),
               "similarity": cand["best_sim"][keep], "mutual_similarity": cand["best_mutual_sim"][keep],
               "links": cand["links"][keep].astype(np.int32),
               "mutual_links": cand["mutual_links"][keep].astype(np.int32),
               "region_a": region_ids[cand["region_a"][keep]].astype(np.int32),
               "region_b": region_ids[cand["region_b"][keep]].astype(np.int32)}
    kinds, counts = np.unique(labels[keep], return_counts=True)
    info = {"images": int(names.size), "regions": int(region_image.size), "k": k, "candidates": int(labels.size),
            "verified": bool(verified), "verified_pairs": int((inliers >= 0).sum()),
            "rescore_matcher": verify.rescore_matcher if verified else "none", "rescored_pairs": rescored,
            "counts": {str(a): int(c) for a, c in zip(kinds, counts)},
            "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}}
    return columns, info


__all__ = ["mine_pairs", "mine_candidates", "verify_candidates"]
