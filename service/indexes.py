"""Published index snapshots opened for search: FAISS (global and regional) and ASMK inverted files.

A snapshot is resolved once through ``LATEST`` and then read from its immutable version folder, so a search
service keeps answering from one consistent version while a reindex publishes the next one.

Exact indexes (``IDMap2,Flat``) are scored with a blocked matrix product over their stored vectors, which
gives complete rankings, exact restriction to a subset of the database, and the same numbers as a numpy
reference; approximate ones (IVF, HNSW, PQ) go through FAISS and are filtered afterwards. A regional index with a
published ``itq_regional_<source>`` snapshot is searched through its Hamming prefilter and an exact re-rank of
the candidates (seed 000 §4.2, :class:`LoadedITQ`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import faiss
import numpy as np

from pipeline import faiss_index as fi
from pipeline.asmk import InvertedFile, aggregate_queries
from pipeline.codebook import assign
from pipeline.diffusion import DiffusionConfig
from pipeline.itq import ITQ, prefilter_regional_search
from pipeline.ranking import RegionSet, rank_scores, regional_image_scores
from service.errors import NotFound
from storage.arrays import load_npy, npy_from_bytes
from storage.layout import SnapshotFiles
from storage.snapshot import Snapshot, open_latest


log = logging.getLogger("indexer")


def _open(root: str, name: str) -> Snapshot:
    try:
        return open_latest(root, name)
    except FileNotFoundError:
        raise NotFound(f"index {name!r} is not published in {root} (did its stage run? see run.json)") from None


def _read_npy(snap: Snapshot, rel: str) -> np.ndarray:
    return npy_from_bytes(snap.read_bytes(rel))


@dataclass
class LoadedIndex:
    """A published FAISS snapshot (``global_<method>`` or ``regional_<source>``) opened for search."""

    snapshot: Snapshot | None
    searcher: fi.ShardedSearcher | None
    image_ids: np.ndarray                 # (n_images,) str: int id -> image id
    region_image: np.ndarray | None       # regional: (n_regions,) int image id of each row
    dim: int
    exact: bool = True                    # IDMap2,Flat: scored exactly over the stored vectors
    _vectors: np.ndarray | None = field(default=None, repr=False)
    _row_of: dict[str, int] | None = field(default=None, repr=False)
    itq: "LoadedITQ | None" = None        # regional: Hamming prefilter + exact re-rank (search_regional uses it)
    _image_rows: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # rows sorted by image

    @classmethod
    def from_vectors(cls, X: np.ndarray, image_ids: Sequence[str], region_image: np.ndarray | None = None
                     ) -> "LoadedIndex":
        """An in-memory exact index over ``X`` (rows of images, or of regions with ``region_image``); trailing
        all-zero columns (the tables' padding) are dropped, as the faiss stage does."""
        X = np.asarray(X, np.float32)
        nz = np.flatnonzero(np.any(X != 0, axis=0))
        dim = int(nz[-1] + 1) if len(nz) else X.shape[1]
        return cls(None, None, np.asarray(image_ids, dtype=str),
                   None if region_image is None else np.asarray(region_image, np.int64), dim, True,
                   np.ascontiguousarray(X[:, :dim]))

    @property
    def kind(self) -> str:
        if self.snapshot is None:
            return "global" if self.region_image is None else "regional"
        return self.snapshot.manifest.get("parameters", {}).get("kind", "global")

    @property
    def nbytes(self) -> int:
        """Bytes of the published snapshot (of the vectors for an in-memory index)."""
        return int(self.snapshot.manifest.get("bytes", 0)) if self.snapshot is not None else int(self.vectors().nbytes)

    def extended(self, X: np.ndarray, region_image: np.ndarray | None = None, prefix: str = "synthetic:"
                 ) -> "LoadedIndex":
        """An in-memory exact copy with extra database items appended (synthetic distractors): global rows
        ``X``, or regional rows ``X`` with their new image number ``region_image`` (0, 1, ...)."""
        X = np.ascontiguousarray(np.asarray(X, np.float32)[:, : self.dim])
        if X.shape[1] < self.dim:
            X = np.pad(X, ((0, 0), (0, self.dim - X.shape[1])))
        n_new = len(X) if region_image is None else (int(region_image.max()) + 1 if len(region_image) else 0)
        ids = np.concatenate([self.image_ids.astype(str), np.array([f"{prefix}{j}" for j in range(n_new)])])
        img = None if self.region_image is None else np.concatenate(
            [self.region_image, len(self.image_ids) + np.asarray(region_image, np.int64)])
        return LoadedIndex(self.snapshot, self.searcher, ids, img, self.dim, True,
                           np.concatenate([self.vectors(), X]))

    def vectors(self) -> np.ndarray:
        """Every stored vector by int id (exact indexes only): rows of images, or of regions."""
        if self._vectors is None:
            parts = [fi._reconstruct_all(s) for s in self.searcher.shards]
            n = sum(len(p[1]) for p in parts)
            X = np.zeros((n, self.dim), np.float32)
            for V, ids in parts:
                X[ids] = V[:, : self.dim]
            self._vectors = X
        return self._vectors

    def rows(self, image_ids: Sequence[str]) -> np.ndarray:
        """Int ids of image ids (-1 for unknown ones)."""
        if self._row_of is None:
            self._row_of = {str(i): r for r, i in enumerate(self.image_ids)}
        return np.array([self._row_of.get(str(i), -1) for i in image_ids], np.int64)

    def allowed_mask(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """Boolean mask over int image ids from a list of allowed image ids (None: all)."""
        if allowed is None:
            return None
        m = np.zeros(len(self.image_ids), bool)
        r = self.rows(list(allowed))
        m[r[r >= 0]] = True
        return m

    # ------------------------------------------------------------------ global
    def search(self, Q: np.ndarray, k: int | None = None, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (all when None) images per query row: (scores, int image ids), ties by id, -1 padded."""
        Q = np.ascontiguousarray(np.atleast_2d(Q)[:, : self.dim], dtype=np.float32)
        mask = self.allowed_mask(allowed)
        n_ok = len(self.image_ids) if mask is None else int(mask.sum())
        k = n_ok if k is None else min(int(k), n_ok)
        if self.exact:
            X = self.vectors()
            ids = np.arange(len(X)) if mask is None else np.flatnonzero(mask)
            return fi.brute_force_knn(X[ids], Q, k, ids=ids)
        kk = k
        while True:  # approximate index: ask for more until enough allowed results come back
            D, I = self.searcher.search(Q, min(kk, self.searcher.ntotal))
            if mask is not None:
                ok = (I >= 0) & mask[np.clip(I, 0, None)]
                D, I = np.where(ok, D, -np.inf), np.where(ok, I, -1)
            if kk >= self.searcher.ntotal or (I >= 0).sum(axis=1).min() >= k:
                return _compact(D, I, k)
            kk *= 4

    # ------------------------------------------------------------------ regional (D2R: max over items)
    def region_set(self, allowed: np.ndarray | None = None) -> RegionSet:
        """The region rows of the allowed images grouped by image (exact indexes)."""
        img = np.asarray(self.region_image, np.int64)
        X = self.vectors()
        mask = self.allowed_mask(allowed)
        keep = np.ones(len(img), bool) if mask is None else mask[img]
        return RegionSet.build(X[keep], img[keep])

    @property
    def can_rescore(self) -> bool:
        """Whether :meth:`rescore_images` has exact rows at hand: the ITQ prefilter's, or an exact index's. An
        approximate FAISS index (IVF, PQ, HNSW) is not asked to rebuild all its rows (gigabytes at R1M scale)."""
        return self.itq is not None or self.exact or self._vectors is not None

    def rescore_images(self, items: Sequence[np.ndarray], images: np.ndarray) -> np.ndarray:
        """Exact D2R scores (n_items, len(images)) of each query item against the given int image ids: the max
        over each image's region rows (the ITQ prefilter's exact rows when there is one). Re-scores a shortlist an
        approximate search reached; ``-inf`` for an image without rows."""
        items = [np.ascontiguousarray(np.atleast_2d(x)[:, : self.dim], dtype=np.float32) for x in items]
        images = np.asarray(images, np.int64)
        if self._image_rows is None:
            order = np.argsort(np.asarray(self.region_image, np.int64), kind="stable")
            bounds = np.searchsorted(np.asarray(self.region_image, np.int64)[order],
                                     np.arange(len(self.image_ids) + 1))
            self._image_rows = (order, bounds)
        order, bounds = self._image_rows
        counts = bounds[images + 1] - bounds[images]
        local = np.repeat(np.arange(len(images)), counts)  # shortlist position of each gathered row
        rows = order[bounds[images][local] + np.arange(len(local)) - np.repeat(np.cumsum(counts) - counts, counts)]
        X = self.itq.vectors if self.itq is not None else self.vectors()
        return regional_image_scores(items, RegionSet.build(np.asarray(X[rows], np.float32), local), len(images))

    def search_regional(self, items: Sequence[np.ndarray], k: int | None = None,
                        allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image scores = max over (query item, region of the image) inner products; (scores, int image ids).

        With an ITQ prefilter (:attr:`itq`) only the regions among each item's ``prefilter`` nearest codes
        count (images none of them reach are not ranked: -1 padded)."""
        items = [np.ascontiguousarray(np.atleast_2d(x)[:, : self.dim], dtype=np.float32) for x in items]
        n_img = len(self.image_ids)
        mask = self.allowed_mask(allowed)
        k = (n_img if mask is None else int(mask.sum())) if k is None else int(k)
        if self.itq is not None:
            return self.itq.search(items, k, self.region_image, mask)
        if self.exact:
            S = regional_image_scores(items, self.region_set(allowed), n_img)
            return rank_scores(S, k)
        out_s, out_i = [], []
        for x in items:  # approximate: top regions per item, max-pooled per image, max over items
            D, I = fi.regional_search(self.searcher, x, max(k, 1) * 4, self.region_image)
            best: dict[int, float] = {}
            for d_row, i_row in zip(D, I):
                for s, i in zip(d_row, i_row):
                    if i >= 0 and (mask is None or mask[i]) and s > best.get(int(i), -np.inf):
                        best[int(i)] = float(s)
            ids = np.array(sorted(best, key=lambda i: (-best[i], i))[:k], np.int64)
            out_i.append(np.pad(ids, (0, k - len(ids)), constant_values=-1))
            out_s.append(np.array([best[i] for i in ids] + [-np.inf] * (k - len(ids)), np.float32))
        return np.stack(out_s), np.stack(out_i)


def _compact(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop the -1 holes of filtered FAISS results, keeping order; (nq, k) padded with -inf / -1."""
    out_d = np.full((len(D), k), -np.inf, np.float32)
    out_i = np.full((len(D), k), -1, np.int64)
    for r in range(len(D)):
        ok = I[r] >= 0
        n = min(k, int(ok.sum()))
        out_d[r, :n], out_i[r, :n] = D[r][ok][:n], I[r][ok][:n]
    return out_d, out_i


def open_index(root: str, name: str, snap: Snapshot | None = None) -> LoadedIndex:
    """Open index ``name`` (e.g. ``global_rmac``, ``regional_fs_egm``): the given snapshot version (a pinned one),
    else the ``LATEST`` complete one."""
    snap = snap or _open(root, name)
    files = snap.files
    shard_files = [SnapshotFiles.INDEX] if SnapshotFiles.INDEX in files else sorted(
        f for f in files if f.startswith(SnapshotFiles.shard(0)[:6]))
    indexes = [fi.deserialize(_read_npy(snap, f)) for f in shard_files]
    params = snap.manifest.get("parameters", {})
    for idx in indexes:
        fi.set_search_params(idx, **params.get("search", {}))
    region_image = _read_npy(snap, SnapshotFiles.REGION_IMAGE) if SnapshotFiles.REGION_IMAGE in files else None
    factory = str(snap.manifest.get("factory", ""))
    return LoadedIndex(snap, fi.ShardedSearcher(indexes), _read_npy(snap, SnapshotFiles.IMAGE_IDS), region_image,
                       int(params.get("dim", indexes[0].d)), factory.endswith("Flat") and "IVF" not in factory)


@dataclass
class LoadedITQ:
    """A published ``itq_regional_<source>`` snapshot: the ITQ hash, the FAISS binary index of the region rows'
    codes and the exact rows (float32, C-contiguous; memory-mapped when stored locally) for the re-rank."""

    itq: ITQ
    index: faiss.IndexBinary
    vectors: np.ndarray
    prefilter: int

    def search(self, items: Sequence[np.ndarray], k: int, region_image: np.ndarray, allowed: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (nq, k), int image ids (nq, k)) of D2R regional search through the prefilter."""
        return prefilter_regional_search(self.index, self.vectors, self.itq, region_image, items, k, self.prefilter,
                                         allowed)


def open_itq(root: str, regional: LoadedIndex, snap: Snapshot | None = None) -> LoadedITQ | None:
    """The ITQ prefilter of a loaded regional index, or None when none is published or it belongs to another
    version of the regional index (then a warning: rows would not match)."""
    name = SnapshotFiles.itq_name(regional.snapshot.name)
    try:
        snap = snap or open_latest(root, name)
    except FileNotFoundError:
        return None
    params = snap.manifest.get("parameters", {})
    if params.get("regional_version") != regional.snapshot.version:
        log.warning("%s was built for %s version %s, not the loaded %s: searching without the prefilter", name,
                    regional.snapshot.name, params.get("regional_version"), regional.snapshot.version)
        return None
    itq = ITQ(mean=_read_npy(snap, SnapshotFiles.ITQ_MEAN), projection=_read_npy(snap, SnapshotFiles.ITQ_PROJECTION),
              rotation=_read_npy(snap, SnapshotFiles.ITQ_ROTATION))
    index = faiss.deserialize_index_binary(np.ascontiguousarray(_read_npy(snap, SnapshotFiles.BINARY_INDEX)))
    if params.get("nprobe"):
        index.nprobe = int(params["nprobe"])
    if SnapshotFiles.VECTORS in snap.files:
        X = load_npy(snap.uri(SnapshotFiles.VECTORS))
    else:
        X = np.ascontiguousarray(regional.vectors()[:, : itq.mean.shape[0]], np.float32)
    return LoadedITQ(itq, index, X, int(params.get("prefilter", 1000)))


@dataclass
class LoadedASMK:
    """A published ASMK snapshot opened for search: inverted file, codebook and image ids."""

    index: InvertedFile
    codebook: np.ndarray
    image_ids: np.ndarray
    multiple: int = 1
    query_multiple: int = 1

    def search(self, local_descs: Sequence[np.ndarray | None], top_k: int | None = 100
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query (its local descriptors, each aggregated into its ``query_multiple`` nearest words): image
        scores and int image ids, best first (``top_k=None``: every image with a score)."""
        present = [j for j, d in enumerate(local_descs) if d is not None and len(d)]
        out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.float32), np.zeros(0, np.int64))
                                                    for _ in local_descs]
        if not present:
            return out
        des = np.concatenate([np.asarray(local_descs[j], np.float32) for j in present])
        qid = np.concatenate([np.full(len(local_descs[j]), j, np.int64) for j in present])
        words = assign(des, self.codebook, multiple=min(self.query_multiple, len(self.codebook)))[0]
        agg = aggregate_queries(des, words, qid, self.codebook, self.index)
        if agg.n_items == 0:
            return out
        ids, scores = self.index.search(agg, topk=top_k, pooling="max")
        for r, j in enumerate(agg.item_image):
            out[int(j)] = (scores[r].astype(np.float32), ids[r].astype(np.int64))
        return out


def open_asmk(root: str, kernel: str, snap: Snapshot | None = None) -> LoadedASMK:
    """Open snapshot ``asmk_<kernel>`` (the given version, else ``LATEST``; ``.npy`` files read without pickle)."""
    snap = snap or _open(root, f"asmk_{kernel}")
    skip = (SnapshotFiles.CODEBOOK, SnapshotFiles.IMAGE_IDS)
    arrays = {f[:-4]: _read_npy(snap, f) for f in snap.files if f.endswith(".npy") and f not in skip}
    params = snap.manifest.get("parameters", {})
    return LoadedASMK(InvertedFile.from_arrays(arrays), _read_npy(snap, SnapshotFiles.CODEBOOK).astype(np.float32),
                      _read_npy(snap, SnapshotFiles.IMAGE_IDS), int(params.get("config", {}).get("multiple", 1)),
                      int(params.get("query_multiple", 1)))


@dataclass
class LoadedDiffusion:
    """A published offline diffusion graph (``diffusion_<method>``): normalised affinity as CSR arrays, the
    parameters it was built with, and the image id of every vertex."""

    graph: dict[str, np.ndarray]
    image_ids: np.ndarray
    params: DiffusionConfig

    def vertices_of(self, image_ids: Sequence[str]) -> np.ndarray:
        """Graph vertex of each image id (-1 when the graph does not hold it)."""
        pos = {str(i): v for v, i in enumerate(self.image_ids)}
        return np.array([pos.get(str(i), -1) for i in image_ids], np.int64)


def open_diffusion(root: str, method: str, snap: Snapshot | None = None) -> LoadedDiffusion:
    """Open snapshot ``diffusion_<method>`` (the given version, else ``LATEST``)."""
    snap = snap or _open(root, f"diffusion_{method}")
    arrays = {f[:-4]: _read_npy(snap, f) for f in snap.files if f.endswith(".npy") and f != SnapshotFiles.IMAGE_IDS}
    params = DiffusionConfig(**snap.manifest.get("parameters", {}).get("params", {}))
    return LoadedDiffusion(arrays, _read_npy(snap, SnapshotFiles.IMAGE_IDS), params)


__all__ = ["LoadedIndex", "LoadedITQ", "LoadedASMK", "LoadedDiffusion", "open_index", "open_itq", "open_asmk",
           "open_diffusion"]
