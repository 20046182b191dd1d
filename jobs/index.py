"""Index job: images → tables → whitening → graph → centrality → object saliency → descriptors → indexes.

Run locally (Ray started on demand) or under ``ray job submit``::

    python -m jobs.index --config configs/demo.yaml
    python -m jobs.index --images <folder|list.txt|manifest.parquet|s3://prefix> --out <uri> [--stages extract,...]

Every stage records its parameters, input versions, counts, time and peak memory in ``<out>/run.json``.
A rerun skips committed shards and finished stages; a stage whose parameters changed is redone together
with every stage after it. A failed stage exits non-zero with its message; rerunning resumes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc

from actors.common import Progress, init_ray, plan_resources
from actors.extract import ExtractJob, ExtractWorker, run_extract
from jobs.config import STAGES, ConfigError, IndexConfig, load_config
from pipeline.extract import ExtractConfig
from storage.arrays import load_arrays, load_json, save_arrays, save_json
from storage.corpus import assign_shards, list_corpus, subset_ids
from storage.tables import StageManifest, read_parquet, write_parquet
from storage.uri import StorageError, check_access, exists, join, redact

log = logging.getLogger("indexer")


class StageFailed(RuntimeError):
    """A stage cannot go on; the message says why."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "filelock", "fsspec", "s3fs", "botocore", "aiobotocore", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------ corpus
def filter_ids(corpus: pa.Table, keep: set[str]) -> pa.Table:
    return corpus.filter(pc.is_in(corpus.column("image_id"), value_set=pa.array(sorted(keep), pa.string())))


def select_subset(corpus: pa.Table, limit: int | None, include: list[str] | None = None,
                  exclude: list[str] | None = None) -> pa.Table:
    """Images to index: ids matching an ``exclude`` glob dropped; with ``limit``, every id matching an
    ``include`` glob plus a stable sample of the others, ``limit`` in all."""
    import fnmatch

    if exclude:
        ids = corpus.column("image_id").to_pylist()
        corpus = filter_ids(corpus, {i for i in ids if not any(fnmatch.fnmatchcase(i, p) for p in exclude)})
    if limit is None:
        return corpus
    ids = corpus.column("image_id").to_pylist()
    must = {i for i in ids if any(fnmatch.fnmatchcase(i, pat) for pat in include or [])}
    rest = subset_ids([i for i in ids if i not in must], max(0, limit - len(must)))
    return filter_ids(corpus, must | set(rest))


def prepare_manifest(images: str, out: str, shard_size: int, limit: int | None = None,
                     include: list[str] | None = None, exclude: list[str] | None = None) -> pa.Table:
    """The run's corpus manifest, reused when the corpus is unchanged (stable shards across reruns)."""
    uri = join(out, "corpus", "manifest.parquet")
    corpus = select_subset(list_corpus(images), limit, include, exclude)
    if exists(uri):
        previous = read_parquet(uri)
        if previous.column("image_id").to_pylist() == corpus.column("image_id").to_pylist() and \
                previous.column("uri").to_pylist() == corpus.column("uri").to_pylist():
            return previous
        log.warning("the corpus changed since the last run of %s: use `python -m jobs.reindex` for an incremental "
                    "update; re-sharding and redoing every stage", redact(out))
        for stage in STAGES:
            StageManifest(out, stage).reset()
    manifest = assign_shards(corpus, shard_size)
    write_manifest(out, manifest)
    return manifest


def write_manifest(out: str, manifest: pa.Table) -> None:
    meta = {b"schema_version": b"1", b"table": b"manifest"}
    write_parquet(join(out, "corpus", "manifest.parquet"), manifest.replace_schema_metadata(meta))


# ------------------------------------------------------------------------------------------ run manifest
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
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunManifest:
    """``<out>/run.json``: per stage its parameters, input versions, counts, time and peak memory."""

    def __init__(self, out: str) -> None:
        self.uri = join(out, "run.json")
        self.data: dict[str, Any] = load_json(self.uri) if exists(self.uri) else {"stages": {}}

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.data["stages"][name] = entry
        self.data["updated_at"] = time.time()
        save_json(self.uri, self.data)

    def invalidate_from(self, name: str, out: str) -> None:
        """Forget ``name`` and every later stage (their inputs change)."""
        for later in STAGES[STAGES.index(name):]:
            self.data["stages"].pop(later, None)
            StageManifest(out, later).reset()
        save_json(self.uri, self.data)


