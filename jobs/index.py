"""Index job: images → tables → whitening → graph → centrality → object saliency → descriptors → indexes.

    python -m jobs.index --images <folder|list.txt|manifest.parquet|s3://prefix> --out <uri>
    python -m jobs.index --config configs/demo.yaml [--stages extract,whiten] [--set graph.k=30]

Builds the whole index by default (every stage below); ``--stages`` restricts it. Runs on a local Ray (started
on demand) or, under ``ray job submit``, on the cluster. Every stage records its parameters, input versions,
counts, time and peak memory in ``<out>/run.json``. A rerun skips committed shards and finished stages; a
stage whose parameters changed is redone together with every stage after it. A failed stage exits non-zero
with its message; rerunning the same command resumes it. Only one index or reindex job may write an output
at a time (a lease in ``<out>``); a second one fails at once and says who holds it.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import yaml

from actors.asmk import run_asmk_stage
from actors.common import init_ray, light_resources
from actors.descriptors import run_descriptors_stage
from actors.diffusion import run_diffusion_stage
from actors.engine import Stage, StageFailed, prepare_manifest, publish_indexes, run_pipeline
from actors.extract import run_extract_stage
from actors.graph import run_graph_stage
from actors.indexes import run_faiss_stage
from actors.object_saliency import run_object_saliency_stage
from actors.rpn import run_rpn_stage
from actors.whiten import run_whiten_stage
from pipeline import faiss_index as fi
from pipeline.config import ALL_STAGES, STAGES, IndexConfig, load_config
from service.errors import run_cli
from storage.run import save_run_config
from storage.lease import Lease
from storage.uri import check_access, redact

log = logging.getLogger("indexer")


def _os_methods(cfg: IndexConfig) -> tuple[str, ...]:
    """Final methods to compute: the OS ones only when the object-saliency stage runs."""
    return tuple(m for m in cfg.descriptors.methods if "object_saliency" in cfg.stages or not m.startswith("os_egm"))


def descriptors_params(cfg: IndexConfig) -> Any:
    """What the descriptors stage depends on: its section, and the learned projection / RPN regions when they
    are used (a run without either keeps the hash it always had)."""
    if cfg.whiten.kind == "pca" and cfg.regions.source == "grid":
        return cfg.descriptors
    return cfg.descriptors, cfg.whiten.projection, cfg.regions


# The DAG, in order: name, what it runs, the config sections its hash covers.
DAG: tuple[Stage, ...] = (
    Stage("extract", lambda c, m, r: run_extract_stage(c.out, c.extract, m, r), lambda c: c.extract),
    Stage("whiten", lambda c, m, r: run_whiten_stage(c.out, c.whiten), lambda c: c.whiten.pca_params()),
    Stage("graph", lambda c, m, r: run_graph_stage(c.out, c.graph, c.katz, r.num_cpus, max(2, r.num_workers)),
          lambda c: (c.graph, c.katz)),
    Stage("object_saliency", run_object_saliency_stage, lambda c: (c.object_saliency, c.graph.beta)),
    Stage("rpn", run_rpn_stage, lambda c: c.regions),   # only with regions.source: rpn (IndexConfig.validated)
    Stage("descriptors", lambda c, m, r: run_descriptors_stage(c.out, _os_methods(c), c.extract.descriptor_dtype,
                                                               light_resources(), c.whiten.projection),
          descriptors_params),
    Stage("faiss", lambda c, m, r: run_faiss_stage(c.out, c.faiss), lambda c: fi.stage_parameters(c.faiss)),
    Stage("asmk", lambda c, m, r: run_asmk_stage(c.out, c.asmk, reuse_codebook=c.reindex.reuse_codebook),
          lambda c: c.asmk),
    Stage("diffusion", lambda c, m, r: run_diffusion_stage(c.out, c.diffusion), lambda c: c.diffusion),
)
assert tuple(s.name for s in DAG) == ALL_STAGES


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "filelock", "fsspec", "s3fs", "botocore", "aiobotocore", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None, prog: str = "python -m jobs.index") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (see configs/demo.yaml)")
    p.add_argument("--images", default=None, help="image folder, URI list (.txt), Parquet manifest or s3:// prefix")
    p.add_argument("--out", default=None, help="output root (local path, file:// or s3://)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--limit", type=int, default=None, help="deterministic subset of N images")
    p.add_argument("--full", action="store_true", help="index the whole corpus (drops the config's demo limit)")
    for flag, key in (("--backbone", "extract.backbone"), ("--weights", "extract.weights"),
                      ("--layer", "extract.layer"), ("--max-side", "extract.max_side"),
                      ("--shard-size", "extract.shard_size"), ("--workers", "ray.workers"),
                      ("--ray-address", "ray.address"), ("--num-cpus", "ray.num_cpus")):
        p.add_argument(flag, default=None, type=int if key.endswith(("max_side", "shard_size", "workers", "num_cpus"))
                       else str, help=f"sets {key}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set graph.k=30 (YAML value)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> IndexConfig:
    """The typed config: the YAML file, then the flags, then ``--set`` overrides."""
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
    if args.full:
        ov["limit"] = None
    for item in args.set:
        key, _, val = item.partition("=")
        ov[key.strip()] = yaml.safe_load(val)
    return load_config(args.config, ov)


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


def job_lease(cfg: IndexConfig, command: str) -> Lease:
    """The output's lease for this job (a second job on the same output fails at once, naming the holder)."""
    return Lease(cfg.out, {"command": command, "images": redact(cfg.images)}, ttl_s=cfg.lease.ttl_s,
                 heartbeat_s=cfg.lease.heartbeat_s)


def index(cfg: IndexConfig) -> dict[str, Any]:
    """Build (or bring up to date) the index of ``cfg`` under the output's lease; returns the run summary."""
    check_access(cfg.out)
    with job_lease(cfg, "index") as lease:
        manifest = prepare_manifest(cfg, DAG)
        save_run_config(cfg.out, cfg.to_dict())
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
        t0 = time.time()
        summary = run_pipeline(cfg, manifest, DAG, lease)
        summary["release"] = publish_indexes(cfg)
        summary["seconds"] = time.time() - t0
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        try:
            summary = index(config_from_args(args))
        except StageFailed as exc:
            log.error("%s", exc)
            log.error("fix the cause and rerun the same command: committed shards and finished stages are kept")
            return 1
        print_summary(summary)
        return 0

    return run_cli(body, args.verbose, "jobs.index")


if __name__ == "__main__":
    sys.exit(main())
