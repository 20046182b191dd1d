"""Typed reads of a run's committed tables: final global descriptors, regions, locals, keypoints, image rows.

Every reader goes through the commit markers (``storage.tables``), so it never sees a half-written shard,
and returns numpy arrays in shard order. ``image_ids`` restricts the rows to some images.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.schemas import descriptors_to_numpy
from storage.layout import shard_label
from storage.tables import StageManifest, TableStore, read_parquet
from storage.uri import get_fs, read_bytes

BOX_COLUMNS = ("x0", "y0", "x1", "y1")


def region_stage(source: str) -> str:
    """The stage that writes a region source: object saliency for ``os_*`` regions, the ``rpn`` pass for ``rpn``
    proposals, extraction otherwise."""
    if source == "rpn":
        return "rpn"
    return "object_saliency" if source.startswith("os_") else "extract"


def _only(t: pa.Table, image_ids: Iterable[str] | None) -> pa.Table:
    if image_ids is None:
        return t
    return t.filter(pc.is_in(t.column("image_id"), value_set=pa.array(list(image_ids), pa.string())))


def _native(t: pa.Table) -> type:
    """The numpy dtype of a table's descriptor column (float16 or float32)."""
    return np.float16 if t.schema.field("descriptor").type.value_type == pa.float16() else np.float32


def _last_nonzero_column(X: np.ndarray) -> int:
    nz = np.flatnonzero(np.any(X != 0, axis=0))
    return int(nz[-1] + 1) if len(nz) else 0


def read_globals(root: str, method: str, image_ids: Iterable[str] | None = None, trim: bool = False
                 ) -> tuple[list[str], np.ndarray]:
    """(image ids, (n, d) float32) of a final global method (the ``descriptors`` stage), in shard order.

    Files are read one at a time and kept in their stored dtype until the end, so the peak is one float32 copy of
    the result. With ``trim`` the all-zero trailing columns (the padding of a method narrower than the table)
    are dropped file by file, so a 256-d method in a 1,280-wide table never exists at full width; the result is
    the untrimmed one's ``[:, :d]`` with ``d`` its last non-zero column + 1 (the full width when all are zero).
    """
    ids: list[str] = []
    parts: list[np.ndarray] = []
    width = 0
    for _, marker in sorted(StageManifest(root, "descriptors").committed().items()):
        t = read_parquet(marker["files"]["globals"])
        t = _only(t.filter(pc.equal(t.column("method"), method)), image_ids)
        ids += t.column("image_id").to_pylist()
        X = descriptors_to_numpy(t.column("descriptor"), _native(t))
        width = X.shape[1]
        parts.append(X[:, :_last_nonzero_column(X)] if trim else X)
    if not parts:
        return ids, np.zeros((0, 0), np.float32)
    d = max(p.shape[1] for p in parts) if trim else width
    d = d or width
    X = np.zeros((len(ids), d), np.float32)
    row = 0
    for p in parts:
        X[row:row + len(p), :p.shape[1]] = p
        row += len(p)
    return ids, X


def iter_regions(root: str, source: str) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """Per committed ``regions`` file of ``source``'s stage, in shard order: (image id per region, pixel boxes (R, 4)
    float32, raw descriptors (R, d) float32) of that source's rows (files without any are skipped). What
    :func:`read_regions` concatenates, one file in memory at a time."""
    cols = ["image_id", "source", *BOX_COLUMNS, "descriptor"]
    for uri in TableStore(root).committed_files("regions", [region_stage(source)]):
        t = read_parquet(uri, columns=cols)
        t = t.filter(pc.equal(t.column("source"), source))
        if t.num_rows:
            boxes = np.stack([t.column(c).to_numpy() for c in BOX_COLUMNS], axis=1).astype(np.float32)
            yield t.column("image_id").to_pylist(), boxes, descriptors_to_numpy(t.column("descriptor"))


