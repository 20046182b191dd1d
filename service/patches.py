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
from pipeline.region_scoring import RegionScorer
from service.encoder import QueryDescriptors
from service.errors import UserError
from service.indexes import LoadedIndex
from storage.query_scorer import load_query_scorer, resolve_location
from storage.uri import redact

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

    def choose(self, q: QueryDescriptors, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(chosen patch indices, all patch scores ``psi``) of one query."""
        if not q.has_patches:
            raise UserError("the query was encoded without patches: encode it with the scorer's proposals "
                            "(SearchService.encode(..., patches=True))")
        feats = np.asarray(q.patch_feat, np.float32)
        if feats.shape[1] != self.scorer.n_features:
            raise UserError(f"the scorer expects {self.scorer.n_features} patch features, the query has "
                            f"{feats.shape[1]}: it was trained on another index run")
        if len(feats) == 0:
            return np.zeros(0, np.int64), np.zeros(0)
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
            chosen, psi = self.choose(q, k)
            items = ([np.asarray(q.regions["full"], np.float32)[:1]] if "full" in q.regions else []) + \
                [np.asarray(q.patch_desc, np.float32)[c:c + 1] for c in chosen]
            if not items:
                extras.append({})
                continue
            S, ids = idx.search_regional(items, per_item, allowed)
            d, i = vote_rankings(S, ids, n_img, width, mask)
            D[r, :len(d)], I[r, :len(i)] = d, i
            extras.append({"patch_boxes": np.asarray(q.patch_boxes)[chosen].tolist(),
                           "patch_scores": psi[chosen].tolist(), "lambda": self.cfg.lam, "k": k})
        return D, I, extras


__all__ = ["PatchSearch", "TRAIN_HINT"]
