"""The tables of ``experiments.scale_dag``: measurements per stage and N, growth exponents, the R1M projection.

Read from ``<root>/results.json`` (one row per (N, stage); see ``experiments.scale_dag``):

* rows that did not finish (a stage stopped or failed) are listed, marked, never fitted;
* a stage run on a stated sample of the corpus (object saliency on ``os_fraction`` of the shards) is listed as
  measured, and fitted / projected per image: its wall, CPU and bytes scaled by ``N / images mapped`` (every
  image is mapped independently; what grows with N, the k-NN among the graph's regions, is in the per-image cost);
* growth exponents ``cost ~ N^p`` are fitted over the sizes run with the same config (a size run with a reduced
  config, as the 1M run with ``configs/scale_1m.yaml``, gets its own ratio column instead).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("whiten", "graph", "object_saliency", "descriptors", "faiss", "asmk")
BASELINE = "baseline"
ORDER = ("generate", BASELINE) + STAGES
DEFAULT_CONFIG = "scale.yaml"
PROGRESS = re.compile(r"(\d+)/(\d+) (shards|images)")


def growth_exponent(ns: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(N) (None with fewer than two positive points)."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v and v > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _fmt_b(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, k in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(b) >= k:
            return f"{b / k:.1f} {unit}" if b / k < 100 else f"{b / k:.0f} {unit}"
    return f"{b:.0f} B"


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def load_runs(results_path: Path) -> list[dict[str, Any]]:
    return json.loads(results_path.read_text())["runs"]


def sampled(r: dict[str, Any]) -> float:
    """Share of the corpus a row's stage processed (1.0 unless run on a stated sample of shards)."""
    if r.get("os_fraction", 1.0) >= 1:
        return 1.0
    images = (r.get("result") or {}).get("images")
    return images / r["n"] if images else r["os_fraction"]


def full_cost(r: dict[str, Any], key: str) -> float | None:
    """``key`` (wall / CPU / bytes) of the whole corpus: a sampled row's value scaled by 1 / share."""
    v = r.get("stage_s") or r["wall_s"] if key == "wall" else r.get(key)
    return None if v is None else v / sampled(r)


def _note(r: dict[str, Any]) -> str:
    notes = []
    if r.get("os_fraction", 1.0) < 1:
        images = (r.get("result") or {}).get("images") or r.get("images_planned")
        notes.append(f"on {images:,} images, {images / r['n']:.2%} of N" if images else
                     f"on {r['os_fraction']:.2%} of shards")
    if r.get("config", DEFAULT_CONFIG) != DEFAULT_CONFIG:
        notes.append(r["config"])
    if r.get("args") and "--locals-fraction" in r["args"]:
        a = r["args"]
        lf, kp = float(a[a.index("--locals-fraction") + 1]), int(a[a.index("--keypoints") + 1])
        if lf < 1 or kp != 1024:
            notes.append(f"locals x{lf:g}, {kp} keypoints")
    if r.get("returncode") != 0:
        m = PROGRESS.search(r.get("progress") or "")
        done = f", {m.group(1)}/{m.group(2)} {m.group(3)} done" if m else ""
        notes.append(f"**{r.get('status', 'failed')}{done}**")
    return f" ({'; '.join(notes)})" if notes else ""


