"""GPU readiness: extraction images/s per GPU at 1024 px, the bare forward next to the extraction mapper.

    bash experiments/gpu_check.sh                      # on a GPU machine, < 8 minutes
    python -m experiments.gpu_check [--device auto|cuda|cpu] [--n 512] [--max-side 1024] [--batch-size 32]
                                    [--backbones mobilenet_v2,resnet101] [--lanes 2,6] [--locals 1000]
                                    [--images DIR] [--budget-s 420] [--out DIR]

For each backbone (random weights unless the offline ImageNet ones are installed: timing only) it measures,
on one device:

* ``bare``: the forward pass alone on batches already on the device, as the mapper runs it (bfloat16
  autocast and channels-last on CUDA, float32 on the CPU), synchronised at the end;
* ``decode+forward``: ``actors.extract.ImageShardMapper`` over a temporary run with a trivial compute function:
  file reads, JPEG decoding (on the GPU with the CPU fallback), resizing, pinned staging, the forward and the
  Parquet writes, without the per-image features;
* ``mapper, N lanes``: the real extraction mapper (``pipeline.extract.extract_features``: globals, regions with
  CAM and FS.EGM, ``--locals`` local features) with N lanes;

each as images/s with the mean GPU utilisation while it ran (nvidia-smi sampling, else
``torch.cuda.utilization``), and the ratio to the bare forward. Images: ``--images`` (JPEGs), else synthetic
photo-like JPEGs of 2048x1536, 1536x2048 and 1920x1080 pixels written in runs of ``--batch-size`` equal sizes
(the mapper batches consecutive images of equal input size). Each phase stops when its share of ``--budget-s``
is spent and reports the images it did. A summary goes to ``--out`` (default ``$OUT`` when set) as
``gpu_check.json`` and ``gpu_check.md``. Installs nothing; ``--device cpu --n 8`` is the dry run the tests use.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from PIL import Image

from experiments import ray_stub  # noqa: F401 - before actors: the GPU image has torch but no Ray
from actors.extract import ImageShardMapper, ImageStageSpec
from pipeline.backbone import REGISTRY, build_backbone
from pipeline.extract import ExtractConfig, ImageFeatures, extract_features, scaled_sizes
from pipeline.preprocess import tensor_to_network_input, to_network_input
from storage.images import decode_image
from storage.tables import read_parquet
from storage.weights import builtin_weights_path, load_state_dict

SIZES = ((2048, 1536), (2048, 1536), (1536, 2048), (1920, 1080))  # (w, h) of the synthetic photos, in turn


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ images
def synthetic_jpegs(folder: Path, n: int, run: int, scale: float = 1.0, unique: int = 4) -> list[Path]:
    """``n`` photo-like JPEGs (smooth colour fields, edges and noise) in runs of ``run`` equal sizes; ``unique``
    distinct pictures per size, written under new names (file contents do not matter to the timing)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool: dict[tuple[int, int], list[bytes]] = {}
    for w, h in dict.fromkeys(SIZES):
        w, h = max(32, int(w * scale)), max(32, int(h * scale))
        pics = []
        for _ in range(unique):
            low = rng.integers(0, 256, size=(h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
            base = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
            base[:, ::97] = 255
            noisy = np.clip(base + rng.integers(-12, 13, size=base.shape), 0, 255).astype(np.uint8)
            path = folder / "tmp.jpg"
            Image.fromarray(noisy).save(path, "JPEG", quality=90)
            pics.append(path.read_bytes())
        pool[(w, h)] = pics
    keys = [(max(32, int(w * scale)), max(32, int(h * scale))) for w, h in SIZES]
    out = []
    for i in range(n):
        key = keys[(i // max(1, run)) % len(keys)]
        path = folder / f"synthetic_{i:05d}.jpg"
        path.write_bytes(pool[key][i % unique])
        out.append(path)
    (folder / "tmp.jpg").unlink(missing_ok=True)
    return out


def real_jpegs(folder: Path, n: int) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"--images {folder}: no JPEG files")
    return (files * (n // len(files) + 1))[:n]


# ------------------------------------------------------------------------------------------------ GPU load
class Utilisation:
    """Mean GPU utilisation (%) while the ``with`` block runs: nvidia-smi every 200 ms, else
    ``torch.cuda.utilization``; None on the CPU or when neither answers."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Utilisation":
        if self.device.type != "cuda":
            return self
        index = self.device.index or 0
        if shutil.which("nvidia-smi"):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            gpu = visible.split(",")[index] if visible.strip() else str(index)
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           "-i", gpu, "-lms", "200"], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
        self._thread.start()
        return self

    def _read_smi(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            if self._stop.is_set():
                break
            if line.strip().isdigit():
                self.samples.append(float(line))

    def _poll_torch(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # noqa: BLE001 - no NVML binding: no figure
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=2)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


# ------------------------------------------------------------------------------------------------ phases
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(cfg: ExtractConfig, paths: list[Path], device: torch.device, seconds: float) -> dict[str, Any]:
    """The forward alone on batches already on the device (decoded and resized beforehand, as the mapper does)."""
    spec = cfg.weights_spec
    bb = build_backbone(cfg.backbone, load_state_dict(spec) if spec else None, cfg.layer, device=device)
    inputs = []
    for p in paths[: cfg.batch_size * 4]:  # a few distinct batches, cycled: inputs do not change the cost
        img = decode_image(p.read_bytes(), max_side=cfg.decode_side)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).to(device)
        inputs.append(tensor_to_network_input(x, scaled_sizes(img.width, img.height, cfg)[0]))
    batches, pending = [], []
    for x in inputs:
        if pending and (x.shape != pending[0].shape or len(pending) >= cfg.batch_size):
            batches.append(torch.stack(pending))
            pending = []
        pending.append(x)
    batches.append(torch.stack(pending))
    with torch.inference_mode():
        for b in batches[:2]:  # warm-up (kernels, autotuning)
            bb(b)
        sync(device)
        done, i, t0 = 0, 0, time.perf_counter()
        with Utilisation(device) as util:
            while done < len(paths) and time.perf_counter() - t0 < seconds:
                b = batches[i % len(batches)]
                bb(b)
                done, i = done + len(b), i + 1
                if i % 8 == 0:
                    sync(device)
            sync(device)
        elapsed = time.perf_counter() - t0
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed, "gpu_util": util.mean,
            "batch_shapes": sorted({str(tuple(b.shape)) for b in batches})}


def _no_features(acts: list[torch.Tensor], hw: tuple[int, int]) -> ImageFeatures:
    """A compute function that only touches the activations (their statistics go to the images row)."""
    A = acts[0]
    return ImageFeatures(feat_hw=tuple(A.shape[1:]), proc_hw=(0, 0), sparsity=np.zeros(A.shape[0], np.float32),
                         act_mean=float(A.mean()), act_max=0.0, region_desc=np.zeros((0, A.shape[0]), np.float32))


def mapper_run(cfg: ExtractConfig, paths: list[Path], root: str, seconds: float, lanes: int,
               compute: Callable | None, threads: int) -> dict[str, Any]:
    """The extraction mapper over shards of the images until done or ``seconds`` are spent (one warm-up shard)."""
    spec = ImageStageSpec(root, "extract", cfg, torch_threads=threads, lanes=lanes)
    m = ImageShardMapper(spec, compute=compute)
    rows = [{"image_id": p.stem + f"_{i}", "uri": str(p), "shard": 0} for i, p in enumerate(paths)]
    m("warmup", rows[: cfg.batch_size * 2])
    sync(m.device)
    m.decoded_on_device = 0
    done, errors, shard, t0 = 0, 0, 0, time.perf_counter()
    with Utilisation(m.device) as util:
        while done < len(rows) and time.perf_counter() - t0 < seconds:
            part = rows[done: done + cfg.shard_size]
            res = m(shard, part)
            done, errors, shard = done + len(part), errors + res.counts["errors"], shard + 1
        sync(m.device)
    elapsed = time.perf_counter() - t0
    out = {"images": done, "seconds": elapsed, "images_per_s": done / elapsed, "gpu_util": util.mean,
           "errors": errors, "lanes": m.n_lanes, "threads_per_lane": m.lane_threads,
           "decoded_on_device": m.decoded_on_device}
    m.pool.shutdown()
    m.lane_pool.shutdown()
    return out


def consistency(cfg: ExtractConfig, paths: list[Path], root: str) -> dict[str, float]:
    """Smallest cosine similarity, per global method, between the mapper's descriptors on its device (GPU
    decoding, bfloat16) and a float32 CPU computation of the same images (Pillow decoding): the GPU path's
    numbers must stay close to the CPU path's."""
    m = ImageShardMapper(ImageStageSpec(root, "extract", cfg))
    rows = [{"image_id": f"c{i}", "uri": str(p), "shard": 0} for i, p in enumerate(paths)]
    table = read_parquet(m(0, rows).files["globals"])
    got = {(i, meth): np.asarray(v, np.float32) for i, meth, v in zip(table.column("image_id").to_pylist(),
                                                                     table.column("method").to_pylist(),
                                                                     table.column("descriptor").to_pylist())}
    spec = cfg.weights_spec
    cpu = build_backbone(cfg.backbone, load_state_dict(spec) if spec else None, cfg.layer, device="cpu")
    cls = None if cpu.classifier_weight is None else (cpu.classifier_weight, cpu.classifier_bias)
    worst: dict[str, float] = {}
    for row in rows:
        img = decode_image(Path(row["uri"]).read_bytes(), max_side=cfg.decode_side)
        hw = img.info.get("original_size", img.size)[::-1]
        with torch.inference_mode():
            acts = [cpu(to_network_input(img, max(w, h))[None])[0] for w, h in scaled_sizes(img.width, img.height, cfg)]
        for meth, ref in extract_features(acts, cfg, hw, cls).globals.items():
            g = got[(row["image_id"], meth)]
            cos = float(g @ ref / max(np.linalg.norm(g) * np.linalg.norm(ref), 1e-12))
            worst[meth] = min(worst.get(meth, 1.0), cos)
    m.pool.shutdown()
    m.lane_pool.shutdown()
    return worst


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--n", type=int, default=512, help="images per phase at most")
    ap.add_argument("--max-side", type=int, default=None, help="default 1024 (256 with --device cpu)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--backbones", default="mobilenet_v2,resnet101")
    ap.add_argument("--lanes", default=None, help="comma-separated lane counts of the full mapper runs "
                                                  "(default 2,6 on CUDA, 0 = auto on the CPU)")
    ap.add_argument("--locals", type=int, default=1000, help="local features per image (0: no locals table)")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                    help="the actor's torch threads (a GPU actor gets at most 4)")
    ap.add_argument("--images", type=Path, default=None, help="JPEG folder (default: synthetic photos)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for everything, setup included")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    return ap.parse_args(argv)


def weights_for(name: str, folder: Path, paths: list[Path], device: torch.device) -> tuple[str | None, str]:
    """(ExtractConfig.weights, label): the offline ImageNet weights when installed, else a random init whose
    batch-norm statistics are measured on a few of the images (without that, a deep random ResNet's activations
    overflow float16 and the features would time NaN maps), saved as a plain state dict."""
    builtin = REGISTRY[name].builtin_weights
    if builtin:
        try:
            builtin_weights_path(builtin)
            return None, "imagenet (builtin)"
        except (FileNotFoundError, ValueError):
            pass
    model = REGISTRY[name].build().to(device)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    if norms:
        x = torch.stack([tensor_to_network_input(torch.from_numpy(np.array(decode_image(p.read_bytes(), max_side=512)))
                                                 .permute(2, 0, 1).to(device), (224, 224)) for p in paths[:8]])
        model.train()
        with torch.no_grad():
            for part in x.split(8):
                model(part)
    path = folder / f"{name}-random.pt"  # read back by storage.weights with torch.load(weights_only=True)
    torch.save({k: v.cpu() for k, v in model.eval().state_dict().items()}, path)
    return str(path), "random, BN statistics from the images" if norms else "random"


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# GPU check: {summary['device_name']}", "",
             f"{summary['max_side']} px, batch {summary['batch_size']}, {summary['locals']} locals, images: "
             f"{summary['images']}; torch {summary['torch']}, torchvision {summary['torchvision']}", "",
             "| backbone | weights | measure | images/s | ratio to bare | GPU util % | images | decoded on GPU |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for b in summary["backbones"]:
        bare = b["bare"]["images_per_s"]
        for name, r in b["phases"].items():
            util = "-" if r.get("gpu_util") is None else f"{r['gpu_util']:.0f}"
            on_gpu = r.get("decoded_on_device", "-")
            lines.append(f"| {b['backbone']} | {b['weights']} | {name} | {r['images_per_s']:.1f} | "
                         f"{r['images_per_s'] / bare:.3f} | {util} | {r['images']} | {on_gpu} |")
    for b in summary["backbones"]:
        if b.get("min_cosine_vs_cpu"):
            pairs = ", ".join(f"{k} {v:.4f}" for k, v in b["min_cosine_vs_cpu"].items())
            lines += ["", f"{b['backbone']}: min cosine, {summary['device']} vs float32 CPU descriptors: "
                          + pairs]
    lines += ["", f"total {summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is initialised: the mapper picks its own device
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    max_side = args.max_side or (1024 if cuda else 256)
    lanes = [int(x) for x in (args.lanes or ("2,6" if cuda else "0")).split(",")]
    backbones = [b for b in args.backbones.split(",") if b]
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    log(f"device {name}; {max_side} px; backbones {backbones}; lanes {lanes}; budget {args.budget_s:.0f} s")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        if args.images:
            paths, source = real_jpegs(args.images, args.n), str(args.images)
        else:
            paths = synthetic_jpegs(work / "images", args.n, args.batch_size, scale=max_side / 1024)
            source = "synthetic " + ", ".join(f"{w}x{h}" for w, h in dict.fromkeys(SIZES)) + \
                     ("" if max_side == 1024 else f" scaled by {max_side / 1024:g}")
        log(f"{len(paths)} images ({source}) ready after {time.perf_counter() - t_start:.0f} s")
        n_phases = len(backbones) * (2 + len(lanes)) + 1
        results = []
        for bname in backbones:
            weights, wlabel = weights_for(bname, work, paths, device)
            cfg = ExtractConfig(backbone=bname, weights=weights, max_side=max_side, batch_size=args.batch_size,
                                shard_size=args.shard_size, local_features=args.locals)
            phases: dict[str, dict[str, Any]] = {}

            def slice_s() -> float:
                left = args.budget_s - (time.perf_counter() - t_start)
                return max(1.0, 0.8 * left / max(1, n_phases - sum(len(r["phases"]) for r in results) - len(phases)))

            log(f"{bname}: bare forward ({slice_s():.0f} s at most)")
            bare = bare_forward(cfg, paths, device, slice_s())
            phases["bare forward"] = bare
            log(f"{bname}: bare {bare['images_per_s']:.1f} images/s, GPU {bare['gpu_util']}")
            runs = [("decode+forward", lanes[0], _no_features)] + [(f"mapper, lanes={n or 'auto'}", n, None)
                                                                  for n in lanes]
            for label, n, compute in runs:
                log(f"{bname}: {label} ({slice_s():.0f} s at most)")
                r = mapper_run(cfg, paths, str(work / "run" / bname / label.replace(" ", "_")), slice_s(), n,
                               compute, args.threads)
                phases[label] = r
                log(f"{bname}: {label} {r['images_per_s']:.1f} images/s ({r['images_per_s'] / bare['images_per_s']:.3f}"
                    f" of bare), GPU {r['gpu_util']}, {r['images']} images, {r['errors']} errors, "
                    f"{r['decoded_on_device']} decoded on the GPU")
            entry = {"backbone": bname, "weights": wlabel, "bare": bare, "phases": phases}
            if bname == backbones[0]:
                log(f"{bname}: descriptors on {device} against float32 on the CPU ({min(8, len(paths))} images)")
                entry["min_cosine_vs_cpu"] = consistency(cfg, paths[:: max(1, len(paths) // 8)][:8],
                                                         str(work / "run" / "consistency"))
                log(f"{bname}: smallest cosine per method {entry['min_cosine_vs_cpu']}")
            results.append(entry)
        summary = {"device": str(device), "device_name": name, "max_side": max_side, "batch_size": args.batch_size,
                   "locals": args.locals, "images": source, "torch": torch.__version__,
                   "torchvision": torchvision.__version__, "cpus": os.cpu_count(),
                   "budget_s": args.budget_s, "seconds": time.perf_counter() - t_start, "backbones": results}
        md = markdown(summary)
        print(md)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
            (args.out / "gpu_check.md").write_text(md)
            log(f"summary in {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
