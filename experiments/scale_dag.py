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
import datetime
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray

from actors.common import init_ray
from actors.engine import Stage, prepare_manifest, run_pipeline
from experiments.synth_corpus import scale_config
from experiments.scale_report import BASELINE, PROGRESS, STAGES, growth_exponent, projection, report
from experiments.synth_os import run_sim_object_saliency_stage
from jobs.index import DAG, job_lease, setup_logging
from storage.run import RunManifest, read_corpus_manifest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "scale.yaml"
# BASELINE: a stage process that runs no stage: Python, the project's imports, a local Ray, the lease


def scale_stages(os_fraction: float = 1.0) -> tuple[Stage, ...]:
    """``jobs.index``'s DAG with the object-saliency stage on simulated maps (same name and parameters, so the
    engine's hashes are the ones ``jobs.index`` computes)."""
    return tuple(Stage(s.name, lambda c, m, r: run_sim_object_saliency_stage(c, m, r, os_fraction), s.params)
                 if s.name == "object_saliency" else s for s in DAG)


def run_one_stage(root: str, stage: str, config: str, os_fraction: float) -> dict[str, Any]:
    """One stage of the DAG in this process, through the engine (``run.json`` records it). The config keeps the
    whole DAG in ``stages`` (what a stage produces can depend on which others run: the descriptors stage writes
    the OS methods only when object saliency is part of the job); only ``stage`` is handed to the engine."""
    cfg = scale_config(root, config)
    dag = scale_stages(os_fraction)
    with job_lease(cfg, "experiments.scale_dag") as lease:
        manifest = prepare_manifest(cfg, dag)
        for attempt in range(3):  # a local Ray waits 30 s for its raylet: too short on a loaded machine at nice 19
            try:
                init_ray(cfg.ray.address, cfg.ray.num_cpus)
                break
            except Exception as exc:  # noqa: BLE001 - only Ray's start-up timeout is retried
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                print(f"local Ray did not start ({exc}); retrying", flush=True)
                ray.shutdown()
        return run_pipeline(cfg, manifest, tuple(s for s in dag if s.name == stage), lease)


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

    def run(self, proc: subprocess.Popen, deadline: float | None = None) -> bool:
        """Sample until ``proc`` exits; past ``deadline`` (epoch seconds) stop its process group (True)."""
        last_pss = 0.0
        while proc.poll() is None:
            now = time.time()
            if deadline is not None and now > deadline:
                stop_group(proc)
                return True
            self.sample(now - last_pss >= self.pss_every)
            if now - last_pss >= self.pss_every:
                last_pss = now
            time.sleep(self.every)
        return False

    @property
    def cpu_seconds(self) -> float:
        return float(sum(self.cpu.values()))


def folder_bytes(path: Path, since: float | None = None) -> int:
    """Total size of the files under ``path`` (with ``since``: of those modified at or after it)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if since is None or st.st_mtime >= since:
                total += st.st_size
    return total


def stop_group(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM the process group of ``proc`` (the stage process and the local Ray it started), SIGKILL after
    ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_progress(log_path: Path, offset: int) -> str | None:
    """The last progress line (``k/n shards`` or ``k/n images``) the log got after ``offset``."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        lines = [ln for ln in f.read().decode(errors="replace").splitlines() if PROGRESS.search(ln)]
    return lines[-1].strip()[:200] if lines else None


def keep_niceness(pid: int) -> None:
    """Give the new session of ``pid`` this process's niceness as its autogroup's (Linux, best effort).

    A stage runs in its own session (so that a deadline can stop its whole tree), and with the kernel's
    autogroup scheduling a new session is a new scheduling group whose weight ignores the processes' nice
    values: ``nice -n 19 experiments/scale_table.sh`` would otherwise compete as an equal with foreground work."""
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(niceness))
    except OSError:
        pass


