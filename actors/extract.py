"""Extraction stage: a pool of Ray actors turns shards of images into rows of the five tables.

Each actor loads the backbone once (on its GPU when it has one), then for every shard it is given:
reads and decodes images in background threads while the network runs, batches images of equal input
size, extracts descriptors and regions, writes one Parquet file per table and finally commits the shard.
Actors are restartable (``max_restarts``) and their calls retried (``max_task_retries``): a SIGKILLed worker
is replaced and its shard redone from scratch, overwriting the same file names, so no row is duplicated.
"""
from __future__ import annotations

import hashlib
import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util import ActorPool

from actors.common import ActorResources, Progress
from pipeline.backbone import build_backbone
from pipeline.extract import ExtractConfig, ImageFeatures, extract_features, scaled_sizes
from pipeline.preprocess import to_network_input
from storage.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from storage.schemas import (ERRORS_SCHEMA, descriptor_array, globals_schema, images_schema, locals_schema,
                             regions_schema)
from storage.tables import StageManifest, TableStore
from storage.uri import read_bytes, redact
from storage.weights import load_state_dict

log = logging.getLogger("indexer")


@dataclass
class ExtractJob:
    """Everything an extraction worker needs (plain data, shipped to every actor)."""

    out_root: str
    config: ExtractConfig = field(default_factory=ExtractConfig)
    backbone: str = "mobilenet_v2"
    weights: str | None = "builtin:mobilenet_v2"
    layer: str | None = None
    stage: str = "extract"
    descriptor_dtype: str = "float16"
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    torch_threads: int = 0
    prefetch: int = 6
    local_pca_mean: np.ndarray | None = None
    local_pca_projection: np.ndarray | None = None
    tables: tuple[str, ...] = ("images", "regions", "globals", "locals", "errors")


@dataclass
class _Decoded:
    row: dict[str, Any]
    image_hw: tuple[int, int] = (0, 0)
    inputs: list[torch.Tensor] = field(default_factory=list)
    n_bytes: int = 0
    sha1: str = ""
    error: tuple[str, str] | None = None


