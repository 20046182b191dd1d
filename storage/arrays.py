"""Arrays and JSON documents in object storage, written atomically and read without pickle."""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from storage.uri import get_fs, is_local, read_bytes, write_bytes_atomic


def save_arrays(uri: str, **arrays: np.ndarray) -> None:
    """Save named arrays as one ``.npz`` (uncompressed, so local copies can be memory-mapped member-wise)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    write_bytes_atomic(uri, buf.getvalue())


def load_arrays(uri: str) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` written by :func:`save_arrays` (``allow_pickle=False``)."""
    with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise one array as ``.npy`` bytes (no pickle: object arrays are refused)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_from_bytes(data: bytes) -> np.ndarray:
    """Parse ``.npy`` bytes written by :func:`npy_bytes` (``allow_pickle=False``)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def save_npy(uri: str, array: np.ndarray) -> None:
    """Save one array as ``.npy`` (memory-mappable when local)."""
    write_bytes_atomic(uri, npy_bytes(array))


def load_npy(uri: str, mmap: bool = True) -> np.ndarray:
    """Load one ``.npy``; local files are memory-mapped read-only when ``mmap``."""
    if mmap and is_local(uri):
        _, path = get_fs(uri)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    return npy_from_bytes(read_bytes(uri))


def save_json(uri: str, obj: Any) -> None:
    """Atomically write ``obj`` as pretty JSON."""
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode())


def load_json(uri: str) -> Any:
    """Read a JSON document."""
    return json.loads(read_bytes(uri))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
