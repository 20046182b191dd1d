"""FAISS index stage: per global method and per regional source, a sharded FAISS index as a snapshot.

Build: read the descriptors of every committed shard, choose the factory string from the corpus size and
the memory budget (or take the user's), train once on a sample, add each table shard in parallel as a Ray
task (every task deserialises the trained empty index and returns its filled shard), then merge the shards
into one index (or keep them as shards for IVF-PQ-sized corpora) and publish a new snapshot version:
``index.npy`` or ``shard-NNNNN.npy`` (FAISS's own serialisation as uint8, no pickle), ``image_ids.npy``
(int id -> image id), for regional indexes ``region_image.npy`` (region row -> int image id), and the
manifest with method, factory, counts, bytes per vector, search parameters and checksums.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray

from pipeline import faiss_index as fi
from storage.arrays import npy_bytes, npy_from_bytes
from storage.schemas import descriptors_to_numpy
from storage.snapshot import Snapshot, SnapshotWriter, open_latest
from storage.tables import StageManifest, read_parquet

log = logging.getLogger("indexer")
MERGE_MAX_VECTORS = 20_000_000  # above this, keep shards (a searcher merges per-shard top-k exactly)


def _read_npy(snap: Snapshot, rel: str) -> np.ndarray:
    return npy_from_bytes(snap.read_bytes(rel))


def _effective_dim(X: np.ndarray) -> int:
    """Width without all-zero trailing columns (descriptor files pad narrower methods with zeros)."""
    nz = np.flatnonzero(np.any(X != 0, axis=0))
    return int(nz[-1] + 1) if len(nz) else X.shape[1]


def load_method(root: str, method: str) -> tuple[list[str], np.ndarray]:
    """(image ids, descriptors) of a final global method, in shard order."""
    ids, parts = [], []
    for _, marker in sorted(StageManifest(root, "descriptors").committed().items()):
        t = read_parquet(marker["files"]["globals"])
        t = t.filter(pc.equal(t.column("method"), method))
        ids += t.column("image_id").to_pylist()
        parts.append(descriptors_to_numpy(t.column("descriptor")))
    X = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return ids, X


def load_regional(root: str, source: str) -> tuple[list[str], np.ndarray]:
    """(image id per region, whitened regional descriptors) of one region source."""
    from actors.descriptors import load_whitening

    white = load_whitening(root, "regions")
    stage = "object_saliency" if source.startswith("os_") else "extract"
    ids, parts = [], []
    for _, marker in sorted(StageManifest(root, stage).committed().items()):
        t = read_parquet(marker["files"]["regions"])
        t = t.filter(pc.equal(t.column("source"), source))
        if t.num_rows:
            ids += t.column("image_id").to_pylist()
            parts.append(np.asarray(white.apply(descriptors_to_numpy(t.column("descriptor"))), np.float32))
    X = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return ids, X


@ray.remote(num_cpus=0.5)
def _add_shard_task(trained: np.ndarray, X: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return fi.serialize(fi.add_shard(trained, X, ids))


def build_index(X: np.ndarray, factory: str | None, memory_budget_gb: float, train_sample: int,
                shard_rows: int = 500_000) -> tuple[list[np.ndarray], str, dict[str, int]]:
    """Train once, add shards in parallel with Ray, merge when small enough. Returns serialised shards."""
    n, d = X.shape
    factory = factory or fi.choose_factory(n, d, memory_budget_gb * 2**30)
    rng = np.random.default_rng(0)
    sample = X if n <= train_sample else X[np.sort(rng.choice(n, train_sample, replace=False))]
    trained = fi.serialize(fi.train_index(factory, sample, d))
    trained_ref = ray.put(trained)
    refs = [_add_shard_task.remote(trained_ref, X[s:s + shard_rows], np.arange(s, min(n, s + shard_rows)))
            for s in range(0, n, shard_rows)]
    shards = ray.get(refs)
    params = fi.default_search_params(fi.deserialize(trained))
    if len(shards) > 1 and n <= MERGE_MAX_VECTORS:
        shards = [fi.serialize(fi.merge_indexes([fi.deserialize(s) for s in shards], consume=True))]
    return shards, factory, params


def _publish(root: str, name: str, kind: str, method: str, shards: list[np.ndarray], factory: str,
             params: dict[str, int], image_ids: list[str], dim: int, n_vectors: int,
             region_image: np.ndarray | None = None) -> dict[str, Any]:
    nbytes = sum(s.nbytes for s in shards)
    with SnapshotWriter(root, name, method=method, factory=factory,
                        counts={"vectors": n_vectors, "images": len(image_ids), "shards": len(shards)},
                        parameters={"kind": kind, "dim": dim, "search": params,
                                    "bytes_per_vector": nbytes / max(n_vectors, 1)}) as w:
        if len(shards) == 1:
            w.write_bytes("index.npy", npy_bytes(shards[0]))
        else:
            for i, s in enumerate(shards):
                w.write_bytes(f"shard-{i:05d}.npy", npy_bytes(s))
        w.write_bytes("image_ids.npy", npy_bytes(np.asarray(image_ids, dtype=str)))
        if region_image is not None:
            w.write_bytes("region_image.npy", npy_bytes(region_image.astype(np.int64)))
    return {"version": w.version, "factory": factory, "vectors": n_vectors, "index_bytes": nbytes,
            "bytes_per_vector": nbytes / max(n_vectors, 1)}


def run_faiss(root: str, cfg: Any) -> dict[str, Any]:
    """Build and publish one snapshot per ``cfg.methods`` global method and per ``cfg.regional`` source."""
    out: dict[str, Any] = {}
    for method in cfg.methods:
        t0 = time.time()
        ids, X = load_method(root, method)
        if len(ids) == 0:
            log.warning("[faiss] no descriptors for method %s: skipped (is its stage enabled?)", method)
            continue
        d = _effective_dim(X)
        X = np.ascontiguousarray(X[:, :d])
        shards, factory, params = build_index(X, cfg.factory, cfg.memory_budget_gb, cfg.train_sample)
        out[f"global_{method}"] = {**_publish(root, f"global_{method}", "global", method, shards, factory, params,
                                              ids, d, len(ids)), "seconds": time.time() - t0}
    for source in cfg.regional:
        t0 = time.time()
        rid, X = load_regional(root, source)
        if len(rid) == 0:
            log.warning("[faiss] no regions of source %s: skipped", source)
            continue
        image_ids, region_image = np.unique(np.asarray(rid, dtype=str), return_inverse=True)
        shards, factory, params = build_index(X, cfg.factory, cfg.memory_budget_gb, cfg.train_sample)
        out[f"regional_{source}"] = {**_publish(root, f"regional_{source}", "regional", source, shards, factory,
                                                params, list(image_ids), X.shape[1], len(rid), region_image),
                                     "seconds": time.time() - t0}
    return out


@dataclass
class LoadedIndex:
    """A published snapshot opened for search."""

    snapshot: Snapshot
    searcher: fi.ShardedSearcher
    image_ids: np.ndarray
    region_image: np.ndarray | None
    dim: int

    @property
    def kind(self) -> str:
        return self.snapshot.manifest.get("parameters", {}).get("kind", "global")

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k images (scores, image ids) per query row; regional indexes max-pool regions per image."""
        Q = np.ascontiguousarray(np.atleast_2d(Q)[:, : self.dim], dtype=np.float32)
        if self.region_image is not None:
            D, I = fi.regional_search(self.searcher, Q, k, self.region_image)
        else:
            D, I = self.searcher.search(Q, min(k, self.searcher.ntotal))
        return D, [[str(self.image_ids[i]) for i in row if i >= 0] for row in I]


def open_index(root: str, name: str) -> LoadedIndex:
    """Open the ``LATEST`` complete snapshot of index ``name`` (e.g. ``global_rmac``, ``regional_fs_egm``)."""
    snap = open_latest(root, name)
    files = snap.files
    shard_files = ["index.npy"] if "index.npy" in files else sorted(f for f in files if f.startswith("shard-"))
    indexes = [fi.deserialize(_read_npy(snap, f)) for f in shard_files]
    params = snap.manifest.get("parameters", {})
    for idx in indexes:
        fi.set_search_params(idx, **params.get("search", {}))
    region_image = _read_npy(snap, "region_image.npy") if "region_image.npy" in files else None
    return LoadedIndex(snap, fi.ShardedSearcher(indexes), _read_npy(snap, "image_ids.npy"), region_image,
                       int(params.get("dim", indexes[0].d)))
