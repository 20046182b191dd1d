"""A run's own records: the stored config (``config.json``), the per-stage record (``run.json``) and the
corpus manifest (``corpus/manifest.parquet``)."""
from __future__ import annotations

import time
from typing import Any, Sequence

import pyarrow as pa

from storage.arrays import load_json, save_json
from storage.layout import RunLayout
from storage.tables import StageManifest, read_parquet, write_parquet
from storage.uri import exists


class NotAnIndexError(FileNotFoundError):
    """The URI holds no index run (no ``config.json``); the message says what was expected."""


def save_run_config(root: str, config: dict[str, Any]) -> None:
    """Store the run's config (a plain mapping) so readers encode queries exactly like the database."""
    save_json(RunLayout(root).config, config)


def load_run_config(root: str) -> dict[str, Any]:
    """The stored config of the run at ``root``; :class:`NotAnIndexError` when there is none."""
    uri = RunLayout(root).config
    if not exists(uri):
        raise NotAnIndexError(f"{root} is not an index run (no config.json there): build one with "
                              "`python -m jobs.index --images <corpus> --out <uri>`")
    return load_json(uri)


class RunManifest:
    """``run.json``: per stage its parameters, input versions, counts, time and peak memory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.uri = RunLayout(root).run_manifest
        self.data: dict[str, Any] = load_json(self.uri) if exists(self.uri) else {"stages": {}}

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.data["stages"][name] = entry
        self.data["updated_at"] = time.time()
        save_json(self.uri, self.data)

    def invalidate_from(self, name: str, order: Sequence[str]) -> None:
        """Forget ``name`` and every later stage of ``order`` (their inputs change), commits included."""
        for later in order[list(order).index(name):]:
            self.data["stages"].pop(later, None)
            StageManifest(self.root, later).reset()
        save_json(self.uri, self.data)

    def all_done(self, stages: Sequence[str]) -> bool:
        """Whether every stage of ``stages`` is recorded as done."""
        return all((self.stage(s) or {}).get("status") == "done" for s in stages)


def read_corpus_manifest(root: str, columns: list[str] | None = None) -> pa.Table | None:
    """The run's corpus manifest, or None before the first run."""
    uri = RunLayout(root).corpus_manifest
    return read_parquet(uri, columns=columns) if exists(uri) else None


def write_corpus_manifest(root: str, manifest: pa.Table) -> None:
    meta = {b"schema_version": b"1", b"table": b"manifest"}
    write_parquet(RunLayout(root).corpus_manifest, manifest.replace_schema_metadata(meta))


__all__ = ["RunManifest", "NotAnIndexError", "save_run_config", "load_run_config", "read_corpus_manifest",
           "write_corpus_manifest"]
