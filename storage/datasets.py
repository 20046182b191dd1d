"""Retrieval benchmark datasets: Revisited Oxford / Paris (+ R1M distractors) and the museum-landmarks layout.

Layouts (the same as filipradenovic/revisitop ``python/dataset.py`` ``configdataset``):

* ``<root>/gnd_<name>.pkl`` (official Revisited Oxford / Paris ground truth) or ``<root>/gnd.json``
  (museum-landmarks): a mapping with ``imlist`` (database ids, database order), ``qimlist`` (query ids) and
  ``gnd`` (one dict per query: ``easy`` / ``hard`` / ``junk`` database indices, ``bbx`` query box
  ``[x0, y0, x1, y1]`` in pixels or null for the whole image, plus any extra keys such as ``group``).
* images at ``<root>/jpg/<id>.jpg`` (queries live in the same folder).
* R1M distractors: ``revisitop1m.txt`` lists paths relative to ``<r1m root>/jpg`` (extension included).

The official ``.pkl`` is read with a restricted unpickler: only the few numpy callables needed to rebuild
arrays / scalars are allowed; every other global (``os.system``, ``builtins.eval``, ...) is refused, so a
tampered file cannot run code. Plain dicts, lists, strings and numbers need no globals at all.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pickle
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from storage.uri import get_fs, join, read_bytes

# R1M size per the revisitop paper / README: 1,001,001 distractor images
REVISITOP1M_SIZE = 1_001_001


class DatasetError(ValueError):
    """A ground-truth or list file is malformed or refers to something it should not."""


class UnsafePickleError(pickle.UnpicklingError, DatasetError):
    """The pickle asked for a global outside the allow-list."""


# ----------------------------------------------------------------------------------------- restricted pickle
@functools.lru_cache(maxsize=1)
def _numpy_callables() -> dict[tuple[str, str], Callable[..., Any]]:
    """The numpy objects that array / scalar / dtype pickles reference, under numpy 1.x and 2.x module names."""
    try:  # numpy >= 2
        from numpy._core import multiarray as _ma
        from numpy._core import numeric as _num
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
        from numpy.core import numeric as _num  # type: ignore[no-redef]
    table: dict[tuple[str, str], Callable[..., Any]] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        table[(f"{mod}.multiarray", "_reconstruct")] = _ma._reconstruct
        table[(f"{mod}.multiarray", "scalar")] = _ma.scalar
        if hasattr(_num, "_frombuffer"):
            table[(f"{mod}.numeric", "_frombuffer")] = _num._frombuffer
    return table


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it; only str -> latin-1 is allowed."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin-1", errors)


def _safe_bytes(*args: Any) -> bytes:
    """``bytes`` as protocol-2 pickles use it for empty bytes; no size-allocating forms."""
    if not args:
        return b""
    if isinstance(args[0], (bytes, bytearray)) and len(args) == 1:
        return bytes(args[0])
    raise UnsafePickleError("refused bytes(...) call in pickle")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only resolves numpy array/scalar/dtype reconstruction helpers."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see class docstring
        allowed = _numpy_callables()
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        if module in ("builtins", "__builtin__") and name == "bytes":
            return _safe_bytes
        raise UnsafePickleError(f"refused global {module}.{name} in pickle")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` allowing only plain containers, numbers, strings and numpy arrays / scalars."""
    obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    _reject_object_arrays(obj)
    return obj


