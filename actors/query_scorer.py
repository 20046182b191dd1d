"""Ray tasks of ``jobs.train_query_scorer`` (seed 000 §3.2, §4.2): per training query photo, the DCG@10 labels of
its sampled patches and the AP of patch voting for every ``lambda`` of the grid, both against the labelled corpus's
regional items (put once in the object store and shared read-only by the tasks)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import ray

from actors.common import Progress
from actors.indexes import load_regional
from pipeline.query_patches import lambda_aps
from pipeline.region_scoring import (LAMBDA_GRID, PROFILE_NAMES, patch_labels, retrieval_profile_dense,
                                     sim_patch_img)

log = logging.getLogger("indexer")


@dataclass
class TrainingQuery:
    """One training query: its photo (the CV group), ground truth in corpus indices, and its patches."""

    name: str
    photo: str
    positives: np.ndarray
    junk: np.ndarray
    full: np.ndarray                 # (d,) the full query image's item
    desc: np.ndarray                 # (P, d) patch descriptors
    feats: np.ndarray                # (P, F) scorer features
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows the SVR trains on
    group: str = ""                  # cross-validation group (default: the photo)

    def __post_init__(self) -> None:
        self.group = self.group or self.photo


def corpus_items(root: str, source: str, corpus_ids: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(items (R, d) grouped by corpus index, corpus index of each row) of the labelled corpus: the rows of the
    run's ``regional_<source>`` index (every image's full view and its ``source`` regions) of the images in
    ``corpus_ids`` (index image id per corpus index; None = not indexed). Other indexed images are left out, so
    they are neither positives nor negatives."""
    ids, X = load_regional(root, source)
    pos = {i: n for n, i in enumerate(corpus_ids) if i is not None}
    img = np.array([pos.get(i, -1) for i in ids], np.int64)
    keep = np.flatnonzero(img >= 0)
    order = keep[np.argsort(img[keep], kind="stable")]
    return np.ascontiguousarray(X[order], np.float32), img[order]


_PROFILE_CHUNK = 256  # patches per dense (chunk, n_images) score block of the profile features


def patch_profiles(X: np.ndarray, img: np.ndarray, n_images: int, full: np.ndarray, desc: np.ndarray,
                   junk: np.ndarray | Sequence[int] = ()) -> np.ndarray:
    """Retrieval-profile features (P, 6) of every patch against the corpus items (exact search, as a query on
    an exact regional index sees them; :func:`pipeline.region_scoring.retrieval_profile`).

    ``junk`` images are left out of the search, as from the ranking the patch's label is computed on: a
    landmark query's own photo in the corpus would otherwise be every patch's perfect first match, which a
    query that is not in the index never has."""
    junk = np.asarray(junk, np.int64).ravel()
    junk = junk[(junk >= 0) & (junk < n_images)]
    full_img = sim_patch_img(np.asarray(full, np.float32).reshape(1, -1), X, img, n_images)[0]
    full_img[junk] = -np.inf
    parts = []
    for s in range(0, len(desc), _PROFILE_CHUNK):
        S = sim_patch_img(desc[s:s + _PROFILE_CHUNK], X, img, n_images)
        S[:, junk] = -np.inf
        parts.append(retrieval_profile_dense(S, full_img))
    return np.concatenate(parts) if parts else np.zeros((0, len(PROFILE_NAMES)))


@ray.remote(num_cpus=1)
def _labels_task(X: np.ndarray, img: np.ndarray, n_images: int, q: TrainingQuery, profile: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    labels = patch_labels(q.desc[q.sample], X, img, q.positives, q.junk, n_images=n_images)
    return labels, (patch_profiles(X, img, n_images, q.full, q.desc, q.junk) if profile else None)


@ray.remote(num_cpus=1)
def _lambda_task(X: np.ndarray, img: np.ndarray, n_images: int, psi: np.ndarray, q: TrainingQuery,
                 lambdas: np.ndarray, k: int) -> np.ndarray:
    return lambda_aps(psi, q.desc, q.full, X, img, n_images, q.positives, q.junk, lambdas, k)


def _gather(refs: list, what: str) -> list:
    """Results of ``refs`` in order, with progress lines."""
    prog = Progress(what, len(refs), unit="queries")
    pending = {r: n for n, r in enumerate(refs)}
    out: list = [None] * len(refs)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for r in done:
            out[pending.pop(r)] = ray.get(r)
        prog.update(len(done))
    prog.update(0, force=True)
    return out


def label_patches(X: np.ndarray, img: np.ndarray, n_images: int, queries: Sequence[TrainingQuery],
                  profile: bool = False) -> list[np.ndarray]:
    """DCG@10 label of each sampled patch (``q.sample``) of every query, one Ray task per query. With
    ``profile``, each query's retrieval-profile features (of every patch) are appended to ``q.feats`` in place."""
    X_ref, img_ref = ray.put(X), ray.put(img)
    refs = [_labels_task.remote(X_ref, img_ref, n_images, q, profile) for q in queries]
    out = []
    for q, (labels, prof) in zip(queries, _gather(refs, "labels")):
        if prof is not None:
            q.feats = np.concatenate([q.feats, prof.astype(q.feats.dtype)], axis=1)
        out.append(labels)
    return out


def lambda_curve(X: np.ndarray, img: np.ndarray, n_images: int, queries: Sequence[TrainingQuery],
                 psis: Sequence[np.ndarray], lambdas: Sequence[float] = LAMBDA_GRID, k: int = 5) -> np.ndarray:
    """(n_queries, L) AP of patch voting per query and ``lambda`` (NaN for a query without positives), one Ray
    task per query; ``psis`` the out-of-fold unaries of every patch of each query."""
    X_ref, img_ref = ray.put(X), ray.put(img)
    lam = np.asarray(list(lambdas), np.float64)
    refs = [_lambda_task.remote(X_ref, img_ref, n_images, psi, q, lam, int(k)) for q, psi in zip(queries, psis)]
    return np.stack(_gather(refs, "lambda"))


__all__ = ["TrainingQuery", "corpus_items", "patch_profiles", "label_patches", "lambda_curve"]