# ------------------------------------------------------------------------------------------ stages
def extract_job(cfg: IndexConfig, stage: str = "extract") -> ExtractJob:
    e = cfg.extract
    weights = e.weights
    if weights is None and e.backbone in ("mobilenet_v2", "efficientnet_lite0"):
        weights = f"builtin:{e.backbone}"
    config = ExtractConfig.from_section(dataclasses.asdict(e))
    if stage == "object_saliency":  # that pass needs the scale-1 map only
        config = dataclasses.replace(config, scales=config.scales[:1], local_features=0)
    return ExtractJob(out_root=cfg.out, config=config, backbone=e.backbone, weights=weights, layer=e.layer,
                      descriptor_dtype=e.descriptor_dtype, batch_size=e.batch_size, stage=stage)


def learn_local_pca(cfg: IndexConfig, manifest: pa.Table, job: ExtractJob, reuse: bool = True) -> dict[str, Any]:
    """Learn the PCA of local descriptors on a sample of images (before they are written reduced)."""
    from pipeline.local_features import learn_pca

    uri = join(cfg.out, "artefacts", "local_pca", "pca.npz")
    if reuse and exists(uri):
        arrays = load_arrays(uri)
    else:
        import ray

        ids = subset_ids(manifest.column("image_id").to_pylist(), cfg.extract.local_pca_images, seed=1)
        rows = filter_ids(manifest, set(ids)).to_pylist()
        res = plan_resources(cfg.ray.workers, cfg.ray.use_gpu, cfg.ray.cpus_per_worker)
        job.torch_threads = res.torch_threads
        worker = ray.remote(ExtractWorker).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(job)
        X = ray.get(worker.sample_local_descriptors.remote(rows, 200))
        ray.kill(worker)
        if len(X) < 2:
            raise StageFailed("local PCA: no local descriptors in the sample (all sample images failed?)")
        mean, projection = learn_pca(X, dim=min(cfg.extract.local_dim, X.shape[1], len(X) - 1))
        save_arrays(uri, mean=mean, projection=projection, sample=np.int64(len(X)))
        arrays = load_arrays(uri)
    job.local_pca_mean = arrays["mean"].astype(np.float32)
    job.local_pca_projection = arrays["projection"].astype(np.float32)
    return {"pca_dim": int(job.local_pca_projection.shape[1])}


def stage_extract(cfg: IndexConfig, manifest: pa.Table) -> dict[str, Any]:
    job = extract_job(cfg)
    extra = learn_local_pca(cfg, manifest, job) if cfg.extract.local_features > 0 else {}
    res = plan_resources(cfg.ray.workers, cfg.ray.use_gpu, cfg.ray.cpus_per_worker)
    out = run_extract(job, manifest, res, Progress("extract", manifest.num_rows))
    if out["images"] == 0 and out["skipped_shards"] == 0:
        raise StageFailed(f"extract: no image could be processed ({out['errors']} errors: {out['error_reasons']})")
    return {**out, **extra}


def stage_whiten(cfg: IndexConfig, manifest: pa.Table) -> dict[str, Any]:
    from actors.descriptors import run_whiten

    return run_whiten(cfg.out, cfg.whiten)


def stage_graph(cfg: IndexConfig, manifest: pa.Table) -> dict[str, Any]:
    from actors.descriptors import run_graph

    res = plan_resources(cfg.ray.workers, cfg.ray.use_gpu, cfg.ray.cpus_per_worker)
    return run_graph(cfg.out, cfg.graph, num_cpus=res.num_cpus, num_workers=max(2, res.num_workers))