def _reject_object_arrays(obj: Any, depth: int = 0) -> None:
    """Object-dtype arrays are never part of the ground truth; refuse them (and absurd nesting)."""
    if depth > 20:
        raise DatasetError("ground truth nested too deeply")
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise UnsafePickleError("refused object-dtype array in pickle")
    if isinstance(obj, dict):
        for v in obj.values():
            _reject_object_arrays(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _reject_object_arrays(v, depth + 1)


# ----------------------------------------------------------------------------------------------- dataset
@dataclass
class Dataset:
    """A retrieval benchmark: database ids, query ids, per-query ground truth, and where the images are.

    Database indices in ``gnd`` refer to ``images``; distractors (if any) are appended after them, so the
    database index ``len(images) + j`` is distractor ``j`` and is a negative for every query.
    """

    name: str
    root: str
    images: list[str]
    queries: list[str]
    gnd: list[dict[str, Any]]
    image_root: str | None = None  # folder of database and query images; default <root>/jpg
    ext: str = ".jpg"
    qext: str = ".jpg"
    distractors: list[str] = field(default_factory=list)
    distractor_root: str | None = None  # folder the distractor list's relative paths start from
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_root is None:
            self.image_root = join(self.root, "jpg")

    @property
    def n_images(self) -> int:
        """Database size including distractors."""
        return len(self.images) + len(self.distractors)

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        return len(self.queries)

    def image_id(self, i: int) -> str:
        """Database id of index ``i`` (distractors keep their list path)."""
        if i < 0 or i >= self.n_images:
            raise IndexError(f"database index {i} out of range [0, {self.n_images})")
        n = len(self.images)
        return self.images[i] if i < n else self.distractors[i - n]

    def image_path(self, i: int) -> str:
        """Path / URI of database image ``i``."""
        n = len(self.images)
        if 0 <= i < n:
            return join(str(self.image_root), self.images[i] + self.ext)
        name = self.image_id(i)
        if self.distractor_root is None:
            raise DatasetError("distractors were added without a distractor_root")
        return join(self.distractor_root, name)

    def image_paths(self) -> list[str]:
        """Paths of the whole database, in database order."""
        return [self.image_path(i) for i in range(self.n_images)]

    def query_path(self, i: int) -> str:
        """Path / URI of query image ``i`` (uncropped)."""
        return join(str(self.image_root), self.queries[i] + self.qext)

    def query_bbox(self, i: int) -> tuple[float, float, float, float] | None:
        """Query box ``(x0, y0, x1, y1)`` in pixels of the query image, or None for the whole image."""
        bbx = self.gnd[i].get("bbx")
        if bbx is None:
            return None
        b = np.asarray(bbx, dtype=np.float64).ravel()
        return (float(b[0]), float(b[1]), float(b[2]), float(b[3]))

    def with_distractors(self, names: list[str], distractor_root: str) -> "Dataset":
        """Copy with ``names`` (relative to ``distractor_root``) appended to the database as negatives."""
        return dataclasses.replace(self, distractors=list(names), distractor_root=distractor_root)


def _index_array(value: Any, n_db: int, what: str) -> np.ndarray:
    """Database indices as a 1-D int64 array, checked to be whole numbers inside ``[0, n_db)``."""
    try:
        arr = np.asarray([] if value is None else value)
        whole = arr.size == 0 or np.issubdtype(arr.dtype, np.integer) or bool(np.all(np.mod(arr, 1) == 0))
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise DatasetError(f"{what}: database indices must be integers")
    arr = arr.astype(np.int64).ravel()
    if arr.size and (arr.min() < 0 or arr.max() >= n_db):
        raise DatasetError(f"{what}: index out of range [0, {n_db})")
    return arr


def _normalise(raw: Any, name: str, root: str, source: str) -> Dataset:
    """Validate a ground-truth mapping and turn it into a :class:`Dataset` (indices as int64 arrays)."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in raw:
            raise DatasetError(f"{source}: missing {key!r}")
    images = [str(x) for x in raw["imlist"]]
    queries = [str(x) for x in raw["qimlist"]]
    for ident in images + queries:
        if ident.startswith("/") or ".." in ident.split("/") or "\\" in ident:
            raise DatasetError(f"{source}: unsafe image id {ident!r}")
    if len(raw["gnd"]) != len(queries):
        raise DatasetError(f"{source}: {len(raw['gnd'])} gnd entries for {len(queries)} queries")
    gnd = []
    for qi, g in enumerate(raw["gnd"]):
        if not isinstance(g, dict):
            raise DatasetError(f"{source}: gnd[{qi}] is not a mapping")
        entry = dict(g)
        for key in ("easy", "hard", "junk", "ok"):
            if key in g:
                entry[key] = _index_array(g[key], len(images), f"{source}: gnd[{qi}][{key!r}]")
        for key in ("easy", "hard", "junk"):
            entry.setdefault(key, np.empty(0, dtype=np.int64))
        bbx = g.get("bbx")
        if bbx is not None:
            b = np.asarray(bbx, dtype=np.float64).ravel()
            if b.size != 4 or not np.all(np.isfinite(b)) or b[2] <= b[0] or b[3] <= b[1]:
                raise DatasetError(f"{source}: gnd[{qi}]['bbx'] must be [x0, y0, x1, y1] with x0 < x1, y0 < y1")
            entry["bbx"] = tuple(float(v) for v in b)
        else:
            entry["bbx"] = None
        gnd.append(entry)
    meta = {k: v for k, v in raw.items() if k not in ("imlist", "qimlist", "gnd")}
    return Dataset(
        name=name, root=root, images=images, queries=queries, gnd=gnd, image_root=resolve_image_root(root), meta=meta
    )


def resolve_image_root(root: str, folder: str = "jpg") -> str:
    """``<root>/jpg``, following a relative link to another folder.

    museum-landmarks' ``in-photos/jpg`` and ``no-box/jpg`` are links ``-> ../jpg``; copies that do not keep
    symlinks (object stores, some archivers) store them as a tiny text file holding the target, which is
    followed here when it names a folder at or below the dataset's parent.
    """
    base = join(root, folder)
    fs, path = get_fs(base)
    try:
        if not fs.isfile(path) or fs.size(path) > 256:
            return base
        target = fs.cat_file(path).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return base
    if not target or target.startswith("/") or "\\" in target or "\n" in target:
        return base
    if "://" in root:
        scheme, rest = root.split("://", 1)
        resolved = f"{scheme}://" + posixpath.normpath(posixpath.join(rest, target))
    else:
        resolved = os.path.normpath(os.path.join(root, target))
    parent = _dirname(root)
    if not resolved.startswith(parent.rstrip("/") + "/"):
        return base
    return resolved


def _dirname(uri: str) -> str:
    """Folder of a file URI (absolute for local paths)."""
    return posixpath.dirname(uri.rstrip("/")) if "://" in uri else os.path.dirname(os.path.abspath(uri))


def load_gnd_json(path_or_uri: str, name: str | None = None) -> Dataset:
    """Dataset from a museum-landmarks style ``gnd.json``; images under ``<folder of the json>/jpg``."""
    try:
        raw = json.loads(read_bytes(path_or_uri).decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path_or_uri}: not valid JSON ({exc})") from None
    root = _dirname(path_or_uri)
    return _normalise(raw, name or posixpath.basename(root.rstrip("/")), root, path_or_uri)


def load_revisitop_pkl(path_or_uri: str, name: str | None = None) -> Dataset:
    """Dataset from an official ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (restricted unpickling)."""
    try:
        raw = restricted_loads(read_bytes(path_or_uri))
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path_or_uri}: unreadable ground-truth pickle ({exc})") from None
    base = posixpath.basename(path_or_uri.rstrip("/"))
    if name is None:
        name = base[len("gnd_"):-len(".pkl")] if base.startswith("gnd_") and base.endswith(".pkl") else base
    return _normalise(raw, name, _dirname(path_or_uri), path_or_uri)


def load_dataset(path_or_uri: str, name: str | None = None) -> Dataset:
    """Dispatch on the ground-truth file's extension (``.json`` or ``.pkl``)."""
    if path_or_uri.endswith(".json"):
        return load_gnd_json(path_or_uri, name)
    if path_or_uri.endswith(".pkl"):
        return load_revisitop_pkl(path_or_uri, name)
    raise DatasetError(f"{path_or_uri}: expected a gnd .json or .pkl file")


def load_revisitop(name: str, data_root: str) -> Dataset:
    """``roxford5k`` / ``rparis6k`` from ``<data_root>/<name>/gnd_<name>.pkl`` (the download job's layout)."""
    name = name.lower()
    if name not in ("roxford5k", "rparis6k"):
        raise DatasetError(f"unknown revisitop dataset {name!r}")
    return load_revisitop_pkl(join(data_root, name, f"gnd_{name}.pkl"), name)


def load_distractor_list(path_or_uri: str) -> list[str]:
    """Relative image paths of the R1M distractor list (``revisitop1m.txt``), one per non-empty line."""
    text = read_bytes(path_or_uri).decode("utf-8")
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n]
    for n in names:
        if n.startswith("/") or ".." in n.split("/") or "\\" in n:
            raise DatasetError(f"{path_or_uri}: unsafe path {n!r} in distractor list")
    return names


def load_revisitop1m(data_root: str) -> tuple[list[str], str]:
    """R1M distractor names and the folder they are relative to (``<data_root>/revisitop1m/{revisitop1m.txt,jpg}``).

    Use as ``dataset.with_distractors(*load_revisitop1m(data_root))``.
    """
    names = load_distractor_list(join(data_root, "revisitop1m", "revisitop1m.txt"))
    return names, join(data_root, "revisitop1m", "jpg")
