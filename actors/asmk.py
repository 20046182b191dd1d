"""Ray tasks building ASMK inverted files per image shard and merging them (pipeline.asmk does the maths).

A shard is a dict of arrays: ``descriptors`` (n, D) PCA-reduced local descriptors, ``image_ids`` (n,),
optionally ``words`` (n, m) precomputed visual words, and for regional variants ``xy`` (n, 2) pixel
positions, ``boxes`` (R, 4) pixel boxes and ``box_image`` (R,). Tasks return ``InvertedFile.to_arrays()``
dicts (plain numpy arrays), which the lead saves as ``.npy`` files. Shards must hold disjoint images; the
merge keeps shard order, so merging equals one build over the concatenated shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray

from pipeline.asmk import ASMKConfig, InvertedFile, aggregate_queries, build_index, merge_inverted_files
from pipeline.codebook import assign
from storage.arrays import npy_bytes, npy_from_bytes


def build_shard_arrays(shard: dict[str, np.ndarray], centroids: np.ndarray, config: dict[str, Any]
                       ) -> dict[str, np.ndarray]:
    """Quantise (unless ``words`` is given), aggregate and index one shard; returns the index arrays."""
    cfg = ASMKConfig(**config)
    des = np.asarray(shard["descriptors"], dtype=np.float32)
    words = shard.get("words")
    if words is None:
        words = assign(des, centroids, multiple=cfg.multiple)[0]
    index = build_index(des, words, shard["image_ids"], centroids, cfg, shard.get("xy"), shard.get("boxes"),
                        shard.get("box_image"))
    return index.to_arrays()


def merge_arrays(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge shard index arrays (in the given order) into one index's arrays."""
    return merge_inverted_files([InvertedFile.from_arrays(p) for p in parts]).to_arrays()


build_shard_task = ray.remote(build_shard_arrays)
merge_task = ray.remote(merge_arrays)


def build_sharded_index(shards: Sequence[dict[str, np.ndarray] | ray.ObjectRef], centroids: np.ndarray,
                        config: ASMKConfig, fan_in: int = 8, num_cpus: float = 1.0) -> InvertedFile:
    """Build one index per shard as Ray tasks, merge them in a tree of ``fan_in``-way merges, and return it.

    Needs an initialised Ray (``actors.common.init_ray`` or ``ray.init``).
    """
    if not shards:
        raise ValueError("no shards")
    cref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
    cfg = config.to_dict()
    refs = [build_shard_task.options(num_cpus=num_cpus).remote(s, cref, cfg) for s in shards]
    while len(refs) > 1:
        refs = [merge_task.options(num_cpus=num_cpus).remote(*refs[i:i + fan_in])
                for i in range(0, len(refs), max(2, fan_in))]
    return InvertedFile.from_arrays(ray.get(refs[0]))


# ---------------------------------------------------------------------------------------------- index stage
# Kernel names users select in the config (``asmk.kernels``) -> what to build.
KERNEL_CONFIGS: dict[str, dict[str, str]] = {
    "asmk": {"kernel": "asmk"},
    "asmk_star": {"kernel": "asmk_star"},
    "vlad": {"kernel": "vlad"},
    "d2r_asmk": {"kernel": "asmk", "regional": "d2r"},
    "d2r_asmk_star": {"kernel": "asmk_star", "regional": "d2r"},
    "d2r_vlad": {"kernel": "vlad", "regional": "d2r"},
    "r_vlad": {"kernel": "vlad", "regional": "rvlad"},
    "naive_r_asmk": {"kernel": "asmk", "regional": "naive_rasmk"},
    "r_asmk": {"kernel": "asmk", "regional": "rasmk"},
    "r_asmk_star": {"kernel": "asmk_star", "regional": "rasmk"},
}


