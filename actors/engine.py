"""The stage engine shared by ``jobs.index`` and ``jobs.reindex``: run a DAG of stages over a run's storage.

A :class:`Stage` is a name, the config sections it depends on, and a function of (config, corpus manifest,
resources). The engine runs the stages in order and records each in ``run.json`` (parameters, input and
output versions, counts, time, peak memory). Every stage's hash chains its parameters with the previous
stage's output version, the first link being the corpus version: a finished stage whose hash is unchanged is
skipped, a changed one is redone together with every stage after it, and a failed run resumes from the
committed shards of the stage that failed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import psutil
import pyarrow as pa

from actors.common import ActorResources, StageFailed, plan_resources
from pipeline.config import IndexConfig, to_plain
from storage.corpus import assign_shards, list_corpus, select_subset
from storage.lease import Lease, LeaseLost
from storage.run import RunManifest, read_corpus_manifest, write_corpus_manifest
from storage.snapshot import list_names
from storage.snapshot_pins import publish_release
from storage.tables import StageManifest
from storage.uri import redact

log = logging.getLogger("indexer")

StageFn = Callable[[IndexConfig, pa.Table, ActorResources], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One node of the DAG: what it runs and which parts of the config it depends on."""

    name: str
    run: StageFn
    params: Callable[[IndexConfig], Any]


class MemoryWatch:
    """Peak resident memory of this process and its descendants during a stage (sampled every 0.5 s)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        try:
            me = psutil.Process()
            # a local Ray started by this job runs its workers as our descendants; on a cluster this is
            # the driver's own memory (workers report through Ray's own metrics)
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> "MemoryWatch":
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def params_hash(params: Any) -> str:
    return hashlib.sha1(json.dumps(to_plain(params), sort_keys=True, default=str).encode()).hexdigest()[:16]


def corpus_version(manifest: pa.Table) -> str:
    """Version of the corpus a run indexes: a hash of its sorted (image id, image version) pairs."""
    return params_hash(sorted(zip(manifest.column("image_id").to_pylist(), manifest.column("version").to_pylist())))


def stage_params(stage: Stage, cfg: IndexConfig) -> dict[str, Any]:
    """The config parts a stage depends on (a change re-runs it and everything after it)."""
    return {"stage": stage.name, "params": to_plain(stage.params(cfg))}


def resources_for(cfg: IndexConfig) -> ActorResources:
    return plan_resources(cfg.ray.workers, cfg.ray.use_gpu, cfg.ray.cpus_per_worker)


def prepare_manifest(cfg: IndexConfig, dag: Sequence[Stage]) -> pa.Table:
    """The run's corpus manifest, reused when the corpus is unchanged (stable shards across reruns)."""
    corpus = select_subset(list_corpus(cfg.images), cfg.limit, cfg.include, cfg.exclude)
    previous = read_corpus_manifest(cfg.out)
    if previous is not None:
        if previous.column("image_id").to_pylist() == corpus.column("image_id").to_pylist() and \
                previous.column("uri").to_pylist() == corpus.column("uri").to_pylist():
            return previous
        log.warning("the corpus changed since the last run of %s: use `python -m jobs.reindex` for an incremental "
                    "update; re-sharding and redoing every stage", redact(cfg.out))
        for stage in dag:
            StageManifest(cfg.out, stage.name).reset()
    manifest = assign_shards(corpus, cfg.extract.shard_size)
    write_corpus_manifest(cfg.out, manifest)
    return manifest


def run_stage(stage: Stage, cfg: IndexConfig, manifest: pa.Table) -> tuple[dict[str, Any], float, int]:
    """Run one stage; returns (result, seconds, peak RSS). Unexpected errors become :class:`StageFailed`."""
    t0 = time.time()
    with MemoryWatch() as mem:
        try:
            result = stage.run(cfg, manifest, resources_for(cfg))
        except StageFailed:
            raise
        except Exception as exc:
            raise StageFailed(f"stage {stage.name} failed: {type(exc).__name__}: {redact(str(exc))}") from exc
    return result, time.time() - t0, mem.peak


def run_pipeline(cfg: IndexConfig, manifest: pa.Table, dag: Sequence[Stage], lease: Lease | None = None
                 ) -> dict[str, Any]:
    """Run the configured stages of ``dag`` in order; finished stages with unchanged parameters are skipped.
    With a ``lease``, each stage starts only while the lease is still ours."""
    run = RunManifest(cfg.out)
    order = [s.name for s in dag]
    summary: dict[str, Any] = {"images_in_corpus": manifest.num_rows, "stages": {}}
    previous_output = corpus_version(manifest)
    for stage in dag:
        if stage.name not in cfg.stages:
            continue
        params = stage_params(stage, cfg)
        phash = params_hash([params, previous_output])
        done = run.stage(stage.name)
        if done and done.get("status") == "done" and done.get("params_hash") == phash:
            log.info("[%s] up to date (parameters and inputs unchanged): skipped", stage.name)
            summary["stages"][stage.name] = {"skipped": True}
            previous_output = done["output_version"]
            continue
        if done and done.get("params_hash") != phash:
            log.info("[%s] parameters or inputs changed: redoing it and the stages after it", stage.name)
            run.invalidate_from(stage.name, order)
        log.info("[%s] starting", stage.name)
        check_lease(lease)
        try:
            result, seconds, peak = run_stage(stage, cfg, manifest)
        except StageFailed as exc:
            run.record(stage.name, {"status": "failed", "params_hash": phash, "error": str(exc)[:2000]})
            raise
        entry = {"status": "done", "params_hash": phash, "parameters": params["params"],
                 "input_version": previous_output, "output_version": params_hash([phash, time.time()]),
                 "result": result, "seconds": seconds, "peak_rss_bytes": peak}
        run.record(stage.name, entry)
        previous_output = entry["output_version"]
        summary["stages"][stage.name] = {**result, "seconds": seconds, "peak_rss_gb": peak / 2**30}
    return summary


def check_lease(lease: Lease | None) -> None:
    """Stop (as a failed stage) when another job took the output over: two writers would corrupt it."""
    if lease is None:
        return
    try:
        lease.check()
    except LeaseLost as exc:
        raise StageFailed(f"the lease on the output was lost: {exc}") from None


def publish_indexes(cfg: IndexConfig) -> dict[str, str]:
    """Record the versions of every published index as one release, so that readers opening the run while the
    next job publishes index by index still get one consistent set."""
    names = list_names(cfg.out)
    return publish_release(cfg.out, names) if names else {}


def restamp_chain(run: RunManifest, cfg: IndexConfig, manifest: pa.Table, dag: Sequence[Stage]) -> None:
    """Record every finished stage's hash as :func:`run_pipeline` computes it for the current corpus, so that
    ``jobs.index`` with the same config finds the stages up to date after a reindex (the reused whitening,
    graph and codebook are accepted for the new corpus: that is what reindexing means). A stage that is not
    done (and every stage after it) keeps no valid hash and is redone."""
    previous = corpus_version(manifest)
    for stage in dag:
        if stage.name not in cfg.stages:
            continue
        entry = run.stage(stage.name)
        if not entry or entry.get("status") != "done" or "output_version" not in entry:
            break
        run.record(stage.name, {**entry, "params_hash": params_hash([stage_params(stage, cfg), previous]),
                                "input_version": previous})
        previous = entry["output_version"]


__all__ = ["Stage", "MemoryWatch", "params_hash", "corpus_version", "stage_params", "prepare_manifest",
           "run_stage", "run_pipeline", "restamp_chain", "resources_for", "StageFailed", "check_lease",
           "publish_indexes"]
