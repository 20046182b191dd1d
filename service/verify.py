"""Spatial verification re-ranking ``+sv[:K]``: any method's shortlist re-ordered by geometrically verified matches.

For each query, the top ``K`` results (default ``verify.shortlist``, 100) are verified: the query's keypoints
(:meth:`service.encoder.QueryEncoder.add_keypoints`, the run's query-side keypoint settings) are matched with each
shortlist image's keypoints, read through :class:`storage.readers.KeypointReader` (only those images' row groups of
the shards that hold them), a MAGSAC++ homography with an affine fallback is fitted
(:func:`pipeline.verification.verify_shortlist`), and the inlier counts are fused with the first-stage scores by
the run's ``verify.fusion`` rule (:func:`pipeline.verification.fuse_scores`; default ``tiered``: images with at
least ``verify.min_inliers`` inliers are verified and ranked first by inlier count, the others keep their
first-stage order). Results past ``K`` keep their order and scores. With ``verify.rescore_matcher``
(``lighterglue`` / ``lightglue``) the learned matcher then re-verifies the first stage's and the fused list's top
``verify.rescore_top`` and its inlier counts replace MNN's there before fusing again
(:func:`pipeline.verification.rescore_positions`).

The ranking's ``extra["matches"]`` holds, per verified image id, the inlier matches as an ``(n, 4)`` float32 array
``[xq, yq, xd, yd]`` in query-crop / database-image pixels (what the results browser and the HTML pages draw), and
``extra["inliers"]`` every shortlist image's inlier count.

:class:`SpatialVerifier` keeps an inlier cache per (query, image) -- a query is identified by its keypoint array --
so the benchmark verifies each pair once however many methods put the image in a query's shortlist, and a small
cache of database keypoints. This module does not import :mod:`service.search` (which registers the re-ranking).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Protocol, Sequence

import numpy as np

from pipeline.keypoints import Keypoints
from pipeline.matching import Matcher, build_matcher
from pipeline.verification import VerifyConfig, fuse_scores, guided_inlier_matches, inlier_matches, rescore_positions
from service.encoder import QueryDescriptors, QueryEncoder
from service.errors import UserError
from storage.keypoint_weights import load_keypoint_weights
from storage.readers import KeypointReader

log = logging.getLogger("indexer")
RESCORE_LOG_EVERY = 25  # queries between progress lines of a batch with learned re-verification (~0.25 s a pair)

DB_CACHE = 4096   # database images whose keypoints stay in memory (about 150 KB each at 1,024 XFeat keypoints)
# (query, image) pairs whose outcome stays cached, oldest dropped first: a benchmark's every shortlist of every
# method (a few 100k pairs, most with no inliers and an empty match array), a long-running server's recent queries
PAIR_CACHE = 1_000_000

# (inliers, (n, 4) float32 inlier matches [xq, yq, xd, yd]) of one (query, database image) pair
PairResult = tuple[int, np.ndarray]


class _Ranked(Protocol):
    image_ids: list[str]
    scores: np.ndarray
    extra: dict[str, Any]


def query_key(q: QueryDescriptors) -> str:
    """A query's identity for the inlier cache: a digest of its keypoints."""
    h = hashlib.sha1(np.ascontiguousarray(q.kp_xy, np.float32).tobytes())
    h.update(np.ascontiguousarray(q.kp_desc, np.float32).tobytes())
    return h.hexdigest()


