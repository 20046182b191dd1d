"""Versioned, immutable index snapshots under ``<root>/indexes/<name>/`` (docs/ARCHITECTURE.md, storage layout).

Layout::

    <root>/indexes/<name>/v20260101T120000123456Z-1a2b3c4d/   one build: its files + manifest.json (last)
    <root>/indexes/<name>/LATEST                              the published version's name

A build writes into a fresh version directory that nobody reads. Only after every file is written does
the writer add ``manifest.json`` (sha256 and size of every file, method, factory, counts, parameters,
created_at) and then move ``LATEST`` atomically (local FS: temp file + ``os.replace``; object stores: one
PUT, which is atomic). Readers resolve ``LATEST`` once and then read only that immutable directory, so a
reader never sees a half-written build, and a failed build publishes nothing.

Works with local paths, ``file://`` and ``s3://`` (any fsspec URL): the filesystem comes from
``fsspec.core.url_to_fs``; S3 endpoint and credentials come from the standard environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) picked up by s3fs. It imports only the run layout
(``storage.layout``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.layout import RunLayout
from storage.layout import LATEST_FILE as LATEST
from storage.uri import get_fs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_VERSION_RE = re.compile(r"^v(\d{8}T\d{12})Z-([0-9a-f]{8})$")
_CHUNK = 8 << 20


class SnapshotError(RuntimeError):
    """A snapshot is missing, incomplete or corrupt."""


def _fs(root_uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The run's filesystem: explicit ``storage_options``, else :func:`storage.uri.get_fs` (the endpoint and
    credentials of the environment, no listings cache). A bare ``fsspec`` S3 filesystem is one cached instance
    per process whatever the environment says, so it could list another endpoint's bucket."""
    if storage_options:
        fs, path = fsspec.core.url_to_fs(root_uri, **storage_options)
    else:
        fs, path = get_fs(root_uri)
    return fs, path.rstrip("/") or "/"


