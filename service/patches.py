"""The ``patches[:k]`` search method (seed 000 §4.2): a trained region scorer rates the query's patches, ``k``
diverse ones are picked greedily, and they and the full query image vote over a regional index.

A database image scores ``sim_img(q, im) + sum_{chosen p} sim_patch_img(p, im)``, where ``sim_patch_img`` is the
best match of the patch among the image's items in ``regional_<source>`` (its full view and its regions) and
``sim_img`` is the same for the full query image. Every item goes through
:meth:`service.indexes.LoadedIndex.search_regional`, so the method runs on exact, FAISS-approximate and
ITQ-prefiltered regional indexes alike. The scorer is the artefact ``jobs.train_query_scorer`` writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.config import ConfigError, build, to_plain
from pipeline.query_patches import PatchSearchConfig, select_patches, vote_rankings
from pipeline.region_scoring import PROFILE_K, PROFILE_NAMES, RegionScorer, dense_from_topk, retrieval_profile
from service.encoder import QueryDescriptors
from service.errors import UserError
from service.indexes import LoadedIndex
from storage.query_scorer import load_query_scorer, resolve_location
from storage.uri import redact

_PROFILE_BATCH = 256  # patches per regional search of the profile features (bounds its (batch, n_images) block)
TRAIN_HINT = ("train one with `python -m jobs.train_query_scorer --dataset <gnd.json folder> --index <run>` "
              "or pass a scorer folder (--scorer / SearchService(scorer=...))")


@dataclass
class PatchSearch:
    """A loaded region scorer with the query-time config it is used with."""

    scorer: RegionScorer
    cfg: PatchSearchConfig
    feature_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    location: str = ""

    @classmethod
    def load(cls, uri: str, override: PatchSearchConfig | None = None) -> "PatchSearch":
        """The scorer in folder ``uri`` (or in the scorer artefact of the index run at ``uri``); ``override``
        replaces the config it was trained with. :class:`UserError` when there is none."""
        location = resolve_location(uri)
        if location is None:
            raise UserError(f"no trained query-region scorer at {redact(uri)}: {TRAIN_HINT}")
        arrays, info = load_query_scorer(location)
        try:
            cfg = override or build(PatchSearchConfig, info.get("config", {}))
        except ConfigError as exc:
            raise UserError(f"the scorer at {redact(location)} has an unreadable config: {exc}") from None
        return cls(RegionScorer.from_arrays(arrays), cfg, list(info.get("feature_names", [])), info, location)

    def describe(self) -> dict[str, Any]:
        """What a report records about the scorer: where it is, its config and learned values."""
        keep = ("C", "lambda", "split", "n_queries", "n_patches", "cv_mse", "cv_map")
        return {"location": self.location, "config": to_plain(self.cfg), **{k: self.info[k] for k in keep
                                                                          if k in self.info}}

    @property
    def uses_profile(self) -> bool:
        """Whether the scorer reads retrieval-profile features (appended after the encoder's patch features)."""
        return tuple(self.feature_names[-len(PROFILE_NAMES):]) == PROFILE_NAMES

    def profile(self, q: QueryDescriptors, idx: LoadedIndex, allowed: np.ndarray | None = None) -> np.ndarray:
        """Retrieval-profile features (P, 6) of the query's patches over ``idx``
        (:func:`pipeline.region_scoring.retrieval_profile`): each patch's best ``PROFILE_K`` image scores and
        the full query image's score of the patch's best image, through the same regional search as the voting
        (exact, FAISS or ITQ-prefiltered)."""
        D = np.asarray(q.patch_desc, np.float32)
        n_img = len(idx.image_ids)
        exact = idx.exact and idx.itq is None
        full = np.asarray(q.regions["full"], np.float32)[:1]
        Sf, If = idx.search_regional([full], None if exact else self.cfg.item_depth, allowed)
        full_dense = dense_from_topk(Sf, If, n_img)[0]
        tops, best = [], []
        for s in range(0, len(D), _PROFILE_BATCH):
            S, I = idx.search_regional([D[i:i + 1] for i in range(s, min(s + _PROFILE_BATCH, len(D)))], PROFILE_K,
                                       allowed)
            tops.append(S)
            best.append(I[:, 0])
        b = np.concatenate(best) if best else np.zeros(0, np.int64)
        if not exact and idx.can_rescore:
            # as in rank(): the patches' best images get the full image's exact score, also those its approximate
            # list missed (the list's lowest score is no bound of theirs); training computes this column exactly
            at = np.unique(b[b >= 0])
            full_dense[at] = idx.rescore_images([full], at)[0]
        full_at = np.where(b >= 0, full_dense[np.maximum(b, 0)], np.nan)
        top = np.concatenate(tops) if tops else np.zeros((0, PROFILE_K), np.float32)
        return retrieval_profile(top, float(Sf[0, 0]) if np.isfinite(Sf[0, 0]) else 0.0, full_at)

    def choose(self, q: QueryDescriptors, k: int, idx: LoadedIndex | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(chosen patch indices, all patch scores ``psi``) of one query; ``idx`` (the regional index searched)
        is needed by a scorer with retrieval-profile features."""
        if not q.has_patches:
            raise UserError("the query was encoded without patches: encode it with the scorer's proposals "
                            "(SearchService.encode(..., patches=True))")
        feats = np.asarray(q.patch_feat, np.float32)
        if len(feats) == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        if self.uses_profile:
            if idx is None:
                raise ValueError("this scorer reads retrieval-profile features: pass the regional index")
            feats = np.concatenate([feats, self.profile(q, idx, allowed).astype(np.float32)], axis=1)
        if feats.shape[1] != self.scorer.n_features:
            raise UserError(f"the scorer expects {self.scorer.n_features} patch features, the query has "
                            f"{feats.shape[1]}: it was trained on another index run")
        psi = self.scorer.predict(feats)
        return select_patches(psi, q.patch_desc, k, self.cfg.lam), psi

    def rank(self, qs: Sequence[QueryDescriptors], idx: LoadedIndex, k: int | None, depth: int | None,
             allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """(scores (nq, depth), int image ids (nq, depth), per-query extras): rankings by patch voting over
        ``idx`` (a regional index), restricted to the ``allowed`` image ids."""
        k = self.cfg.k if k is None else int(k)
        n_img = len(idx.image_ids)
        mask = idx.allowed_mask(allowed)
        n_ok = n_img if mask is None else int(mask.sum())
        width = n_ok if depth is None else min(int(depth), n_ok)
        per_item = None if (idx.exact and idx.itq is None) else max(width, self.cfg.item_depth)
        D = np.full((len(qs), width), -np.inf, np.float32)
        I = np.full((len(qs), width), -1, np.int64)
        extras = []
        for r, q in enumerate(qs):
            chosen, psi = self.choose(q, k, idx, allowed)
            items = ([np.asarray(q.regions["full"], np.float32)[:1]] if "full" in q.regions else []) + \
                [np.asarray(q.patch_desc, np.float32)[c:c + 1] for c in chosen]
            if not items:
                extras.append({})
                continue
            S, ids = idx.search_regional(items, per_item, allowed)
            if per_item is not None and idx.can_rescore:
                # approximate lists (the ITQ prefilter): every image any item reached is re-scored exactly
                # for every item (seed 000 §4.2: exact features re-rank the prefilter's shortlist). Filling an
                # item's unreached images with its lowest listed score put the tail of a prefilter's re-ranked
                # candidates (-0.10) below a positive painting it missed (0.11): no-box patches:5 lost 3.9 mAP.
                # An approximate FAISS index without ITQ keeps that fill (dense_from_topk): no exact rows.
                reached = np.unique(ids[ids >= 0])
                S, ids = idx.rescore_images(items, reached), np.broadcast_to(reached, (len(items), len(reached)))
            d, i = vote_rankings(S, ids, n_img, width, mask)
            D[r, :len(d)], I[r, :len(i)] = d, i
            extras.append({"patch_boxes": np.asarray(q.patch_boxes)[chosen].tolist(),
                           "patch_scores": psi[chosen].tolist(), "lambda": self.cfg.lam, "k": k})
        return D, I, extras


__all__ = ["PatchSearch", "TRAIN_HINT"]