def stage_object_saliency(cfg: IndexConfig, manifest: pa.Table) -> dict[str, Any]:
    from actors.descriptors import artefact_uri, load_graph_artefacts
    from actors.object_saliency import ObjectSaliencyWorker, OSParams

    job = extract_job(cfg, stage="object_saliency")
    job.tables = ("regions", "globals", "errors")
    g = load_graph_artefacts(cfg.out)
    o = cfg.object_saliency
    params = OSParams(k=o.k, patch_side=o.patch_side, beta=cfg.graph.beta, Theta=o.Theta, theta=o.theta,
                      rho=o.rho, tau=o.tau, sigma=o.sigma)
    white = load_arrays(artefact_uri(cfg.out, "whitening", "regions.npz"))
    # only images that extracted successfully get an OS pass
    from storage.tables import TableStore

    good = set(TableStore(cfg.out).read("images", ["extract"], columns=["image_id"]).column("image_id").to_pylist())
    rows = filter_ids(manifest, good)
    res = plan_resources(cfg.ray.workers, cfg.ray.use_gpu, cfg.ray.cpus_per_worker)
    return run_extract(job, rows, res, Progress("object_saliency", rows.num_rows), worker_cls=ObjectSaliencyWorker,
                       worker_args=(white, g["f"], g["g"], g["index_bytes"], params))


def stage_descriptors(cfg: IndexConfig, manifest: pa.Table) -> dict[str, Any]:
    from actors.descriptors import run_descriptors

    methods = list(cfg.descriptors.methods)
    if "object_saliency" not in cfg.stages:
        methods = [m for m in methods if not m.startswith("os_egm")]
    return run_descriptors(cfg.out, methods, cfg.extract.descriptor_dtype)


def stage_faiss(cfg: IndexConfig, manifest: pa.Table) -> dict[str, Any]:
    from actors.indexes import run_faiss

    return run_faiss(cfg.out, cfg.faiss)


def stage_asmk(cfg: IndexConfig, manifest: pa.Table) -> dict[str, Any]:
    from actors.asmk import run_asmk

    return run_asmk(cfg.out, cfg.asmk, reuse_codebook=cfg.reindex.reuse_codebook)


STAGE_FUNCS: dict[str, Callable[[IndexConfig, pa.Table], dict[str, Any]]] = {
    "extract": stage_extract, "whiten": stage_whiten, "graph": stage_graph,
    "object_saliency": stage_object_saliency, "descriptors": stage_descriptors, "faiss": stage_faiss,
    "asmk": stage_asmk,
}


def stage_params(cfg: IndexConfig, stage: str) -> dict[str, Any]:
    """The config parts a stage depends on (a change re-runs it and everything after it)."""
    d = cfg.to_dict()
    own = {"extract": d["extract"], "whiten": d["whiten"], "graph": d["graph"],
           "object_saliency": d["object_saliency"], "descriptors": d["descriptors"], "faiss": d["faiss"],
           "asmk": d["asmk"]}[stage]
    return {"stage": stage, "params": own}


def corpus_version(manifest: pa.Table) -> str:
    """Version of the corpus a run indexes: a hash of its sorted (image id, image version) pairs; the first link of
    the chain of stage hashes (stage ``i`` hashes its parameters with stage ``i - 1``'s output version)."""
    return params_hash(sorted(zip(manifest.column("image_id").to_pylist(), manifest.column("version").to_pylist())))


