"""Shard-atomic Parquet tables with per-stage commit manifests.

A stage writes each shard's files under deterministic names (``tables/<table>/<stage>-<shard>.parquet``),
then writes the shard's commit marker ``stages/<stage>/shards/<shard>.json`` listing those files. Readers
only read files listed by committed markers, so a shard killed mid-way is invisible; a retry or rerun
overwrites the same names, so rows are never duplicated.
"""
from __future__ import annotations

import io
import time
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.arrays import load_json, save_json
from storage.layout import RunLayout
from storage.layout import shard_label as shard_name
from storage.schemas import KEYPOINT_ROW_GROUP, check_schema_version
from storage.uri import exists, join, listdir, read_bytes, remove, write_bytes_atomic


def write_parquet(uri: str, table: pa.Table, compression: str = "zstd", row_group_size: int | None = None) -> int:
    """Atomically write one Parquet file; returns its size in bytes. ``row_group_size``: rows per row group
    (small groups let a reader fetch a few images' rows by their ``image_id`` statistics)."""
    data = parquet_bytes(table, compression, row_group_size)
    write_bytes_atomic(uri, data)
    return len(data)


def parquet_bytes(table: pa.Table, compression: str = "zstd", row_group_size: int | None = None) -> bytes:
    """The bytes :func:`write_parquet` stores for ``table`` (the one writer: encodings, compression, row groups)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression, row_group_size=row_group_size)
    return buf.getvalue()


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file written by :func:`write_parquet` (schema version checked)."""
    table = pq.read_table(io.BytesIO(read_bytes(uri)), columns=columns)
    check_schema_version(pq.read_schema(io.BytesIO(read_bytes(uri))) if columns else table.schema)
    return table


class StageManifest:
    """Commit markers and summary of one stage of one run."""

    def __init__(self, root: str, stage: str) -> None:
        self.root = root
        self.stage = stage
        self.layout = RunLayout(root)
        self.dir = self.layout.stage_dir(stage)

    def marker_uri(self, shard: int | str) -> str:
        return self.layout.shard_marker(self.stage, shard)

    def _relative(self, uri: str) -> str:
        """A file URI under the run root as a path relative to it (others unchanged)."""
        prefix = self.root.rstrip("/") + "/"
        return uri[len(prefix):] if uri.startswith(prefix) else uri

    def resolve(self, uri: str) -> str:
        """A file URI as a marker lists it → its URI (inverse of the relative form; absolute paths and URIs with a
        scheme unchanged)."""
        return uri if "://" in uri or uri.startswith("/") else join(self.root, uri)

    def committed(self) -> dict[str, dict[str, Any]]:
        """Committed shards: label → marker content (files written, as URIs under this run's root, counts, ...).

        Markers list their files relative to the run root, so a run copied or moved as a whole (another folder,
        another bucket) reads its own files; markers written with absolute URIs are read as they are."""
        out = {}
        for uri in listdir(self.layout.shard_markers_dir(self.stage)):
            if uri.endswith(".json"):
                out[uri.rsplit("/", 1)[-1][:-5]] = self._resolved(load_json(uri))
        return out

    def marker(self, shard: int | str) -> dict[str, Any]:
        """One committed shard's marker, its files as URIs under this run's root (as :meth:`committed`)."""
        return self._resolved(load_json(self.marker_uri(shard)))

    def _resolved(self, marker: dict[str, Any]) -> dict[str, Any]:
        if isinstance(marker.get("files"), dict):
            marker["files"] = {k: self.resolve(v) for k, v in marker["files"].items()}
        return marker

    def is_committed(self, shard: int | str) -> bool:
        return exists(self.marker_uri(shard))

    def commit(self, shard: int | str, files: dict[str, str], **info: Any) -> None:
        """Publish a shard: its files (table name → URI) become visible to readers atomically (stored relative
        to the run root when under it, see :meth:`committed`)."""
        save_json(self.marker_uri(shard), {"shard": shard_name(shard),
                                            "files": {k: self._relative(v) for k, v in files.items()},
                                            "committed_at": time.time(), **info})

    def uncommit(self, shard: int | str) -> None:
        """Withdraw a shard (used when re-indexing drops or replaces it)."""
        remove(self.marker_uri(shard))

    def write_summary(self, summary: dict[str, Any]) -> None:
        save_json(self.layout.stage_summary(self.stage), summary)

    def summary(self) -> dict[str, Any] | None:
        uri = self.layout.stage_summary(self.stage)
        return load_json(uri) if exists(uri) else None

    def reset(self) -> None:
        """Forget every commit of this stage (a forced re-run)."""
        remove(self.dir, recursive=True)


