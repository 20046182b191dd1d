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

import faiss
import numpy as np
import ray

from actors.common import Progress
from actors.whiten import load_whitenings
from pipeline import faiss_index as fi
from pipeline.faiss_index import FaissConfig
from pipeline.itq import build_binary_index, default_nlist, learn_itq
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


def publish_itq(root: str, regional_name: str, regional: dict[str, Any], X: np.ndarray, cfg: FaissConfig,
                exact: bool) -> dict[str, Any]:
    """Learn ITQ codes of a regional index's rows (seed 000 §4.2) and publish ``itq_<regional_name>``: the ITQ
    arrays and a FAISS binary index over the codes (ids = region rows). The exact rows for the re-rank come from
    the regional snapshot when it is exact (``Flat``); otherwise they are stored here (``vectors.npy``). The
    manifest names the regional version the rows belong to (the service ignores a mismatched pair)."""
    t0 = time.time()
    n, d = X.shape
    bits = min(cfg.itq_bits, d - d % 8, n - n % 8)  # PCA gives at most min(d, n) axes (pipeline.itq)
    if bits != cfg.itq_bits:
        log.warning("[faiss] %s: %d-bit ITQ needs >= %d dimensions and rows (have %d x %d): using %d bits",
                    regional_name, cfg.itq_bits, cfg.itq_bits, n, d, bits)
    if bits < 8:
        log.warning("[faiss] %s: too few rows for ITQ: no prefilter published", regional_name)
        return {"bits": 0, "vectors": n}
    itq = learn_itq(X, bits=bits, max_train=cfg.itq_train)
    nlist = default_nlist(n)
    index = build_binary_index(itq.encode(X), nlist=nlist)
    data = faiss.serialize_index_binary(index)
    name = SnapshotFiles.itq_name(regional_name)
    params = {"kind": "itq", "bits": bits, "prefilter": cfg.itq_prefilter, "nlist": nlist,
              "nprobe": int(getattr(index, "nprobe", 0)), "regional_version": regional["version"],
              "dim": d, "own_vectors": not exact, "final_loss": float(itq.loss[-1]) if len(itq.loss) else None}
    with SnapshotWriter(root, name, method=regional_name, factory=f"ITQ{bits}," + ("BIVF" if nlist else "BFlat"),
                        counts={"vectors": n}, parameters=params) as w:
        w.write_bytes(SnapshotFiles.ITQ_MEAN, npy_bytes(itq.mean))
        w.write_bytes(SnapshotFiles.ITQ_PROJECTION, npy_bytes(itq.projection))
        w.write_bytes(SnapshotFiles.ITQ_ROTATION, npy_bytes(itq.rotation))
        w.write_bytes(SnapshotFiles.BINARY_INDEX, npy_bytes(data))
        if not exact:
            w.write_bytes(SnapshotFiles.VECTORS, npy_bytes(np.ascontiguousarray(X, np.float32)))
    return {"version": w.version, "bits": bits, "vectors": n, "index_bytes": int(data.nbytes),
            "seconds": time.time() - t0}


def run_faiss_stage(root: str, cfg: FaissConfig) -> dict[str, Any]:
    """Build and publish one snapshot per ``cfg.methods`` global method and per ``cfg.regional`` source."""
    out: dict[str, Any] = {}
    progress = Progress("faiss", len(cfg.methods) + len(cfg.regional), unit="indexes", every=0.0)
    for method in cfg.methods:
        t0 = time.time()
        ids, X = read_globals(root, method, trim=True)  # trailing zero padding dropped file by file
        if len(ids) == 0:
            log.warning("[faiss] no descriptors for method %s: skipped (is its stage enabled?)", method)
            progress.update(1)
            continue
        d = _effective_dim(X)
        X = np.ascontiguousarray(X[:, :d])
        shards, factory, params = build_index(X, cfg)
        out[f"global_{method}"] = {**_publish(root, f"global_{method}", "global", method, shards, factory, params,
                                              ids, d, len(ids)), "seconds": time.time() - t0}
        log.info("[faiss] global_%s: %s over %s vectors x %d in %.1f s", method, factory, f"{len(ids):,}", d,
                 time.time() - t0)
        progress.update(1)
    for source in cfg.regional:
        t0 = time.time()
        rid, X = load_regional(root, source)
        if len(rid) == 0:
            log.warning("[faiss] no regions of source %s: skipped", source)
            progress.update(1)
            continue
        image_ids, region_image = np.unique(np.asarray(rid, dtype=str), return_inverse=True)
        shards, factory, params = build_index(X, cfg)
        name = f"regional_{source}"
        out[name] = {**_publish(root, name, "regional", source, shards, factory, params, list(image_ids),
                                X.shape[1], len(rid), region_image), "seconds": time.time() - t0}
        if cfg.itq_bits:
            exact = factory.endswith("Flat") and "IVF" not in factory
            itq = publish_itq(root, name, out[name], X, cfg, exact)
            if itq.get("bits"):
                out[SnapshotFiles.itq_name(name)] = itq
        log.info("[faiss] %s: %s over %s regions x %d in %.1f s", name, factory, f"{len(rid):,}", X.shape[1],
                 time.time() - t0)
        progress.update(1)
    return out


__all__ = ["run_faiss_stage", "build_index", "load_regional", "publish_itq"]
