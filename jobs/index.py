"""Index job: images → tables (→ whitening → graph → centrality → object saliency → descriptors → indexes).

Run locally (Ray started on demand) or under ``ray job submit``::

    python -m jobs.index --images <folder|list.txt|manifest.parquet|s3://prefix> --out <uri> [--stages extract]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from actors.common import Progress, init_ray, plan_resources
from actors.extract import ExtractJob, job_parameters, run_extract
from pipeline.extract import ExtractConfig
from storage.corpus import assign_shards, list_corpus, subset_ids
from storage.tables import StageManifest, read_parquet, write_parquet
from storage.uri import StorageError, check_access, exists, join, redact

log = logging.getLogger("indexer")
ALL_STAGES = ("extract",)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def prepare_manifest(images: str, out: str, shard_size: int, limit: int | None = None) -> Any:
    """The run's corpus manifest: reused when the corpus is unchanged (stable shards across reruns)."""
    uri = join(out, "corpus", "manifest.parquet")
    corpus = list_corpus(images)
    if limit is not None:
        keep = set(subset_ids(corpus.column("image_id").to_pylist(), limit))
        import pyarrow.compute as pc

        corpus = corpus.filter(pc.is_in(corpus.column("image_id"), value_set=__import__("pyarrow").array(sorted(keep))))
    if exists(uri):
        previous = read_parquet(uri)
        if previous.column("image_id").to_pylist() == corpus.column("image_id").to_pylist() and \
                previous.column("uri").to_pylist() == corpus.column("uri").to_pylist():
            return previous
        log.warning("corpus changed since the last run of %s; use `python -m jobs.reindex` for incremental "
                    "updates — re-sharding and redoing every stage", redact(out))
        for stage in ALL_STAGES:
            StageManifest(out, stage).reset()
    manifest = assign_shards(corpus, shard_size)
    write_parquet(uri, manifest.replace_schema_metadata({b"schema_version": b"1", b"table": b"manifest"}))
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="image folder, URI list (.txt), Parquet manifest or s3:// prefix")
    p.add_argument("--out", required=True, help="output root (local path, file:// or s3://)")
    p.add_argument("--stages", default="extract", help=f"comma-separated stages from {ALL_STAGES}")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default=None, help="weights file/URI (default: the backbone's offline weights)")
    p.add_argument("--layer", default=None, help="conv layer whose activations are used (module path)")
    p.add_argument("--max-side", type=int, default=1024)
    p.add_argument("--scales", default="1", help="comma-separated input scales for global descriptors")
    p.add_argument("--regions", default="full,grid,fs_egm,cam", help="region sources")
    p.add_argument("--globals", default="mac,gem,spoc,crow,cam_ofa,fs_egm_sum", help="global methods")
    p.add_argument("--descriptor-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="deterministic subset of N images")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        log.error("unknown stages %s; known: %s", sorted(unknown), ALL_STAGES)
        return 2
    try:
        check_access(args.out)
        manifest = prepare_manifest(args.images, args.out, args.shard_size, args.limit)
    except (StorageError, FileNotFoundError, ValueError) as exc:
        log.error("%s", redact(str(exc)))
        return 2
    init_ray(args.ray_address, args.num_cpus)
    summary: dict[str, Any] = {"images_in_corpus": manifest.num_rows}
    if "extract" in stages:
        weights = args.weights
        if weights is None and args.backbone in ("mobilenet_v2", "efficientnet_lite0"):
            weights = f"builtin:{args.backbone}"
        config = ExtractConfig(max_side=args.max_side, scales=tuple(float(eval_scale(s)) for s in args.scales.split(",")),
                               region_sources=tuple(s for s in args.regions.split(",") if s),
                               global_methods=tuple(s for s in args.globals.split(",") if s))
        job = ExtractJob(out_root=args.out, config=config, backbone=args.backbone, weights=weights, layer=args.layer,
                         descriptor_dtype=args.descriptor_dtype, batch_size=args.batch_size)
        resources = plan_resources(args.workers)
        t0 = time.time()
        res = run_extract(job, manifest, resources, Progress("extract", manifest.num_rows))
        res["wall_seconds"] = time.time() - t0
        StageManifest(args.out, "extract").write_summary({"parameters": job_parameters(job), **res})
        summary["extract"] = res
    log.info("summary: %s", summary)
    print_summary(summary)
    return 0


def eval_scale(text: str) -> float:
    """Parse a scale such as ``1``, ``0.5`` or ``1/sqrt(2)``."""
    import math

    text = text.strip()
    if text.startswith("1/sqrt("):
        return 1.0 / math.sqrt(float(text[len("1/sqrt("):-1]))
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    return float(text)


def print_summary(summary: dict[str, Any]) -> None:
    """Human summary at the end of a run."""
    print("=" * 60)
    print(f"images in corpus: {summary.get('images_in_corpus')}")
    for stage, res in summary.items():
        if not isinstance(res, dict):
            continue
        parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()]
        print(f"{stage}: " + ", ".join(parts))
    print("=" * 60)


if __name__ == "__main__":
    sys.exit(main())
