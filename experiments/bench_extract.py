"""Extraction throughput: the pipeline's images/s next to the bare backbone forward pass, same images, same run.

    python -m jobs.bench_extract [--images DIR] [--n 64] [--max-side 1024]

The bare reference decodes every image beforehand and times only ``backbone(x)``; the pipeline number
is the extraction stage end to end (read, decode, resize, forward, pooling, regions, Parquet writes,
commits), measured both as stage wall time and as the workers' steady-state time (without actor start-up).
Target: pipeline >= 85% of the bare forward throughput on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from actors.common import Progress, init_ray, plan_resources
from actors.extract import ExtractJob, run_extract
from pipeline.backbone import build_backbone
from pipeline.extract import ExtractConfig
from pipeline.preprocess import to_network_input
from storage.corpus import assign_shards, list_corpus
from storage.images import decode_image
from storage.tables import StageManifest
from storage.weights import load_state_dict

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks" / "jpg"


def pick_images(folder: Path, n: int) -> list[Path]:
    """A fixed, varied sample: every k-th file of the sorted folder."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    step = max(1, len(files) // n)
    return files[::step][:n]


def equal_shape_batches(inputs: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Consecutive inputs of equal shape stacked in batches of at most ``batch_size`` (the actor's rule)."""
    batches, pending = [], []
    for x in inputs:
        if pending and (x.shape != pending[0].shape or len(pending) >= batch_size):
            batches.append(torch.stack(pending))
            pending = []
        pending.append(x)
    if pending:
        batches.append(torch.stack(pending))
    return batches


def bare_forward(paths: list[Path], backbone: str, max_side: int, threads: int, batch_size: int) -> float:
    """Images/s of the backbone forward pass alone (inputs decoded, resized and batched beforehand).

    Runs inside a Ray worker with the same CPU share and torch threads as an extraction actor, and batches
    equal-size inputs exactly as the actor does, so it is the best the pipeline could reach: the forward
    pass with nothing else (no reading, decoding, pooling, regions, EGM, Parquet writes).
    """
    torch.set_num_threads(threads)
    bb = build_backbone(backbone, load_state_dict(f"builtin:{backbone}"))
    inputs = [to_network_input(decode_image(p.read_bytes()), max_side) for p in paths]
    batches = equal_shape_batches(inputs, batch_size)
    bb(inputs[0][None])  # warm-up
    t0 = time.perf_counter()
    for x in batches:
        bb(x)
    return len(inputs) / (time.perf_counter() - t0)


def pipeline_run(paths: list[Path], backbone: str, max_side: int, shard_size: int) -> dict:
    """Run the real extraction stage over the images; returns wall and steady-state images/s."""
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        img_dir = work / "images"
        img_dir.mkdir()
        for p in paths:
            os.symlink(p, img_dir / p.name)
        manifest = assign_shards(list_corpus(str(img_dir)), shard_size)
        job = ExtractJob(out_root=str(work / "out"), config=ExtractConfig(max_side=max_side), backbone=backbone,
                         weights=f"builtin:{backbone}")
        res = run_extract(job, manifest, plan_resources(), Progress("extract", manifest.num_rows, every=30))
        shard_seconds = sum(m["seconds"] for m in StageManifest(job.out_root, "extract").committed().values())
        return {"images": res["images"], "wall_images_per_s": res["images_per_second"],
                "steady_images_per_s": res["images"] / shard_seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    paths = pick_images(args.images, args.n)
    init_ray()
    res = plan_resources()
    remote_bare = ray.remote(bare_forward).options(num_cpus=res.num_cpus)
    # alternate reference and pipeline so that load changes on a shared machine hit both
    bare_runs, pipe_runs = [], []
    for _ in range(args.repeats):
        bare_runs.append(ray.get(remote_bare.remote(paths, args.backbone, args.max_side, res.torch_threads,
                                                    ExtractJob.batch_size)))
        pipe_runs.append(pipeline_run(paths, args.backbone, args.max_side, args.shard_size))
    bare = sum(bare_runs) / len(bare_runs)
    pipe = {k: sum(r[k] for r in pipe_runs) / len(pipe_runs) for k in pipe_runs[0]}
    out = {"bare_runs": bare_runs, "pipeline_runs": pipe_runs, "images": len(paths), "max_side": args.max_side, "backbone": args.backbone,
           "bare_forward_images_per_s": bare, **pipe,
           "ratio_steady": pipe["steady_images_per_s"] / bare, "ratio_wall": pipe["wall_images_per_s"] / bare}
    print(f"{'measure':<34}{'images/s':>10}{'ratio':>8}")
    print(f"{'bare backbone forward':<34}{bare:>10.2f}{1.0:>8.2f}")
    print(f"{'pipeline (workers, steady state)':<34}{pipe['steady_images_per_s']:>10.2f}{out['ratio_steady']:>8.2f}")
    print(f"{'pipeline (stage wall, incl. start)':<34}{pipe['wall_images_per_s']:>10.2f}{out['ratio_wall']:>8.2f}")
    print("target: steady-state ratio >= 0.85 ->", "OK" if out["ratio_steady"] >= 0.85 else "BELOW TARGET")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
