"""Storage backends of :mod:`storage.lease`: atomic create / compare-and-replace / delete of the lease file on a
local filesystem (link + rename + marker files) and on S3 (conditional PUT / DELETE with If-None-Match / If-Match).
The protocols are described in :mod:`storage.lease`."""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any


from storage.uri import StorageError, get_fs, redact, retry_call

log = logging.getLogger("storage.lease")


class LeaseHeld(RuntimeError):
    """Another live job holds the lease; ``holder`` is its lease record (job id, host, pid, ...)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class LeaseLost(RuntimeError):
    """The lease was taken over (or could not be renewed within its ttl) while this job held it."""


class _Conflict(Exception):
    """A conditional write did not apply: the lease changed under us."""


@dataclass
class _Record:
    """What a read of LOCK.json returned."""

    raw: bytes
    tag: str          # ETag (S3) or sha256 of the content (local): identifies this exact version
    mtime: float      # store's modification time (unix seconds)
    data: dict[str, Any] | None  # parsed JSON; None when unreadable (a create still being written)


def _now_iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _parse_iso(s: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(s).replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return None


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

# ------------------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------------------
class _LocalBackend:
    def __init__(self, path: str) -> None:
        self.path = path
        self.dir = os.path.dirname(path) or "."

    def _tmp(self, data: bytes) -> str:
        os.makedirs(self.dir, exist_ok=True)
        tmp = os.path.join(self.dir, f".{os.path.basename(self.path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _link_in(self, data: bytes) -> None:
        """Create ``self.path`` with ``data`` only if absent (FileExistsError otherwise)."""
        tmp = self._tmp(data)
        try:
            os.link(tmp, self.path)
            return
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        finally:
            os.unlink(tmp)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # no hard links here
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _tag(raw: bytes) -> str:
        return hashlib.sha256(raw).hexdigest()

    def read(self) -> _Record | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        return _Record(raw, self._tag(raw), mtime, data if isinstance(data, dict) else None)

    def create(self, data: bytes) -> str:
        self._link_in(data)
        return self._tag(data)

    def _marker(self, key: str) -> str:
        return f"{self.path}.takeover-{key}"

    def _move_away(self, expected_tag: str, what: str) -> str:
        """Rename the lease to a private name; if it is not ``expected_tag``, put it back and conflict."""
        moved = f"{self.path}.{what}-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            raise _Conflict("the lease disappeared") from None
        with open(moved, "rb") as f:
            tag = self._tag(f.read())
        if tag != expected_tag:
            try:
                os.link(moved, self.path)  # put back; fails only if a new lease appeared meanwhile
            except FileExistsError:
                log.error("lease %s changed while being replaced; the previous holder will find it lost",
                          self.path)
            os.unlink(moved)
            raise _Conflict("the lease changed")
        return moved

    def take_over(self, data: bytes, stale: _Record) -> str:
        key = str((stale.data or {}).get("token") or stale.tag[:16])
        marker = self._marker(key)
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            # another process is taking this lease over (it takes milliseconds); a marker older than the
            # ttl was left by a taker that died half-way: remove it so that the next round can proceed
            # (the rename-and-compare step below still keeps two takers from both winning)
            try:
                if time.time() - os.stat(marker).st_mtime > float((stale.data or {}).get("ttl_s") or 60):
                    os.unlink(marker)
            except FileNotFoundError:
                pass
            raise _Conflict("another process is taking the lease over") from None
        os.close(fd)
        moved = self._move_away(stale.tag, "stale")
        try:
            self._link_in(data)
        except FileExistsError:
            raise _Conflict("a new lease was created during the take-over") from None
        finally:
            os.unlink(moved)
        return self._tag(data)

    def renew(self, data: bytes, mine: str, token: str) -> str:
        if os.path.exists(self._marker(token)):
            raise _Conflict("the lease was taken over")
        cur = self.read()
        if cur is None or cur.tag != mine:
            raise _Conflict("the lease was replaced")
        os.replace(self._tmp(data), self.path)
        return self._tag(data)

    def delete(self, mine: str, token: str) -> bool:
        if os.path.exists(self._marker(token)):
            return False
        cur = self.read()
        if cur is None or cur.tag != mine:
            return False
        try:
            os.unlink(self._move_away(mine, "released"))
        except _Conflict:
            return False
        return True

    def cleanup(self, older_than_s: float) -> None:
        """Remove take-over markers and leftovers older than ``older_than_s``."""
        base = os.path.basename(self.path)
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        now = time.time()
        for n in names:
            if n.startswith((base + ".takeover-", base + ".stale-", base + ".released-", "." + base + ".")):
                p = os.path.join(self.dir, n)
                try:
                    st = os.stat(p)
                    # ctime too: a lease renamed aside by a take-over in progress keeps its old mtime
                    if now - max(st.st_mtime, st.st_ctime) > older_than_s:
                        os.unlink(p)
                except FileNotFoundError:
                    pass


_PROBED: dict[tuple[str, str], bool] = {}
_PROBE_LOCK = threading.Lock()


def _precondition_failed(exc: BaseException) -> bool:
    """412 PreconditionFailed / 409 ConditionalRequestConflict, through s3fs's translation."""
    e: BaseException | None = exc
    while e is not None:
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and "Error" in resp:
            code = str(resp["Error"].get("Code", ""))
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status in (409, 412)
        if isinstance(e, FileExistsError):  # s3fs: PreconditionFailed with Condition If-None-Match
            return True
        e = e.__cause__ or e.__context__
    return False


