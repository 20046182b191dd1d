"""GPU readiness: extraction images/s per GPU at 1024 px, the bare forward next to the extraction mapper.

    bash experiments/gpu_check.sh                      # on a GPU machine, < 8 minutes
    python -m experiments.gpu_check [--device auto|cuda|cpu] [--n 512] [--max-side 1024] [--batch-size 32]
                                    [--backbones mobilenet_v2,resnet101] [--lanes 2,6] [--locals 1000]
                                    [--images DIR] [--budget-s 360] [--out DIR]

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
import traceback
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
            acts = [cpu(to_network_input(img, size=(w, h))[None])[0]
                    for w, h in scaled_sizes(img.width, img.height, cfg)]
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
    ap.add_argument("--budget-s", type=float, default=360.0, help="seconds for everything, setup included")
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
        bare = b["phases"].get("bare forward", {}).get("images_per_s")
        for name, r in b["phases"].items():
            if "error" in r:
                lines.append(f"| {b['backbone']} | {b['weights']} | {name} | failed: {r['error'][:80]} | | | | |")
                continue
            util = "-" if r.get("gpu_util") is None else f"{r['gpu_util']:.0f}"
            ratio = f"{r['images_per_s'] / bare:.3f}" if bare else "-"
            lines.append(f"| {b['backbone']} | {b['weights']} | {name} | {r['images_per_s']:.1f} | {ratio} | {util} | "
                         f"{r['images']} | {r.get('decoded_on_device', '-')} |")
    for b in summary["backbones"]:
        if b.get("min_cosine_vs_cpu"):
            pairs = ", ".join(f"{k} {v:.4f}" for k, v in b["min_cosine_vs_cpu"].items())
            lines += ["", f"{b['backbone']}: min cosine, {summary['device']} vs float32 CPU descriptors: " + pairs]
    lines += ["", f"total {summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget"]
    return "\n".join(lines) + "\n"


def guarded(label: str, fn: Callable[[], Any]) -> Any:
    """Run one phase; a failure is recorded (and the check goes on with the next phase) instead of ending it."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one broken phase must not cost the other figures
        log(f"{label} FAILED: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=12)}


def write_summary(out: Path | None, summary: dict[str, Any], final: bool) -> None:
    """JSON after every phase (a killed run keeps what it measured), markdown at the end."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    if final:
        (out / "gpu_check.md").write_text(markdown(summary))


def check_backbone(bname: str, args: argparse.Namespace, ctx: dict[str, Any], entry: dict[str, Any]) -> None:
    """Every phase of one backbone, filling ``entry['phases']`` (and the summary file) as they finish."""
    device, paths, work, lanes = ctx["device"], ctx["paths"], ctx["work"], ctx["lanes"]
    weights, entry["weights"] = weights_for(bname, work, paths, device)
    cfg = ExtractConfig(backbone=bname, weights=weights, max_side=ctx["max_side"], batch_size=args.batch_size,
                        shard_size=args.shard_size, local_features=args.locals)
    phases = entry["phases"]

    def slice_s() -> float:
        left = args.budget_s - (time.perf_counter() - ctx["t0"])
        return max(1.0, 0.8 * left / max(1, ctx["phases_left"]))

    runs: list[tuple[str, Callable[[float], dict[str, Any]]]] = [
        ("bare forward", lambda sec: bare_forward(cfg, paths, device, sec)),
        ("decode+forward", lambda sec: mapper_run(cfg, paths, str(work / "run" / bname / "lite"), sec, lanes[0],
                                                  _no_features, args.threads))]
    for n in lanes:
        runs.append((f"mapper, lanes={n or 'auto'}",
                     lambda sec, n=n: mapper_run(cfg, paths, str(work / "run" / bname / f"lanes{n}"), sec, n, None,
                                                 args.threads)))
    for label, run in runs:
        sec = slice_s()
        log(f"{bname}: {label} ({sec:.0f} s at most)")
        phases[label] = r = guarded(f"{bname}: {label}", lambda: run(sec))
        ctx["phases_left"] -= 1
        if "error" not in r:
            bare = phases["bare forward"].get("images_per_s")
            log(f"{bname}: {label} {r['images_per_s']:.1f} images/s"
                + (f" ({r['images_per_s'] / bare:.3f} of bare)" if bare else "")
                + f", GPU util {r['gpu_util']}, {r['images']} images"
                + (f", {r['errors']} errors, {r['decoded_on_device']} decoded on the GPU" if "errors" in r else ""))
        ctx["save"](final=False)
    if ctx["consistency"]:
        ctx["consistency"] = False
        log(f"{bname}: descriptors on {device} against float32 on the CPU (8 images)")
        entry["min_cosine_vs_cpu"] = guarded(f"{bname}: consistency", lambda: consistency(
            cfg, paths[:: max(1, len(paths) // 8)][:8], str(work / "run" / "consistency")))
        ctx["phases_left"] -= 1
        log(f"{bname}: smallest cosine per method {entry['min_cosine_vs_cpu']}")


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
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
    summary: dict[str, Any] = {"device": str(device), "device_name": name, "max_side": max_side,
                               "batch_size": args.batch_size, "locals": args.locals, "torch": torch.__version__,
                               "torchvision": torchvision.__version__, "cpus": os.cpu_count(),
                               "budget_s": args.budget_s, "seconds": 0.0, "backbones": []}

    def save(final: bool) -> None:
        summary["seconds"] = time.perf_counter() - t0
        write_summary(args.out, summary, final)

    try:
        if args.images:
            paths, summary["images"] = real_jpegs(args.images, args.n), str(args.images)
        else:
            paths = synthetic_jpegs(work / "images", args.n, args.batch_size, scale=max_side / 1024)
            summary["images"] = "synthetic " + ", ".join(f"{w}x{h}" for w, h in dict.fromkeys(SIZES)) + \
                ("" if max_side == 1024 else f" scaled by {max_side / 1024:g}")
        log(f"{len(paths)} images ({summary['images']}) ready after {time.perf_counter() - t0:.0f} s")
        ctx = {"device": device, "paths": paths, "work": work, "lanes": lanes, "max_side": max_side, "t0": t0,
               "phases_left": len(backbones) * (2 + len(lanes)) + 1, "consistency": True, "save": save}
        for bname in backbones:
            entry: dict[str, Any] = {"backbone": bname, "weights": "", "phases": {}}
            summary["backbones"].append(entry)
            failed = guarded(bname, lambda: check_backbone(bname, args, ctx, entry))
            if failed:
                entry["error"] = failed
        save(final=True)
        print(markdown(summary))
        if args.out:
            log(f"summary in {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