def _base(root: str, name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad index name {name!r}")
    return RunLayout(root).index_dir(name)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _check_rel(rel: str) -> str:
    rel = rel.strip()
    norm = posixpath.normpath(rel)
    if not rel or rel.startswith("/") or norm.startswith("..") or norm in (".", MANIFEST):
        raise ValueError(f"bad file name {rel!r} inside a snapshot")
    return norm


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so readers see the old or the new content, never a partial file."""
    if _is_local(fs):
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)  # one PUT: atomic on S3 and compatible stores


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
            size += len(b)
    return h.hexdigest(), size


def new_version_name(now: _dt.datetime | None = None) -> str:
    """``v<UTC timestamp, microseconds>Z-<8 hex>``: sorts by creation time, unique across writers."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"v{now.astimezone(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S%f')}Z-{uuid.uuid4().hex[:8]}"


def version_time(version: str) -> _dt.datetime:
    """Creation time encoded in a version name."""
    m = _VERSION_RE.match(version)
    if not m:
        raise ValueError(f"not a version name: {version!r}")
    return _dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=_dt.timezone.utc)


class _HashingFile:
    """Write-only file wrapper that hashes what passes through (avoids reading big files back)."""

    def __init__(self, f: BinaryIO, on_close: Any) -> None:
        self._f, self._on_close = f, on_close
        self._h, self._n = hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        mv = memoryview(b).cast("B")
        self._h.update(mv)
        self._n += mv.nbytes
        return self._f.write(b)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            self._on_close(self._h.hexdigest(), self._n)

    def __enter__(self) -> "_HashingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class Snapshot:
    """A published (complete) snapshot version, read-only."""

    fs: fsspec.AbstractFileSystem
    root: str
    name: str
    version: str
    manifest: dict[str, Any] = field(repr=False)

    @property
    def dir(self) -> str:
        """The version directory (a path in ``fs``)."""
        return posixpath.join(_base(self.root, self.name), self.version)

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest.get("files", {}))

    def path(self, rel: str) -> str:
        """Path of a file inside the version, for ``self.fs``."""
        return posixpath.join(self.dir, _check_rel(rel))

    def uri(self, rel: str) -> str:
        """Full URI of a file (``s3://...``, ``file://...``) for other fsspec-based readers."""
        return self.fs.unstrip_protocol(self.path(rel))

    def open(self, rel: str, mode: str = "rb") -> BinaryIO:
        if "r" not in mode:
            raise ValueError("snapshots are read-only")
        return self.fs.open(self.path(rel), mode)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def verify(self) -> None:
        """Recompute sha256 and size of every file in the manifest; raise :class:`SnapshotError` on mismatch."""
        for rel, meta in self.manifest.get("files", {}).items():
            try:
                digest, size = _sha256(self.fs, self.path(rel))
            except FileNotFoundError as e:
                raise SnapshotError(f"{self.name}/{self.version}: missing {rel}") from e
            if digest != meta["sha256"] or size != meta["bytes"]:
                raise SnapshotError(f"{self.name}/{self.version}: checksum mismatch for {rel}")


class SnapshotWriter:
    """Context manager building one new snapshot version; publishes it only on successful exit.

    ::

        with SnapshotWriter(out_uri, "global_rmac", method="rmac", factory="IVF4096,Flat") as w:
            w.write_bytes("index.faiss", faiss_bytes)
            w.counts["vectors"] = n
            w.parameters["nprobe"] = 32
        snap = w.snapshot            # the published version

    Files go under ``w.dir`` (``w.open(rel)``, ``w.write_bytes``, ``w.write_json``, or ``w.fs`` directly at
    ``w.path(rel)``). On exit without exception: manifest.json (checksums of every file found in the
    directory) then LATEST. On exception: the partial directory is removed (best effort) and LATEST is
    untouched; the exception propagates.
    """

    def __init__(
        self,
        root_uri: str,
        name: str,
        *,
        method: str = "",
        factory: str = "",
        counts: dict[str, int] | None = None,
        parameters: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.fs, self.root = _fs(root_uri, storage_options)
        self.name = name
        self.base = _base(self.root, name)
        self.method, self.factory = method, factory
        self.counts: dict[str, int] = dict(counts or {})
        self.parameters: dict[str, Any] = dict(parameters or {})
        self.version: str | None = None
        self.snapshot: Snapshot | None = None
        self._hashes: dict[str, tuple[str, int]] = {}

    # -- writing ------------------------------------------------------------------------------------------
    @property
    def dir(self) -> str:
        if self.version is None:
            raise RuntimeError("use SnapshotWriter as a context manager")
        return posixpath.join(self.base, self.version)

    def path(self, rel: str) -> str:
        """Path of a file inside the new version, for ``self.fs``."""
        return posixpath.join(self.dir, _check_rel(rel))

    def uri(self, rel: str) -> str:
        """Full URI of a file inside the new version (for writers that take URIs)."""
        return self.fs.unstrip_protocol(self.path(rel))

    def open(self, rel: str, mode: str = "wb") -> _HashingFile:
        if mode != "wb":
            raise ValueError("SnapshotWriter.open only writes ('wb')")
        rel = _check_rel(rel)
        p = self.path(rel)
        self.fs.makedirs(posixpath.dirname(p), exist_ok=True)

        def record(digest: str, n: int) -> None:
            self._hashes[rel] = (digest, n)

        return _HashingFile(self.fs.open(p, "wb"), record)

    def write_bytes(self, rel: str, data: bytes | bytearray | memoryview) -> None:
        with self.open(rel) as f:
            f.write(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    # -- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> "SnapshotWriter":
        self.version = new_version_name()
        self.fs.makedirs(self.dir, exist_ok=True)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            try:
                if self.fs.exists(self.dir):
                    self.fs.rm(self.dir, recursive=True)
            except Exception:  # noqa: BLE001 - cleanup must not mask the build error
                log.warning("could not remove failed snapshot %s", self.dir)
            return False
        self._publish()
        return False

    def _list_files(self) -> list[str]:
        self.fs.invalidate_cache(self.dir)
        found = self.fs.find(self.dir)
        prefix = self.dir.rstrip("/") + "/"
        rels = []
        for p in found:
            p = self.fs._strip_protocol(p)
            rel = p[len(prefix):] if p.startswith(prefix) else posixpath.relpath(p, self.dir)
            if rel and rel != MANIFEST:
                rels.append(rel)
        return sorted(rels)

    def _publish(self) -> None:
        files: dict[str, dict[str, Any]] = {}
        for rel in self._list_files():
            p = self.path(rel)
            size = int(self.fs.size(p))
            known = self._hashes.get(rel)
            digest = known[0] if known is not None and known[1] == size else _sha256(self.fs, p)[0]
            files[rel] = {"sha256": digest, "bytes": size}
        manifest = {
            "format": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "method": self.method,
            "factory": self.factory,
            "counts": self.counts,
            "parameters": self.parameters,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "files": files,
            "bytes": int(sum(f["bytes"] for f in files.values())),
        }
        data = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default).encode()
        _atomic_write(self.fs, posixpath.join(self.dir, MANIFEST), data)
        _atomic_write(self.fs, posixpath.join(self.base, LATEST), (self.version + "\n").encode())
        self.snapshot = Snapshot(self.fs, self.root, self.name, self.version, manifest)


def _json_default(o: Any) -> Any:
    for attr in ("item", "tolist"):  # numpy scalars / arrays in parameters
        if hasattr(o, attr):
            return getattr(o, attr)()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------------------
def read_latest(root_uri: str, name: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The published version name, or None when nothing was published yet."""
    fs, root = _fs(root_uri, storage_options)
    try:
        v = fs.cat_file(posixpath.join(_base(root, name), LATEST)).decode().strip()
    except FileNotFoundError:
        return None
    if not _VERSION_RE.match(v):
        raise SnapshotError(f"LATEST of {name} holds an invalid version {v!r}")
    return v


def open_version(
    root_uri: str, name: str, version: str, *, verify: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Snapshot:
    """Open one complete version (its manifest must exist); optionally verify all checksums."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"not a version name: {version!r}")
    fs, root = _fs(root_uri, storage_options)
    mpath = posixpath.join(_base(root, name), version, MANIFEST)
    try:
        manifest = json.loads(fs.cat_file(mpath))
    except FileNotFoundError as e:
        raise SnapshotError(f"{name}/{version} has no manifest (incomplete build)") from e
    snap = Snapshot(fs, root, name, version, manifest)
    if verify:
        snap.verify()
    return snap


def open_latest(
    root_uri: str, name: str, *, verify: bool = False, storage_options: dict[str, Any] | None = None,
) -> Snapshot:
    """Open the version LATEST points to. Raises FileNotFoundError when nothing is published."""
    v = read_latest(root_uri, name, storage_options)
    if v is None:
        raise FileNotFoundError(f"no published snapshot of {name} under {root_uri}")
    return open_version(root_uri, name, v, verify=verify, storage_options=storage_options)


def list_names(root_uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the indexes of a run that have a published version (a ``LATEST``), sorted."""
    fs, root = _fs(root_uri, storage_options)
    base = posixpath.dirname(_base(root, "x"))
    fs.invalidate_cache(base)  # s3fs caches listings per process; a reindex elsewhere may have published since
    try:
        entries = fs.ls(base, detail=False)
    except FileNotFoundError:
        return []
    names = [posixpath.basename(fs._strip_protocol(p).rstrip("/")) for p in entries]
    return sorted(n for n in names if fs.exists(posixpath.join(base, n, LATEST)))


def _scan(fs: fsspec.AbstractFileSystem, base: str) -> Iterator[tuple[str, bool]]:
    """(version, complete) for every version directory under ``base``."""
    fs.invalidate_cache(base)
    try:
        entries = fs.ls(base, detail=False)
    except FileNotFoundError:
        return
    complete = {posixpath.basename(posixpath.dirname(fs._strip_protocol(p)))
                for p in fs.glob(posixpath.join(base, "v*", MANIFEST))}
    for p in entries:
        v = posixpath.basename(fs._strip_protocol(p).rstrip("/"))
        if _VERSION_RE.match(v):
            yield v, v in complete


def list_versions(
    root_uri: str, name: str, *, include_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Version names, oldest first; complete (manifest present) ones only unless ``include_incomplete``."""
    fs, root = _fs(root_uri, storage_options)
    return sorted(v for v, ok in _scan(fs, _base(root, name)) if ok or include_incomplete)


def prune(
    root_uri: str,
    name: str,
    keep_days: float = 7.0,
    keep_min: int = 3,
    *,
    now: _dt.datetime | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Delete old versions; return the deleted names.

    Kept: the LATEST version (always), the newest ``keep_min`` complete versions, and every version younger
    than ``keep_days`` (readers may still hold an older version open; builds may be in progress). Incomplete
    versions (no manifest: crashed builds) older than ``keep_days`` are deleted too.
    """
    fs, root = _fs(root_uri, storage_options)
    base = _base(root, name)
    latest = read_latest(root_uri, name, storage_options)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    cutoff = now - _dt.timedelta(days=keep_days)
    scanned = sorted(_scan(fs, base), reverse=True)  # newest first
    keep = {v for v, ok in scanned if ok}
    keep = set(sorted(keep, reverse=True)[:max(keep_min, 0)])  # newest keep_min complete versions
    if latest is not None:
        keep.add(latest)
    deleted = []
    for v, _ok in scanned:
        if v in keep or version_time(v) >= cutoff:
            continue
        fs.rm(posixpath.join(base, v), recursive=True)
        deleted.append(v)
    return sorted(deleted)
