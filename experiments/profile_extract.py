"""Where the extraction mapper's time goes: CPU seconds per image of each step, measured one step at a time.

    python -m experiments.profile_extract [--config configs/benchmark.yaml] [--n 64] [--max-side 1024]
                                          [--threads 2] [--cprofile 25] [--json out.json]

Steps (the work of ``actors.extract.ImageShardMapper`` on one shard, run serially here so that each has its
own cost): read + sha1, decode (``storage.images.decode_image``, draft mode), network input (resize +
normalise, every forward scale), forward (the actor's batches), keypoints (the learned keypoint network
of ``extract.keypoints``, batched like the forward), features (``pipeline.extract.extract_features``
with a cProfile breakdown by function), rows (``_add``: local PCA and the row buffers) and the Parquet write.
CPU time is ``time.process_time`` (every thread of the process), so a busy machine inflates the wall clock but
not these numbers much; the serial steps run with the torch thread count of one of the mapper's lanes
(``--threads`` split over its lanes: one thread each by default, where no intra-op thread spins). Then the real
mapper runs the same shard (decode threads and lanes overlapping) and its wall and CPU time are printed next to
the sum of the parts: what the overlap costs or saves.
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actors.extract import ImageShardMapper, ImageStageSpec, LocalPCA
from experiments.bench_extract import pick_images
from experiments.common import DEFAULT_DATA, add_config_args, config_from_args, write_json
from pipeline.extract import scaled_sizes
from pipeline.preprocess import to_network_input
from storage.images import decode_image
from storage.shard_writer import ShardTables


class Clock:
    """Accumulates process CPU seconds and wall seconds per step name."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def run(self, name: str, fn, *args):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn(*args)
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w0
        return out


def random_pca(channels: int, dim: int) -> LocalPCA:
    """A fixed orthonormal projection: costs what the learned local PCA costs, no sample needed."""
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((channels, dim)))[0]
    return LocalPCA((rng.standard_normal(channels) * 0.01).astype(np.float32), q.astype(np.float32))


def serial_profile(m: ImageShardMapper, rows: list[dict], top: int) -> tuple[Clock, str]:
    """Each step of the mapper over ``rows``, one after the other; cProfile of the features step."""
    cfg, clock = m.config, Clock()
    decoded = []
    for r in rows:
        data = clock.run("read+sha1", lambda u: (b := Path(u).read_bytes(), hashlib.sha1(b).hexdigest())[0], r["uri"])
        img = clock.run("decode", decode_image, data, m.spec.max_pixels, cfg.decode_side)
        inputs = clock.run("network input", lambda im: [to_network_input(im, size=(w, h))
                                                        for w, h in scaled_sizes(im.width, im.height, cfg)], img)
        d = m._decode(r)  # the mapper's own record (same inputs), used for batching and rows
        assert all(torch.equal(a, b) for a, b in zip(d.inputs, inputs))
        decoded.append(d)
    batches, pending = [], []
    for d in decoded:  # the actor's batching rule
        key = [tuple(t.shape) for t in d.inputs]
        if pending and ([tuple(t.shape) for t in pending[0].inputs] != key or len(pending) >= cfg.batch_size):
            batches.append(pending)
            pending = []
        pending.append(d)
    batches.append(pending)
    acts = [clock.run("forward", m._forward, b) for b in batches]
    for b in batches:  # learned keypoints (XFeat by default): the same pass, after the CNN forward in a lane
        clock.run("keypoints", m._keypoints, b)
    prof = cProfile.Profile()
    feats = []
    for b, a in zip(batches, acts):
        for d, x in zip(b, a):
            prof.enable()
            feats.append((d, clock.run("features", m.compute, x, d.image_hw)))
            prof.disable()
    local_dim = m.spec.local_pca.dim if m.spec.local_pca is not None else None
    tables = ShardTables(m.spec.tables, m.backbone.channels, cfg.descriptor_dtype, local_dim)
    for d, f in feats:
        clock.run("rows (PCA, buffers)", m._add, tables, d, f)
    clock.run("parquet write", tables.write, m.store, m.spec.stage, "profile")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return clock, s.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--images", type=Path, default=DEFAULT_DATA / "jpg")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-side", type=int, default=None, help="sets extract.max_side")
    ap.add_argument("--threads", type=int, default=2, help="the actor's torch threads (as the 2-core actor)")
    ap.add_argument("--lanes", type=int, default=0, help="the mapper's lanes (0: auto)")
    ap.add_argument("--cprofile", type=int, default=25, help="functions listed for the features step")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args, extract__max_side=args.max_side).extract
    paths = pick_images(args.images, args.n)
    rows = [{"image_id": p.stem, "uri": str(p), "shard": 0} for p in paths]
    with tempfile.TemporaryDirectory(prefix="profile_extract_") as root:
        spec = ImageStageSpec(root, "extract", cfg, torch_threads=args.threads, lanes=args.lanes)
        m = ImageShardMapper(spec)
        if cfg.n_locals > 0:
            m.spec.local_pca = random_pca(m.backbone.channels, min(cfg.local_dim, m.backbone.channels))
        m(0, rows[: min(8, len(rows))])  # warm-up (allocators, oneDNN kernels)
        torch.set_num_threads(m.lane_threads)
        clock, prof = serial_profile(m, rows, args.cprofile)
        torch.set_num_threads(args.threads)
        c0, w0 = time.process_time(), time.perf_counter()
        m(1, rows)
        pipe_cpu, pipe_wall = time.process_time() - c0, time.perf_counter() - w0
    n = len(rows)
    total = sum(clock.cpu.values())
    print(f"{n} images, max side {cfg.max_side}, forward scales {cfg.forward_scales}, {cfg.backbone}, "
          f"mapper {m.n_lanes} lane(s) x {m.lane_threads} torch thread(s) (serial steps likewise), "
          f"locals {cfg.n_locals}")
    print(f"{'step':<24}{'CPU ms/img':>12}{'share':>8}{'wall ms/img':>13}")
    for k, v in clock.cpu.items():
        print(f"{k:<24}{1e3 * v / n:>12.1f}{v / total:>8.1%}{1e3 * clock.wall[k] / n:>13.1f}")
    print(f"{'sum of steps':<24}{1e3 * total / n:>12.1f}{1.0:>8.1%}{1e3 * sum(clock.wall.values()) / n:>13.1f}")
    print(f"{'mapper (overlapped)':<24}{1e3 * pipe_cpu / n:>12.1f}{'':>8}{1e3 * pipe_wall / n:>13.1f}")
    print(f"forward / sum of steps (CPU): {clock.cpu['forward'] / total:.2f}; "
          f"serial forward wall / mapper wall: {clock.wall['forward'] / pipe_wall:.2f}")
    print("\nfeatures step, by function (tottime):\n" + prof)
    write_json(args.json, {"images": n, "cpu_s": clock.cpu, "wall_s": clock.wall, "mapper_cpu_s": pipe_cpu,
                           "mapper_wall_s": pipe_wall, "threads": args.threads, "max_side": cfg.max_side})
    return 0


if __name__ == "__main__":
    sys.exit(main())
