"""Exclusive leases on an output root (``<root>/LOCK.json``): one indexing job writes a root at a time.

::

    with Lease(cfg.out, {"job_id": run_id, "command": "index"}, ttl_s=120, heartbeat_s=20):
        ...                                   # raises LeaseHeld at once if another live job holds the root

The lease file is JSON: ``job_id``, ``host``, ``pid``, ``started_at``, ``heartbeat_at`` (UTC ISO-8601),
``ttl_s``, ``heartbeat_s``, a random ``token`` naming this acquisition, a ``seq`` counting renewals, and the
caller's ``owner`` info. A daemon thread renews ``heartbeat_at`` every ``heartbeat_s``. A lease whose last
sign of life is older than its own ``ttl_s`` belongs to a dead (or hung) job and may be taken over. The last
sign of life is the later of ``heartbeat_at`` (the holder's clock) and the file's modification time (the
store's clock), so one fast clock cannot make a live lease look stale; clocks must agree to well within ttl.

Protocol, S3 (every write is a compare-and-swap on the server, which AWS S3, SeaweedFS >= 4 and moto support)
  acquire   PUT LOCK.json with ``If-None-Match: *``: succeeds only if no lease exists (412 otherwise).
  held?     GET LOCK.json -> content + ETag + LastModified; live -> :class:`LeaseHeld` (who, since when).
  take over stale lease: PUT with ``If-Match: <ETag read>``. Of two simultaneous takers (or a taker and a
            late heartbeat of the old holder) exactly one PUT matches; the other gets 412 and re-reads.
  heartbeat PUT with ``If-Match: <ETag of our last write>``; 412 means someone took over: the lease is lost
            (``lost`` is set, ``on_lost`` called, :meth:`Lease.check` raises :class:`LeaseLost`).
  release   DELETE with ``If-Match: <our ETag>``: never deletes a lease that is no longer ours.
  The first use of a bucket probes that the server honours conditions (a PUT with a bogus ``If-Match`` must
  fail); a server that ignores them would make leases silently non-exclusive, so that is a StorageError.
  A retried PUT whose first attempt did land gets 412 on the retry; the lease is then re-read and counts as
  ours when it carries our token and sequence number.

Protocol, local files (POSIX; also NFS, where link/rename/O_EXCL are atomic on the server)
  acquire   write a temp file, then ``os.link(temp, LOCK.json)``: atomic create-if-absent with the full
            content (``os.open(O_CREAT|O_EXCL)`` + write where hard links are unsupported; a reader that
            sees such a file still empty treats it as live until its mtime is older than the ttl).
  take over stale lease with token T: (1) create ``LOCK.json.takeover-T`` with O_EXCL: of several takers of
            the same stale lease one wins; (2) rename LOCK.json to a private name and compare the moved
            file with what was judged stale (sha256); if it differs (the holder renewed it, or a new lease
            appeared), link it back and give up; (3) link our lease in as in acquire (fails if a fresh
            acquirer got in between: then we lost).
  heartbeat if ``LOCK.json.takeover-<our token>`` exists or LOCK.json is no longer our last write, the lease
            is lost; otherwise write temp + ``os.replace``.
  release   same checks, then rename LOCK.json away, compare, delete (or link back if not ours).
  Residual window: a holder stalled for longer than its ttl that wakes exactly between a taker's steps can
  overwrite the taker's lease (microseconds wide). Both then notice at the next heartbeat (the file carries
  one token only) and the loser reports the lease as lost. Leases do not fence writes: a job must call
  :meth:`Lease.check` (or watch ``lost``) between stages and stop when it raises.

Works with any root accepted by :mod:`storage.uri` (local path, ``file://``, ``s3://``); I/O goes through
the retrying helpers of :mod:`storage.uri`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from typing import Any, Callable

from fsspec.implementations.local import LocalFileSystem

from storage.layout import RunLayout
from storage.lease_backends import (LeaseHeld, LeaseLost, _age, _Conflict, _LocalBackend, _now_iso,  # noqa: F401
                                    _parse_iso, _Record, _S3Backend)
from storage.uri import StorageError, _describe, get_fs, redact

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# the lease
# ------------------------------------------------------------------------------------------------------------
class Lease:
    """An exclusive, heartbeated lease on ``root`` (see the module docstring for the protocol).

    ``owner_info`` is stored in the lease (``job_id`` from it names the job in messages; a random one is made
    otherwise). ``ttl_s``: how long without a heartbeat before others may take the lease over;
    ``heartbeat_s`` (default ttl/4): the renewal period. ``on_lost(message)`` is called from the heartbeat
    thread if the lease is lost. Use as a context manager, or :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, root: str, owner_info: dict[str, Any] | None = None, ttl_s: float = 120.0,
                 heartbeat_s: float | None = None, *, on_lost: Callable[[str], None] | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        heartbeat_s = ttl_s / 4 if heartbeat_s is None else heartbeat_s
        if not 0 < heartbeat_s < ttl_s:
            raise ValueError(f"heartbeat_s must be in (0, ttl_s): got {heartbeat_s} for ttl {ttl_s}")
        self.root = root.rstrip("/")
        self.uri = RunLayout(self.root).lock
        self.owner_info = dict(owner_info or {})
        self.job_id = str(self.owner_info.get("job_id") or f"job-{uuid.uuid4().hex[:12]}")
        self.ttl_s, self.heartbeat_s = float(ttl_s), float(heartbeat_s)
        self.on_lost = on_lost
        fs, path = get_fs(self.uri)
        self._backend: _LocalBackend | _S3Backend = (
            _LocalBackend(path) if isinstance(fs, LocalFileSystem) else _S3Backend(self.uri))
        self.token: str | None = None
        self.seq = 0
        self.started_at = 0.0
        self.lost = False
        self.lost_reason = ""
        self.took_over: dict[str, Any] | None = None  # the stale lease record we replaced, if any
        self._tag: str | None = None
        self._last_renewal = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()

    # -- content ------------------------------------------------------------------------------------------
    def _content(self, now: float) -> bytes:
        rec = {"job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(),
               "started_at": _now_iso(self.started_at), "heartbeat_at": _now_iso(now), "ttl_s": self.ttl_s,
               "heartbeat_s": self.heartbeat_s, "token": self.token, "seq": self.seq, "owner": self.owner_info}
        return json.dumps(rec, indent=2, sort_keys=True, default=str).encode()

    def _is_mine(self, rec: _Record | None) -> bool:
        return rec is not None and rec.data is not None and rec.data.get("token") == self.token and \
            rec.data.get("seq") == self.seq

    # -- state of a lease record ---------------------------------------------------------------------------
    def _last_alive(self, rec: _Record) -> float:
        hb = _parse_iso((rec.data or {}).get("heartbeat_at")) or 0.0
        return max(hb, rec.mtime)

    def _is_stale(self, rec: _Record, now: float) -> bool:
        ttl = float((rec.data or {}).get("ttl_s") or self.ttl_s)
        return now - self._last_alive(rec) > ttl

    def _held_message(self, rec: _Record, now: float) -> str:
        d = rec.data or {}
        if not d:
            return (f"{self.root} is locked ({self.uri} exists but is being written or unreadable; "
                    f"modified {_age(now - rec.mtime)} ago)")
        started = _parse_iso(d.get("started_at"))
        ttl = float(d.get("ttl_s") or self.ttl_s)
        alive = self._last_alive(rec)
        since = f"since {d.get('started_at')} ({_age(now - started)} ago)" if started else "since an unknown time"
        return (f"{self.root} is locked by job {d.get('job_id')} (host {d.get('host')}, pid {d.get('pid')}) "
                f"{since}; last heartbeat {_age(now - alive)} ago, ttl {ttl:g} s. If that job is dead, its "
                f"lease can be taken over in {_age(ttl - (now - alive))}, or delete {self.uri} by hand.")

    # -- lifecycle ----------------------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        """Take the lease, or raise :class:`LeaseHeld` at once when a live job holds it."""
        if self.token is not None:
            raise RuntimeError("lease already acquired")
        try:
            if isinstance(self._backend, _S3Backend):
                self._backend.probe()
            self._backend.cleanup(max(10 * self.ttl_s, 3600.0))
            self._acquire()
        except (LeaseHeld, StorageError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise _describe(exc, self.uri) from None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def _acquire(self) -> None:
        for _ in range(5):  # a few rounds: the lease may vanish or change while we look at it
            self.token, self.seq = uuid.uuid4().hex, 0
            now = time.time()
            self.started_at = now
            data = self._content(now)
            try:
                self._tag = self._backend.create(data)
                self._last_renewal = now
                log.info("lease %s acquired by job %s", redact(self.uri), self.job_id)
                return
            except FileExistsError:
                pass
            rec = self._backend.read()
            if rec is None:
                continue  # released in between: try again
            if self._is_mine(rec):  # our create landed but its reply was lost (retried PUT got 412)
                self._tag, self._last_renewal = rec.tag, now
                return
            now = time.time()
            if not self._is_stale(rec, now):
                raise LeaseHeld(self._held_message(rec, now), rec.data)
            try:
                self._tag = self._backend.take_over(data, rec)
            except _Conflict:
                cur = self._backend.read()
                if self._is_mine(cur):
                    self._tag, self._last_renewal = cur.tag, now
                    self.took_over = rec.data or {}
                    return
                if cur is not None and not self._is_stale(cur, time.time()):
                    raise LeaseHeld(self._held_message(cur, time.time()), cur.data) from None
                time.sleep(random.uniform(0.02, 0.1))  # another taker is at work: look again shortly
                continue
            self._last_renewal = now
            self.took_over = rec.data or {}
            d = rec.data or {}
            log.warning("%s", redact(f"lease {self.uri} taken over by job {self.job_id} from job {d.get('job_id')} "
                                     f"(host {d.get('host')}, pid {d.get('pid')}), silent for "
                                     f"{_age(now - self._last_alive(rec))}"))
            return
        raise LeaseHeld(f"{self.root}: could not acquire {self.uri}: it kept changing (several jobs starting?)")

    def renew(self) -> None:
        """One heartbeat (the thread calls this every ``heartbeat_s``); raises :class:`LeaseLost`."""
        with self._io:
            if self.token is None or self.lost:
                raise LeaseLost(self.lost_reason or "lease not held")
            self.seq += 1
            now = time.time()
            data = self._content(now)
            try:
                self._tag = self._backend.renew(data, self._tag or "", self.token)
            except _Conflict:
                cur = self._backend.read()
                if self._is_mine(cur):  # a retried PUT whose first attempt landed
                    self._tag = cur.tag
                else:
                    holder = self._held_message(cur, now) if cur is not None else f"{self.uri} was deleted"
                    self._mark_lost(f"lease on {self.root} lost: {holder}")
                    raise LeaseLost(self.lost_reason) from None
            self._last_renewal = now

    def _mark_lost(self, reason: str) -> None:
        """Record the loss; ``on_lost`` runs before ``lost`` turns true, so whoever sees ``lost`` also sees
        the callback's effects (a watcher polling ``lost`` never races the callback)."""
        self.lost_reason = redact(reason)
        log.error("%s", self.lost_reason)
        if self.on_lost is not None:
            try:
                self.on_lost(self.lost_reason)
            except Exception:  # noqa: BLE001
                log.exception("on_lost callback failed")
        self.lost = True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as exc:  # noqa: BLE001 - storage trouble: keep trying until the ttl runs out
                since = time.time() - self._last_renewal
                log.warning("%s", redact(f"lease heartbeat on {self.uri} failed ({type(exc).__name__}: {exc}); "
                                         f"last renewal {since:.0f} s ago"))
                if since > self.ttl_s:
                    self._mark_lost(f"lease on {self.root} expired: no heartbeat for {since:.0f} s "
                                    f"(ttl {self.ttl_s:g} s)")
                    return

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease was lost; call between stages of a job."""
        if self.lost:
            raise LeaseLost(self.lost_reason)
        if self.token is None:
            raise LeaseLost("lease not held")

    @property
    def held(self) -> bool:
        return self.token is not None and not self.lost

    def release(self) -> bool:
        """Stop the heartbeat and delete the lease if it is still ours; True when deleted."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.heartbeat_s))
        self._thread = None
        with self._io:
            if self.token is None:
                return False
            token, tag, self.token = self.token, self._tag or "", None
            if self.lost:
                return False
            try:
                deleted = self._backend.delete(tag, token)
            except Exception as exc:  # noqa: BLE001
                log.warning("%s", redact(f"could not release lease {self.uri}: {type(exc).__name__}: {exc}"))
                return False
        if deleted:
            log.info("lease %s released by job %s", redact(self.uri), self.job_id)
        else:
            log.warning("lease %s was no longer ours at release", redact(self.uri))
        return deleted

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_lease(root: str) -> dict[str, Any] | None:
    """The current lease record of ``root`` (None if unlocked), e.g. for a status command."""
    uri = RunLayout(root.rstrip("/")).lock
    fs, path = get_fs(uri)
    backend = _LocalBackend(path) if isinstance(fs, LocalFileSystem) else _S3Backend(uri)
    rec = backend.read()
    return None if rec is None else (rec.data or {})
