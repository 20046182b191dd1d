"""Nightly re-indexing: bring an index run up to date with its corpus, doing only what changed.

    python -m jobs.reindex --config <yaml> [--images <uri>] [--out <uri>]

1. Compare the corpus with the run's manifest: new, changed (same id, other URI/size/version) and deleted
   images.
2. Deleted and changed images are removed from every shard that holds them (the shard's files are rewritten
   without their rows under new names and its commit marker replaced atomically); new and changed images go to
   new shards numbered after the existing ones, so nothing committed is redone.
3. Extraction runs on the new shards only. Whitening, local PCA and the ASMK codebook are reused when the
   config says so. The region graph and Katz centrality are rebuilt when more than
   ``reindex.rebuild_graph_fraction`` of the corpus changed (then every image gets a new object-saliency
   pass); otherwise new images get object saliency from the stored graph.
4. Final descriptors are computed for new or rewritten shards, the FAISS and ASMK indexes are rebuilt as new
   snapshots and published atomically; snapshots older than ``reindex.keep_days`` are pruned (the newest
   ``keep_min`` and ``LATEST`` always stay).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pyarrow as pa

from actors.common import init_ray
from actors.engine import StageFailed, check_lease, params_hash, publish_indexes, restamp_chain, run_stage, \
    stage_params
from jobs.index import DAG, config_from_args, job_lease, parse_args, print_summary, setup_logging
from pipeline.config import IndexConfig
from service.errors import run_cli
from storage.corpus import MANIFEST_SCHEMA, assign_shards, diff_corpus, filter_ids, list_corpus, select_subset
from storage.run import NotAnIndexError, RunManifest, read_corpus_manifest, write_corpus_manifest
from storage.snapshot import list_names
from storage.snapshot_pins import prune_unpinned
from storage.tables import StageManifest, drop_images
from storage.lease import Lease
from storage.uri import check_access, redact

log = logging.getLogger("indexer")
SHARD_STAGES = ("extract", "object_saliency", "rpn", "descriptors")   # rpn: regions.source rpn only


def update_manifest(cfg: IndexConfig, previous: pa.Table, summary: dict[str, Any]) -> tuple[pa.Table, float]:
    """Drop deleted/changed images from committed shards, append new ones in new shards, publish the manifest.
    Returns the new manifest and the changed fraction of the corpus."""
    current = select_subset(list_corpus(cfg.images), cfg.limit, cfg.include, cfg.exclude)
    d = diff_corpus(previous, current)
    gone, added = d["deleted"] | d["changed"], d["new"] | d["changed"]
    changed_fraction = (len(d["new"]) + len(d["deleted"]) + len(d["changed"])) / max(1, current.num_rows)
    summary.update(images_in_corpus=current.num_rows, diff={k: len(v) for k, v in d.items()},
                   changed_fraction=changed_fraction)
    log.info("[reindex] %d new, %d changed, %d deleted (%.1f%% of the corpus)", len(d["new"]), len(d["changed"]),
             len(d["deleted"]), 100 * changed_fraction)
    kept = filter_ids(previous, gone, invert=True)
    first = (max(previous.column("shard").to_pylist()) + 1) if previous.num_rows else 0
    new_rows = assign_shards(filter_ids(current, added), cfg.extract.shard_size, first_shard=first)
    manifest = pa.concat_tables([kept.cast(MANIFEST_SCHEMA), new_rows]).sort_by("image_id")
    if gone:  # before publishing the new manifest
        shards = {f"{s:05d}" for s in filter_ids(previous, gone).column("shard").to_pylist()}
        for stage in SHARD_STAGES:
            rewritten = drop_images(cfg.out, stage, gone, shards)
            if stage != "descriptors":
                summary.setdefault("rewritten_shards", {})[stage] = len(rewritten)
    write_corpus_manifest(cfg.out, manifest)
    return manifest, changed_fraction


def plan_stages(cfg: IndexConfig, run: RunManifest, rebuild_graph: bool) -> tuple[list[str], bool]:
    """The stages to run tonight, and whether the graph is rebuilt (then every image gets a new OS pass)."""
    plan = []
    for stage in cfg.stages:
        if stage == "whiten" and cfg.reindex.reuse_whitening and run.stage("whiten"):
            continue
        graph_status = (run.stage("graph") or {}).get("status")
        if stage == "graph" and not rebuild_graph and graph_status == "done":
            continue
        if stage == "graph" and graph_status == "stale":
            rebuild_graph = True
        plan.append(stage)
    rebuild = rebuild_graph and "graph" in plan
    if rebuild:
        # object saliency depends on the graph: redo it everywhere. The graph is marked stale first, so that a
        # rerun after a crash between here and the rebuild still rebuilds it (the corpus diff is empty then,
        # but the reset shards must not be redone with the old graph)
        run.record("graph", {**(run.stage("graph") or {}), "status": "stale"})
        StageManifest(cfg.out, "object_saliency").reset()
        StageManifest(cfg.out, "descriptors").reset()
    return plan, rebuild


def prune_snapshots(cfg: IndexConfig) -> int:
    """Delete index snapshots older than ``keep_days`` (never LATEST, the newest ``keep_min``, nor a version a
    reader has pinned)."""
    return sum(len(prune_unpinned(cfg.out, name, keep_days=cfg.reindex.keep_days, keep_min=cfg.reindex.keep_min))
               for name in list_names(cfg.out))


def reindex(cfg: IndexConfig) -> dict[str, Any]:
    """Incremental update of the run at ``cfg.out`` under the output's lease; see the module docstring. Ray is
    started (or joined) once the lease is held and the previous run found, as in ``jobs.index``: a busy output or
    a missing run fails before Ray starts."""
    with job_lease(cfg, "reindex") as lease:
        previous = read_corpus_manifest(cfg.out)
        if previous is None:
            raise NotAnIndexError(f"no previous run at {redact(cfg.out)}: run `python -m jobs.index` first")
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
        t0 = time.time()
        summary = _reindex(cfg, previous, lease)
        summary["seconds"] = time.time() - t0
    return summary


def _reindex(cfg: IndexConfig, previous: pa.Table, lease: Lease) -> dict[str, Any]:
    summary: dict[str, Any] = {"stages": {}}
    manifest, changed_fraction = update_manifest(cfg, previous, summary)
    run = RunManifest(cfg.out)
    plan, summary["graph_rebuilt"] = plan_stages(cfg, run, changed_fraction > cfg.reindex.rebuild_graph_fraction)
    by_name = {s.name: s for s in DAG}
    for name in plan:
        check_lease(lease)
        result, seconds, peak = run_stage(by_name[name], cfg, manifest)
        run.record(name, {"status": "done", "parameters": stage_params(by_name[name], cfg)["params"],
                          "result": result, "reindex": True, "seconds": seconds, "peak_rss_bytes": peak,
                          "output_version": params_hash([name, time.time()])})
        summary["stages"][name] = {**result, "seconds": seconds}
    restamp_chain(run, cfg, manifest, DAG)
    summary["release"] = publish_indexes(cfg)
    summary["pruned_snapshots"] = prune_snapshots(cfg)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, prog="python -m jobs.reindex")
    setup_logging(args.verbose)

    def body() -> int:
        cfg = config_from_args(args)
        check_access(cfg.out)
        try:
            summary = reindex(cfg)
        except StageFailed as exc:
            log.error("%s", exc)
            return 1
        print_summary(summary)
        return 0

    return run_cli(body, args.verbose, "jobs.reindex")


__all__ = ["reindex", "update_manifest", "plan_stages"]

if __name__ == "__main__":
    sys.exit(main())
