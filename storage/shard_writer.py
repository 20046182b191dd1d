"""Column buffers of one shard of the image tables, written as one Parquet file per table.

The image stages (extraction, object saliency) add rows image by image (arrays, plain values), then
:meth:`ShardTables.write` writes every table the stage owns, even empty ones, so that a committed shard has
nothing left to do on a rerun. Descriptor columns are float16 or float32 fixed-size lists (storage.schemas).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from storage.schemas import (ERRORS_SCHEMA, KEYPOINT_ROW_GROUP, descriptor_array, globals_schema, images_schema,
                             keypoints_schema, locals_schema, regions_schema)
from storage.tables import TableStore
from storage.uri import redact

IMAGE_TABLES = ("images", "regions", "globals", "locals", "keypoints", "errors")


def pad_width(vec: np.ndarray, width: int) -> np.ndarray:
    """``vec`` zero-padded to ``width`` (a table column holds one width; padding keeps norms and inner products)."""
    vec = np.asarray(vec)
    return vec if len(vec) >= width else np.pad(vec, (0, width - len(vec)))


class ShardTables:
    """Rows of one shard for the tables in ``tables`` (a subset of :data:`IMAGE_TABLES`)."""

    def __init__(self, tables: Iterable[str], channels: int, descriptor_dtype: str = "float16",
                 local_dim: int | None = None, keypoint_dim: int | None = None,
                 keypoint_dtype: str = "int8") -> None:
        """``local_dim`` / ``keypoint_dim``: descriptor widths of the locals / keypoints tables (None: not written);
        ``keypoint_dtype``: the keypoints table's descriptor type (``int8`` or ``float16``, storage.schemas)."""
        self.tables = tuple(tables)
        self.channels = int(channels)
        self.dtype = descriptor_dtype
        self.local_dim = local_dim
        self.images: list[dict[str, Any]] = []
        self.sparsity: list[np.ndarray] = []
        self.regions: list[dict[str, Any]] = []
        self.region_desc: list[np.ndarray] = []
        self.globals: list[tuple[str, str]] = []
        self.global_desc: list[np.ndarray] = []
        # per image: (image_id, xy (n, 2), scale (n,), strength (n,)), kept as arrays (built into columns at write)
        self.locals: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.local_desc: list[np.ndarray] = []
        self.keypoint_dim = keypoint_dim
        self.keypoint_dtype = keypoint_dtype
        self.keypoints: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.errors: list[dict[str, Any]] = []

    @property
    def n_images(self) -> int:
        """Images processed in this shard (their ``images`` row is written only when the stage owns it)."""
        return len(self.images)

    def add_error(self, image_id: str, uri: str, stage: str, reason: str, detail: str) -> None:
        """One ``errors`` row: the image is skipped for this stage with a short reason code and a message."""
        self.errors.append({"image_id": image_id, "uri": redact(uri), "stage": stage, "reason": reason,
                            "detail": redact(detail)[:2000]})

    def add_image(self, row: Mapping[str, Any], sparsity: np.ndarray) -> None:
        """One ``images`` row (``row`` has the schema's scalar columns; ``sparsity`` the per-channel fractions)."""
        self.images.append(dict(row))
        self.sparsity.append(np.asarray(sparsity).astype(np.float16))

    def add_regions(self, image_id: str, sources: list[str], levels: np.ndarray, boxes: np.ndarray,
                    scores: np.ndarray, saliency: np.ndarray, desc: np.ndarray) -> None:
        """The image's region proposals (pixel boxes) with their descriptors; ``region_id`` numbers them."""
        for i in range(len(sources)):
            b = boxes[i]
            self.regions.append({"image_id": image_id, "region_id": i, "source": sources[i],
                                 "level": int(levels[i]), "x0": float(b[0]), "y0": float(b[1]),
                                 "x1": float(b[2]), "y1": float(b[3]), "score": float(scores[i]),
                                 "saliency": float(saliency[i])})
        self.region_desc.append(desc)

    def add_globals(self, image_id: str, vectors: Mapping[str, np.ndarray]) -> None:
        """One row per method; narrower vectors are zero-padded to the table's width (inner products unchanged)."""
        for method, vec in vectors.items():
            self.globals.append((image_id, method))
            self.global_desc.append(pad_width(vec, self.channels))

    def add_locals(self, image_id: str, xy: np.ndarray, scale: np.ndarray, strength: np.ndarray,
                   desc: np.ndarray) -> None:
        n = len(desc)
        self.locals.append((image_id, np.asarray(xy, np.float32).reshape(-1, 2)[:n],
                            np.asarray(scale, np.float32).ravel()[:n], np.asarray(strength, np.float32).ravel()[:n]))
        self.local_desc.append(np.asarray(desc, np.float32))

    def add_keypoints(self, image_id: str, xy: np.ndarray, score: np.ndarray, desc: np.ndarray) -> None:
        """One image's keypoints: positions (n, 2) in original-image pixels, scores (n,), descriptors (n, D)."""
        self.keypoints.append((image_id, np.asarray(xy, np.float32).reshape(-1, 2),
                               np.asarray(score, np.float32).ravel(), np.asarray(desc, np.float32)))

    def _keypoints_table(self) -> pa.Table:
        """The keypoints rows sorted by image id (row groups then cover narrow id ranges), descriptors in
        ``keypoint_dtype``."""
        dim = int(self.keypoint_dim or 0)
        items = [(i, xy, score, desc.reshape(-1, dim)) for i, xy, score, desc in sorted(self.keypoints,
                                                                                     key=lambda k: k[0])]
        ids, kid, (xy, score, desc) = _image_rows(items, ((0, 2), (0,), (0, dim)))
        schema = keypoints_schema(dim, self.keypoint_dtype)
        return pa.table({"image_id": pa.array(ids, pa.string()), "keypoint_id": pa.array(kid, pa.int32()),
                         "x": pa.array(xy[:, 0]), "y": pa.array(xy[:, 1]), "score": pa.array(score),
                         "descriptor": descriptor_array(desc, self.keypoint_dtype)}, schema=schema)

    def _locals_table(self, dim: int, desc: np.ndarray) -> pa.Table:
        """The locals rows in the order they were added, built column by column from the per-image arrays (a
        Python dict per local cost the actor's main thread ~4 ms of GIL per image at 600 locals)."""
        ids, lid, (xy, scale, strength) = _image_rows(self.locals, ((0, 2), (0,), (0,)))
        return pa.table({"image_id": pa.array(ids, pa.string()), "local_id": pa.array(lid, pa.int32()),
                         "x": pa.array(xy[:, 0]), "y": pa.array(xy[:, 1]), "scale": pa.array(scale),
                         "strength": pa.array(strength), "descriptor": descriptor_array(desc, self.dtype)},
                        schema=locals_schema(dim, self.dtype))

    def _table(self, rows: list[dict[str, Any]], schema: pa.Schema, desc: np.ndarray | None) -> pa.Table:
        cols: dict[str, Any] = {}
        for name in schema.names:
            if name == "descriptor":
                cols[name] = descriptor_array(desc, self.dtype)  # type: ignore[arg-type]
            elif name == "act_sparsity":
                C = self.channels
                sp = np.stack(self.sparsity) if self.sparsity else np.zeros((0, C), np.float16)
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(sp.reshape(-1)), C)
            else:
                cols[name] = pa.array([r[name] for r in rows], schema.field(name).type)
        return pa.table(cols, schema=schema)

    def write(self, store: TableStore, stage: str, shard: int | str) -> dict[str, str]:
        """Write this shard's tables; returns table name -> file URI (for the commit marker)."""
        C, files = self.channels, {}
        if "images" in self.tables:
            files["images"] = store.write("images", stage, shard, self._table(self.images, images_schema(C), None))
        rdesc = np.concatenate(self.region_desc) if self.region_desc else np.zeros((0, C), np.float32)
        files["regions"] = store.write("regions", stage, shard, self._table(
            self.regions, regions_schema(rdesc.shape[1], self.dtype), rdesc))
        gdesc = np.stack(self.global_desc) if self.global_desc else np.zeros((0, C), np.float32)
        grows = [{"image_id": i, "method": m} for i, m in self.globals]
        files["globals"] = store.write("globals", stage, shard, self._table(
            grows, globals_schema(gdesc.shape[1], self.dtype), gdesc))
        if "locals" in self.tables and self.local_dim is not None:
            dim = self.local_dim
            ldesc = np.concatenate(self.local_desc) if self.local_desc else np.zeros((0, dim), np.float32)
            files["locals"] = store.write("locals", stage, shard, self._locals_table(dim, ldesc))
        if "keypoints" in self.tables and self.keypoint_dim is not None:
            files["keypoints"] = store.write("keypoints", stage, shard, self._keypoints_table(),
                                             row_group_size=KEYPOINT_ROW_GROUP)
        files["errors"] = store.write("errors", stage, shard, self._table(self.errors, ERRORS_SCHEMA, None))
        return files


def _image_rows(items: Sequence[tuple[Any, ...]], empty_shapes: tuple[tuple[int, ...], ...]
                ) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Per-image arrays ``(image_id, a_1, ..., a_k)`` (each with one row per item of the image) as table columns:
    the image id repeated over its rows, the row number within its image (int32), and each ``a_j`` concatenated
    over the images (float32 zeros of ``empty_shapes[j]`` when there are none)."""
    counts = [len(item[1]) for item in items]
    ids = [item[0] for item, c in zip(items, counts) for _ in range(c)]
    row = np.concatenate([np.arange(c, dtype=np.int32) for c in counts]) if items else np.zeros(0, np.int32)
    cols = [np.concatenate([item[j] for item in items]) if items else np.zeros(shape, np.float32)
            for j, shape in enumerate(empty_shapes, start=1)]
    return ids, row, cols


__all__ = ["ShardTables", "IMAGE_TABLES", "KEYPOINT_ROW_GROUP", "pad_width"]