class SpatialVerifier:
    """Verifies shortlists of one index run against its keypoints table (one per :class:`SearchService`)."""

    def __init__(self, root: str, encoder: QueryEncoder, config: VerifyConfig | None = None) -> None:
        self.encoder = encoder
        self.cfg = config if config is not None else encoder.cfg.verify
        self.reader = KeypointReader(root)
        self._matcher: Matcher | None = None
        self._rescorer: Matcher | None = None
        self._db: OrderedDict[str, Keypoints] = OrderedDict()
        self.pairs: dict[tuple[str, str], PairResult] = {}   # the inlier cache, shared by every method
        self.rescored: dict[tuple[str, str], PairResult] = {}  # the same for the learned re-verification
        self.pairs_verified = 0
        self.pairs_rescored = 0
        self._lock = threading.Lock()   # the results browser searches from several threads over one service

    @property
    def matcher(self) -> Matcher:
        if self._matcher is None:
            m = self.cfg.matcher
            self._matcher = build_matcher(m, self.encoder.device,
                                          None if m.name == "mnn" else load_keypoint_weights(m.name))
        return self._matcher

    @property
    def rescorer(self) -> Matcher:
        """The learned matcher of ``verify.rescore_matcher`` (built on first use)."""
        if self._rescorer is None:
            name = self.cfg.rescore_matcher
            self._rescorer = build_matcher(self.cfg.rescorer_config(), self.encoder.device, load_keypoint_weights(name))
        return self._rescorer

    def database_keypoints(self, image_ids: Sequence[str]) -> dict[str, Keypoints]:
        """Keypoints of database images (read per shard on a cache miss); images without any are absent."""
        with self._lock:
            have = {i: self._db[i] for i in image_ids if i in self._db}
        missing = [i for i in image_ids if i not in have]
        if missing:
            read = Keypoints.from_table_rows(self.reader.read(missing), self.reader.size_of)
            have.update(read)
            with self._lock:
                self._db.update(read)
                while len(self._db) > DB_CACHE:
                    self._db.popitem(last=False)
        return have

    def verify(self, q: QueryDescriptors, image_ids: Sequence[str], rescore: bool = False) -> list[PairResult]:
        """(inliers, inlier matches) of the query against each image (cached per pair); ``rescore``: with the
        learned re-verification matcher instead of ``verify.matcher``."""
        if not self.reader.available:
            raise UserError("this run has no keypoints table: +sv needs extract.keypoints at index time")
        qkp = self.encoder.add_keypoints(q).keypoints
        assert qkp is not None
        key = query_key(q)
        cache = self.rescored if rescore else self.pairs
        todo = [i for i in dict.fromkeys(image_ids) if (key, i) not in cache]
        if todo:
            db = self.database_keypoints(todo)
            empty = Keypoints.empty(qkp.dim, (1, 1))
            dbs = [db.get(i, empty) for i in todo]
            if rescore:
                res = guided_inlier_matches(qkp, dbs, self.rescore_anchors(key, todo), self.cfg.rescore_keypoints,
                                            self.cfg, self.rescorer)
            else:
                res = inlier_matches(qkp, dbs, self.cfg, self.matcher)
            done = dict(zip(todo, res))
            with self._lock:
                if rescore:
                    self.rescored.update({(key, i): res for i, res in done.items()})
                    self.pairs_rescored += len(todo)
                else:
                    self.add_pairs({(key, i): res for i, res in done.items()})
                    self.pairs_verified += len(todo)
        else:
            done = {}
        return [done[i] if i in done else cache[(key, i)] for i in image_ids]

    def add_pairs(self, pairs: dict[tuple[str, str], PairResult]) -> None:
        """Put verified pairs into the cache (e.g. verified elsewhere, as Ray tasks), dropping the oldest beyond
        :data:`PAIR_CACHE`."""
        self.pairs.update(pairs)
        if len(self.pairs) > PAIR_CACHE:
            for k in list(self.pairs)[: len(self.pairs) - PAIR_CACHE]:
                del self.pairs[k]

    def rescore_anchors(self, key: str, image_ids: Sequence[str]) -> list[np.ndarray | None]:
        """Per image, the cached MNN inlier matches of the query ``key`` that the learned matcher sees first
        (``verify.rescore_guided``; None when off or not verified): the one place in-process re-verification and the
        benchmark's Ray tasks take them from."""
        guided = self.cfg.rescore_guided
        return [self.pairs[(key, i)][1] if guided and (key, i) in self.pairs else None for i in image_ids]

    def rescore_targets(self, key: str, image_ids: Sequence[str], scores: np.ndarray) -> list[str]:
        """The shortlist images (first-stage order) that the learned matcher re-verifies for the query ``key``
        (:func:`query_key`), from its cached MNN results: the pairs a batch can verify ahead, e.g. as Ray tasks."""
        inl = np.array([self.pairs[(key, i)][0] for i in image_ids], np.float64)
        return [image_ids[j] for j in rescore_positions(scores, inl, self.cfg)]

    def rerank(self, qs: Sequence[QueryDescriptors], rankings: Sequence[_Ranked], depth: int | None
               ) -> list[Any]:
        """Each ranking's top ``depth`` (default ``verify.shortlist``) re-ordered by fused score; the inlier
        matches of verified images in ``extra["matches"]``, every shortlist image's count in ``extra["inliers"]``."""
        k_max = self.cfg.shortlist if depth is None else int(depth)
        if self.cfg.rescore_matcher == "none" or len(qs) < RESCORE_LOG_EVERY:
            return [self.rerank_one(q, r, k_max) for q, r in zip(qs, rankings)]
        out, t0, n0 = [], time.time(), self.pairs_rescored
        for n, (q, r) in enumerate(zip(qs, rankings), 1):
            out.append(self.rerank_one(q, r, k_max))
            if n % RESCORE_LOG_EVERY == 0 or n == len(qs):
                el = time.time() - t0
                log.info("[sv] %d/%d queries re-verified with %s (%d new pairs, %.0f s, ETA %.0f s)", n, len(qs),
                         self.cfg.rescore_matcher, self.pairs_rescored - n0, el, el / n * (len(qs) - n))
        return out

    def rerank_one(self, q: QueryDescriptors, r: _Ranked, k_max: int) -> Any:
        """One query's ranking re-ordered (see :meth:`rerank`)."""
        k = min(k_max, len(r.image_ids))
        if k == 0:
            return r
        ids = list(r.image_ids)
        res = self.verify(q, ids[:k])
        inl = np.array([n for n, _ in res], np.float64)
        s = np.asarray(r.scores[:k], np.float64)
        if self.cfg.rescore_matcher != "none":
            # the learned matcher re-verifies the top of both lists; its counts replace MNN's there
            pos = rescore_positions(s, inl, self.cfg)
            for j, pr in zip(pos, self.verify(q, [ids[j] for j in pos], rescore=True)):
                res[j] = pr
                inl[j] = pr[0]
        fused = fuse_scores(s, inl, self.cfg)
        order = np.argsort(-fused, kind="stable")
        extra = dict(r.extra or {})
        extra["matches"] = {ids[j]: res[j][1] for j in range(k) if inl[j] >= self.cfg.min_inliers}
        extra["inliers"] = {ids[j]: int(inl[j]) for j in range(k)}
        new_scores = np.concatenate([fused[order], np.asarray(r.scores[k:], np.float64)]).astype(np.float32)
        return replace(r, image_ids=[ids[j] for j in order] + ids[k:], scores=new_scores, extra=extra)


def sv_rerank(service: Any, qs: Sequence[QueryDescriptors], rankings: list[Any], depth: int | None,
              allowed: np.ndarray | None) -> list[Any]:
    """The ``+sv[:K]`` list re-ranking (registered by :mod:`service.search`): the service's verifier over the
    top ``K`` of each ranking (the rankings are already restricted to ``allowed``)."""
    return service.verifier().rerank(qs, rankings, depth)


__all__ = ["SpatialVerifier", "sv_rerank", "query_key", "PairResult"]
