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


class NpyFile:
    """A local ``.npy`` file read lazily: ``shape``, ``dtype``, ``len()``, row ranges ``[a:b]`` and single rows read
    from the file when asked, ``np.asarray`` for the whole array. Unlike a memory map it holds no file descriptor,
    so a merge can keep thousands of them open (a memory map keeps one descriptor each; processes get ~20,000)."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: only C-ordered arrays without objects can be read lazily")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def _rows(self, a: int, b: int) -> np.ndarray:
        b = max(a, b)
        with open(self.path, "rb") as f:
            f.seek(self.offset + a * self.row_bytes)
            data = f.read((b - a) * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((b - a,) + self.shape[1:])

    def __getitem__(self, key: Any) -> Any:
        if self.shape and isinstance(key, slice) and key.step in (None, 1):
            a, b, _ = key.indices(len(self))
            return self._rows(a, b)
        if self.shape and isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(key)
            return self._rows(i, i + 1)[0]
        return np.asarray(self)[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            a = np.frombuffer(f.read(self.nbytes), dtype=self.dtype).reshape(self.shape)
        return a if dtype is None else a.astype(dtype)


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