class TableStore:
    """Typed access to the tables of one output root."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.layout = RunLayout(root)

    def file_uri(self, table: str, stage: str, shard: int | str) -> str:
        return self.layout.table_file(table, stage, shard)

    def write(self, table: str, stage: str, shard: int | str, data: pa.Table, row_group_size: int | None = None
              ) -> str:
        """Write ``data`` as the shard's file of ``table`` (not visible until the shard is committed)."""
        uri = self.file_uri(table, stage, shard)
        write_parquet(uri, data, row_group_size=row_group_size)
        return uri

    def committed_files(self, table: str, stages: Iterable[str] | None = None) -> list[str]:
        """URIs of ``table``'s files listed by committed markers (of the given stages, default: all)."""
        stage_names = list(stages) if stages is not None else [
            u.rsplit("/", 1)[-1] for u in listdir(self.layout.stages_dir)]
        files = []
        for stage in stage_names:
            for _, marker in sorted(StageManifest(self.root, stage).committed().items()):
                uri = marker.get("files", {}).get(table)
                if uri:
                    files.append(uri)
        return files

    def read(self, table: str, stages: Iterable[str] | None = None, columns: list[str] | None = None,
             filter_expr: Any = None) -> pa.Table:
        """Concatenate the committed files of ``table``; ``filter_expr`` is a pyarrow compute expression."""
        parts = []
        for uri in self.committed_files(table, stages):
            t = read_parquet(uri, columns=columns)
            if filter_expr is not None:
                t = t.filter(filter_expr)
            parts.append(t)
        if not parts:
            return pa.table({}) if columns is None else pa.table({c: pa.array([]) for c in columns})
        return pa.concat_tables(parts, promote_options="permissive")


def drop_images(root: str, stage: str, image_ids: set[str], shards: set[str]) -> list[str]:
    """Rewrite the committed ``shards`` of ``stage`` (those the manifest says hold ``image_ids``) without them.

    Returns the labels of the rewritten shards. Each table file is rewritten atomically, then the marker is
    replaced, so readers see the old or the new shard, never a mix that duplicates or loses rows.
    """
    manifest = StageManifest(root, stage)
    rewritten = []
    value_set = pa.array(sorted(image_ids), pa.string())
    for label in sorted(shards):
        if not manifest.is_committed(label):
            continue
        marker = manifest.marker(label)
        files = marker.get("files", {})
        tables = {name: read_parquet(uri) for name, uri in files.items()}
        hit = any(t.num_rows and pc.any(pc.is_in(t.column("image_id"), value_set=value_set)).as_py()
                  for t in tables.values())
        if not hit:
            continue
        kept_tables, dropped_ok = {}, set()
        for name, t in tables.items():
            gone = pc.is_in(t.column("image_id"), value_set=value_set)
            if name != "errors":
                dropped_ok.update(t.filter(gone).column("image_id").to_pylist())
            kept_tables[name] = kept = t.filter(pc.invert(gone))
        # new file names, then the marker switch: a reader holding the old marker still finds the old files,
        # one with the new marker finds only new files (never a new regions file next to an old globals file)
        stamp = f"r{time.time_ns()}"
        new_files = {}
        for name, kept in kept_tables.items():
            new_files[name] = TableStore(root).layout.table_file(name, stage, label, stamp)
            write_parquet(new_files[name], kept, row_group_size=KEYPOINT_ROW_GROUP if name == "keypoints" else None)
        info = {k: v for k, v in marker.items() if k not in ("files", "shard", "committed_at", "rewritten_at")}
        # the old marker's counts include the dropped rows: count what the rewritten shard holds
        if "images" in info:
            info["images"] = (kept_tables["images"].num_rows if "images" in kept_tables
                              else max(0, int(info["images"]) - len(dropped_ok)))
        if "errors" in info and "errors" in kept_tables:
            info["errors"] = kept_tables["errors"].num_rows
        if "rows" in info and "globals" in kept_tables:
            info["rows"] = kept_tables["globals"].num_rows
        manifest.commit(label, new_files, **info, rewritten_at=time.time())
        for old_uri in files.values():
            if old_uri not in new_files.values():
                remove(old_uri)
        rewritten.append(label)
    return rewritten
