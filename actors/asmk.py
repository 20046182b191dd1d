"""Ray tasks building ASMK inverted files per image shard and merging them (pipeline.asmk does the maths).

A shard is a dict of arrays: ``descriptors`` (n, D) PCA-reduced local descriptors, ``image_ids`` (n,),
optionally ``words`` (n, m) precomputed visual words, and for regional variants ``xy`` (n, 2) pixel
positions, ``boxes`` (R, 4) pixel boxes and ``box_image`` (R,). Tasks return ``InvertedFile.to_arrays()``
dicts (plain numpy arrays), which the lead saves as ``.npy`` files. Shards must hold disjoint images; the
merge keeps shard order, so merging equals one build over the concatenated shards.

The ``asmk`` stage is out of core: each shard task stores its inverted files as parts (``.npy`` per array under
``RunLayout.asmk_parts_dir``) and returns only their sizes; the driver then reads the parts lazily
(``storage.arrays.NpyFile``: row ranges on demand, no memory map) and writes the merged arrays straight into the
snapshot a range of visual words at a time (``pipeline.inverted_file.merged_postings``), so neither the shards'
nor the merged index's arrays are ever held whole in memory (peak: one range of postings). The result is byte
for byte what ``merge_inverted_files`` of all shards would publish.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from typing import Any, Sequence

import numpy as np
import ray

from pipeline.asmk import (ASMKConfig, AsmkIndexConfig, InvertedFile, build_index, kernel_config,
                           merge_inverted_files)
from pipeline.inverted_file import merged_postings, merged_word_ptr
from pipeline.codebook import assign, train_codebook
from storage.arrays import NpyFile, load_json, load_npy, npy_bytes, save_json, save_npy
from storage.layout import RunLayout, SnapshotFiles
from storage.readers import count_rows, read_locals_file, read_region_boxes_file, region_stage
from storage.snapshot import SnapshotWriter
from storage.tables import StageManifest, read_parquet
from storage.uri import exists, get_fs, is_local, read_bytes, remove

log = logging.getLogger("indexer")


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


def shard_index_arrays(locals_uri: str, regions_uri: str | None, source: str, id_map: dict[str, int],
                       centroids: np.ndarray, configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Read one shard's locals (and region boxes), quantise once, build every requested kernel's index arrays."""
    ids, xy, des = read_locals_file(locals_uri)
    keep = np.array([i in id_map for i in ids], dtype=bool)
    ids, xy, des = ids[keep], xy[keep], des[keep]
    image_ids = np.array([id_map[i] for i in ids], dtype=np.int64)
    multiple = max(ASMKConfig(**c).multiple for c in configs.values()) if configs else 1
    words_all = assign(des, centroids, multiple=multiple)[0] if len(des) else np.zeros((0, multiple), np.int64)
    box_ids, boxes = read_region_boxes_file(regions_uri, source)
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


@ray.remote(num_cpus=0.5)
def _shard_parts_task(root: str, label: str, locals_uri: str, regions_uri: str | None, source: str,
                      id_map: dict[str, int], centroids: np.ndarray, configs: dict[str, dict[str, Any]]
                      ) -> dict[str, dict[str, Any]]:
    """Build one shard's inverted files and store them as parts (one ``.npy`` per array) for the streaming merge;
    returns only their sizes, so the driver never holds the shards' arrays."""
    layout = RunLayout(root)
    out = {}
    for name, arrays in shard_index_arrays(locals_uri, regions_uri, source, id_map, centroids, configs).items():
        for key, a in arrays.items():
            save_npy(layout.asmk_part(name, label, key), a)
        out[name] = {"items": int(len(arrays["item_image"])), "postings": int(arrays["word_ptr"][-1]),
                     "keys": list(arrays)}
    return out


def sample_locals(files: list[str], n: int, seed: int = 0) -> np.ndarray:
    """``n`` local descriptors drawn uniformly without replacement from all rows of the ``locals`` files (in
    their order), in the order drawn, reading one file at a time; all of them when there are at most ``n``."""
    counts = np.array([count_rows(u) for u in files], np.int64)
    total = int(counts.sum())
    take = np.random.default_rng(seed).choice(total, n, replace=False) if total > n else np.arange(total)
    starts = np.r_[0, np.cumsum(counts)]
    out: np.ndarray | None = None
    for f, uri in enumerate(files):
        slots = np.flatnonzero((take >= starts[f]) & (take < starts[f + 1]))
        if len(slots) == 0:
            continue
        des = read_locals_file(uri)[2]
        if out is None:
            out = np.zeros((len(take), des.shape[1]), np.float32)
        out[slots] = des[take[slots] - starts[f]]
    return out if out is not None else np.zeros((0, 0), np.float32)


