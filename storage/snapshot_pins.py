"""Pinned snapshot versions: searches running during a reindex keep reading the version they opened.

:func:`storage.snapshot.open_latest` resolves ``LATEST`` once and then reads only that immutable version
folder, so a reader never mixes two builds of one index. What it does not prevent is :func:`prune` deleting
that folder while the reader still needs its files (an index loaded lazily, a long verify, a reader that
opened just before several publications). This module adds keep-alive pins:

    <root>/indexes/<name>/PINS/<version>--<pin id>.json    {"version", "expires_at", "host", "pid", "owner"}

* :func:`open_pinned` resolves ``LATEST``, writes a pin for that version, *then* reads its manifest. If the
  manifest is gone (pruned in between), it drops the pin and resolves ``LATEST`` again.
* :func:`prune_unpinned` (use it instead of :func:`storage.snapshot.prune`) deletes a candidate version in
  three steps: read and delete its manifest (new readers now see it as incomplete and go to ``LATEST``),
  list the pins, and either restore the manifest (a live pin appeared) or delete the folder. A reader whose
  manifest read succeeded wrote its pin before that read, hence before the pruner's pin listing, so the
  pruner sees the pin: a pinned version is never deleted. (Needs read-after-write consistent listings: local
  files, AWS S3 since 2020, SeaweedFS.)
* Pins expire (``ttl_s``, default 1 h) so that a crashed reader does not keep a version forever; a long-lived
  reader renews them (``keepalive=True`` starts a daemon thread, or call :meth:`PinnedSnapshot.renew`).
  Expired pins are deleted by the pruner. ``LATEST`` and the newest ``keep_min`` versions are always kept, as
  before.
* Reading a file of a version that was pruned anyway (pin expired) raises :class:`SnapshotError` saying so,
  instead of a bare FileNotFoundError.
* :func:`open_pinned_set` pins several indexes at once; with a release record (:func:`publish_release`,
  ``<root>/indexes/RELEASE.json``, written by a job after it published all its indexes) the set is the
  versions of one job run, so a search combining indexes never mixes two runs.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from storage import snapshot as sn
from storage.layout import RunLayout
from storage.snapshot import MANIFEST, Snapshot, SnapshotError

log = logging.getLogger(__name__)

DEFAULT_PIN_TTL_S = 3600.0


def _pins_dir(fs_root: str, name: str) -> str:
    return RunLayout(fs_root).index_pins(name)


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_iso(s: Any) -> float:
    try:
        return _dt.datetime.fromisoformat(str(s).replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return 0.0


@dataclass
class PinnedSnapshot:
    """A snapshot version held open by a pin. Read files through it (or through ``snapshot``)."""

    snapshot: Snapshot
    pin_path: str
    ttl_s: float
    owner: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.snapshot.name

    @property
    def version(self) -> str:
        return self.snapshot.version

    @property
    def files(self) -> list[str]:
        return self.snapshot.files

    def _missing(self, rel: str) -> SnapshotError:
        return SnapshotError(
            f"{self.name}/{self.version}: {rel} is gone: the version was pruned (its pin expired or was "
            f"removed; pins last {self.ttl_s:g} s unless renewed). Reopen the index to read the current version.")

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.snapshot.read_bytes(rel)
        except FileNotFoundError:
            raise self._missing(rel) from None

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def open(self, rel: str, mode: str = "rb") -> BinaryIO:
        try:
            return self.snapshot.open(rel, mode)
        except FileNotFoundError:
            raise self._missing(rel) from None

    def renew(self) -> None:
        """Extend the pin by ``ttl_s`` from now."""
        _write_pin(self.snapshot.fs, self.pin_path, self.version, self.ttl_s, self.owner)

    def _keepalive(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl_s / 3)):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - keep trying; the pin lasts ttl_s
                log.warning("could not renew pin %s: %s: %s", self.pin_path, type(exc).__name__, exc)

    def close(self) -> None:
        """Drop the pin (the version may be pruned from now on)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.snapshot.fs.rm(self.pin_path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - it expires anyway
            log.warning("could not remove pin %s: %s: %s", self.pin_path, type(exc).__name__, exc)

    def __enter__(self) -> "PinnedSnapshot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_pin(fs: Any, path: str, version: str, ttl_s: float, owner: dict[str, Any]) -> None:
    now = time.time()
    rec = {"version": version, "created_at": _iso(now), "expires_at": _iso(now + ttl_s), "ttl_s": ttl_s,
           "host": socket.gethostname(), "pid": os.getpid(), "owner": owner}
    sn._atomic_write(fs, path, json.dumps(rec, sort_keys=True, default=str).encode())


def pin_version(root_uri: str, name: str, version: str, *, ttl_s: float = DEFAULT_PIN_TTL_S,
                owner: dict[str, Any] | None = None, keepalive: bool = False, verify: bool = False,
                storage_options: dict[str, Any] | None = None) -> PinnedSnapshot:
    """Pin ``version`` of index ``name`` and open it; SnapshotError if it is not (or no longer) complete."""
    if not sn._VERSION_RE.match(version):
        raise ValueError(f"not a version name: {version!r}")
    fs, root = sn._fs(root_uri, storage_options)
    owner = dict(owner or {})
    path = posixpath.join(_pins_dir(root, name), f"{version}--{uuid.uuid4().hex[:12]}.json")
    _write_pin(fs, path, version, ttl_s, owner)
    try:
        snap = sn.open_version(root_uri, name, version, verify=verify, storage_options=storage_options)
    except BaseException:
        try:
            fs.rm(path)
        except Exception:  # noqa: BLE001
            pass
        raise
    pinned = PinnedSnapshot(snap, path, ttl_s, owner)
    if keepalive:
        pinned._thread = threading.Thread(target=pinned._keepalive, name=f"pin-{name}", daemon=True)
        pinned._thread.start()
    return pinned


def open_pinned(root_uri: str, name: str, *, ttl_s: float = DEFAULT_PIN_TTL_S, owner: dict[str, Any] | None = None,
                keepalive: bool = False, verify: bool = False, attempts: int = 5,
                storage_options: dict[str, Any] | None = None) -> PinnedSnapshot:
    """Pin and open the version ``LATEST`` points to (FileNotFoundError when nothing is published)."""
    last: Exception | None = None
    for _ in range(max(1, attempts)):
        v = sn.read_latest(root_uri, name, storage_options)
        if v is None:
            raise FileNotFoundError(f"no published snapshot of {name} under {root_uri}")
        try:
            return pin_version(root_uri, name, v, ttl_s=ttl_s, owner=owner, keepalive=keepalive, verify=verify,
                               storage_options=storage_options)
        except SnapshotError as exc:  # pruned between reading LATEST and pinning: LATEST has moved on
            last = exc
    raise SnapshotError(f"could not pin a complete version of {name}: {last}")


# ------------------------------------------------------------------------------------------------------------
# sets of indexes, releases
# ------------------------------------------------------------------------------------------------------------
def publish_release(root_uri: str, names: list[str], *, info: dict[str, Any] | None = None,
                    storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Record the current ``LATEST`` version of each of ``names`` as one release (``indexes/RELEASE.json``).

    Call it after a job has published all its indexes; readers using :func:`open_pinned_set` then get the
    versions of one run even while the next run publishes its indexes one by one.
    """
    versions = {}
    for n in names:
        v = sn.read_latest(root_uri, n, storage_options)
        if v is None:
            raise SnapshotError(f"cannot release {n}: nothing published")
        versions[n] = v
    fs, root = sn._fs(root_uri, storage_options)
    rec = {"versions": versions, "released_at": _iso(time.time()), "info": dict(info or {})}
    sn._atomic_write(fs, RunLayout(root).release, json.dumps(rec, indent=2, sort_keys=True,
                                                                            default=str).encode())
    return versions


def read_release(root_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, str] | None:
    """The versions of the last release (name -> version), or None when no release was recorded."""
    fs, root = sn._fs(root_uri, storage_options)
    try:
        return dict(json.loads(fs.cat_file(RunLayout(root).release))["versions"])
    except FileNotFoundError:
        return None


def open_pinned_set(root_uri: str, names: list[str], *, use_release: bool = True, **kw: Any
                    ) -> dict[str, PinnedSnapshot]:
    """Pin one version per index name: the release's versions when there is a release covering all of
    ``names`` (and ``use_release``), else each name's ``LATEST``. On any failure the pins taken are dropped."""
    release = read_release(root_uri, kw.get("storage_options")) if use_release else None
    out: dict[str, PinnedSnapshot] = {}
    try:
        for n in names:
            if release is not None and all(x in release for x in names):
                out[n] = pin_version(root_uri, n, release[n], **{k: v for k, v in kw.items() if k != "attempts"})
            else:
                out[n] = open_pinned(root_uri, n, **kw)
    except BaseException:
        for p in out.values():
            p.close()
        raise
    return out


# ------------------------------------------------------------------------------------------------------------
# pruning that respects pins
# ------------------------------------------------------------------------------------------------------------
def live_pins(root_uri: str, name: str, *, now: float | None = None, remove_expired: bool = False,
              storage_options: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """version -> records of its unexpired pins (expired ones deleted with ``remove_expired``)."""
    fs, root = sn._fs(root_uri, storage_options)
    d = _pins_dir(root, name)
    fs.invalidate_cache(d)
    try:
        entries = fs.ls(d, detail=False)
    except FileNotFoundError:
        return {}
    now = time.time() if now is None else now
    out: dict[str, list[dict[str, Any]]] = {}
    for p in entries:
        p = fs._strip_protocol(p)
        if not p.endswith(".json"):
            continue
        try:
            rec = json.loads(fs.cat_file(p))
        except FileNotFoundError:
            continue  # unpinned meanwhile
        except ValueError:
            rec = {"version": posixpath.basename(p).split("--", 1)[0], "expires_at": ""}
            try:  # a pin being written: counts as live for a minute
                mtime = fs.modified(p).timestamp()
            except Exception:  # noqa: BLE001
                mtime = now
            rec["expires_at"] = _iso(mtime + 60)
        if _parse_iso(rec.get("expires_at")) > now:
            out.setdefault(str(rec.get("version")), []).append(rec)
        elif remove_expired:
            try:
                fs.rm(p)
            except FileNotFoundError:
                pass
    return out


def prune_unpinned(
    root_uri: str,
    name: str,
    keep_days: float = 7.0,
    keep_min: int = 3,
    *,
    now: _dt.datetime | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """:func:`storage.snapshot.prune` that never deletes a version with a live pin; returns deleted names.

    Kept: LATEST, the newest ``keep_min`` complete versions, versions younger than ``keep_days``, pinned
    versions. Expired pins are removed. See the module docstring for why a reader cannot lose its version.
    """
    fs, root = sn._fs(root_uri, storage_options)
    base = sn._base(root, name)
    fs.invalidate_cache()  # s3fs caches listings per folder and invalidates parents only: drop them all
    latest = sn.read_latest(root_uri, name, storage_options)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    cutoff = now - _dt.timedelta(days=keep_days)
    scanned = sorted(sn._scan(fs, base), reverse=True)  # newest first
    keep = set(sorted((v for v, ok in scanned if ok), reverse=True)[:max(keep_min, 0)])
    if latest is not None:
        keep.add(latest)
    pinned = live_pins(root_uri, name, remove_expired=True, storage_options=storage_options)
    deleted = []
    for v, complete in scanned:
        if v in keep or v in pinned or sn.version_time(v) >= cutoff:
            continue
        vdir = posixpath.join(base, v)
        mpath = posixpath.join(vdir, MANIFEST)
        if not complete and not [f for f in fs.find(vdir) if fs._strip_protocol(f).rstrip("/") != vdir]:
            # an emptied folder that the store still lists (SeaweedFS keeps them as "v.../" objects): tidy
            # up, but it is not a version deleted now
            try:
                fs.rm(vdir, recursive=True)
            except FileNotFoundError:
                pass
            continue
        manifest = None
        if complete:
            try:
                manifest = fs.cat_file(mpath)
                fs.rm(mpath)  # from now on new readers see the version as incomplete
            except FileNotFoundError:
                manifest = None
        if v in live_pins(root_uri, name, storage_options=storage_options):  # pinned meanwhile: restore
            if manifest is not None:
                sn._atomic_write(fs, mpath, manifest)
            log.info("snapshot %s/%s pinned while pruning: kept", name, v)
            continue
        fs.rm(vdir, recursive=True)
        deleted.append(v)
    fs.invalidate_cache()
    return sorted(deleted)