def kernel_config(name: str, multiple: int = 1) -> ASMKConfig:
    """The :class:`ASMKConfig` of a kernel name (``asmk_star``, ``r_asmk_star``, ``d2r_asmk_star``, ...)."""
    if name not in KERNEL_CONFIGS:
        raise ValueError(f"unknown ASMK kernel {name!r}; known: {sorted(KERNEL_CONFIGS)}")
    return ASMKConfig(**KERNEL_CONFIGS[name], multiple=int(multiple))


def _read_shard_locals(locals_uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image id per descriptor, positions (n, 2), descriptors (n, D) float32) of one ``locals`` file."""
    from storage.schemas import descriptors_to_numpy
    from storage.tables import read_parquet

    t = read_parquet(locals_uri, columns=["image_id", "x", "y", "descriptor"])
    xy = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], axis=1).astype(np.float32)
    return (np.asarray(t.column("image_id").to_pylist(), dtype=object), xy,
            np.asarray(descriptors_to_numpy(t.column("descriptor")), np.float32))


def _read_shard_boxes(regions_uri: str | None, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(image id per box, pixel boxes (R, 4)) of one ``regions`` file, ``source`` rows only."""
    import pyarrow.compute as pc

    from storage.tables import read_parquet

    if regions_uri is None:
        return np.zeros(0, dtype=object), np.zeros((0, 4), np.float32)
    t = read_parquet(regions_uri, columns=["image_id", "source", "x0", "y0", "x1", "y1"])
    t = t.filter(pc.equal(t.column("source"), source))
    boxes = np.stack([t.column(c).to_numpy() for c in ("x0", "y0", "x1", "y1")], axis=1) if t.num_rows else \
        np.zeros((0, 4))
    return np.asarray(t.column("image_id").to_pylist(), dtype=object), boxes.astype(np.float32)


