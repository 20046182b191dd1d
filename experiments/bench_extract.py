"""Extraction throughput: the extract stage's images/s next to the bare backbone forward pass, same images, same run.

    python -m experiments.bench_extract [--config configs/benchmark.yaml] [--images DIR] [--n 64]
                                        [--max-side 1024] [--device auto|cpu|cuda] [--lanes 0] [--repeats 2]
                                        [--json out.json]

What is extracted (backbone, weights, scales, regions, globals, local features, batch size) is the config's
``extract`` section; ``--max-side`` overrides ``extract.max_side``. The bare reference runs in a Ray worker
with the same resources (CPU share, torch threads, GPU) as an extraction actor: it decodes every image
beforehand, builds the same network inputs (every forward scale of the config) and batches them by the
actor's rule, then times only the forward passes (on a GPU including the host-to-device copy of each batch
and a synchronisation, as the actor's forward does). With learned keypoints (``extract.keypoints``: xfeat,
aliked) their network is part of the forward: the reference also runs the keypoint extractor on each batch's
RGB arrays, decoded beforehand at the keypoints' side as the actor decodes them (its own resize, detection and
top-N included, as in the actor); ``--set extract.keypoints.name=none`` measures the CNN alone.
The pipeline number is the real stage,
``actors.extract.run_extract_stage`` over a temporary run (read, decode, resize, forward, pooling, regions,
EGM, local features, Parquet writes and commits), measured as the workers' steady-state time (sum of the
shards' own times, without actor start-up), as the shards' wall time (with the actors' start), and as the
whole stage (with the local PCA learned on a sample first, when the config has local features). Reference
and pipeline alternate ``--repeats`` times so load changes on a shared machine hit both.
Target: steady state >= 85% of the bare forward throughput.

The actor maps batches on ``lanes`` threads (``actors.extract.ImageStageSpec.lane_plan``; on the CPU by default
two lanes of ``torch_threads // 2`` intra-op threads each). The target's reference is the forward as it ran
before lanes (one thread of the actor with all its torch threads); on the CPU a second reference line times the
bare forward in the actor's lanes too, so that both what the lanes gain and what the rest of the pipeline costs
are visible.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from actors.common import ActorResources, init_ray, plan_resources
from actors.extract import ImageStageSpec, run_extract_stage
from experiments.common import DEFAULT_DATA, add_config_args, config_from_args, load_backbone, read_image, write_json
from pipeline.extract import ExtractConfig, scaled_sizes
from pipeline.keypoints import build_keypoint_extractor
from pipeline.preprocess import to_network_input
from storage.corpus import assign_shards, list_corpus
from storage.keypoint_weights import load_keypoint_weights
from storage.tables import StageManifest

TARGET = 0.85


def pick_images(folder: Path, n: int) -> list[Path]:
    """A fixed, varied sample: every k-th file of the sorted folder."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    step = max(1, len(files) // n)
    return files[::step][:n]


def keypoint_input(path: Path, cfg: ExtractConfig) -> np.ndarray | None:
    """The RGB array the actor's keypoint extractor gets (decoded at ``extract.keypoint_side``), None without
    learned keypoints."""
    if not cfg.keypoints.learned:
        return None
    side = max(cfg.keypoint_side, cfg.decode_side)
    return np.asarray(read_image(path, side).convert("RGB"))


def network_inputs(path: Path, cfg: ExtractConfig) -> list[torch.Tensor]:
    """The inputs the extraction actor builds for one image: one per forward scale, decoded with draft mode."""
    img = read_image(path, cfg.decode_side)
    return [to_network_input(img, size=(w, h)) for w, h in scaled_sizes(img.width, img.height, cfg)]


def equal_shape_batches(inputs: list[list[torch.Tensor]], batch_size: int) -> list[list[torch.Tensor]]:
    """Consecutive images whose inputs have equal shapes, at most ``batch_size`` per batch (the actor's rule);
    each batch is one stacked tensor per forward scale."""
    batches, pending = [], []
    for x in inputs:
        if pending and ([t.shape for t in x] != [t.shape for t in pending[0]] or len(pending) >= batch_size):
            batches.append([torch.stack(s) for s in zip(*pending)])
            pending = []
        pending.append(x)
    if pending:
        batches.append([torch.stack(s) for s in zip(*pending)])
    return batches


