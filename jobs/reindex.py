"""Nightly re-indexing: bring an index run up to date with its corpus, doing only what changed.

    python -m jobs.reindex --config <yaml> [--images <uri>] [--out <uri>]

1. Compare the corpus with the run's manifest: new, changed (same id, other URI/size/version) and deleted
   images.
2. Deleted and changed images are removed from every shard that holds them (the shard's files are rewritten
   without their rows and its commit marker replaced atomically); new and changed images go to new shards
   numbered after the existing ones, so nothing committed is redone.
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
import re
import sys
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from actors.common import init_ray
from jobs.config import STAGES, ConfigError, IndexConfig
from jobs.index import (STAGE_FUNCS, MemoryWatch, RunManifest, StageFailed, config_from_args, corpus_version,
                        params_hash, print_summary, select_subset, setup_logging, stage_params, write_manifest)
from storage.arrays import load_json
from storage.corpus import MANIFEST_SCHEMA, assign_shards, list_corpus
from storage.tables import StageManifest, read_parquet, write_parquet
from storage.uri import StorageError, check_access, exists, get_fs, join, redact

log = logging.getLogger("indexer")
SHARD_STAGES = ("extract", "object_saliency", "descriptors")


def diff_corpus(previous: pa.Table, current: pa.Table) -> dict[str, set[str]]:
    """Ids that are new, deleted, or changed (same id, different URI, size or version) between two listings."""
    def key(t: pa.Table) -> dict[str, tuple]:
        return {i: (u, s, v) for i, u, s, v in zip(*(t.column(c).to_pylist() for c in ("image_id", "uri", "size",
                                                                                     "version")))}
    prev, cur = key(previous), key(current)
    return {"new": set(cur) - set(prev), "deleted": set(prev) - set(cur),
            "changed": {i for i in set(prev) & set(cur) if prev[i] != cur[i]}}


def drop_images(root: str, stage: str, image_ids: set[str], shards: set[str]) -> list[str]:
    """Rewrite the committed ``shards`` of ``stage`` (those the manifest says hold ``image_ids``) without them.

    Returns the labels of the rewritten shards. Each table file is rewritten atomically, then the marker is
    replaced, so readers see the old or the new shard, never a mix that duplicates or loses rows.
    """
    manifest = StageManifest(root, stage)
    rewritten = []
    value_set = pa.array(sorted(image_ids), pa.string())
    for label in sorted(shards):
        if not manifest.is_committed(label):
            continue
        marker = load_json(manifest.marker_uri(label))
        files = marker.get("files", {})
        tables = {name: read_parquet(uri) for name, uri in files.items()}
        hit = any(t.num_rows and pc.any(pc.is_in(t.column("image_id"), value_set=value_set)).as_py()
                  for t in tables.values())
        if not hit:
            continue
        kept_tables, dropped_ok = {}, set()
        for name, t in tables.items():
            gone = pc.is_in(t.column("image_id"), value_set=value_set)
            if name != "errors":
                dropped_ok.update(t.filter(gone).column("image_id").to_pylist())
            kept_tables[name] = kept = t.filter(pc.invert(gone))
        # new file names, then the marker switch: a reader holding the old marker still finds the old files,
        # one with the new marker finds only new files (never a new regions file next to an old globals file)
        stamp = f"r{time.time_ns()}"
        new_files = {}
        for name, kept in kept_tables.items():
            base = re.sub(r"(\.r\d+)?\.parquet$", "", files[name])
            new_files[name] = f"{base}.{stamp}.parquet"
            write_parquet(new_files[name], kept)
        info = {k: v for k, v in marker.items() if k not in ("files", "shard", "committed_at", "rewritten_at")}
        # the old marker's counts include the dropped rows: count what the rewritten shard holds
        if "images" in info:
            info["images"] = (kept_tables["images"].num_rows if "images" in kept_tables
                              else max(0, int(info["images"]) - len(dropped_ok)))
        if "errors" in info and "errors" in kept_tables:
            info["errors"] = kept_tables["errors"].num_rows
        if "rows" in info and "globals" in kept_tables:
            info["rows"] = kept_tables["globals"].num_rows
        manifest.commit(label, new_files, **info, rewritten_at=time.time())
        for old_uri in files.values():
            if old_uri not in new_files.values():
                fs, path = get_fs(old_uri)
                try:
                    fs.rm(path)
                except FileNotFoundError:
                    pass
        rewritten.append(label)
    return rewritten


def reindex(cfg: IndexConfig) -> dict[str, Any]:
    """Incremental update of the run at ``cfg.out``; see the module docstring."""
    out = cfg.out
    manifest_uri = join(out, "corpus", "manifest.parquet")
    if not exists(manifest_uri):
        raise StageFailed(f"no previous run at {redact(out)}: run `python -m jobs.index` first")
    previous = read_parquet(manifest_uri)
    current = select_subset(list_corpus(cfg.images), cfg.limit, cfg.include, cfg.exclude)
    d = diff_corpus(previous, current)
    gone = d["deleted"] | d["changed"]
    added = d["new"] | d["changed"]
    n = max(1, current.num_rows)
    changed_fraction = (len(d["new"]) + len(d["deleted"]) + len(d["changed"])) / n
    summary: dict[str, Any] = {"images_in_corpus": current.num_rows, "stages": {}, "diff": {
        k: len(v) for k, v in d.items()}, "changed_fraction": changed_fraction}
    log.info("[reindex] %d new, %d changed, %d deleted (%.1f%% of the corpus)", len(d["new"]), len(d["changed"]),
             len(d["deleted"]), 100 * changed_fraction)

    # 1. manifest: keep existing rows (and shards), add new ones in new shards after the last one
    kept = previous.filter(pc.invert(pc.is_in(previous.column("image_id"), value_set=pa.array(sorted(gone),
                                                                                              pa.string()))))
    first = (max(previous.column("shard").to_pylist()) + 1) if previous.num_rows else 0
    fresh = current.filter(pc.is_in(current.column("image_id"), value_set=pa.array(sorted(added), pa.string())))
    new_rows = assign_shards(fresh, cfg.extract.shard_size, first_shard=first)
    manifest = pa.concat_tables([kept.cast(MANIFEST_SCHEMA), new_rows]).sort_by("image_id")
    # 2. drop deleted/changed rows from committed shards (before publishing the new manifest)
    if gone:
        gone_rows = previous.filter(pc.is_in(previous.column("image_id"), value_set=pa.array(sorted(gone), pa.string())))
        shards = {f"{s:05d}" for s in gone_rows.column("shard").to_pylist()}
        for stage in SHARD_STAGES:
            rewritten = drop_images(out, stage, gone, shards)
            if stage == "descriptors":
                continue
            summary.setdefault("rewritten_shards", {})[stage] = len(rewritten)
    write_manifest(out, manifest)

    rebuild_graph = changed_fraction > cfg.reindex.rebuild_graph_fraction
    run = RunManifest(out)
    plan = []
    for stage in cfg.stages:
        if stage == "whiten" and cfg.reindex.reuse_whitening and run.stage("whiten"):
            continue
        if stage == "graph" and not rebuild_graph and (run.stage("graph") or {}).get("status") == "done":
            continue
        if stage == "graph" and (run.stage("graph") or {}).get("status") == "stale":
            rebuild_graph = True
        plan.append(stage)
    if rebuild_graph and "graph" in plan:
        # every image's object saliency depends on the graph: redo them all. Mark the graph stale first, so
        # that a rerun after a crash between here and the rebuild still rebuilds it (the corpus diff is empty
        # then, but the reset shards must not be redone with the old graph)
        run.record("graph", {**(run.stage("graph") or {}), "status": "stale"})
        StageManifest(out, "object_saliency").reset()
        StageManifest(out, "descriptors").reset()
    summary["graph_rebuilt"] = bool(rebuild_graph and "graph" in plan)
    for stage in plan:
        t0 = time.time()
        with MemoryWatch() as mem:
            try:
                result = STAGE_FUNCS[stage](cfg, manifest)
            except StageFailed:
                raise
            except Exception as exc:
                raise StageFailed(f"stage {stage} failed: {type(exc).__name__}: {redact(str(exc))}") from exc
        run.record(stage, {"status": "done", "parameters": stage_params(cfg, stage)["params"], "result": result,
                           "reindex": True, "seconds": time.time() - t0, "peak_rss_bytes": mem.peak,
                           "output_version": params_hash([stage, time.time()])})
        summary["stages"][stage] = {**result, "seconds": time.time() - t0}
    restamp_chain(run, cfg, manifest)
    prune_snapshots(cfg, summary)
    return summary


def restamp_chain(run: RunManifest, cfg: IndexConfig, manifest: pa.Table) -> None:
    """Record every finished stage's hash as ``jobs.index`` computes it for the current corpus, so that
    ``jobs.index`` with the same config on this output finds the stages up to date instead of redoing them
    all: the reused whitening, graph and codebook are accepted for the new corpus, which is what reindexing
    means. A stage that is not done (and every stage after it) keeps no valid hash and is redone."""
    previous = corpus_version(manifest)
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        entry = run.stage(stage)
        if not entry or entry.get("status") != "done" or "output_version" not in entry:
            break
        run.record(stage, {**entry, "params_hash": params_hash([stage_params(cfg, stage), previous]),
                           "input_version": previous})
        previous = entry["output_version"]


def prune_snapshots(cfg: IndexConfig, summary: dict[str, Any]) -> None:
    """Delete index snapshots older than ``keep_days`` (never LATEST nor the newest ``keep_min``)."""
    from storage.snapshot import prune
    from storage.uri import listdir

    removed = 0
    for name_uri in listdir(join(cfg.out, "indexes")):
        name = name_uri.rsplit("/", 1)[-1]
        removed += len(prune(cfg.out, name, keep_days=cfg.reindex.keep_days, keep_min=cfg.reindex.keep_min) or [])
    summary["pruned_snapshots"] = removed


def main(argv: list[str] | None = None) -> int:
    from jobs.index import parse_args

    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    try:
        check_access(cfg.out)
    except StorageError as exc:
        log.error("%s", exc)
        return 2
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    t0 = time.time()
    try:
        summary = reindex(cfg)
    except StageFailed as exc:
        log.error("%s", exc)
        return 1
    summary["seconds"] = time.time() - t0
    print_summary(summary)
    return 0


__all__ = ["diff_corpus", "drop_images", "reindex"]

if __name__ == "__main__":
    sys.exit(main())