def read_regions(root: str, source: str, image_ids: Iterable[str] | None = None,
                 with_descriptors: bool = True) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image id per region, pixel boxes (R, 4) float32, raw regional descriptors (R, d) float32) of a source."""
    cols = ["image_id", "source", *BOX_COLUMNS] + (["descriptor"] if with_descriptors else [])
    t = _only(TableStore(root).read("regions", [region_stage(source)], columns=cols,
                                    filter_expr=pc.field("source") == source), image_ids)
    if t.num_rows == 0:
        return [], np.zeros((0, 4), np.float32), np.zeros((0, 0), np.float32)
    boxes = np.stack([t.column(c).to_numpy() for c in BOX_COLUMNS], axis=1).astype(np.float32)
    X = descriptors_to_numpy(t.column("descriptor")) if with_descriptors else np.zeros((t.num_rows, 0), np.float32)
    return t.column("image_id").to_pylist(), boxes, X


def read_locals(root: str, image_ids: Iterable[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Local descriptors: image id per descriptor, positions (n, 2) and descriptors (n, D), float32."""
    t = _only(TableStore(root).read("locals", ["extract"]), image_ids)
    if t.num_rows == 0:
        return [], np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32)
    xy = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], axis=1).astype(np.float32)
    return t.column("image_id").to_pylist(), xy, descriptors_to_numpy(t.column("descriptor"))


def read_locals_file(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image id per descriptor, positions (n, 2), descriptors (n, D) float32) of one ``locals`` file."""
    t = read_parquet(uri, columns=["image_id", "x", "y", "descriptor"])
    xy = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], axis=1).astype(np.float32)
    return (np.asarray(t.column("image_id").to_pylist(), dtype=object), xy,
            np.asarray(descriptors_to_numpy(t.column("descriptor")), np.float32))


def has_keypoints(root: str, stage: str = "extract") -> bool:
    """Whether the run has committed ``keypoints`` files."""
    return any(m.get("files", {}).get("keypoints") for m in StageManifest(root, stage).committed().values())


class KeypointReader:
    """Per-shard reads of the ``keypoints`` table: the rows of some images only, from the shards that hold them.

    The shard of every image comes from the ``images`` table (two columns, read once); a request opens only those
    shards' committed keypoints files and reads only the row groups whose ``image_id`` statistics can hold a
    requested id (the extraction stage writes each file sorted by image id,
    ``storage.schemas.KEYPOINT_ROW_GROUP`` rows per group), so a shortlist of 100 images reads about
    100 x 1-2 row groups, never the whole table.
    """

    def __init__(self, root: str, stage: str = "extract", threads: int = 4) -> None:
        self.root, self.stage, self.threads = root, stage, threads
        markers = StageManifest(root, stage).committed()
        self.files = {label: m["files"]["keypoints"] for label, m in markers.items()
                      if m.get("files", {}).get("keypoints")}
        cols = ["image_id", "shard", "width", "height"]
        t = TableStore(root).read("images", [stage], columns=cols) if self.files else None
        ok = t is not None and t.num_rows > 0
        ids = t.column("image_id").to_pylist() if ok else []
        self.shard_of: dict[str, str] = dict(zip(ids, (shard_label(s) for s in t.column("shard").to_pylist()))) \
            if ok else {}
        self.size_of: dict[str, tuple[int, int]] = dict(zip(ids, zip(t.column("width").to_pylist(),
                                                                     t.column("height").to_pylist()))) if ok else {}
        self._meta: dict[str, pq.FileMetaData] = {}

    @property
    def available(self) -> bool:
        """Whether the run has a committed keypoints table."""
        return bool(self.files)

    def _row_groups(self, pf: pq.ParquetFile, uri: str, ids: set[str]) -> list[int]:
        meta = self._meta.setdefault(uri, pf.metadata)
        col = meta.schema.names.index("image_id")
        out = []
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(col).statistics
            if st is None or not st.has_min_max or any(st.min <= i <= st.max for i in ids):
                out.append(g)
        return out

    def read(self, image_ids: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """image id -> (positions (n, 2) original-image pixels, scores (n,), descriptors (n, D) float32), in
        keypoint order (strongest first); images without keypoints (or unknown) are absent.

        The shards are read by up to ``threads`` threads: a shortlist spans dozens of shards, and Parquet's
        decoding releases the GIL, so the shards' reads overlap (on object storage, so do their requests)."""
        by_shard: dict[str, set[str]] = {}
        for i in dict.fromkeys(image_ids):
            label = self.shard_of.get(i)
            if label in self.files:
                by_shard.setdefault(label, set()).add(i)
        out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        jobs = sorted(by_shard.items())
        if len(jobs) > 1 and self.threads > 1:
            with ThreadPoolExecutor(min(self.threads, len(jobs))) as pool:
                parts = list(pool.map(lambda job: self._read_shard(*job), jobs))
        else:
            parts = [self._read_shard(label, ids) for label, ids in jobs]
        for part in parts:
            out.update(part)
        return out

    def _read_shard(self, label: str, ids: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The rows of ``ids`` in one shard's keypoints file (only the row groups that can hold them)."""
        uri = self.files[label]
        fs, path = get_fs(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            groups = self._row_groups(pf, uri, ids)
            if not groups:
                return {}
            t = pf.read_row_groups(groups, columns=["image_id", "keypoint_id", "x", "y", "score", "descriptor"],
                                   use_threads=False)
        t = _only(t, ids)
        names = np.asarray(t.column("image_id").to_pylist(), dtype=object)
        kid = t.column("keypoint_id").to_numpy()
        xy = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], axis=1).astype(np.float32)
        score = t.column("score").to_numpy().astype(np.float32)
        desc = descriptors_to_numpy(t.column("descriptor"), np.float32)
        out = {}
        for i in ids:
            m = np.flatnonzero(names == i)
            if len(m):
                m = m[np.argsort(kid[m], kind="stable")]
                out[i] = (xy[m], score[m], desc[m])
        return out


