"""URIs through fsspec: local paths, ``file://`` and ``s3://`` (endpoint and credentials from the environment).

S3 settings come from the standard environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``) plus ``AWS_ENDPOINT_URL`` (or ``S3_ENDPOINT_URL``) for
S3-compatible servers. Credentials are never put into URIs, logs or error messages.

Transient object-store errors (503 / SlowDown / RequestTimeout / InternalError, connection resets, an endpoint
that is briefly unreachable) are retried by :func:`retry_call` with exponential backoff and jitter:
``INDEXER_S3_RETRIES`` attempts in all (default 6), the n-th wait drawn from
``[0.5, 1] * min(INDEXER_S3_RETRY_MAX_S, INDEXER_S3_RETRY_BASE_S * 2**n)`` (defaults 0.2 s and 20 s: 3-6 s
of waiting in all before giving up). Local files are never retried, nor is :func:`check_access` (a wrong
endpoint or key at start-up should fail at once).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

try:  # botocore and aiohttp come with s3fs; without them there is no S3 and nothing to classify
    import aiohttp
    import botocore.exceptions as _bce
except ImportError:  # pragma: no cover
    aiohttp = None
    _bce = None

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage operation failed (clear message, no credentials)."""


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri``: for s3, the endpoint from the environment; credentials via botocore's chain."""
    if uri.startswith(("s3://", "s3a://")):
        opts: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
            opts["config_kwargs"] = {"s3": {"addressing_style": "path"}}
        opts["skip_instance_cache"] = True
        return opts
    return {}


