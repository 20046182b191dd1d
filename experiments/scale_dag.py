"""The offline DAG at 10k / 100k / 1M images on synthetic tables: wall, CPU, peak memory and bytes per stage.

    python -m experiments.scale_dag --sizes 10000,100000,1000000 --root /work/runs/scale
    python -m experiments.scale_dag --report --root /work/runs/scale          # the README's tables only

For every N it writes a synthetic corpus (``experiments.synth_corpus``: what extraction would write, with the real
schemas, shard layout, commit markers, corpus manifest and ``run.json`` entry), then runs each later stage of
``jobs.index``'s DAG as its own process (``python -m experiments.scale_dag _stage ...``: the engine's
``run_pipeline`` with ``stages=[<stage>]`` on a local Ray), the object-saliency stage through its simulated
activation maps (``experiments.synth_os``), every other stage unchanged. While a stage runs, its process tree (the
driver, and the local Ray it starts: raylet, GCS, workers) is sampled every 0.5 s: the peak of the summed RSS and
of the summed PSS (which counts the shared object store once), and each process's CPU time (user + system, its
last sample). Bytes written are the growth of the run's folder. Results (with the 1-minute load average before
and after each stage, since the machine is shared) go to ``<root>/results.json``; ``--report`` fits the growth
exponent ``cost ~ N^p`` per stage over the sizes measured and prints the tables.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from actors.common import init_ray
from actors.engine import Stage, prepare_manifest, run_pipeline
from experiments.synth_corpus import scale_config
from experiments.synth_os import run_sim_object_saliency_stage
from jobs.index import DAG, job_lease, setup_logging
from storage.layout import RunLayout
from storage.run import RunManifest
from storage.tables import StageManifest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "scale.yaml"
STAGES = ("whiten", "graph", "object_saliency", "descriptors", "faiss", "asmk")
BASELINE = "baseline"   # a stage process that runs no stage: Python, the project's imports, a local Ray, the lease


def scale_stages(os_fraction: float = 1.0) -> tuple[Stage, ...]:
    """``jobs.index``'s DAG with the object-saliency stage on simulated maps (same name and parameters, so the
    engine's hashes are the ones ``jobs.index`` computes)."""
    return tuple(Stage(s.name, lambda c, m, r: run_sim_object_saliency_stage(c, m, r, os_fraction), s.params)
                 if s.name == "object_saliency" else s for s in DAG)


def run_one_stage(root: str, stage: str, config: str, os_fraction: float) -> dict[str, Any]:
    """One stage of the DAG in this process, through the engine (``run.json`` records it)."""
    cfg = scale_config(root, config, {"stages": [] if stage == BASELINE else [stage]})
    dag = scale_stages(os_fraction)
    with job_lease(cfg, "experiments.scale_dag") as lease:
        manifest = prepare_manifest(cfg, dag)
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
        return run_pipeline(cfg, manifest, dag, lease)


# ------------------------------------------------------------------------------------------ measurement
class TreeWatch:
    """Peak summed RSS / PSS and total CPU time of a process and its descendants, sampled until it exits."""

    def __init__(self, pid: int, every: float = 0.5, pss_every: float = 2.0) -> None:
        self.pid, self.every, self.pss_every = pid, every, pss_every
        self.peak_rss = self.peak_pss = 0
        self.cpu: dict[tuple[int, float], float] = {}     # (pid, create_time) -> last CPU seconds seen

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root] + root.children(recursive=True)
        except psutil.Error:
            return []

    def sample(self, with_pss: bool) -> None:
        rss = pss = 0
        for p in self._tree():
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    # own time only: a reaped child's time also shows in its parent's children_* (counted twice)
                    self.cpu[(p.pid, p.create_time())] = t.user + t.system
                    rss += p.memory_info().rss
                if with_pss:
                    pss += p.memory_full_info().pss
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)
        if with_pss:
            self.peak_pss = max(self.peak_pss, pss)

    def run(self, proc: subprocess.Popen) -> None:
        last_pss = 0.0
        while proc.poll() is None:
            now = time.time()
            self.sample(now - last_pss >= self.pss_every)
            if now - last_pss >= self.pss_every:
                last_pss = now
            time.sleep(self.every)

    @property
    def cpu_seconds(self) -> float:
        return float(sum(self.cpu.values()))


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def measure(cmd: list[str], run_dir: Path, log_path: Path) -> dict[str, Any]:
    """Run ``cmd`` and measure it (see the module docstring)."""
    before, load0, t0 = folder_bytes(run_dir), os.getloadavg()[0], time.time()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        watch = TreeWatch(proc.pid)
        watch.run(proc)
    return {"returncode": proc.returncode, "wall_s": time.time() - t0, "cpu_s": watch.cpu_seconds,
            "peak_rss_bytes": watch.peak_rss, "peak_pss_bytes": watch.peak_pss,
            "bytes_written": folder_bytes(run_dir) - before, "load_before": load0, "load_after": os.getloadavg()[0],
            "free_gb_before": psutil.virtual_memory().available / 2**30}


