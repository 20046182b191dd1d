"""URIs through fsspec: local paths, ``file://`` and ``s3://`` (endpoint and credentials from the environment).

S3 settings come from the standard environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``) plus ``AWS_ENDPOINT_URL`` (or ``S3_ENDPOINT_URL``) for
S3-compatible servers. Credentials are never put into URIs, logs or error messages.
"""
from __future__ import annotations

import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


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
    return StorageError(redact(f"storage operation on {uri} failed: {msg}{hint}"))


def read_bytes(uri: str) -> bytes:
    """Whole object/file content; raises FileNotFoundError if missing, StorageError on other failures."""
    fs, path = get_fs(uri)
    try:
        return fs.cat_file(path)
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
            fs.pipe_file(path, data)
    except Exception as exc:  # noqa: BLE001
        raise _describe(exc, uri) from None


def exists(uri: str) -> bool:
    """Whether ``uri`` exists."""
    fs, path = get_fs(uri)
    try:
        return fs.exists(path)
    except Exception as exc:  # noqa: BLE001
        raise _describe(exc, uri) from None


def listdir(uri: str) -> list[str]:
    """Full URIs of the entries directly under ``uri`` ([] if it does not exist)."""
    fs, path = get_fs(uri)
    try:
        if not fs.exists(path):
            return []
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise _describe(exc, uri) from None
    return sorted(join(uri, n.rstrip("/").rsplit("/", 1)[-1]) for n in names)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file or, with ``recursive``, a folder; missing targets are fine."""
    fs, path = get_fs(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
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
