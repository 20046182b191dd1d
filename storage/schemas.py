"""Versioned Parquet schemas of the tables and conversions between descriptor columns and numpy.

Descriptors are ``fixed_size_list<float16|float32|int8>[d]`` columns; one Parquet file holds one width ``d`` per
descriptor column. ``int8`` (the keypoints table's default) stores a direction: each row is scaled by
``127 / max_i |x_i|`` and rounded, and readers return it L2-normalised (:func:`descriptors_to_numpy`), so it is only
for descriptors that are compared by cosine (keypoint descriptors are unit rows by contract).
The schema version and table name are stored in the Parquet key-value metadata so readers
can refuse files written by an incompatible version.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
TABLES = ("images", "regions", "globals", "locals", "keypoints", "errors")
DTYPES = {"float16": pa.float16(), "float32": pa.float32(), "int8": pa.int8()}
KEYPOINT_ROW_GROUP = 1024  # rows per row group of a keypoints file: a reader fetches an image's rows, not the file


def _meta(table: str) -> dict[bytes, bytes]:
    return {b"schema_version": str(SCHEMA_VERSION).encode(), b"table": table.encode()}


def descriptor_type(dim: int, dtype: str = "float16") -> pa.DataType:
    """Arrow type of a descriptor column of width ``dim``."""
    if dtype not in DTYPES:
        raise ValueError(f"descriptor dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return pa.list_(DTYPES[dtype], dim)


def images_schema(channels: int) -> pa.Schema:
    """One row per successfully processed image."""
    return pa.schema([
        ("image_id", pa.string()), ("uri", pa.string()), ("shard", pa.int32()),
        ("width", pa.int32()), ("height", pa.int32()),
        ("proc_width", pa.int32()), ("proc_height", pa.int32()),
        ("feat_width", pa.int32()), ("feat_height", pa.int32()),
        ("bytes", pa.int64()), ("sha1", pa.string()), ("backbone", pa.string()), ("layer", pa.string()),
        ("act_sparsity", pa.list_(pa.float16(), channels)), ("act_mean", pa.float32()), ("act_max", pa.float32()),
    ], metadata=_meta("images"))


def regions_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """One row per region proposal (box in original-image pixels) with its regional descriptor."""
    return pa.schema([
        ("image_id", pa.string()), ("region_id", pa.int32()), ("source", pa.string()), ("level", pa.int16()),
        ("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32()),
        ("score", pa.float32()), ("saliency", pa.float32()), ("descriptor", descriptor_type(dim, dtype)),
    ], metadata=_meta("regions"))


def globals_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """One row per (image, global method)."""
    return pa.schema([
        ("image_id", pa.string()), ("method", pa.string()), ("descriptor", descriptor_type(dim, dtype)),
    ], metadata=_meta("globals"))


def locals_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """One row per local descriptor (position in original-image pixels)."""
    return pa.schema([
        ("image_id", pa.string()), ("local_id", pa.int32()), ("x", pa.float32()), ("y", pa.float32()),
        ("scale", pa.float32()), ("strength", pa.float32()), ("descriptor", descriptor_type(dim, dtype)),
    ], metadata=_meta("locals"))


def keypoints_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """One row per learned keypoint (XFeat / ALIKED / CNN locals): position in original-image pixels, detector
    score, descriptor (``extract.keypoints.descriptor_dtype``: int8 by default, see the module docstring)."""
    return pa.schema([
        ("image_id", pa.string()), ("keypoint_id", pa.int32()), ("x", pa.float32()), ("y", pa.float32()),
        ("score", pa.float32()), ("descriptor", descriptor_type(dim, dtype)),
    ], metadata=_meta("keypoints"))


def pairs_schema() -> pa.Schema:
    """Mined training pairs (``jobs.mine_pairs``): one row per candidate image pair and its evidence. ``kind``:
    ``positive`` / ``hard_negative`` / ``ambiguous`` (spatially verified), ``weak_positive`` / ``weak_negative``
    (mutual k-NN and similarity only, no keypoints), ``unverified``; ``inliers`` -1 when not verified;
    ``similarity``: best region link, ``mutual_similarity``: best mutual link (-inf when none); ``links`` /
    ``mutual_links``: directed region links; ``region_a`` / ``region_b``: region ids of the best link."""
    return pa.schema([
        ("image_a", pa.string()), ("image_b", pa.string()), ("kind", pa.string()), ("verified", pa.bool_()),
        ("inliers", pa.int32()), ("similarity", pa.float32()), ("mutual_similarity", pa.float32()),
        ("links", pa.int32()), ("mutual_links", pa.int32()), ("region_a", pa.int32()), ("region_b", pa.int32()),
    ], metadata=_meta("pairs"))


ERRORS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()),
], metadata=_meta("errors"))


def encode_int8_rows(x: np.ndarray) -> np.ndarray:
    """(N, d) float → (N, d) int8: every row scaled so that its largest magnitude is 127, then rounded (a row's
    direction at 8 bits per value; all-zero rows stay zero). Decoded by :func:`decode_int8_rows`."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).max(axis=1, keepdims=True) if x.size else np.ones((len(x), 1), np.float32)
    return np.clip(np.rint(x * (127.0 / np.maximum(peak, 1e-30))), -127, 127).astype(np.int8)


def decode_int8_rows(q: np.ndarray) -> np.ndarray:
    """(N, d) int8 from :func:`encode_int8_rows` → (N, d) float32 L2-normalised rows (zero rows stay zero)."""
    x = np.asarray(q, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def descriptor_array(x: np.ndarray, dtype: str = "float16") -> pa.FixedSizeListArray:
    """(N, d) numpy → fixed-size-list Arrow array of ``dtype`` (zero-copy for float32; ``int8`` rows are encoded
    by :func:`encode_int8_rows` unless already int8)."""
    if dtype not in DTYPES:
        raise ValueError(f"descriptor dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be 2-D, got shape {x.shape}")
    if dtype == "int8":
        x = np.ascontiguousarray(x if x.dtype == np.int8 else encode_int8_rows(x))
    else:
        x = np.ascontiguousarray(x, dtype=np.float16 if dtype == "float16" else np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def descriptors_to_numpy(column: pa.ChunkedArray | pa.Array, dtype: type = np.float32) -> np.ndarray:
    """Fixed-size-list column → (N, d) numpy array of ``dtype`` (an ``int8`` column is decoded to L2-normalised
    rows by :func:`decode_int8_rows` first)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = column.type.list_size
    if len(column) == 0:
        return np.zeros((0, width), dtype=dtype)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    if column.type.value_type == pa.int8():
        return decode_int8_rows(flat.reshape(len(column), width)).astype(dtype, copy=False)
    return flat.reshape(len(column), width).astype(dtype, copy=False)


def check_schema_version(schema: pa.Schema) -> None:
    """Raise if a file was written by an unknown schema version."""
    meta = schema.metadata or {}
    version = int(meta.get(b"schema_version", b"0"))
    if version != SCHEMA_VERSION:
        raise ValueError(f"table schema version {version} is not supported (expected {SCHEMA_VERSION}); "
                         "re-run the stage")