def _save(results_path: Path, row: dict[str, Any]) -> None:
    """Add ``row`` to results.json (under a lock: the sizes may run as concurrent drivers on one root)."""
    with open(results_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
        data["runs"] = [r for r in data["runs"] if (r["n"], r["stage"]) != (row["n"], row["stage"])] + [row]
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(results_path)


def run_size(n: int, root: Path, config: str, stages: list[str], gen_args: list[str], os_fraction: float,
             workers: int) -> None:
    """Generate the corpus of ``n`` images (unless done) and run ``stages`` on it, one measured process each."""
    run_dir = root / f"n{n}"
    results, log_path = root / "results.json", root / f"n{n}.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    done = json.loads(results.read_text())["runs"] if results.exists() else []
    finished = {r["stage"] for r in done if r["n"] == n and r.get("returncode") == 0}
    py = sys.executable
    if "generate" in stages and "generate" not in finished:
        cmd = [py, "-m", "experiments.synth_corpus", "--out", str(run_dir), "--images", str(n), "--config", config,
               "--workers", str(workers), *gen_args]
        row = {"n": n, "stage": "generate", "args": gen_args, "config": Path(config).name,
               **measure(cmd, run_dir, log_path)}
        _save(results, row)
        if row["returncode"]:
            raise SystemExit(f"generation of {n} images failed: see {log_path}")
    for stage in [s for s in (BASELINE,) + STAGES if s in stages and s not in finished]:
        # measured from scratch: shard commits left by an interrupted, unrecorded run would make it look cheaper
        if stage != BASELINE and Path(RunLayout(str(run_dir)).stage_dir(stage)).exists():
            StageManifest(str(run_dir), stage).reset()
        cmd = [py, "-m", "experiments.scale_dag", "_stage", "--out", str(run_dir), "--stage", stage,
               "--config", config, "--os-fraction", str(os_fraction)]
        row = {"n": n, "stage": stage, "config": Path(config).name, **measure(cmd, run_dir, log_path)}
        entry = RunManifest(str(run_dir)).stage(stage) or {}
        row.update(stage_s=entry.get("seconds"), engine_peak_rss_bytes=entry.get("peak_rss_bytes"),
                   result=entry.get("result"))
        if stage == "object_saliency":
            row["os_fraction"] = os_fraction
        _save(results, row)
        print(f"n={n} {stage}: rc={row['returncode']} wall={row['wall_s']:.0f}s cpu={row['cpu_s']:.0f}s "
              f"rss={row['peak_rss_bytes'] / 2**30:.2f}GB load={row['load_before']:.1f}", flush=True)
        if row["returncode"]:
            raise SystemExit(f"stage {stage} at {n} images failed: see {log_path}")


# ------------------------------------------------------------------------------------------ report
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


def report(results_path: Path) -> str:
    """Markdown: per stage and N the measurements, then the growth exponents per stage."""
    runs = [r for r in json.loads(results_path.read_text())["runs"] if r.get("returncode") == 0]
    order = ("generate", BASELINE) + STAGES
    lines = ["| stage | N | wall (stage) | CPU | peak RSS (PSS) | written | load before/after |",
             "|---|---|---|---|---|---|---|"]
    for stage in order:
        for r in sorted((r for r in runs if r["stage"] == stage), key=lambda r: r["n"]):
            note = f" (OS on {r['os_fraction']:.0%} of shards)" if r.get("os_fraction", 1.0) < 1 else ""
            wall = r.get("stage_s") or r["wall_s"]
            lines.append(f"| {stage}{note} | {r['n']:,} | {_fmt_s(wall)} | {_fmt_s(r['cpu_s'])} | "
                         f"{_fmt_b(r['peak_rss_bytes'])} ({_fmt_b(r['peak_pss_bytes'])}) | "
                         f"{_fmt_b(r['bytes_written'])} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", "| stage | p (wall) | p (CPU) | p (peak RSS) | p (bytes) | sizes fitted |",
              "|---|---|---|---|---|---|"]
    for stage in order:
        rs = sorted((r for r in runs if r["stage"] == stage and r.get("os_fraction", 1.0) >= 1), key=lambda r: r["n"])
        if len(rs) < 2:
            continue
        ns = [r["n"] for r in rs]
        lines.append(f"| {stage} | {_p(growth_exponent(ns, [r.get('stage_s') or r['wall_s'] for r in rs]))} | "
                     f"{_p(growth_exponent(ns, [r['cpu_s'] for r in rs]))} | "
                     f"{_p(growth_exponent(ns, [r['peak_rss_bytes'] for r in rs]))} | "
                     f"{_p(growth_exponent(ns, [r['bytes_written'] for r in rs]))} | "
                     f"{', '.join(f'{n:,}' for n in ns)} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Cluster:
    """What the projection assumes (cluster.yaml's ``gpu_a10g`` node type: g5.12xlarge, 4 GPUs, 48 vCPUs)."""

    nodes: int = 4
    gpus_per_node: int = 4
    cpus_per_node: int = 48
    efficiency: float = 0.7               # share of the cluster's cores a CPU stage keeps busy
    extract_cpu_s_per_image: float = 0.43  # measured: 4.64 images/s on this machine's 2 cores at 1024 px
    extract_gpu_images_per_s: float = 100.0  # per GPU; assumed (not measured here)
    os_forward_cpu_s_per_image: float = 0.21  # the backbone pass OS redoes (the bare forward: 4.87 images/s / 2 cores)


def projection(results_path: Path, n: int = 1_000_000, c: Cluster = Cluster()) -> str:
    """Markdown: R1M on the cluster of ``c``, per stage, from the CPU seconds measured here (measured at ``n`` when
    that size ran in full, else extrapolated from the largest size measured with the stage's fitted exponent)."""
    runs = [r for r in json.loads(results_path.read_text())["runs"] if r.get("returncode") == 0]
    cores = c.nodes * c.cpus_per_node * c.efficiency
    gpus = c.nodes * c.gpus_per_node
    lines = ["| stage | CPU at 1M (here, less the baseline) | source | on the cluster |", "|---|---|---|---|"]
    cpu_only = n * c.extract_cpu_s_per_image / cores
    with_gpus = n / (gpus * c.extract_gpu_images_per_s)
    lines.append(f"| extract | {_fmt_s(n * c.extract_cpu_s_per_image)} | README's measured CPU rate | "
                 f"{_fmt_s(with_gpus)} on {gpus} GPUs at {c.extract_gpu_images_per_s:.0f} images/s each (assumed); "
                 f"{_fmt_s(cpu_only)} on the CPUs alone |")
    total = with_gpus
    base = {r["n"]: r["cpu_s"] for r in runs if r["stage"] == BASELINE}
    for stage in STAGES:
        rs = sorted((r for r in runs if r["stage"] == stage and r.get("os_fraction", 1.0) >= 1), key=lambda r: r["n"])
        if not rs:
            continue
        net = [max(r["cpu_s"] - base.get(r["n"], 0.0), 1e-3) for r in rs]  # the stage's own work
        p = growth_exponent([r["n"] for r in rs], net)
        last = rs[-1]
        cpu = net[-1] * (n / last["n"]) ** (p if p is not None else 1.0)
        src = "measured" if last["n"] == n else \
            f"from {last['n']:,} with p = {p:.2f}" if p is not None else f"from {last['n']:,}, linear"
        wall = cpu / cores
        extra = ""
        if stage == "object_saliency":
            fwd = n * c.os_forward_cpu_s_per_image / (c.efficiency * gpus * 40)  # a GPU forward ~40x a CPU core's
            wall += fwd
            extra = f" (+ the backbone pass on the GPUs, {_fmt_s(fwd)})"
        total += wall
        lines.append(f"| {stage} | {_fmt_s(cpu)} | {src} | {_fmt_s(wall)}{extra} |")
    lines.append(f"| **total** | | | **{_fmt_s(total)}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_stage":
        ap = argparse.ArgumentParser(prog="experiments.scale_dag _stage")
        ap.add_argument("--out", required=True)
        ap.add_argument("--stage", required=True, choices=(BASELINE,) + STAGES)
        ap.add_argument("--config", default=str(DEFAULT_CONFIG))
        ap.add_argument("--os-fraction", type=float, default=1.0)
        a = ap.parse_args(argv[1:])
        setup_logging()
        print(json.dumps(run_one_stage(a.out, a.stage, a.config, a.os_fraction), default=str))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder of the runs (n<N>/) and results.json")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--stages", default=",".join(("generate", BASELINE) + STAGES))
    ap.add_argument("--os-fraction", type=float, default=1.0, help="share of shards the OS stage maps (stated)")
    ap.add_argument("--locals-fraction", type=float, default=1.0)
    ap.add_argument("--keypoints", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2, help="generator processes")
    ap.add_argument("--report", action="store_true", help="print the tables of results.json and exit")
    a = ap.parse_args(argv)
    root = Path(a.root)
    if not a.report:
        root.mkdir(parents=True, exist_ok=True)
        gen = ["--locals-fraction", str(a.locals_fraction), "--keypoints", str(a.keypoints)]
        for n in [int(x) for x in a.sizes.split(",") if x]:
            run_size(n, root, a.config, a.stages.split(","), gen, a.os_fraction, a.workers)
    print(report(root / "results.json"))
    print()
    print(projection(root / "results.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
