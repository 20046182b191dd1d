"""Spatial verification of many queries' shortlists as Ray tasks (the benchmark's ``+sv`` rows).

:func:`verify_many` takes each query's keypoints and the database images to verify it against (the union of its
shortlists over every method), splits the queries into chunks, and runs one Ray task per chunk: each reads its
shortlists' keypoints through :class:`storage.readers.KeypointReader` (only the shards and row groups that hold
them) and verifies with :func:`pipeline.verification.inlier_matches` -- the computation
:class:`service.verify.SpatialVerifier` runs in process, whose inlier cache the results then fill. One query (or
no Ray) stays in process.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import ray

from actors.common import Progress
from pipeline.keypoints import Keypoints
from pipeline.matching import build_matcher
from pipeline.verification import VerifyConfig, guided_inlier_matches
from storage.keypoint_weights import load_keypoint_weights
from storage.readers import KeypointReader

log = logging.getLogger("indexer")

# query key -> (positions (n, 2), scores (n,), descriptors (n, D), (width, height)) and its images to verify
QueryKeypoints = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]
PairResults = dict[tuple[str, str], tuple[int, np.ndarray]]
MIN_TASKS = 32


Job = tuple[str, QueryKeypoints, list[str], list[np.ndarray | None]]


def verify_chunk(root: str, cfg: VerifyConfig, jobs: list[Job]) -> PairResults:
    """Verify each (query key, query keypoints, image ids, anchors) job against the run's keypoints table; a pair's
    anchors (an earlier verification's inlier matches, or None) come first among the at most
    ``cfg.matcher.max_keypoints`` keypoints per image the matcher sees
    (:func:`pipeline.verification.guided_inlier_matches`)."""
    reader = KeypointReader(root)
    m = cfg.matcher
    matcher = build_matcher(m, "cpu", None if m.name == "mnn" else load_keypoint_weights(m.name))
    out: PairResults = {}
    for key, (xy, scores, desc, size), ids, anchors in jobs:
        qkp = Keypoints(xy, scores, desc, size)
        rows = Keypoints.from_table_rows(reader.read(ids), reader.size_of)
        empty = Keypoints.empty(qkp.dim, (1, 1))
        db = [rows.get(i, empty) for i in ids]
        for i, res in zip(ids, guided_inlier_matches(qkp, db, anchors, m.max_keypoints, cfg, matcher)):
            out[(key, i)] = res
    return out


@ray.remote(num_cpus=1)
def _verify_task(root: str, cfg: VerifyConfig, jobs: list[Job]) -> PairResults:
    import cv2  # one OpenCV thread per task: the tasks themselves fill the cores

    cv2.setNumThreads(1)
    return verify_chunk(root, cfg, jobs)


def verify_many(root: str, cfg: VerifyConfig, queries: dict[str, QueryKeypoints], shortlists: dict[str, list[str]],
                chunks: int = 0, anchors: dict[tuple[str, str], np.ndarray] | None = None
                ) -> tuple[PairResults, dict[str, Any]]:
    """Every (query, image) pair of ``shortlists`` verified: Ray tasks over ``chunks`` groups of queries (default
    twice the cluster's CPUs) when Ray is up and there is more than one query, else in process. ``anchors``: per
    (query key, image id), matches the matcher sees first when it sees at most ``cfg.matcher.max_keypoints``."""
    t0 = time.time()
    anchors = anchors or {}
    jobs: list[Job] = []
    for k, ids in shortlists.items():
        ids = list(dict.fromkeys(ids))
        if ids:
            jobs.append((k, queries[k], ids, [anchors.get((k, i)) for i in ids]))
    pairs = sum(len(j[2]) for j in jobs)
    if len(jobs) <= 1 or not ray.is_initialized():
        out = verify_chunk(root, cfg, jobs)
        return out, {"pairs": pairs, "tasks": 0, "seconds": time.time() - t0}
    # enough tasks for progress lines and load balance (each task opens its reader once: ~0.1 s), at least two
    # per CPU; a task's queries are interleaved over the list so that the tasks are about equally long
    n = chunks or max(MIN_TASKS, 2 * int(ray.cluster_resources().get("CPU", 1)))
    n = min(n, len(jobs))
    cfg_ref = ray.put(cfg)
    pending = {_verify_task.remote(root, cfg_ref, jobs[c::n]): sum(len(j[2]) for j in jobs[c::n]) for c in range(n)}
    progress = Progress("verify", pairs, unit="pairs")
    out: PairResults = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        out.update(ray.get(ready[0]))
        progress.update(pending.pop(ready[0]))
    log.info("[verify] %d pairs of %d queries in %d Ray tasks, %.1f s", pairs, len(jobs), n, time.time() - t0)
    return out, {"pairs": pairs, "tasks": n, "seconds": time.time() - t0}


__all__ = ["verify_many", "verify_chunk", "QueryKeypoints", "PairResults"]