def run_pipeline(cfg: IndexConfig, manifest: pa.Table) -> dict[str, Any]:
    """Run the configured stages in DAG order; finished stages with unchanged parameters are skipped."""
    run = RunManifest(cfg.out)
    summary: dict[str, Any] = {"images_in_corpus": manifest.num_rows, "stages": {}}
    previous_output = corpus_version(manifest)
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        params = stage_params(cfg, stage)
        phash = params_hash([params, previous_output])
        done = run.stage(stage)
        if done and done.get("status") == "done" and done.get("params_hash") == phash:
            log.info("[%s] up to date (parameters and inputs unchanged): skipped", stage)
            summary["stages"][stage] = {"skipped": True}
            previous_output = done["output_version"]
            continue
        if done and done.get("params_hash") != phash:
            log.info("[%s] parameters or inputs changed: redoing it and the stages after it", stage)
            run.invalidate_from(stage, cfg.out)
        log.info("[%s] starting", stage)
        t0 = time.time()
        with MemoryWatch() as mem:
            try:
                result = STAGE_FUNCS[stage](cfg, manifest)
            except StageFailed:
                raise
            except Exception as exc:
                run.record(stage, {"status": "failed", "params_hash": phash, "error": redact(str(exc))[:2000],
                                   "seconds": time.time() - t0})
                raise StageFailed(f"stage {stage} failed: {type(exc).__name__}: {redact(str(exc))}") from exc
        entry = {"status": "done", "params_hash": phash, "parameters": params["params"],
                 "input_version": previous_output, "output_version": params_hash([phash, time.time()]),
                 "result": result, "seconds": time.time() - t0, "peak_rss_bytes": mem.peak}
        run.record(stage, entry)
        previous_output = entry["output_version"]
        summary["stages"][stage] = {**result, "seconds": entry["seconds"], "peak_rss_gb": mem.peak / 2**30}
        log.info("[%s] done in %.1f s (peak RSS %.2f GB)", stage, entry["seconds"], mem.peak / 2**30)
    return summary


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (see configs/demo.yaml)")
    p.add_argument("--images", default=None, help="image folder, URI list (.txt), Parquet manifest or s3:// prefix")
    p.add_argument("--out", default=None, help="output root (local path, file:// or s3://)")
    p.add_argument("--stages", default=None, help=f"comma-separated stages from {STAGES}")
    p.add_argument("--limit", type=int, default=None, help="deterministic subset of N images")
    p.add_argument("--full", action="store_true", help="index the whole corpus (drops the config's demo limit)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--weights", default=None, help="weights file/URI (default: the backbone's offline weights)")
    p.add_argument("--layer", default=None)
    p.add_argument("--max-side", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set graph.k=30 (YAML value)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> IndexConfig:
    import yaml

    ov: dict[str, Any] = {}
    for key, val in (("images", args.images), ("out", args.out), ("limit", args.limit),
                     ("extract.backbone", args.backbone), ("extract.weights", args.weights),
                     ("extract.layer", args.layer), ("extract.max_side", args.max_side),
                     ("extract.shard_size", args.shard_size), ("ray.workers", args.workers),
                     ("ray.address", args.ray_address), ("ray.num_cpus", args.num_cpus)):
        if val is not None:
            ov[key] = val
    if args.stages is not None:
        ov["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
    elif args.config is None:
        ov["stages"] = ["extract"]
    for item in args.set:
        key, _, val = item.partition("=")
        ov[key.strip()] = yaml.safe_load(val)
    cfg = load_config(args.config, ov)
    if args.full:
        cfg.limit = None
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    try:
        check_access(cfg.out)
        manifest = prepare_manifest(cfg.images, cfg.out, cfg.extract.shard_size, cfg.limit, cfg.include,
                                    cfg.exclude)
    except (StorageError, FileNotFoundError, ValueError) as exc:
        log.error("%s", redact(str(exc)))
        return 2
    save_json(join(cfg.out, "config.json"), cfg.to_dict())
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    t0 = time.time()
    try:
        summary = run_pipeline(cfg, manifest)
    except StageFailed as exc:
        log.error("%s", exc)
        log.error("fix the cause and rerun the same command: committed shards and finished stages are kept")
        return 1
    summary["seconds"] = time.time() - t0
    print_summary(summary)
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    """Human summary at the end of a run."""
    print("=" * 72)
    print(f"images in corpus: {summary.get('images_in_corpus')}   total time: {summary.get('seconds', 0):.1f} s")
    for stage, res in summary.get("stages", {}).items():
        parts = []
        for k, v in res.items():
            if isinstance(v, float):
                parts.append(f"{k}={v:.3g}")
            elif isinstance(v, (int, str, bool)) or (isinstance(v, dict) and len(str(v)) < 80):
                parts.append(f"{k}={v}")
        print(f"{stage:>16}: " + ", ".join(parts))
    print("=" * 72)


if __name__ == "__main__":
    sys.exit(main())