def bare_forward(paths: list[Path], cfg: ExtractConfig, threads: int, lanes: int = 1) -> dict:
    """Images/s of the forward passes alone (inputs decoded, resized and batched beforehand), on the device an
    extraction actor with these resources would use (CUDA when Ray gave the worker a GPU). ``lanes > 1`` (CPU
    only): the batches are forwarded by that many threads at once, each with ``threads // lanes`` torch threads,
    as the actor's lanes do."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bb = load_backbone(cfg, device)
    batches = equal_shape_batches([network_inputs(p, cfg) for p in paths], cfg.batch_size)
    # the learned keypoints' network is a second forward of the same pass (extract.keypoints): the actor runs it
    # per batch on RGB arrays decoded beforehand, so the reference does too (same batches of images)
    kp_ex, kp_batches = None, []
    if cfg.keypoints.learned:
        kp_ex = build_keypoint_extractor(cfg.keypoints.extractor_config(device=str(device)), device,
                                         state_dict=load_keypoint_weights(cfg.keypoints.name))
        sizes = [len(b[0]) for b in batches]
        rgbs = [keypoint_input(p, cfg) for p in paths]
        starts = np.cumsum([0, *sizes])
        kp_batches = [rgbs[a:b] for a, b in zip(starts[:-1], starts[1:])]

    def forward(job: tuple[list[torch.Tensor], list[np.ndarray] | None]) -> None:
        scales, rgbs = job
        with torch.inference_mode():
            for x in scales:
                bb(x.to(device, non_blocking=True))
            if kp_ex is not None and rgbs:
                kp_ex.extract_batch(rgbs)

    jobs = [(b, kp_batches[i] if kp_batches else None) for i, b in enumerate(batches)]
    with torch.inference_mode():
        bb(batches[0][0][:1].to(device))  # warm-up
        if kp_ex is not None:
            kp_ex.extract_batch(kp_batches[0][:1])
    lanes = 1 if device.type == "cuda" else max(1, lanes)
    pool = ThreadPoolExecutor(lanes, initializer=torch.set_num_threads, initargs=(max(1, threads // lanes),))
    if lanes > 1:
        list(pool.map(forward, jobs[:lanes]))  # warm-up of each lane's kernels
    t0 = time.perf_counter()
    if lanes > 1:
        list(pool.map(forward, jobs))
    else:
        for job in jobs:
            forward(job)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    pool.shutdown()
    return {"images_per_s": len(paths) / seconds, "device": str(device), "batches": len(batches), "lanes": lanes,
            "threads_per_lane": max(1, threads // lanes),
            "keypoints": f"{cfg.keypoints.name} @{cfg.keypoints.max_side} px" if kp_ex is not None else None}


def pipeline_run(paths: list[Path], cfg: ExtractConfig, resources: ActorResources, lanes: int = 0) -> dict:
    """Run the real extraction stage over the images in a temporary run; wall and steady-state images/s."""
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        img_dir = work / "images"
        img_dir.mkdir()
        for p in paths:
            (img_dir / p.name).symlink_to(p.resolve())
        manifest = assign_shards(list_corpus(str(img_dir)), cfg.shard_size)
        root = str(work / "run")
        t0 = time.perf_counter()
        res = run_extract_stage(root, cfg, manifest, resources, lanes=lanes)
        stage_s = time.perf_counter() - t0
        shard_seconds = sum(m["seconds"] for m in StageManifest(root, "extract").committed().values())
        return {"images": res["images"], "errors": res["errors"], "wall_images_per_s": res["images_per_second"],
                "stage_images_per_s": res["images"] / stage_s,
                "steady_images_per_s": res["images"] / max(shard_seconds, 1e-9)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_results(out: dict) -> None:
    bare = out["bare_forward_images_per_s"]
    kp = out["bare_runs"][0].get("keypoints")
    print(f"{out['images']} images, max side {out['max_side']}, forward scales {out['forward_scales']}"
          f"{f' + keypoints {kp}' if kp else ''}, "
          f"{out['backbone']} on {out['device']}, {out['workers']} worker(s), {out['torch_threads']} torch thread(s), "
          f"pipeline lanes {out['lanes']} x {out['threads_per_lane']} thread(s)")
    print(f"{'measure':<44}{'images/s':>10}{'ratio':>8}")
    print(f"{'bare forward (1 lane, all threads)':<44}{bare:>10.2f}{1.0:>8.2f}")
    if out.get("bare_lanes_images_per_s"):
        label = f"bare forward ({out['lanes']} lanes x {out['threads_per_lane']} thr)"
        print(f"{label:<44}{out['bare_lanes_images_per_s']:>10.2f}{out['bare_lanes_images_per_s'] / bare:>8.2f}")
    for key, label in (("steady_images_per_s", "pipeline (workers, steady state)"),
                       ("wall_images_per_s", "pipeline (shards wall, incl. actor start)"),
                       ("stage_images_per_s", "pipeline (whole stage, incl. local PCA)")):
        print(f"{label:<44}{out[key]:>10.2f}{out[key] / bare:>8.2f}")
    ok = out["ratio_steady"] >= TARGET
    print(f"target: steady-state ratio >= {TARGET} ->", "OK" if ok else "BELOW TARGET")
    if out.get("bare_lanes_images_per_s"):
        print(f"steady state / bare forward in the same lanes: {out['ratio_steady_vs_lanes']:.2f} "
              "(the cost of everything but the forward)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--images", type=Path, default=DEFAULT_DATA / "jpg")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-side", type=int, default=None, help="sets extract.max_side")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: a GPU per worker when the Ray cluster has GPUs; cpu hides the GPUs from the local "
                         "Ray this script starts")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the actor and the reference (default: the resource plan's)")
    ap.add_argument("--lanes", type=int, default=0,
                    help="the actor's lanes (batches mapped at once; 0: auto, 1: the former single-lane mapper)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the numbers as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args, extract__max_side=args.max_side).extract
    paths = pick_images(args.images, args.n)
    if args.device == "cpu":
        # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for workers that asked for no GPU, so an actor would still
        # find the GPU: hide it from the local Ray started below (and from every worker it starts)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    init_ray()
    res = plan_resources(use_gpu={"auto": None, "cpu": False, "cuda": True}[args.device])
    if args.device == "cuda" and res.num_gpus == 0:
        raise SystemExit("--device cuda: the Ray cluster has no GPU")
    if args.threads:
        res = dataclasses.replace(res, torch_threads=args.threads)
    remote_bare = ray.remote(bare_forward).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus)
    lanes, per_lane = ImageStageSpec("", "extract", cfg, torch_threads=res.torch_threads,
                                     lanes=args.lanes).lane_plan(cuda=res.num_gpus > 0)
    bare_runs, lane_runs, pipe_runs = [], [], []
    for _ in range(args.repeats):  # alternate so that load changes on a shared machine hit both
        bare_runs.append(ray.get(remote_bare.remote(paths, cfg, res.torch_threads)))
        if lanes > 1 and res.num_gpus == 0:
            lane_runs.append(ray.get(remote_bare.remote(paths, cfg, res.torch_threads, lanes)))
        pipe_runs.append(pipeline_run(paths, cfg, res, args.lanes))
    bare = sum(r["images_per_s"] for r in bare_runs) / len(bare_runs)
    bare_lanes = sum(r["images_per_s"] for r in lane_runs) / len(lane_runs) if lane_runs else None
    pipe = {k: sum(r[k] for r in pipe_runs) / len(pipe_runs) for k in pipe_runs[0] if k.endswith("_per_s")}
    out = {"bare_runs": bare_runs, "bare_lanes_runs": lane_runs, "pipeline_runs": pipe_runs, "images": len(paths),
           "max_side": cfg.max_side, "forward_scales": list(cfg.forward_scales), "backbone": cfg.backbone,
           "device": bare_runs[0]["device"], "workers": res.num_workers, "torch_threads": res.torch_threads,
           "lanes": lanes, "threads_per_lane": per_lane, "bare_forward_images_per_s": bare,
           "bare_lanes_images_per_s": bare_lanes, **pipe,
           "ratio_steady": pipe["steady_images_per_s"] / bare, "ratio_wall": pipe["wall_images_per_s"] / bare,
           "ratio_stage": pipe["stage_images_per_s"] / bare,
           "ratio_steady_vs_lanes": pipe["steady_images_per_s"] / bare_lanes if bare_lanes else None,
           "errors": sum(r["errors"] for r in pipe_runs)}
    print_results(out)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