def train_or_reuse_codebook(root: str, files: list[str], k: int, sample: int, reuse: bool,
                            seed: int = 0, locals_name: str = "cnn") -> tuple[np.ndarray, dict[str, Any]]:
    """The run's visual-word codebook: reused when ``reuse`` and it was trained with the same size and sample on
    descriptors of the same local PCA, else k-means on a uniform sample of all locals (the nightly re-index
    keeps its visual words; ``reindex.reuse_codebook``)."""
    layout = RunLayout(root)
    cb_uri, info_uri, pca_uri = layout.artefact("asmk_codebook"), layout.artefact("asmk_info"), \
        layout.artefact("local_pca")
    pca_digest = hashlib.sha256(read_bytes(pca_uri)).hexdigest()[:16] if exists(pca_uri) else None
    if locals_name != "cnn":  # learned descriptors: no PCA, the extractor names the space
        pca_digest = locals_name
    if reuse and exists(cb_uri) and exists(info_uri):
        info = load_json(info_uri)
        if (info.get("requested_k"), info.get("requested_sample"), info.get("local_pca")) == (k, sample, pca_digest):
            return np.asarray(load_npy(cb_uri, mmap=False), np.float32), {**info, "reused": True}
    t0 = time.time()
    X = sample_locals(files, sample, seed)
    if len(X) < 2:
        raise RuntimeError("asmk: no local descriptors (set extract.local_features > 0 and run extract)")
    k_eff = int(min(k, max(2, len(X) // 39)))  # FAISS k-means wants >= 39 points per centroid
    C = train_codebook(X, k_eff, seed=seed)
    info = {"requested_k": int(k), "requested_sample": int(sample), "k": int(len(C)), "dim": int(C.shape[1]),
            "sample": int(len(X)), "local_pca": pca_digest, "seconds": time.time() - t0, "reused": False}
    if k_eff < k:
        info["note"] = f"codebook reduced to {k_eff} words: only {len(X)} sampled descriptors"
    save_npy(cb_uri, C)
    save_json(info_uri, info)
    return C, info


def _shard_id_maps(shards: list[tuple[str, str]]) -> tuple[list[str], list[dict[str, int]]]:
    """Stable integer image ids in shard order (``image_ids.npy`` maps them back)."""
    all_ids: list[str] = []
    id_maps = []
    for _, uri in shards:
        sid = sorted(set(read_parquet(uri, columns=["image_id"]).column("image_id").to_pylist()))
        id_maps.append({i: len(all_ids) + j for j, i in enumerate(sid)})
        all_ids += sid
    return all_ids, id_maps


def _gather_in_order(refs: list[Any], t0: float) -> list[Any]:
    pending, n_done = list(refs), 0
    while pending:
        _, pending = ray.wait(pending, num_returns=1)
        n_done += 1
        if n_done == len(refs) or n_done % max(1, len(refs) // 10) == 0:
            log.info("[asmk] %d/%d shards aggregated (%.1f s)", n_done, len(refs), time.time() - t0)
    return ray.get(refs)  # shard order, so merging equals one build over the whole corpus


def _open_parts(root: str, name: str, labels: list[str], keys: list[str], scratch: str) -> list[InvertedFile]:
    """The stored parts of kernel ``name`` in shard order, read lazily from their files (copied to ``scratch``
    first when the run is not on a local file system): nothing is held in memory or mapped."""
    layout, parts = RunLayout(root), []
    for label in labels:
        arrays = {}
        for key in keys:
            uri = layout.asmk_part(name, label, key)
            if is_local(uri):
                path = get_fs(uri)[1]
            else:
                path = os.path.join(scratch, f"{name}-{label}-{key}.npy")
                with open(path, "wb") as f:
                    f.write(read_bytes(uri))
            arrays[key] = NpyFile(path)
        parts.append(InvertedFile.from_arrays(arrays))
    return parts


def _stream_npy(w: SnapshotWriter, rel: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Any) -> None:
    """Write an ``.npy`` of ``shape`` from consecutive ``chunks`` (the bytes ``np.save`` would write)."""
    with w.open(rel) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(int(x) for x in shape)})
        for c in chunks:
            f.write(np.ascontiguousarray(c, dtype=dtype).tobytes())


def _write_merged(w: SnapshotWriter, parts: list[InvertedFile]) -> tuple[int, int, int, int]:
    """The merge of ``parts`` (``merge_inverted_files``) written array by array into the snapshot, a range of
    words at a time. Returns (items, postings, words, bytes of the arrays)."""
    first = parts[0]
    ptr = merged_word_ptr(parts)
    n_items, nnz = sum(p.n_items for p in parts), int(ptr[-1])
    id_dtype = np.int32 if n_items < 2**31 else np.int64
    vec_dtype = np.result_type(*[p.vecs.dtype for p in parts])
    vshape = (nnz,) + first.vecs.shape[1:]
    w.write_bytes(SnapshotFiles.array("word_ptr"), npy_bytes(ptr))
    _stream_npy(w, SnapshotFiles.array("item_ids"), id_dtype, (nnz,), (b[0] for b in merged_postings(parts)))
    _stream_npy(w, SnapshotFiles.array("vecs"), vec_dtype, vshape, (b[1] for b in merged_postings(parts)))
    _stream_npy(w, SnapshotFiles.array("item_self"), np.float64, (n_items,), (p.item_self for p in parts))
    _stream_npy(w, SnapshotFiles.array("item_image"), np.int64, (n_items,), (p.item_image for p in parts))
    for key, a in first.to_arrays().items():
        if key not in ("word_ptr", "item_ids", "vecs", "item_self", "item_image"):
            w.write_bytes(SnapshotFiles.array(key), npy_bytes(a))
    nbytes = ptr.nbytes + nnz * np.dtype(id_dtype).itemsize + int(np.prod(vshape)) * np.dtype(vec_dtype).itemsize \
        + n_items * 16
    return n_items, nnz, first.n_words, int(nbytes)


def _publish(root: str, name: str, parts: list[InvertedFile], C: np.ndarray, all_ids: list[str],
             config: dict[str, Any], cfg: AsmkIndexConfig, cb_info: dict[str, Any]) -> dict[str, Any]:
    with SnapshotWriter(root, f"asmk_{name}", method=name, factory="inverted-file",
                        parameters={"kind": "asmk", "config": config, "region_source": cfg.region_source,
                                    "query_multiple": int(cfg.query_multiple_assignment),
                                    "codebook": {k: cb_info[k] for k in ("k", "dim", "sample")}}) as w:
        n_items, nnz, n_words, nbytes = _write_merged(w, parts)
        w.counts.update(images=len(all_ids), items=n_items, postings=nnz, words=n_words)
        w.parameters.update(index_bytes=nbytes, bytes_per_image=nbytes / max(1, len(all_ids)))
        w.write_bytes(SnapshotFiles.CODEBOOK, npy_bytes(C))
        w.write_bytes(SnapshotFiles.IMAGE_IDS, npy_bytes(np.asarray(all_ids, dtype=str)))
    log.info("[asmk] %s: %d items, %d postings, %.1f KB/image", name, n_items, nnz,
             nbytes / max(1, len(all_ids)) / 1024)
    return {"version": w.version, "items": n_items, "postings": nnz, "index_bytes": nbytes,
            "bytes_per_image": nbytes / max(1, len(all_ids))}


def run_asmk_stage(root: str, cfg: AsmkIndexConfig, reuse_codebook: bool = True) -> dict[str, Any]:
    """Index stage: codebook, then one inverted file per ``cfg.kernels`` entry built per extract shard by Ray
    tasks and merged in shard order; each published as snapshot ``asmk_<kernel>`` (flat ``.npy`` arrays,
    ``image_ids.npy``, the codebook and bytes per image in the manifest)."""
    t0 = time.time()
    markers = sorted(StageManifest(root, "extract").committed().items())
    table = "locals" if cfg.locals == "cnn" else "keypoints"  # both have image_id, x, y, descriptor
    shards = [(label, m["files"][table]) for label, m in markers if m.get("files", {}).get(table)]
    if not shards:
        raise RuntimeError(f"asmk: the extract stage wrote no {table} tables (asmk.locals: {cfg.locals}; "
                           + ("extract.local_features must be > 0)" if table == "locals" else
                              f"extract.keypoints.name must be {cfg.locals})"))
    C, cb_info = train_or_reuse_codebook(root, [u for _, u in shards], cfg.codebook_size, cfg.codebook_sample,
                                         reuse_codebook, locals_name=cfg.locals)
    log.info("[asmk] codebook: %d words x %d (%s)", len(C), C.shape[1],
             "reused" if cb_info.get("reused") else f"trained in {cb_info['seconds']:.1f} s")
    region_files = {label: m["files"].get("regions")
                    for label, m in StageManifest(root, region_stage(cfg.region_source)).committed().items()}
    configs = {name: kernel_config(name, cfg.multiple_assignment).to_dict() for name in cfg.kernels}
    all_ids, id_maps = _shard_id_maps(shards)
    cref = ray.put(np.ascontiguousarray(C))
    layout = RunLayout(root)
    remove(layout.asmk_parts_dir, recursive=True)  # parts of an earlier, interrupted run
    sizes = _gather_in_order([_shard_parts_task.remote(root, label, uri, region_files.get(label), cfg.region_source,
                                                       id_maps[s], cref, configs)
                              for s, (label, uri) in enumerate(shards)], t0)
    out: dict[str, Any] = {"codebook": cb_info, "images": len(all_ids)}
    with tempfile.TemporaryDirectory(prefix="asmk-parts-") as scratch:
        for name in cfg.kernels:
            parts = _open_parts(root, name, [label for label, _ in shards], sizes[0][name]["keys"], scratch)
            out[f"asmk_{name}"] = _publish(root, name, parts, C, all_ids, configs[name], cfg, cb_info)
            del parts
    remove(layout.asmk_parts_dir, recursive=True)
    out["seconds"] = time.time() - t0
    return out


__all__ = ["build_shard_arrays", "merge_arrays", "build_sharded_index", "run_asmk_stage", "train_or_reuse_codebook",
           "sample_locals"]