@ray.remote(num_cpus=0.5)
def _shard_indexes_task(locals_uri: str, regions_uri: str | None, source: str, id_map: dict[str, int],
                        centroids: np.ndarray, configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Read one shard's locals (and region boxes), quantise once, build every requested kernel's index arrays."""
    ids, xy, des = _read_shard_locals(locals_uri)
    keep = np.array([i in id_map for i in ids], dtype=bool)
    ids, xy, des = ids[keep], xy[keep], des[keep]
    image_ids = np.array([id_map[i] for i in ids], dtype=np.int64)
    multiple = max(ASMKConfig(**c).multiple for c in configs.values()) if configs else 1
    words_all = assign(des, centroids, multiple=multiple)[0] if len(des) else np.zeros((0, multiple), np.int64)
    box_ids, boxes = _read_shard_boxes(regions_uri, source)
    bkeep = np.array([i in id_map for i in box_ids], dtype=bool)
    box_image = np.array([id_map[i] for i in box_ids[bkeep]], dtype=np.int64)
    out = {}
    for name, c in configs.items():
        cfg = ASMKConfig(**c)
        regional = cfg.regional != "none"
        index = build_index(des, words_all[:, :cfg.multiple], image_ids, centroids, cfg, xy if regional else None,
                            boxes[bkeep] if regional else None, box_image if regional else None)
        out[name] = index.to_arrays()
    return out


def _sample_locals(files: list[str], n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` local descriptors sampled uniformly across the shards' ``locals`` files."""
    rng = np.random.default_rng(seed)
    per_file = max(1, n // max(1, len(files)))
    parts = []
    for uri in files:
        des = _read_shard_locals(uri)[2]
        if len(des) > per_file:
            des = des[np.sort(rng.choice(len(des), per_file, replace=False))]
        parts.append(des)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def train_or_reuse_codebook(root: str, files: list[str], k: int, sample: int, reuse: bool,
                            seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """The run's visual-word codebook ``<root>/artefacts/asmk/codebook.npy``: reused when ``reuse`` and it was
    trained with the same size and sample on descriptors of the same local PCA, else k-means on a sample
    across shards (the nightly re-index keeps its visual words; ``reindex.reuse_codebook``)."""
    import hashlib
    import time

    from storage.arrays import load_json, load_npy, save_json, save_npy
    from storage.uri import exists, join, read_bytes

    cb_uri, info_uri = join(root, "artefacts", "asmk", "codebook.npy"), join(root, "artefacts", "asmk", "info.json")
    pca_uri = join(root, "artefacts", "local_pca", "pca.npz")
    pca_digest = hashlib.sha256(read_bytes(pca_uri)).hexdigest()[:16] if exists(pca_uri) else None
    if reuse and exists(cb_uri) and exists(info_uri):
        info = load_json(info_uri)
        if (info.get("requested_k"), info.get("requested_sample"), info.get("local_pca")) == (k, sample, pca_digest):
            return np.asarray(load_npy(cb_uri, mmap=False), np.float32), {**info, "reused": True}
    t0 = time.time()
    X = _sample_locals(files, sample, seed)
    if len(X) < 2:
        raise RuntimeError("asmk: no local descriptors (set extract.local_features > 0 and run extract)")
    k_eff = int(min(k, max(2, len(X) // 39)))  # FAISS k-means wants >= 39 points per centroid
    from pipeline.codebook import train_codebook

    C = train_codebook(X, k_eff, seed=seed)
    info = {"requested_k": int(k), "requested_sample": int(sample), "k": int(len(C)), "dim": int(C.shape[1]), "sample": int(len(X)),
            "local_pca": pca_digest, "seconds": time.time() - t0, "reused": False}
    if k_eff < k:
        info["note"] = f"codebook reduced to {k_eff} words: only {len(X)} sampled descriptors"
    save_npy(cb_uri, C)
    save_json(info_uri, info)
    return C, info


def run_asmk(root: str, cfg: Any, reuse_codebook: bool = True) -> dict[str, Any]:
    """Index stage: codebook, then one inverted file per ``cfg.kernels`` entry built per extract shard by Ray
    tasks and merged in shard order; each published as snapshot ``asmk_<kernel>`` (flat ``.npy`` arrays,
    ``image_ids.npy``, the codebook and bytes per image in the manifest)."""
    import logging
    import time

    from storage.snapshot import SnapshotWriter
    from storage.tables import StageManifest

    log = logging.getLogger("indexer")
    t0 = time.time()
    markers = sorted(StageManifest(root, "extract").committed().items())
    shards = [(label, m["files"]["locals"]) for label, m in markers if m.get("files", {}).get("locals")]
    if not shards:
        raise RuntimeError("asmk: the extract stage wrote no locals tables (extract.local_features must be > 0)")
    C, cb_info = train_or_reuse_codebook(root, [u for _, u in shards], int(cfg.codebook_size),
                                         int(cfg.codebook_sample), reuse_codebook)
    log.info("[asmk] codebook: %d words x %d (%s)", len(C), C.shape[1],
             "reused" if cb_info.get("reused") else f"trained in {cb_info['seconds']:.1f} s")
    source = cfg.region_source
    region_stage = "object_saliency" if source.startswith("os_") else "extract"
    region_files = {label: m["files"].get("regions") for label, m in StageManifest(root, region_stage)
                    .committed().items()}
    configs = {name: kernel_config(name, cfg.multiple_assignment).to_dict() for name in cfg.kernels}
    # stable integer ids in shard order: image_ids.npy maps them back
    all_ids: list[str] = []
    id_maps = []
    for _, uri in shards:
        from storage.tables import read_parquet

        sid = sorted(set(read_parquet(uri, columns=["image_id"]).column("image_id").to_pylist()))
        id_maps.append({i: len(all_ids) + j for j, i in enumerate(sid)})
        all_ids += sid
    cref = ray.put(np.ascontiguousarray(C))
    refs = [_shard_indexes_task.remote(uri, region_files.get(label), source, id_maps[s], cref, configs)
            for s, (label, uri) in enumerate(shards)]
    pending, n_done = list(refs), 0
    while pending:
        _, pending = ray.wait(pending, num_returns=1)
        n_done += 1
        if n_done == len(refs) or n_done % max(1, len(refs) // 10) == 0:
            log.info("[asmk] %d/%d shards aggregated (%.1f s)", n_done, len(refs), time.time() - t0)
    built = ray.get(refs)  # shard order, so merging equals one build over the whole corpus
    out: dict[str, Any] = {"codebook": cb_info, "images": len(all_ids)}
    for name in cfg.kernels:
        inv = merge_inverted_files([InvertedFile.from_arrays(b[name]) for b in built])
        arrays = inv.to_arrays()
        nbytes = inv.nbytes()
        with SnapshotWriter(root, f"asmk_{name}", method=name, factory="inverted-file",
                            counts={"images": len(all_ids), "items": inv.n_items, "postings": inv.nnz,
                                    "words": inv.n_words},
                            parameters={"kind": "asmk", "config": configs[name], "region_source": source,
                                        "query_multiple": int(cfg.query_multiple_assignment),
                                        "codebook": {k: cb_info[k] for k in ("k", "dim", "sample")},
                                        "index_bytes": nbytes, "bytes_per_image": nbytes / max(1, len(all_ids))}
                            ) as w:
            for key, a in arrays.items():
                w.write_bytes(f"{key}.npy", npy_bytes(a))
            w.write_bytes("codebook.npy", npy_bytes(C))
            w.write_bytes("image_ids.npy", npy_bytes(np.asarray(all_ids, dtype=str)))
        out[f"asmk_{name}"] = {"version": w.version, "items": inv.n_items, "postings": inv.nnz,
                               "index_bytes": nbytes, "bytes_per_image": nbytes / max(1, len(all_ids))}
        log.info("[asmk] %s: %d items, %d postings, %.1f KB/image", name, inv.n_items, inv.nnz,
                 nbytes / max(1, len(all_ids)) / 1024)
    out["seconds"] = time.time() - t0
    return out


@dataclass
class LoadedASMK:
    """A published ASMK snapshot opened for search: inverted file, codebook and image ids."""

    index: InvertedFile
    codebook: np.ndarray
    image_ids: np.ndarray
    multiple: int = 1
    query_multiple: int = 1

    def search(self, local_desc: np.ndarray, top_k: int = 100) -> tuple[np.ndarray, list[str]]:
        """Scores and image ids of the top ``top_k`` database images for one query's local descriptors, each
        descriptor aggregated into its ``query_multiple`` nearest words."""
        des = np.asarray(local_desc, np.float32)
        if len(des) == 0:
            return np.zeros(0, np.float32), []
        words = assign(des, self.codebook, multiple=min(self.query_multiple, len(self.codebook)))[0]
        agg = aggregate_queries(des, words, np.zeros(len(des), np.int64), self.codebook, self.index)
        if agg.n_items == 0:
            return np.zeros(0, np.float32), []
        ids, scores = self.index.search(agg, topk=top_k, pooling="max")
        return scores[0].astype(np.float32), [str(self.image_ids[i]) for i in ids[0]]


def open_asmk(root: str, kernel: str) -> LoadedASMK:
    """Open the ``LATEST`` snapshot ``asmk_<kernel>`` (``.npy`` files read without pickle)."""
    from storage.snapshot import open_latest

    snap = open_latest(root, f"asmk_{kernel}")

    def load(rel: str) -> np.ndarray:
        return npy_from_bytes(snap.read_bytes(rel))

    arrays = {f[:-4]: load(f) for f in snap.files if f.endswith(".npy") and f not in ("codebook.npy",
                                                                                      "image_ids.npy")}
    params = snap.manifest.get("parameters", {})
    return LoadedASMK(InvertedFile.from_arrays(arrays), load("codebook.npy").astype(np.float32),
                      load("image_ids.npy"), int(params.get("config", {}).get("multiple", 1)),
                      int(params.get("query_multiple", 1)))
