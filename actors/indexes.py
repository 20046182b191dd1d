"""The ``faiss`` stage: per global method and per regional source, a sharded FAISS index as a snapshot.

Build: read the descriptors of every committed shard, choose the factory string from the corpus size and
the memory budget (or take the user's), train once on a sample, add each table shard in parallel as a Ray
task (every task deserialises the trained empty index and returns its filled shard), then merge the shards
into one index (or keep them as shards for IVF-PQ-sized corpora) and publish a new snapshot version:
``index.npy`` or ``shard-NNNNN.npy`` (FAISS's own serialisation as uint8, no pickle), ``image_ids.npy``
(int id -> image id), for regional indexes ``region_image.npy`` (region row -> int image id), and the
manifest with method, factory, counts, bytes per vector, search parameters and checksums. Searching a
published snapshot is the query side's job (``service.indexes``).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import ray

from actors.whiten import load_whitenings
from pipeline import faiss_index as fi
from pipeline.faiss_index import FaissConfig
from storage.arrays import npy_bytes
from storage.layout import SnapshotFiles
from storage.readers import iter_regions, read_globals
from storage.snapshot import SnapshotWriter

log = logging.getLogger("indexer")
MERGE_MAX_VECTORS = 20_000_000  # above this, keep shards (a searcher merges per-shard top-k exactly)


def _effective_dim(X: np.ndarray) -> int:
    """Width without all-zero trailing columns (descriptor files pad narrower methods with zeros)."""
    nz = np.flatnonzero(np.any(X != 0, axis=0))
    return int(nz[-1] + 1) if len(nz) else X.shape[1]


def load_regional(root: str, source: str) -> tuple[list[str], np.ndarray]:
    """(image id per item, whitened regional descriptors) of a regional index: every image's full-image region
    plus its ``source`` regions (seed 002 eq. 3: ``r = 1`` is the whole image), so an image is found by its
    whole view as well as by its parts."""
    white = load_whitenings(root)["regions"]
    ids: list[str] = []
    parts = []
    for src in dict.fromkeys(("full", source)):
        for rid, _, X in iter_regions(root, src):  # one file at a time: only the whitened rows are kept
            ids += rid
            parts.append(np.asarray(white.apply(X), np.float32))
    return ids, (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32))


@ray.remote(num_cpus=0.5)
def _add_shard_task(trained: np.ndarray, X: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return fi.serialize(fi.add_shard(trained, X, ids))


def build_index(X: np.ndarray, cfg: FaissConfig, shard_rows: int = 500_000
                ) -> tuple[list[np.ndarray], str, dict[str, int]]:
    """Train once, add shards in parallel with Ray, merge when small enough. Returns serialised shards."""
    n, d = X.shape
    factory = cfg.factory or fi.choose_factory(n, d, cfg.memory_budget_gb * 2**30, flat_max_n=cfg.flat_max_vectors)
    rng = np.random.default_rng(0)
    sample = X if n <= cfg.train_sample else X[np.sort(rng.choice(n, cfg.train_sample, replace=False))]
    trained = fi.serialize(fi.train_index(factory, sample, d))
    trained_ref = ray.put(trained)
    refs = [_add_shard_task.remote(trained_ref, X[s:s + shard_rows], np.arange(s, min(n, s + shard_rows)))
            for s in range(0, n, shard_rows)]
    shards = ray.get(refs)
    params = fi.default_search_params(fi.deserialize(trained))
    if len(shards) > 1 and n <= MERGE_MAX_VECTORS:
        shards = [fi.serialize(fi.merge_indexes([fi.deserialize(s) for s in shards], consume=True))]
    return shards, factory, params


def write_npy(w: SnapshotWriter, rel: str, array: np.ndarray) -> None:
    """One array into a snapshot as ``.npy``, streamed in chunks (no second in-memory copy of a large index)."""
    with w.open(rel) as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def _publish(root: str, name: str, kind: str, method: str, shards: list[np.ndarray], factory: str,
             params: dict[str, int], image_ids: list[str], dim: int, n_vectors: int,
             region_image: np.ndarray | None = None) -> dict[str, Any]:
    nbytes = sum(s.nbytes for s in shards)
    with SnapshotWriter(root, name, method=method, factory=factory,
                        counts={"vectors": n_vectors, "images": len(image_ids), "shards": len(shards)},
                        parameters={"kind": kind, "dim": dim, "search": params,
                                    "bytes_per_vector": nbytes / max(n_vectors, 1)}) as w:
        if len(shards) == 1:
            write_npy(w, SnapshotFiles.INDEX, shards[0])
        else:
            for i, s in enumerate(shards):
                write_npy(w, SnapshotFiles.shard(i), s)
        w.write_bytes(SnapshotFiles.IMAGE_IDS, npy_bytes(np.asarray(image_ids, dtype=str)))
        if region_image is not None:
            w.write_bytes(SnapshotFiles.REGION_IMAGE, npy_bytes(region_image.astype(np.int64)))
    return {"version": w.version, "factory": factory, "vectors": n_vectors, "index_bytes": nbytes,
            "bytes_per_vector": nbytes / max(n_vectors, 1)}


def run_faiss_stage(root: str, cfg: FaissConfig) -> dict[str, Any]:
    """Build and publish one snapshot per ``cfg.methods`` global method and per ``cfg.regional`` source."""
    out: dict[str, Any] = {}
    for method in cfg.methods:
        t0 = time.time()
        ids, X = read_globals(root, method, trim=True)  # trailing zero padding dropped file by file
        if len(ids) == 0:
            log.warning("[faiss] no descriptors for method %s: skipped (is its stage enabled?)", method)
            continue
        d = _effective_dim(X)
        X = np.ascontiguousarray(X[:, :d])
        shards, factory, params = build_index(X, cfg)
        out[f"global_{method}"] = {**_publish(root, f"global_{method}", "global", method, shards, factory, params,
                                              ids, d, len(ids)), "seconds": time.time() - t0}
    for source in cfg.regional:
        t0 = time.time()
        rid, X = load_regional(root, source)
        if len(rid) == 0:
            log.warning("[faiss] no regions of source %s: skipped", source)
            continue
        image_ids, region_image = np.unique(np.asarray(rid, dtype=str), return_inverse=True)
        shards, factory, params = build_index(X, cfg)
        out[f"regional_{source}"] = {**_publish(root, f"regional_{source}", "regional", source, shards, factory,
                                                params, list(image_ids), X.shape[1], len(rid), region_image),
                                     "seconds": time.time() - t0}
    return out


__all__ = ["run_faiss_stage", "build_index", "load_regional"]
