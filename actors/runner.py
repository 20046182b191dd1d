"""One shard runner for every Ray stage that works shard by shard.

A stage is a *mapper* (built once per actor by a picklable factory: it loads the backbone, an index, a
whitening...) that turns one shard's input into written table files, and the runner, which owns the rest:
the actor pool (a GPU each when the cluster has GPUs, fractional CPUs otherwise), retries, progress lines and
the commit of each shard. A shard becomes visible to readers only when its commit marker is written, after
its files; actors are restartable (``max_restarts``) and their calls retried (``max_task_retries``), so a
killed worker's shard is redone from scratch under the same file names: no row is ever lost or duplicated.
A shard that is already committed is skipped, so a rerun after a crash resumes. An actor with no shard left to
take is killed at once: when a node is lost near the end of a stage, its restarting actors then find room on the
remaining nodes instead of waiting for resources that idle actors hold.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import ray

from actors.common import ActorResources, Progress
from storage.arrays import load_json
from storage.layout import shard_label
from storage.tables import StageManifest

log = logging.getLogger("indexer")
COUNTERS = ("images", "errors", "rows")


@dataclass
class ShardResult:
    """What a mapper did with one shard: the files it wrote (table -> URI) and its counts."""

    files: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)       # recorded in the commit marker
    error_reasons: list[str] = field(default_factory=list)     # one reason code per failed image


class ShardMapper(Protocol):
    def __call__(self, shard: int | str, payload: Any) -> ShardResult: ...


class ShardWorker:
    """Actor body: builds the mapper once, then maps and commits whole shards (idempotent per shard)."""

    def __init__(self, root: str, stage: str, factory: Callable[[], ShardMapper]) -> None:
        self.manifest = StageManifest(root, stage)
        self.mapper = factory()

    def process(self, shard: int | str, payload: Any) -> dict[str, Any]:
        if self.manifest.is_committed(shard):
            # a retried call whose first attempt committed before its worker died: report what it wrote
            marker = load_json(self.manifest.marker_uri(shard))
            return {"shard": shard_label(shard), "skipped": True, "seconds": 0.0,
                    **{k: int(marker.get(k, 0)) for k in COUNTERS if k in marker}}
        t0 = time.time()
        out = self.mapper(shard, payload)
        seconds = time.time() - t0
        self.manifest.commit(shard, out.files, **out.counts, seconds=seconds)
        return {"shard": shard_label(shard), "skipped": False, "seconds": seconds, **out.counts,
                "error_reasons": out.error_reasons}

    def call(self, method: str, *args: Any) -> Any:
        """Run one of the mapper's own methods (e.g. sampling descriptors before the stage proper)."""
        return getattr(self.mapper, method)(*args)


def _actor_class(resources: ActorResources) -> Any:
    return ray.remote(ShardWorker).options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                           max_restarts=-1, max_task_retries=-1, max_concurrency=1)


def run_shards(root: str, stage: str, shards: Mapping[int | str, Any], factory: Callable[[], ShardMapper],
               resources: ActorResources, progress: Progress | None = None,
               weight: Callable[[Any], int] = len) -> dict[str, Any]:
    """Map every uncommitted shard of ``shards`` (label -> payload) with a pool of actors; commit each.

    ``weight(payload)`` is the progress units of a shard (its images by default). Returns summed counts,
    error reasons, the number of shards done / skipped, and the rate of the run.
    """
    committed = set(StageManifest(root, stage).committed())
    key_of = {shard_label(s): s for s in shards}
    todo = [s for s in shards if shard_label(s) not in committed]
    total = sum(weight(p) for p in shards.values())
    progress = progress or Progress(stage, total=total)
    skipped = total - sum(weight(shards[s]) for s in todo)
    progress.skipped = skipped
    progress.update(skipped, force=True)
    result: dict[str, Any] = {**{k: 0 for k in COUNTERS}, "shards": len(shards),
                              "skipped_shards": len(shards) - len(todo), "error_reasons": {}}
    if not todo:
        return result
    cls = _actor_class(resources)
    # the factory goes to the object store once, and this ref keeps it there for the whole stage: an actor restarted
    # after its node was lost is built again from it (passed by value, Ray would free it once the first actors were
    # built, and the restart would fail: ray-project/ray#53727)
    factory_ref = ray.put(factory)
    actors = [cls.remote(root, stage, factory_ref) for _ in range(max(1, min(resources.num_workers, len(todo))))]
    t0 = time.time()
    queue, idle = list(todo), list(actors)
    pending: dict[Any, Any] = {}  # call -> its actor
    try:
        while queue or pending:
            while queue and idle:
                s = queue.pop(0)
                a = idle.pop(0)
                pending[a.process.remote(s, shards[s])] = a
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                actor = pending.pop(ref)
                out = ray.get(ref)
                for k in COUNTERS:
                    result[k] += int(out.get(k, 0))
                for reason in out.get("error_reasons", []):
                    result["error_reasons"][reason] = result["error_reasons"].get(reason, 0) + 1
                progress.update(weight(shards[key_of[out["shard"]]]), errors=int(out.get("errors", 0)))
                if queue:
                    idle.append(actor)
                else:
                    # nothing left for it: free its resources now, so that an actor being restarted elsewhere (its
                    # node was lost) can be placed even when the cluster has no other room for it
                    ray.kill(actor)
        progress.update(0, force=True)
    finally:
        for a in actors:
            ray.kill(a)
    result["seconds"] = time.time() - t0
    done_units = total - skipped
    result["per_second"] = done_units / max(result["seconds"], 1e-9)
    return result


def run_on_one(root: str, stage: str, factory: Callable[[], ShardMapper], resources: ActorResources,
               method: str, *args: Any) -> Any:
    """Build the stage's mapper in one actor and call ``method(*args)`` on it (no commits)."""
    actor = _actor_class(resources).remote(root, stage, factory)
    try:
        return ray.get(actor.call.remote(method, *args))
    finally:
        ray.kill(actor)


__all__ = ["ShardResult", "ShardMapper", "ShardWorker", "run_shards", "run_on_one"]