_S3_FS: dict[tuple, fsspec.AbstractFileSystem] = {}


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and in-filesystem path for ``uri``.

    S3 filesystems are reused per process, endpoint and credentials: creating one (a botocore session and
    client) costs ~0.5-2 s, which made every read/write of a shard pay it. Directory listings are never
    cached, so a marker written by another worker is seen at once.
    """
    if uri.startswith("s3a://"):
        uri = "s3://" + uri[len("s3a://"):]
    if uri.startswith("s3://"):
        opts = storage_options(uri)
        key = (os.getpid(), repr(sorted(opts.items())), *(os.environ.get(v) for v in (
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE")))
        fs = _S3_FS.get(key)
        if fs is None:
            fs = fsspec.filesystem("s3", use_listings_cache=False, **opts)
            _S3_FS[key] = fs
        return fs, fs._strip_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return isinstance(get_fs(uri)[0], LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join URI path parts with ``/`` (keeps the scheme)."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + str(p).strip("/")
    return out


def redact(text: str) -> str:
    """Remove anything that looks like credentials from a URI or message before logging."""
    text = re.sub(r"(//)[^/@\s]+@", r"\1***@", text)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        val = os.environ.get(var)
        if val:
            text = text.replace(val, "***")
    return text


# ------------------------------------------------------------------------------------------------------------
# retries of transient object-store errors
# ------------------------------------------------------------------------------------------------------------
# Why a layer on top of botocore's and s3fs's own retries (botocore 1.43 / aiobotocore 3.10 / s3fs 2026.9):
# - botocore ("legacy" mode, the default) makes 5 attempts with random exponential waits (<= 1, 2, 4, 8 s)
#   for 500/502/503/504/509/429, throttling codes, RequestTimeout and connection errors. A SlowDown burst or a
#   restarting server that lasts longer than that surfaces to us.
# - s3fs's _error_wrapper (5 attempts, 0.1 * 1.7**i s: about 1 s of waiting in all) retries only
#   socket/HTTP-client errors (incl. a reset while reading a body: aiobotocore raises ResponseStreamingError)
#   and ClientErrors whose text contains "SlowDown"; "ServiceUnavailable"/503, "InternalError" and
#   EndpointConnectionError are not retried there. It then turns the error into a plain OSError
#   (SlowDown/503 -> EBUSY, 500 -> EREMOTEIO, RequestTimeout -> TimeoutError), so callers cannot tell it from
#   a permanent one without looking at the cause.
# - our operations are several requests (listdir = exists + ls, remove = exists + rm): one transient failure
#   in the middle should redo the operation, not fail the shard.
# Here the whole operation is retried, on top, only for errors classified as transient; 403/credentials,
# NoSuchBucket, missing keys and bad requests fail at once with their clear message.
RETRIES_ENV = "INDEXER_S3_RETRIES"
RETRY_BASE_ENV = "INDEXER_S3_RETRY_BASE_S"
RETRY_MAX_ENV = "INDEXER_S3_RETRY_MAX_S"
DEFAULT_RETRIES, DEFAULT_RETRY_BASE_S, DEFAULT_RETRY_MAX_S = 6, 0.2, 20.0

_TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestThrottled",
    "BandwidthLimitExceeded", "OperationAborted", "500", "502", "503", "504",
}
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
# s3fs's translation of SlowDown/ServiceUnavailable/503/409 (EBUSY) and InternalError/500 (EREMOTEIO)
_TRANSIENT_ERRNOS = {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)}


def retry_settings() -> tuple[int, float, float]:
    """(attempts, base delay s, max delay s) from the environment (read at every call, so tests can set them)."""
    def num(var: str, default: float, cast: type) -> Any:
        raw = os.environ.get(var, "").strip()
        try:
            return cast(raw) if raw else default
        except ValueError:
            raise StorageError(f"{var}={raw!r} is not a number") from None
    return (max(1, num(RETRIES_ENV, DEFAULT_RETRIES, int)), max(0.0, num(RETRY_BASE_ENV, DEFAULT_RETRY_BASE_S, float)),
            max(0.0, num(RETRY_MAX_ENV, DEFAULT_RETRY_MAX_S, float)))


def _client_error_transient(exc: BaseException) -> bool | None:
    """For a botocore ClientError: whether its code/HTTP status is transient; None for other exceptions."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying (throttling, 5xx, timeouts, dropped connections).

    Never: missing objects/buckets, permission or credential errors, existing objects (conditional writes),
    bad requests. The exception's cause chain is inspected because s3fs re-raises ClientErrors as OSErrors.
    """
    if isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError,
                        NotADirectoryError)):
        return False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        verdict = _client_error_transient(e)
        if verdict is not None:
            return verdict
        if isinstance(e, (ConnectionError, TimeoutError)):  # resets, refused, aborted, broken pipe, timeouts
            return True
        if _bce is not None and isinstance(e, (_bce.ConnectionError, _bce.HTTPClientError,
                                               _bce.IncompleteReadError)):
            return True  # EndpointConnectionError, ConnectionClosedError, ResponseStreamingError, timeouts
        if aiohttp is not None and isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
        if type(e) is OSError and e.errno in _TRANSIENT_ERRNOS:  # s3fs's translation, cause not kept
            return True
        # explicit causes always; the implicit context only of OSErrors (s3fs raises its translations inside
        # `except ClientError` without a cause), so a bug raised while handling a reset is not retried
        e = e.__cause__ if e.__cause__ is not None else (
            e.__context__ if isinstance(e, OSError) and not e.__suppress_context__ else None)
    return False


def retry_call(fn: Callable[[], T], uri: str, what: str = "operation") -> T:
    """``fn()`` retried on transient errors (see :func:`is_transient`) for object-store URIs.

    Local paths are called once. The last error propagates unchanged (callers convert it to a
    :class:`StorageError`); it gets an ``attempts`` attribute. Each retry logs one debug line (redacted).
    """
    if "://" not in uri or uri.startswith("file://"):
        return fn()
    attempts, base, cap = retry_settings()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except BaseException as exc:  # re-raised unless transient and attempts are left
            if attempt >= attempts or not isinstance(exc, Exception) or not is_transient(exc):
                if attempt > 1:
                    try:
                        exc.attempts = attempt  # type: ignore[attr-defined]
                    except AttributeError:
                        pass
                raise
            delay = min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.debug("%s", redact(f"transient error in {what} on {uri} (attempt {attempt}/{attempts}): "
                                   f"{type(exc).__name__}: {exc}; retrying in {delay:.2f} s"))
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _describe(exc: BaseException, uri: str) -> StorageError:
    msg = f"{type(exc).__name__}: {exc}"
    hint = ""
    low = msg.lower()
    remote = "://" in uri and not uri.startswith("file://")
    # s3fs turns SignatureDoesNotMatch / InvalidAccessKeyId into a PermissionError carrying only the message
    if (remote and isinstance(exc, PermissionError)) or any(s in low for s in (
            "invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden", "403",
            "signature we calculated", "access key id you provided")):
        hint = " (the credentials were rejected: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy)"
    elif "nosuchbucket" in low:
        hint = " (the bucket does not exist)"
    elif "could not connect" in low or "connect" in low and "endpoint" in low:
        hint = " (check AWS_ENDPOINT_URL)"
    attempts = getattr(exc, "attempts", 1)
    if attempts > 1:
        hint += f" (gave up after {attempts} attempts; {RETRIES_ENV} sets the number)"
    return StorageError(redact(f"storage operation on {uri} failed: {msg}{hint}"))


def read_bytes(uri: str) -> bytes:
    """Whole object/file content; raises FileNotFoundError if missing, StorageError on other failures."""
    fs, path = get_fs(uri)
    try:
        return retry_call(lambda: fs.cat_file(path), uri, "read")
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - converted to a clear error
        raise _describe(exc, uri) from None


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old content or all of the new one.

    Local files: write a sibling temp file, fsync, ``os.replace``. Object stores: a single PUT is atomic.
    """
    fs, path = get_fs(uri)
    try:
        if isinstance(fs, LocalFileSystem):
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            retry_call(lambda: fs.pipe_file(path, data), uri, "write")  # a PUT of the same bytes is idempotent
    except Exception as exc:  # noqa: BLE001
        raise _describe(exc, uri) from None


