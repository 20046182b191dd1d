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
import pyarrow.parquet as pq

from storage.arrays import load_json, save_json
from storage.schemas import check_schema_version
from storage.uri import exists, join, listdir, read_bytes, remove, write_bytes_atomic


def shard_name(shard: int | str) -> str:
    """Canonical shard label (``00042``, or a string label such as ``d20261123-00001`` for deltas)."""
    return f"{shard:05d}" if isinstance(shard, int) else str(shard)


def write_parquet(uri: str, table: pa.Table, compression: str = "zstd") -> int:
    """Atomically write one Parquet file; returns its size in bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    data = buf.getvalue()
    write_bytes_atomic(uri, data)
    return len(data)


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
        self.dir = join(root, "stages", stage)

    def marker_uri(self, shard: int | str) -> str:
        return join(self.dir, "shards", shard_name(shard) + ".json")

    def committed(self) -> dict[str, dict[str, Any]]:
        """Committed shards: label → marker content (files written, counts, ...)."""
        out = {}
        for uri in listdir(join(self.dir, "shards")):
            if uri.endswith(".json"):
                out[uri.rsplit("/", 1)[-1][:-5]] = load_json(uri)
        return out

    def is_committed(self, shard: int | str) -> bool:
        return exists(self.marker_uri(shard))

    def commit(self, shard: int | str, files: dict[str, str], **info: Any) -> None:
        """Publish a shard: its files (table name → URI) become visible to readers atomically."""
        save_json(self.marker_uri(shard), {"shard": shard_name(shard), "files": files,
                                            "committed_at": time.time(), **info})

    def uncommit(self, shard: int | str) -> None:
        """Withdraw a shard (used when re-indexing drops or replaces it)."""
        remove(self.marker_uri(shard))

    def write_summary(self, summary: dict[str, Any]) -> None:
        save_json(join(self.dir, "stage.json"), summary)

    def summary(self) -> dict[str, Any] | None:
        uri = join(self.dir, "stage.json")
        return load_json(uri) if exists(uri) else None

    def reset(self) -> None:
        """Forget every commit of this stage (a forced re-run)."""
        remove(self.dir, recursive=True)


class TableStore:
    """Typed access to the tables of one output root."""

    def __init__(self, root: str) -> None:
        self.root = root

    def file_uri(self, table: str, stage: str, shard: int | str) -> str:
        return join(self.root, "tables", table, f"{stage}-{shard_name(shard)}.parquet")

    def write(self, table: str, stage: str, shard: int | str, data: pa.Table) -> str:
        """Write ``data`` as the shard's file of ``table`` (not visible until the shard is committed)."""
        uri = self.file_uri(table, stage, shard)
        write_parquet(uri, data)
        return uri

    def committed_files(self, table: str, stages: Iterable[str] | None = None) -> list[str]:
        """URIs of ``table``'s files listed by committed markers (of the given stages, default: all)."""
        stage_names = list(stages) if stages is not None else [
            u.rsplit("/", 1)[-1] for u in listdir(join(self.root, "stages"))]
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