def measure(cmd: list[str], run_dir: Path, log_path: Path, deadline: float | None = None) -> dict[str, Any]:
    """Run ``cmd`` and measure it (see the module docstring); past ``deadline`` it is stopped and the row says so,
    with the last progress line of its log (the rate of the partial run)."""
    before, load0, t0 = folder_bytes(run_dir), os.getloadavg()[0], time.time()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        keep_niceness(proc.pid)
        watch = TreeWatch(proc.pid)
        stopped = watch.run(proc, deadline)
    row = {"returncode": proc.returncode, "wall_s": time.time() - t0, "cpu_s": watch.cpu_seconds,
           "peak_rss_bytes": watch.peak_rss, "peak_pss_bytes": watch.peak_pss,
           # what the process wrote: the files it created or rewrote (a rerun rewrites the same names, so the
           # folder's growth would miss it), and the growth of the folder beside it
           "bytes_written": folder_bytes(run_dir, t0 - 1), "bytes_growth": folder_bytes(run_dir) - before,
           "load_before": load0, "load_after": os.getloadavg()[0],
           "free_gb_before": psutil.virtual_memory().available / 2**30}
    if stopped or proc.returncode:
        row.update(status="stopped at the deadline" if stopped else "failed",
                   progress=last_progress(log_path, offset))
    return row


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
             workers: int, deadline: float | None = None) -> None:
    """Generate the corpus of ``n`` images (unless done) and run ``stages`` on it, in the order given, one measured
    process each; a process still running at ``deadline`` is stopped (and recorded as such), later ones not run."""
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
               **measure(cmd, run_dir, log_path, deadline)}
        _save(results, row)
        if row["returncode"]:
            raise SystemExit(f"generation of {n} images {row['status']}: see {log_path}")
    for stage in [s for s in stages if s in (BASELINE,) + STAGES and s not in finished]:
        if deadline is not None and time.time() > deadline:
            raise SystemExit(f"deadline passed: {stage} and later stages at {n} images not run")
        # measured from scratch: the engine would skip a stage run.json records as done, and the runner the shards
        # an interrupted, unrecorded run committed; both would make the stage look cheaper than it is
        if stage != BASELINE:
            RunManifest(str(run_dir)).invalidate_from(stage, [stage])
        cmd = [py, "-m", "experiments.scale_dag", "_stage", "--out", str(run_dir), "--stage", stage,
               "--config", config, "--os-fraction", str(os_fraction)]
        row = {"n": n, "stage": stage, "config": Path(config).name, **measure(cmd, run_dir, log_path, deadline)}
        entry = RunManifest(str(run_dir)).stage(stage) or {}
        row.update(stage_s=entry.get("seconds"), engine_peak_rss_bytes=entry.get("peak_rss_bytes"),
                   result=entry.get("result"))
        if stage == "object_saliency":
            shard_col = read_corpus_manifest(str(run_dir), ["shard"]).column("shard").to_numpy()
            kept = np.unique(shard_col)[:max(1, math.ceil(os_fraction * len(np.unique(shard_col))))]
            row.update(os_fraction=os_fraction, images_planned=int(np.isin(shard_col, kept).sum()))
        _save(results, row)
        print(f"n={n} {stage}: rc={row['returncode']} wall={row['wall_s']:.0f}s cpu={row['cpu_s']:.0f}s "
              f"rss={row['peak_rss_bytes'] / 2**30:.2f}GB load={row['load_before']:.1f}", flush=True)
        if row["returncode"]:
            raise SystemExit(f"stage {stage} at {n} images {row['status']}: see {log_path}")


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
    ap.add_argument("--os-shards", type=int, help="the OS stage maps this many shards at every size (instead of "
                    "--os-fraction: the same images everywhere, so its per-image cost can be compared across N)")
    ap.add_argument("--locals-fraction", type=float, default=1.0)
    ap.add_argument("--keypoints", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2, help="generator processes")
    ap.add_argument("--deadline", help="UTC time HH:MM: stop the process running then (recorded as stopped, with "
                    "its last progress line) and run nothing after it")
    ap.add_argument("--report", action="store_true", help="print the tables of results.json and exit")
    a = ap.parse_args(argv)
    root = Path(a.root)
    if not a.report:
        root.mkdir(parents=True, exist_ok=True)
        gen = ["--locals-fraction", str(a.locals_fraction), "--keypoints", str(a.keypoints)]
        deadline = None
        if a.deadline:
            hh, mm = (int(x) for x in a.deadline.split(":"))
            now = datetime.datetime.now(datetime.timezone.utc)
            deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
        for n in [int(x) for x in a.sizes.split(",") if x]:
            shards = -(-n // scale_config(str(root / f"n{n}"), a.config).extract.shard_size)
            # the stage keeps the first ceil(fraction * shards) shards: just under k / shards keeps k
            frac = a.os_fraction if a.os_shards is None else min(1.0, (a.os_shards - 0.5) / shards)
            run_size(n, root, a.config, a.stages.split(","), gen, frac, a.workers, deadline)
    print(report(root / "results.json"))
    print()
    print(projection(root / "results.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["run_one_stage", "measure", "run_size", "growth_exponent", "report", "projection", "main"]
