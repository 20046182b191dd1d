"""The ``descriptors`` stage: final whitened global descriptors of every method, shard by shard.

Each extraction shard's ``regions`` and raw ``globals`` (plus the object-saliency pass's OS sums) go through
:func:`pipeline.descriptors.final_descriptors` (the same function the query side uses) and are written as the
shard's ``globals`` file of this stage, committed shard by shard by the shard runner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from actors.common import ActorResources, Progress
from actors.runner import ShardResult, run_shards
from actors.whiten import load_whitenings
from pipeline.descriptors import DescriptorRows, final_descriptors
from storage.schemas import descriptor_array, descriptors_to_numpy, globals_schema
from storage.tables import StageManifest, TableStore, read_parquet
from storage.training import load_projection, save_learned_whitening

STAGE = "descriptors"


def table_rows(t: pa.Table, label_column: str) -> DescriptorRows:
    """A ``regions`` (label: ``source``) or ``globals`` (label: ``method``) table as descriptor rows."""
    return DescriptorRows(t.column("image_id").to_numpy(zero_copy_only=False),
                          t.column(label_column).to_numpy(zero_copy_only=False),
                          descriptors_to_numpy(t.column("descriptor")))


class DescriptorsMapper:
    """Final descriptors of one extraction shard (whitenings loaded once per actor)."""

    def __init__(self, root: str, methods: tuple[str, ...], dtype: str) -> None:
        self.store, self.methods, self.dtype = TableStore(root), methods, dtype
        self.whitenings = load_whitenings(root)

    def __call__(self, shard: int | str, payload: dict[str, Any]) -> ShardResult:
        regions = read_parquet(payload["files"]["regions"])
        if payload.get("rpn_files", {}).get("regions"):   # regions.source: rpn (the rpn pass's proposals)
            regions = pa.concat_tables([regions, read_parquet(payload["rpn_files"]["regions"])])
        globals_ = read_parquet(payload["files"]["globals"])
        if payload.get("os_files", {}).get("globals"):
            globals_ = pa.concat_tables([globals_, read_parquet(payload["os_files"]["globals"])])
        out = final_descriptors(table_rows(regions, "source"), table_rows(globals_, "method"), self.methods,
                                self.whitenings)
        X = out.X if len(out.X) else np.zeros((0, 1), np.float32)
        table = pa.table({"image_id": pa.array(out.image_ids, pa.string()),
                          "method": pa.array(out.methods, pa.string()),
                          "descriptor": descriptor_array(X, self.dtype)}, schema=globals_schema(X.shape[1], self.dtype))
        return ShardResult({"globals": self.store.write("globals", STAGE, shard, table)}, {"rows": len(out.image_ids)})


@dataclass
class DescriptorsMapperFactory:
    root: str
    methods: tuple[str, ...]
    dtype: str

    def __call__(self) -> DescriptorsMapper:
        return DescriptorsMapper(self.root, self.methods, self.dtype)


def install_projection(root: str, projection: str) -> dict[str, Any]:
    """Copy the learned projection at ``projection`` (``jobs.train_projection``) into the run as its ``learned``
    whitening (what ``rmac_learned`` and the query side apply); checks that it takes this run's regional MACs."""
    arrays, info = load_projection(projection)
    channels = load_whitenings(root)["regions"].in_dim
    if arrays["projection"].shape[0] != channels:
        raise RuntimeError(f"descriptors: the projection at {projection} takes {arrays['projection'].shape[0]}-d "
                           f"regional MACs, this run's have {channels} (trained on another backbone or layer?)")
    save_learned_whitening(root, arrays)
    return {"projection": projection, "projection_dim": int(arrays["projection"].shape[1]),
            "projection_pairs": info.get("pairs", {}).get("uri")}


def run_descriptors_stage(root: str, methods: tuple[str, ...], dtype: str, resources: ActorResources,
                          projection: str | None = None) -> dict[str, Any]:
    """Final descriptors for every committed extraction shard not yet done. OS methods need the OS stage;
    ``projection``: a learned projection's folder, installed first (``rmac_learned``)."""
    learned = install_projection(root, projection) if projection else {}
    extract = StageManifest(root, "extract").committed()
    os_stage = StageManifest(root, "object_saliency").committed()
    rpn_stage = StageManifest(root, "rpn").committed()
    wanted = tuple(m for m in methods if not m.startswith("os_egm") or os_stage)
    shards = {label: {"files": m["files"], "os_files": os_stage.get(label, {}).get("files", {}),
                      "rpn_files": rpn_stage.get(label, {}).get("files", {})}
              for label, m in sorted(extract.items())}
    out = run_shards(root, STAGE, shards, DescriptorsMapperFactory(root, wanted, dtype), resources,
                     Progress(STAGE, len(shards), unit="shards"), weight=lambda _: 1)
    return {"shards": out["shards"] - out["skipped_shards"], "skipped_shards": out["skipped_shards"],
            "rows": out["rows"], "methods": list(wanted), "seconds": out.get("seconds", 0.0), **learned}


__all__ = ["run_descriptors_stage", "DescriptorsMapper", "table_rows", "install_projection"]