def report(results_path: Path) -> str:
    """Markdown: per stage and N the measurements, then the growth exponents per stage."""
    runs = load_runs(results_path)
    lines = ["| stage | N | wall (stage) | CPU | peak RSS (PSS) | written | load before/after |",
             "|---|---|---|---|---|---|---|"]
    for stage in ORDER:
        for r in sorted((r for r in runs if r["stage"] == stage), key=lambda r: r["n"]):
            wall = r.get("stage_s") or r["wall_s"]
            lines.append(f"| {stage}{_note(r)} | {r['n']:,} | {_fmt_s(wall)} | {_fmt_s(r['cpu_s'])} | "
                         f"{_fmt_b(r['peak_rss_bytes'])} ({_fmt_b(r['peak_pss_bytes'])}) | "
                         f"{_fmt_b(max(r['bytes_written'], 0))} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", "| stage | p (wall) | p (CPU) | p (peak RSS) | p (bytes) | sizes fitted |",
              "|---|---|---|---|---|---|"]
    for stage in ORDER:
        rs = sorted((r for r in runs if r["stage"] == stage and r.get("returncode") == 0
                     and r.get("config", DEFAULT_CONFIG) == DEFAULT_CONFIG), key=lambda r: r["n"])
        if len(rs) < 2:
            continue
        ns = [r["n"] for r in rs]
        per_image = " (per image, scaled to N)" if any(sampled(r) < 1 for r in rs) else ""
        lines.append(f"| {stage}{per_image} | {_p(growth_exponent(ns, [full_cost(r, 'wall') for r in rs]))} | "
                     f"{_p(growth_exponent(ns, [full_cost(r, 'cpu_s') for r in rs]))} | "
                     f"{_p(growth_exponent(ns, [r['peak_rss_bytes'] for r in rs]))} | "
                     f"{_p(growth_exponent(ns, [full_cost(r, 'bytes_written') for r in rs]))} | "
                     f"{', '.join(f'{n:,}' for n in ns)} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Cluster:
    """What the projection assumes (cluster.yaml's ``gpu_a10g`` node type: g5.12xlarge, 4 GPUs, 48 vCPUs)."""

    nodes: int = 4
    gpus_per_node: int = 4
    cpus_per_node: int = 16                # the Ray CPU resource cluster.yaml gives a gpu_a10g node (48 vCPUs)
    efficiency: float = 0.7               # share of the cores a CPU stage keeps busy
    # measured (README, `make demo`, 2026-12-01): extract 11.5 images/s at 512 px on this machine's 2 cores, incl.
    # actor start, the local PCA / CAM sample and XFeat keypoints -> 0.17 core-seconds per image (the scale runs
    # model the 512 px statistics)
    extract_cpu_s_per_image: float = 2 / 11.5
    extract_gpu_images_per_s: float = 100.0  # per GPU at 512 px; assumed (no GPU extraction figure is in the repo)
    os_forward_cpu_s_per_image: float = 2 / 19.2  # OS's own decode + forward (README `make demo`: 19.2 images/s)


# stages whose work is sharded over all the cluster's workers; the others run their heavy step on one node
# (whiten: one PCA; graph: k-NN blocks go to Ray tasks but the index build, mutual k-NN and Katz below 2M
# regions stay on one process; faiss: one build per method, methods in parallel)
SHARDED = ("object_saliency", "descriptors", "asmk")

# stages projected linearly (per image) from the largest size instead of with the fitted exponent, and why.
# Object saliency searches each image's patches among the graph's regions: exactly (a flat index) below
# graph.exact_threshold (200,000 regions), so between 10k and 100k its per-image cost grows with N (p ~ 1.4),
# but with an IVF index above it (nprobe 16 of ~sqrt(N) lists: at 1M about 8k vectors scanned per query against
# 102k at 100k). The 100k per-image cost is therefore an upper bound of the 1M one, not a rate to extrapolate.
LINEAR_FROM_LARGEST = {"object_saliency": "per image, an upper bound (flat k-NN at 100k, IVF above 200k regions)"}

# stages whose work the reduced 1M config (configs/scale_1m.yaml) does not reduce: the graph is built over the
# FS.EGM regions at their real per-image count in both configs, and object saliency searches that graph. Their 1M
# run is the measurement the projection uses.
FULL_PROBLEM_AT_1M = ("graph", "object_saliency")


def projection(results_path: Path, n: int = 1_000_000, c: Cluster = Cluster()) -> str:
    """Markdown: R1M on the cluster of ``c``, per stage, from the CPU seconds measured here, less the baseline
    process (Python, imports, a local Ray): extrapolated from the largest size run with the full config with the
    stage's fitted CPU exponent; a 1M run with a reduced config is quoted beside it."""
    runs = [r for r in load_runs(results_path) if r.get("returncode") == 0]
    gpus = c.nodes * c.gpus_per_node
    lines = ["| stage | CPU at 1M (one core here) | source | measured at 1M (reduced config) | on the cluster |",
             "|---|---|---|---|---|"]
    cpu_only = n * c.extract_cpu_s_per_image / (c.nodes * c.cpus_per_node * c.efficiency)
    with_gpus = n / (gpus * c.extract_gpu_images_per_s)
    lines.append(f"| extract | {_fmt_s(n * c.extract_cpu_s_per_image)} | README's measured CPU rate (512 px) | - | "
                 f"{_fmt_s(with_gpus)} on {gpus} GPUs at {c.extract_gpu_images_per_s:.0f} images/s each (assumed); "
                 f"{_fmt_s(cpu_only)} on the CPUs alone |")
    total = with_gpus
    base = {r["n"]: r["cpu_s"] for r in runs if r["stage"] == BASELINE}
    for stage in STAGES:
        rs = sorted((r for r in runs if r["stage"] == stage and r.get("config", DEFAULT_CONFIG) == DEFAULT_CONFIG),
                    key=lambda r: r["n"])
        big = [r for r in runs if r["stage"] == stage and r["n"] == n and r.get("config", DEFAULT_CONFIG)
               != DEFAULT_CONFIG]
        if not rs:
            continue
        net = [max(full_cost(r, "cpu_s") - base.get(r["n"], 0.0) / sampled(r), 1e-3) for r in rs]
        p = growth_exponent([r["n"] for r in rs], net)
        last = rs[-1]
        linear = LINEAR_FROM_LARGEST.get(stage)
        cpu = net[-1] * (n / last["n"]) ** (p if p is not None and not linear else 1.0)
        src = "measured" if last["n"] == n else \
            f"from {last['n']:,}, linear {linear}" if linear else \
            f"from {last['n']:,} with p = {p:.2f}" if p is not None else f"from {last['n']:,}, linear"
        big_cpu = max(full_cost(big[0], "cpu_s") - base.get(n, 0.0) / sampled(big[0]), 0.0) if big else None
        seen = "-" if big_cpu is None else _fmt_s(big_cpu)
        if big_cpu is not None and stage in FULL_PROBLEM_AT_1M:
            cpu = max(big_cpu, 1e-3)
            src = f"measured at {n:,} (reduced config: the same FS.EGM graph)"
        cores = c.cpus_per_node * c.efficiency * (c.nodes if stage in SHARDED else 1)
        wall = cpu / cores
        extra = f" on {cores:.0f} cores"
        if stage == "object_saliency":
            fwd = with_gpus * c.os_forward_cpu_s_per_image / c.extract_cpu_s_per_image  # like extraction's pass
            wall += fwd
            extra += f" + decode and forward on the GPUs, {_fmt_s(fwd)}"
        total += wall
        lines.append(f"| {stage} | {_fmt_s(cpu)} | {src} | {seen} | {_fmt_s(wall)}{extra} |")
    lines.append(f"| **total** | | | | **{_fmt_s(total)}** |")
    return "\n".join(lines)


__all__ = ["growth_exponent", "report", "projection", "Cluster", "STAGES", "BASELINE", "LINEAR_FROM_LARGEST",
           "FULL_PROBLEM_AT_1M"]