class ExtractWorker:
    """One extraction worker: holds the backbone, processes whole shards (wrapped as a Ray actor)."""

    def __init__(self, job: ExtractJob) -> None:
        self.job = job
        if job.torch_threads:
            torch.set_num_threads(job.torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        state = load_state_dict(job.weights) if job.weights else None
        self.backbone = build_backbone(job.backbone, state, job.layer, device=self.device)
        self.classifier = None
        if self.backbone.classifier_weight is not None:
            self.classifier = (self.backbone.classifier_weight, self.backbone.classifier_bias)
        self.store = TableStore(job.out_root)
        self.manifest = StageManifest(job.out_root, job.stage)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")

    # ---------------------------------------------------------------- decoding (background threads)
    def _decode(self, row: dict[str, Any]) -> _Decoded:
        d = _Decoded(row=row)
        try:
            data = read_bytes(row["uri"])
        except FileNotFoundError:
            d.error = ("missing", f"no such file or object: {redact(row['uri'])}")
            return d
        except Exception as exc:  # noqa: BLE001
            d.error = ("missing", redact(f"{type(exc).__name__}: {exc}"))
            return d
        d.n_bytes, d.sha1 = len(data), hashlib.sha1(data).hexdigest()
        try:
            img = decode_image(data, max_pixels=self.job.max_pixels, max_side=self.job.config.decode_side)
        except ImageError as exc:
            d.error = (exc.reason, exc.detail)
            return d
        except Exception as exc:  # noqa: BLE001
            d.error = ("corrupt", f"{type(exc).__name__}: {exc}")
            return d
        ow, oh = img.info.get("original_size", img.size)  # full resolution even when JPEG draft decoding shrank img
        d.image_hw = (oh, ow)
        if min(img.width, img.height) < 16:
            d.error = ("unsupported", f"image too small: {img.width}x{img.height} pixels")
            return d
        for w, h in scaled_sizes(img.width, img.height, self.job.config):
            d.inputs.append(to_network_input(img, max(w, h)))
        return d

    def _decoded_stream(self, rows: list[dict[str, Any]]) -> Iterator[_Decoded]:
        """Decode ahead of the network by ``prefetch`` images, preserving order."""
        window = max(1, self.job.prefetch)
        futures = [self.pool.submit(self._decode, r) for r in rows[:window]]
        for i in range(len(rows)):
            if i + window < len(rows):
                futures.append(self.pool.submit(self._decode, rows[i + window]))
            yield futures[i].result()
            futures[i] = None  # type: ignore[call-overload]  # free decoded tensors early

    # ---------------------------------------------------------------- forward + extraction
    def _forward(self, batch: list[_Decoded]) -> list[list[torch.Tensor]]:
        """Activations per image per scale; one forward per scale for a batch of equal-size inputs."""
        per_image: list[list[torch.Tensor]] = [[] for _ in batch]
        for s in range(len(batch[0].inputs)):
            x = torch.stack([d.inputs[s] for d in batch]).to(self.device, non_blocking=True)
            acts = self.backbone(x)
            for i in range(len(batch)):
                per_image[i].append(acts[i])
        return per_image

    def _batches(self, rows: list[dict[str, Any]]) -> Iterator[tuple[list[_Decoded], list[_Decoded]]]:
        """Yield (good images of equal input size, failed images) groups in corpus order."""
        pending: list[_Decoded] = []
        for d in self._decoded_stream(rows):
            if d.error is not None:
                yield [], [d]
                continue
            key = [tuple(t.shape) for t in d.inputs]
            if pending and ([tuple(t.shape) for t in pending[0].inputs] != key or len(pending) >= self.job.batch_size):
                yield pending, []
                pending = []
            pending.append(d)
        if pending:
            yield pending, []

    def compute(self, activations: list[torch.Tensor], decoded: _Decoded) -> ImageFeatures:
        """Per-image features from its activations (subclasses compute other region sources)."""
        return extract_features(activations, self.job.config, decoded.image_hw, self.classifier)

    def sample_local_descriptors(self, rows: list[dict[str, Any]], per_image: int) -> np.ndarray:
        """Raw local descriptors of a few images (no writes): the sample the local PCA is learned on."""
        rng = np.random.default_rng(0)
        parts = []
        for good, _ in self._batches(rows):
            if not good:
                continue
            for d, a in zip(good, self._forward(good)):
                f = self.compute(a, d)
                if f.local_desc is not None and len(f.local_desc):
                    take = rng.choice(len(f.local_desc), min(per_image, len(f.local_desc)), replace=False)
                    parts.append(f.local_desc[take])
        return np.concatenate(parts) if parts else np.zeros((0, self.backbone.channels), np.float32)

    def process_shard(self, shard: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Extract and commit one shard; a committed shard is skipped (idempotent)."""
        if self.manifest.is_committed(shard):
            # a retried call whose first attempt committed before its worker died: report what it wrote
            from storage.arrays import load_json

            m = load_json(self.manifest.marker_uri(shard))
            return {"shard": shard, "skipped": True, "images": m.get("images", 0), "errors": m.get("errors", 0),
                    "seconds": 0.0}
        t0 = time.time()
        acc = _ShardRows(self.job, self.backbone)
        for good, bad in self._batches(rows):
            for d in bad:
                acc.add_error(d.row, "extract", *d.error)  # type: ignore[misc]
            if not good:
                continue
            try:
                acts = self._forward(good)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one odd-sized batch
                for d in good:
                    acc.add_error(d.row, "extract", "internal", f"forward failed: {type(exc).__name__}: {exc}")
                continue
            for d, a in zip(good, acts):
                try:
                    feats = self.compute(a, d)
                except Exception as exc:  # noqa: BLE001 - recorded, the shard goes on
                    acc.add_error(d.row, "extract", "internal",
                                  f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=2)}")
                    continue
                feats.proc_hw = tuple(d.inputs[0].shape[1:])  # type: ignore[assignment]
                acc.add(d, feats)
        files = acc.write(self.store, shard)
        seconds = time.time() - t0
        self.manifest.commit(shard, files, images=acc.n_images, errors=len(acc.errors), seconds=seconds)
        return {"shard": shard, "skipped": False, "images": acc.n_images, "errors": len(acc.errors),
                "seconds": seconds, "error_reasons": [e["reason"] for e in acc.errors]}


class _ShardRows:
    """Column buffers of one shard for the five tables."""

    def __init__(self, job: ExtractJob, backbone: torch.nn.Module) -> None:
        self.job = job
        self.backbone_name = getattr(backbone, "name", "")
        self.layer = getattr(backbone, "layer", "")
        self.channels = int(getattr(backbone, "channels", 0))
        self.images: list[dict[str, Any]] = []
        self.sparsity: list[np.ndarray] = []
        self.regions: list[dict[str, Any]] = []
        self.region_desc: list[np.ndarray] = []
        self.globals: list[tuple[str, str]] = []
        self.global_desc: list[np.ndarray] = []
        self.locals: list[dict[str, Any]] = []
        self.local_desc: list[np.ndarray] = []
        self.errors: list[dict[str, Any]] = []
        self.n_images = 0

    def add_error(self, row: dict[str, Any], stage: str, reason: str, detail: str) -> None:
        self.errors.append({"image_id": row["image_id"], "uri": redact(row["uri"]), "stage": stage,
                            "reason": reason, "detail": redact(detail)[:2000]})

    def add(self, d: _Decoded, f: ImageFeatures) -> None:
        iid = d.row["image_id"]
        self.n_images += 1
        ph, pw = f.proc_hw
        self.images.append({"image_id": iid, "uri": redact(d.row["uri"]), "shard": int(d.row["shard"]),
                            "width": d.image_hw[1], "height": d.image_hw[0], "proc_width": pw, "proc_height": ph,
                            "feat_width": f.feat_hw[1], "feat_height": f.feat_hw[0], "bytes": d.n_bytes,
                            "sha1": d.sha1, "backbone": self.backbone_name, "layer": self.layer,
                            "act_mean": f.act_mean, "act_max": f.act_max})
        self.sparsity.append(f.sparsity.astype(np.float16))
        for i in range(len(f.region_source)):
            b = f.region_boxes[i]
            self.regions.append({"image_id": iid, "region_id": i, "source": f.region_source[i],
                                 "level": int(f.region_level[i]), "x0": float(b[0]), "y0": float(b[1]),
                                 "x1": float(b[2]), "y1": float(b[3]), "score": float(f.region_score[i]),
                                 "saliency": float(f.region_saliency[i])})
        self.region_desc.append(f.region_desc)
        for method, vec in f.globals.items():
            self.globals.append((iid, method))
            self.global_desc.append(vec)
        if f.local_desc is not None and len(f.local_desc):
            desc = f.local_desc
            if self.job.local_pca_projection is not None:
                from pipeline.pooling import l2n_np

                desc = l2n_np((l2n_np(desc) - self.job.local_pca_mean) @ self.job.local_pca_projection)
            for j in range(len(desc)):
                self.locals.append({"image_id": iid, "local_id": j, "x": float(f.local_xy[j, 0]),
                                    "y": float(f.local_xy[j, 1]), "scale": float(f.local_scale[j]),
                                    "strength": float(f.local_strength[j])})
            self.local_desc.append(desc.astype(np.float32))

    def _table(self, rows: list[dict[str, Any]], schema: pa.Schema, desc: np.ndarray | None) -> pa.Table:
        cols: dict[str, Any] = {}
        for name in schema.names:
            if name == "descriptor":
                cols[name] = descriptor_array(desc, self.job.descriptor_dtype)  # type: ignore[arg-type]
            elif name == "act_sparsity":
                sp = np.stack(self.sparsity) if self.sparsity else np.zeros((0, self.channels), np.float16)
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(sp.reshape(-1)), self.channels)
            else:
                cols[name] = pa.array([r[name] for r in rows], schema.field(name).type)
        return pa.table(cols, schema=schema)

    def write(self, store: TableStore, shard: int) -> dict[str, str]:
        """Write this shard's tables (even empty ones, so a rerun has nothing left to do)."""
        job, stage, C = self.job, self.job.stage, self.channels
        files = {}
        if "images" in job.tables:
            files["images"] = store.write("images", stage, shard, self._table(self.images, images_schema(C), None))
        rdesc = np.concatenate(self.region_desc) if self.region_desc else np.zeros((0, C), np.float32)
        files["regions"] = store.write("regions", stage, shard, self._table(
            self.regions, regions_schema(rdesc.shape[1], job.descriptor_dtype), rdesc))
        gdesc = np.stack(self.global_desc) if self.global_desc else np.zeros((0, C), np.float32)
        grows = [{"image_id": i, "method": m} for i, m in self.globals]
        files["globals"] = store.write("globals", stage, shard, self._table(
            grows, globals_schema(gdesc.shape[1], job.descriptor_dtype), gdesc))
        if job.config.local_features > 0 and "locals" in job.tables:
            dim = (job.local_pca_projection.shape[1] if job.local_pca_projection is not None else C)
            ldesc = np.concatenate(self.local_desc) if self.local_desc else np.zeros((0, dim), np.float32)
            files["locals"] = store.write("locals", stage, shard, self._table(
                self.locals, locals_schema(dim, job.descriptor_dtype), ldesc))
        files["errors"] = store.write("errors", stage, shard, self._table(self.errors, ERRORS_SCHEMA, None))
        return files


def run_extract(job: ExtractJob, manifest: pa.Table, resources: ActorResources,
                progress: Progress | None = None, worker_cls: type = None,
                worker_args: tuple = ()) -> dict[str, Any]:
    """Run the extraction stage over every uncommitted shard of ``manifest`` with an actor pool.

    Returns counts (images, errors, skipped shards), error reasons and the images/s of the run.
    """
    stage_manifest = StageManifest(job.out_root, job.stage)
    committed = set(stage_manifest.committed())
    rows = manifest.to_pylist()
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_shard.setdefault(int(r["shard"]), []).append(r)
    todo = [s for s in sorted(by_shard) if f"{s:05d}" not in committed]
    progress = progress or Progress(job.stage, total=len(rows))
    if worker_cls is None:
        worker_cls = ExtractWorker
    skipped_images = sum(len(by_shard[s]) for s in by_shard if f"{s:05d}" in committed)
    progress.skipped = skipped_images
    progress.update(skipped_images, force=True)
    result: dict[str, Any] = {"images": 0, "errors": 0, "skipped_shards": len(by_shard) - len(todo),
                              "shards": len(by_shard), "error_reasons": {}}
    if not todo:
        return result
    job.torch_threads = job.torch_threads or resources.torch_threads
    actor_cls = ray.remote(worker_cls or ExtractWorker).options(
        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_restarts=-1, max_task_retries=-1,
        max_concurrency=1)
    n_workers = max(1, min(resources.num_workers, len(todo)))
    actors = [actor_cls.remote(job, *worker_args) for _ in range(n_workers)]
    pool = ActorPool(actors)
    t0 = time.time()
    for out in pool.map_unordered(lambda a, s: a.process_shard.remote(s, by_shard[s]), todo):
        result["images"] += out["images"]
        result["errors"] += out["errors"]
        for reason in out.get("error_reasons", []):
            result["error_reasons"][reason] = result["error_reasons"].get(reason, 0) + 1
        progress.update(out["images"] + out["errors"], errors=out["errors"])
    progress.update(0, force=True)
    result["seconds"] = time.time() - t0
    result["images_per_second"] = result["images"] / max(result["seconds"], 1e-9)
    for a in actors:
        ray.kill(a)
    return result


def job_parameters(job: ExtractJob) -> dict[str, Any]:
    """JSON-able parameters of an extraction job (recorded in the stage summary)."""
    d = asdict(job)
    d.pop("local_pca_mean", None), d.pop("local_pca_projection", None)
    d["config"] = asdict(job.config)
    return d
