"""Ray Train runs of the learned projection (seed 003 shift + FC, ``pipeline.projection``).

:func:`train_projection_ray` runs :func:`pipeline.projection.train_projection` — the very function a plain
call runs — inside ``ray.train.torch.TorchTrainer`` workers: ``prepare_model`` wraps the module (DDP when
there is more than one worker), each worker takes its ``rank::world_size`` share of every batch, and rank 0
writes a checkpoint after every epoch: ``projection.npz`` (``mean``, ``projection``: the keys of
``Whitening.to_arrays``, so ``whiten.kind: learned`` loads it as a whitening) and ``config.json`` (the
``ProjectionConfig``, the epoch and its statistics). Checkpoints go to ``storage_path`` (a local folder or
a URI that pyarrow understands, e.g. ``s3://bucket/runs``; on a multi-node cluster it must be shared).

:func:`load_triplet_data` assembles the training data of ``jobs.train_projection`` from a run's tables and its
mined pairs (``jobs.mine_pairs``).

With one CPU worker the result is bit-identical to the plain call for the same seed and data (tested).
With N workers DDP averages the N shares' gradients, so pass ``lr`` scaled by N for the same step.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch

from pipeline.descriptors import RMAC_SOURCES
from pipeline.pair_mining import POSITIVE, WEAK_POSITIVE
from pipeline.projection import ProjectionConfig, TripletData, train_projection
from storage.arrays import load_arrays, load_json, save_arrays, save_json
from storage.readers import iter_regions
from storage.training import PROJECTION_FILE

ARRAYS_FILE = PROJECTION_FILE
CONFIG_FILE = "projection_config.json"   # inside a Ray Train checkpoint folder


@dataclass
class ProjectionRun:
    """Outcome of a Ray Train run: the trained arrays, the last epoch's metrics, the checkpoint's path."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    checkpoint_path: str
    config: dict[str, Any]


def _projection_worker(loop_config: dict) -> None:
    """Ray Train worker loop: the plain training function with Ray's model wrapper, rank and reporting."""
    payload = ray.get(loop_config["payload"])
    config = ProjectionConfig.from_dict(loop_config["config"])
    data = TripletData(**payload["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def report(epoch: int, stats: dict, arrays: dict) -> None:
        # every worker reports (Ray Train expects it); only rank 0 carries the checkpoint
        if rank != 0:
            ray.train.report(stats)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_arrays(os.path.join(tmp, ARRAYS_FILE), **arrays)
            save_json(os.path.join(tmp, CONFIG_FILE), {"kind": "learned_projection", "epoch": epoch,
                                                       "config": config.to_dict(), "stats": stats})
            ray.train.report(stats, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    train_projection(config, data, payload["init"], epoch_callback=report,
                     prepare_model=ray.train.torch.prepare_model, rank=rank, world_size=world,
                     device=ray.train.torch.get_device())


def load_triplet_data(root: str, pairs: pa.Table, sources: tuple[str, ...] = RMAC_SOURCES,
                      accept: tuple[str, ...] = (POSITIVE, WEAK_POSITIVE)) -> tuple[TripletData, list[str]]:
    """The run's stored regional MACs of ``sources`` (every indexed image: the database itself is the training
    set) and the mined pairs of kinds ``accept`` as positives. Returns the data and the image id of each row."""
    ids, parts, missing = [], [], []
    for src in sources:
        before = len(ids)
        for rid, _, X in iter_regions(root, src):   # one file at a time
            ids += rid
            parts.append(X.astype(np.float32))
        if len(ids) == before:
            missing.append(src)
    if missing:   # an R-MAC without some of the regions asked for would train a different descriptor
        raise RuntimeError(f"no regions of source(s) {missing} in {root} (asked for {list(sources)})")
    ids_arr = np.asarray(ids, dtype=str)
    order = np.argsort(ids_arr, kind="stable")
    names, starts = np.unique(ids_arr[order], return_index=True)
    index = {n: i for i, n in enumerate(names.tolist())}
    t = pairs.filter(pc.is_in(pairs.column("kind"), value_set=pa.array(list(accept))))
    pos = [(index[a], index[b]) for a, b in zip(t.column("image_a").to_pylist(), t.column("image_b").to_pylist())
           if a in index and b in index]
    data = TripletData(np.concatenate(parts)[order], np.r_[starts, len(ids_arr)].astype(np.int64),
                       np.asarray(pos, np.int64).reshape(-1, 2))
    return data, names.tolist()


def load_projection_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and config document of a checkpoint folder written by :func:`train_projection_ray`."""
    return load_arrays(os.path.join(path, ARRAYS_FILE)), load_json(os.path.join(path, CONFIG_FILE))


def train_projection_ray(config: ProjectionConfig, data: TripletData, init: Mapping[str, np.ndarray],
                         storage_path: str, name: str = "learned_projection", num_workers: int = 1,
                         use_gpu: bool = False, checkpoints_to_keep: int = 2) -> ProjectionRun:
    """Train the projection under ``TorchTrainer`` (``ScalingConfig(num_workers, use_gpu)``).

    ``init``: the PCA-whitening arrays (``mean``, ``projection``). The data go to the workers through the
    object store (one copy per node). Returns the arrays of the last checkpoint (the last epoch).
    """
    if config.epochs < 1:
        raise ValueError("a Ray Train run needs epochs >= 1 (it returns the last epoch's checkpoint)")
    payload = ray.put({"data": {"regions": data.regions, "offsets": data.offsets, "positives": data.positives,
                                "groups": data.groups},
                       "init": {k: np.asarray(v) for k, v in init.items()}})
    trainer = ray.train.torch.TorchTrainer(
        _projection_worker,
        train_loop_config={"config": config.to_dict(), "payload": payload},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoints_to_keep)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        arrays, doc = load_projection_checkpoint(ckpt)
    return ProjectionRun(arrays=arrays, metrics=dict(result.metrics or {}), checkpoint_path=result.checkpoint.path,
                         config=doc)