def count_rows(uri: str) -> int:
    """Rows of one table file (from the Parquet footer)."""
    return pq.ParquetFile(io.BytesIO(read_bytes(uri))).metadata.num_rows


def read_region_boxes_file(uri: str | None, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(image id per box, pixel boxes (R, 4)) of one ``regions`` file, ``source`` rows only."""
    if uri is None:
        return np.zeros(0, dtype=object), np.zeros((0, 4), np.float32)
    t = read_parquet(uri, columns=["image_id", "source", *BOX_COLUMNS])
    t = t.filter(pc.equal(t.column("source"), source))
    boxes = np.stack([t.column(c).to_numpy() for c in BOX_COLUMNS], axis=1) if t.num_rows else np.zeros((0, 4))
    return np.asarray(t.column("image_id").to_pylist(), dtype=object), boxes.astype(np.float32)


def image_uris(root: str, image_ids: Iterable[str] | None = None) -> dict[str, str]:
    """image id -> URI of the indexed images (the ``images`` table)."""
    t = _only(TableStore(root).read("images", ["extract"], columns=["image_id", "uri"]), image_ids)
    return dict(zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist()))


def available_globals(root: str) -> set[str]:
    """Final global methods present in the run's descriptors table."""
    t = TableStore(root).read("globals", ["descriptors"], columns=["method"])
    return set(t.column("method").to_pylist()) if t.num_rows else set()


def available_sources(root: str) -> set[str]:
    """Region sources present in the run's tables (extraction and object saliency)."""
    out: set[str] = set()
    store = TableStore(root)
    for stage in ("extract", "object_saliency"):
        if store.committed_files("regions", [stage]):
            out |= set(store.read("regions", [stage], columns=["source"]).column("source").to_pylist())
    return out


__all__ = ["KeypointReader", "has_keypoints",
           "read_globals", "read_regions", "iter_regions", "read_locals", "read_locals_file", "read_region_boxes_file",
           "image_uris", "available_globals", "available_sources", "region_stage", "count_rows"]
