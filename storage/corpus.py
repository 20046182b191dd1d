"""Corpus input → manifest with stable image ids and deterministic shards.

Accepted sources: a folder (local path, ``file://`` or an ``s3://`` prefix; every non-hidden file is an
input, so broken or non-image files are reported rather than silently skipped), a text file with one URI per
line, or a Parquet manifest with a ``uri`` column (optional ``image_id``).
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import posixpath
from collections import Counter
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.uri import StorageError, _describe, get_fs, read_bytes

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("shard", pa.int32()),
    ("size", pa.int64()), ("version", pa.string()),
])

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _scheme_prefix(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""


def _list_folder(uri: str) -> list[tuple[str, str, int, str]]:
    """(relative path, uri, size, version) of every non-hidden file under a folder, recursively."""
    fs, root = get_fs(uri)
    root = root.rstrip("/")
    prefix = _scheme_prefix(uri)
    out = []
    for path, info in sorted(fs.find(root, detail=True, withdirs=False).items()):
        rel = posixpath.relpath(path, root)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
        out.append((rel, prefix + path, int(info.get("size") or 0), version.strip('"')))
    return out


def _stable_ids(names: list[str]) -> list[str]:
    """Ids from relative names: extension dropped unless that would make two ids equal."""
    stems = [posixpath.splitext(n)[0] for n in names]
    counts = Counter(stems)
    return [s if counts[s] == 1 else n for s, n in zip(stems, names)]


def list_corpus(source: str) -> pa.Table:
    """Manifest rows (image_id, uri, size, version) for a folder, URI list (.txt) or Parquet manifest.

    Store failures (rejected credentials, unreachable endpoint) become a :class:`StorageError` with a clear,
    credential-free message.
    """
    try:
        return _list_corpus(source)
    except (FileNotFoundError, ValueError, StorageError):
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. s3fs PermissionError on a wrong secret
        raise _describe(exc, source) from None


def _list_corpus(source: str) -> pa.Table:
    fs, path = get_fs(source)
    if fs.isdir(path):
        rows = _list_folder(source)
        ids = _stable_ids([r[0] for r in rows])
        uris = [r[1] for r in rows]
        sizes = [r[2] for r in rows]
        versions = [r[3] for r in rows]
    elif source.endswith(".parquet"):
        t = pq.read_table(io.BytesIO(read_bytes(source)))
        if "uri" not in t.column_names:
            raise ValueError(f"{source}: a Parquet manifest needs a 'uri' column")
        uris = t.column("uri").to_pylist()
        ids = t.column("image_id").to_pylist() if "image_id" in t.column_names else _stable_ids(
            [u.rsplit("/", 1)[-1] for u in uris])
        sizes = [-1] * len(uris)
        versions = [""] * len(uris)
    elif fs.isfile(path):
        lines = read_bytes(source).decode("utf-8").splitlines()
        uris = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        ids = _stable_ids([u.rsplit("/", 1)[-1] for u in uris])
        if len(set(ids)) != len(ids):
            ids = uris
        sizes = [-1] * len(uris)
        versions = [""] * len(uris)
    else:
        raise FileNotFoundError(f"corpus source not found: {source}")
    if len(set(ids)) != len(ids):
        dup = [k for k, v in Counter(ids).items() if v > 1][:5]
        raise ValueError(f"duplicate image ids in {source}: {dup}")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return pa.table({
        "image_id": pa.array([ids[i] for i in order], pa.string()),
        "uri": pa.array([uris[i] for i in order], pa.string()),
        "size": pa.array([sizes[i] for i in order], pa.int64()),
        "version": pa.array([versions[i] for i in order], pa.string()),
    })


def assign_shards(corpus: pa.Table, shard_size: int = 64, first_shard: int = 0) -> pa.Table:
    """Deterministic shards: images sorted by id, cut into consecutive chunks of ``shard_size``."""
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    corpus = corpus.sort_by("image_id")
    n = corpus.num_rows
    shards = pa.array([first_shard + i // shard_size for i in range(n)], pa.int32())
    t = corpus.append_column("shard", shards) if "shard" not in corpus.column_names else corpus.set_column(
        corpus.column_names.index("shard"), "shard", shards)
    return t.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def num_shards(corpus: pa.Table) -> int:
    """Number of distinct shards in a sharded manifest."""
    return 0 if corpus.num_rows == 0 else len(set(corpus.column("shard").to_pylist()))


def subset_ids(ids: list[str], limit: int | None, seed: int = 0) -> list[str]:
    """A deterministic sample of ``limit`` ids (all when None): ids ordered by a stable hash."""
    if limit is None or limit >= len(ids):
        return list(ids)
    keyed = sorted(ids, key=lambda s: hashlib.sha1(f"{seed}:{s}".encode()).hexdigest())
    return sorted(keyed[:limit])


def filter_ids(corpus: pa.Table, keep: set[str] | Sequence[str], invert: bool = False) -> pa.Table:
    """Rows of ``corpus`` whose ``image_id`` is in ``keep`` (not in it with ``invert``), order kept."""
    mask = pc.is_in(corpus.column("image_id"), value_set=pa.array(sorted(keep), pa.string()))
    return corpus.filter(pc.invert(mask) if invert else mask)


def select_subset(corpus: pa.Table, limit: int | None, include: Sequence[str] = (),
                  exclude: Sequence[str] = ()) -> pa.Table:
    """Images to index: ids matching an ``exclude`` glob dropped; with ``limit``, every id matching an
    ``include`` glob plus a stable sample of the others, ``limit`` in all."""
    if exclude:
        ids = corpus.column("image_id").to_pylist()
        corpus = filter_ids(corpus, {i for i in ids if not any(fnmatch.fnmatchcase(i, p) for p in exclude)})
    if limit is None:
        return corpus
    ids = corpus.column("image_id").to_pylist()
    must = {i for i in ids if any(fnmatch.fnmatchcase(i, pat) for pat in include)}
    rest = subset_ids([i for i in ids if i not in must], max(0, limit - len(must)))
    return filter_ids(corpus, must | set(rest))


def rows_by_shard(manifest: pa.Table) -> dict[int, list[dict[str, Any]]]:
    """Manifest rows grouped by shard number, shards in increasing order, rows in manifest order."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in manifest.to_pylist():
        out.setdefault(int(r["shard"]), []).append(r)
    return dict(sorted(out.items()))


def diff_corpus(previous: pa.Table, current: pa.Table) -> dict[str, set[str]]:
    """Ids that are new, deleted, or changed (same id, different URI, size or version) between two listings."""
    def key(t: pa.Table) -> dict[str, tuple]:
        return {i: (u, s, v) for i, u, s, v in zip(*(t.column(c).to_pylist() for c in ("image_id", "uri", "size",
                                                                                     "version")))}
    prev, cur = key(previous), key(current)
    return {"new": set(cur) - set(prev), "deleted": set(prev) - set(cur),
            "changed": {i for i in set(prev) & set(cur) if prev[i] != cur[i]}}


__all__ = ["diff_corpus", "MANIFEST_SCHEMA", "list_corpus", "assign_shards", "num_shards", "subset_ids", "filter_ids",
           "select_subset", "rows_by_shard"]