def exists(uri: str) -> bool:
    """Whether ``uri`` exists."""
    fs, path = get_fs(uri)
    try:
        return retry_call(lambda: fs.exists(path), uri, "exists")
    except Exception as exc:  # noqa: BLE001
        raise _describe(exc, uri) from None


def listdir(uri: str) -> list[str]:
    """Full URIs of the entries directly under ``uri`` ([] if it does not exist)."""
    fs, path = get_fs(uri)

    def ls() -> list[str]:
        fs.invalidate_cache(path)  # s3fs keeps listings per process: a listing must see what others wrote since
        if not fs.exists(path):
            return []
        return fs.ls(path, detail=False)

    try:
        names = retry_call(ls, uri, "listdir")
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise _describe(exc, uri) from None
    # some S3 servers (SeaweedFS) keep an emptied folder as a "<folder>/" object, which lists as the folder itself
    own = path.rstrip("/")
    return sorted(join(uri, n.rstrip("/").rsplit("/", 1)[-1]) for n in names if n.rstrip("/") != own)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file or, with ``recursive``, a folder; missing targets are fine."""
    fs, path = get_fs(uri)

    def rm() -> None:
        try:
            if fs.exists(path):
                fs.rm(path, recursive=recursive)
        except FileNotFoundError:  # gone meanwhile (or removed by an attempt whose reply was lost)
            pass

    try:
        retry_call(rm, uri, "remove")
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise _describe(exc, uri) from None


def check_access(uri: str) -> None:
    """Fail early with a clear StorageError when ``uri``'s store rejects us (bad credentials, no bucket)."""
    fs, path = get_fs(uri)
    try:
        if isinstance(fs, LocalFileSystem):
            os.makedirs(path, exist_ok=True)
            return
        bucket = path.split("/", 1)[0]
        fs.ls(bucket, detail=False)
    except Exception as exc:  # noqa: BLE001
        raise _describe(exc, uri) from None