class _S3Backend:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, path = get_fs(uri)
        self.bucket, self.key = path.split("/", 1)

    def _call(self, method: str, what: str, **kw: Any) -> Any:
        return retry_call(lambda: self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kw), self.uri, what)

    def probe(self) -> None:
        """Check once per process and bucket that the server honours ``If-Match`` (see module docstring)."""
        ident = (str(self.fs.client_kwargs.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "aws"),
                 self.bucket)
        with _PROBE_LOCK:
            if _PROBED.get(ident):
                return
            key = f"{self.key.rsplit('/', 1)[0]}/.lease-probe-{uuid.uuid4().hex}" if "/" in self.key else \
                f".lease-probe-{uuid.uuid4().hex}"
            try:
                retry_call(lambda: self.fs.call_s3("put_object", Bucket=self.bucket, Key=key, Body=b"probe",
                                                   IfMatch='"0123456789abcdef0123456789abcdef"'),
                           self.uri, "conditional-write probe")
            except FileNotFoundError:
                pass  # 404 NoSuchKey: If-Match on a missing key (AWS, moto)
            except Exception as exc:  # noqa: BLE001
                if not _precondition_failed(exc):
                    raise
            else:
                try:
                    self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key)
                finally:
                    raise StorageError(redact(
                        f"the S3 server behind {self.uri} ignores conditional writes (If-Match), so leases "
                        "there would not be exclusive; use a server that supports them (AWS S3, SeaweedFS >= 4, "
                        "MinIO, Ceph RGW)"))
            _PROBED[ident] = True

    def read(self) -> _Record | None:
        async def get() -> tuple[bytes, dict[str, Any]]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                body = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return body, resp

        from fsspec.asyn import sync

        try:
            raw, resp = retry_call(lambda: sync(self.fs.loop, get), self.uri, "read lease")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        lm = resp.get("LastModified")
        mtime = lm.timestamp() if hasattr(lm, "timestamp") else 0.0
        return _Record(raw, str(resp.get("ETag", "")), mtime, data if isinstance(data, dict) else None)

    def _put(self, data: bytes, what: str, **cond: str) -> str:
        try:
            return str(self._call("put_object", what, Body=data, **cond).get("ETag", ""))
        except Exception as exc:  # noqa: BLE001
            if _precondition_failed(exc):
                raise _Conflict(what) from None
            if isinstance(exc, FileNotFoundError) and "IfMatch" in cond:  # If-Match on a deleted key (AWS/moto)
                raise _Conflict(what) from None
            raise

    def create(self, data: bytes) -> str:
        try:
            return self._put(data, "create lease", IfNoneMatch="*")
        except _Conflict:
            raise FileExistsError(self.uri) from None

    def take_over(self, data: bytes, stale: _Record) -> str:
        return self._put(data, "take over lease", IfMatch=stale.tag)

    def renew(self, data: bytes, mine: str, token: str) -> str:
        return self._put(data, "renew lease", IfMatch=mine)

    def delete(self, mine: str, token: str) -> bool:
        cur = self.read()
        if cur is None or cur.tag != mine:
            return False
        try:
            self._call("delete_object", "release lease", IfMatch=mine)
        except FileNotFoundError:
            return True
        except Exception as exc:  # noqa: BLE001
            if _precondition_failed(exc):
                # someone else's lease now, or our DELETE landed and its retry found nothing to match
                return self.read() is None
            raise
        return True

    def cleanup(self, older_than_s: float) -> None:
        pass  # S3 leaves nothing behind
