"""Ray helpers shared by the actors: cluster start-up, resources per actor, progress reporting."""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import ray

log = logging.getLogger("indexer")


class StageFailed(RuntimeError):
    """A stage cannot go on; the message says why and what to change."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a running cluster (``address``, or ``RAY_ADDRESS`` under ``ray job submit``) or start a local one.

    A local head started here disables Ray 2.60's token auth (nothing else can reach it) and the dashboard.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": _project_root()}})


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ActorResources:
    """Resources of one worker actor: a GPU each when the cluster has GPUs, else a fraction of the CPUs."""

    num_cpus: float
    num_gpus: float
    num_workers: int
    torch_threads: int


def plan_resources(requested_workers: int | None = None, use_gpu: bool | None = None,
                   cpus_per_worker: float | None = None) -> ActorResources:
    """Choose actor count and per-actor resources from the cluster's resources.

    CPU-only: actors get fractional CPUs (Ray Data/actor pools hang on small nodes when each actor asks for
    a whole CPU and the driver needs one too) and torch uses the node's cores split between actors.
    """
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    cpus = max(1, int(total.get("CPU", 1)))
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu and gpus > 0:
        n = requested_workers or gpus
        return ActorResources(num_cpus=cpus_per_worker or max(1.0, min(4.0, cpus / max(n, 1) - 0.1)),
                              num_gpus=1.0, num_workers=n, torch_threads=max(1, min(4, cpus // max(n, 1))))
    n = requested_workers or max(1, cpus // 4)
    per = cpus_per_worker or round(max(0.25, (cpus - 0.5) / n), 2)
    return ActorResources(num_cpus=per, num_gpus=0.0, num_workers=n, torch_threads=max(1, cpus // n))


def light_resources(per_worker: float = 0.5) -> ActorResources:
    """CPU-only workers for table-to-table stages (descriptors): ``per_worker`` CPUs each, as many as fit."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return ActorResources(num_cpus=per_worker, num_gpus=0.0, num_workers=max(1, int(cpus / per_worker)),
                          torch_threads=1)


@dataclass
class Progress:
    """Rows done, rate and ETA of a stage, logged at most every ``every`` seconds."""

    stage: str
    total: int
    unit: str = "images"
    every: float = 5.0
    done: int = 0
    errors: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.time)
    _last: float = 0.0
    _logged: tuple[int, int] | None = None  # (done, errors) of the last line: a forced update repeats none

    def update(self, n: int, errors: int = 0, force: bool = False) -> None:
        self.done += n
        self.errors += errors
        now = time.time()
        if not force and now - self._last < self.every and self.done < self.total:
            return
        if self._logged == (self.done, self.errors):
            return
        self._last = now
        self._logged = (self.done, self.errors)
        elapsed = max(now - self.started, 1e-9)
        rate = max(self.done - self.skipped, 0) / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / max(self.total, 1)
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if remaining == remaining else "--:--:--"
        msg = (f"[{self.stage}] {self.done}/{self.total} {self.unit} ({pct:5.1f}%) "
               f"{rate:6.2f} {self.unit}/s ETA {eta} errors={self.errors}")
        log.info(msg)
        if not log.handlers and not logging.getLogger().handlers:
            print(msg, file=sys.stderr, flush=True)

    def rate(self) -> float:
        return max(self.done - self.skipped, 0) / max(time.time() - self.started, 1e-9)
