"""Tuning a FAISS index's speed/recall knob (``nprobe`` / ``efSearch``) against an exact ground truth."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from pipeline.faiss_index import ShardedSearcher, _as_f32, _find_hnsw, _find_ivf, _is_gpu_index, set_search_params

# ----------------------------------------------------------------------------------------------------------
# tuning
# ----------------------------------------------------------------------------------------------------------
def recall_at_k(I: np.ndarray, ground_truth_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |top-k found ∩ true top-k| / |true top-k| (missing ids -1 ignored)."""
    I = np.asarray(I)[:, :k]
    G = np.asarray(ground_truth_ids)[:, :k]
    hits = 0
    total = 0
    step = max(1, 4_000_000 // max(1, k * k))
    for s in range(0, I.shape[0], step):
        a, g = I[s:s + step], G[s:s + step]
        match = (a[:, :, None] == g[:, None, :]) & (g[:, None, :] >= 0)
        hits += int(match.any(axis=2).sum())
        total += int((g >= 0).sum())
    return hits / max(total, 1)


def tunable_parameter(index: Any) -> tuple[str, list[int]] | None:
    """(name, candidate values ascending) of the main speed/recall knob, or None for exact indexes."""
    first = index.shards[0] if isinstance(index, ShardedSearcher) else index
    if _is_gpu_index(first):  # GpuIndexIVF* (or replicas of them) expose nlist directly
        g = faiss.downcast_index(first)
        g = faiss.downcast_index(g.at(0)) if hasattr(g, "at") else g
        nlist = getattr(g, "nlist", None)
    else:
        ivf = _find_ivf(first)
        nlist = ivf.nlist if ivf is not None else None
    if nlist is not None:
        vals = [2 ** i for i in range(int(math.log2(nlist)) + 1)]
        return "nprobe", sorted(set(vals + [int(nlist)]))
    if _find_hnsw(first) is not None:
        return "efSearch", [16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048]
    return None


def tune(
    index: Any,
    queries: np.ndarray,
    ground_truth_ids: np.ndarray,
    k: int = 100,
    target_recall: float | None = None,
    latency_budget_ms: float | None = None,
    *,
    values: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Choose ``nprobe`` (IVF) / ``efSearch`` (HNSW) on held-out queries with exact ``ground_truth_ids``.

    - ``target_recall``: the smallest value whose recall@k reaches the target. Search cost grows with the
      value, so the smallest one is the lowest-latency one; choosing by value (not by noisy timings) keeps
      the choice reproducible. If no value reaches it, the best-recall value is chosen (``met=False``).
    - ``latency_budget_ms`` (mean per query, batched search of all ``queries``): the best recall among
      values within the budget (the scan stops at the first value over budget).

    The chosen value is applied to ``index``. Returns ``{"param", <param>, "recall", "latency_ms", "met",
    "curve": [(value, recall, latency_ms), ...]}``; ``{"param": None, ...}`` for exact indexes.
    """
    if (target_recall is None) == (latency_budget_ms is None):
        raise ValueError("give exactly one of target_recall, latency_budget_ms")
    Q = _as_f32(queries)
    tp = tunable_parameter(index)
    if tp is None:
        t0 = time.perf_counter()
        _, I = index.search(Q, k)
        lat = (time.perf_counter() - t0) * 1e3 / len(Q)
        r = recall_at_k(I, ground_truth_ids, k)
        met = r >= target_recall if target_recall is not None else lat <= latency_budget_ms
        return {"param": None, "recall": r, "latency_ms": lat, "met": bool(met), "curve": []}
    name, cands = tp
    if values is not None:
        cands = sorted({int(v) for v in values})
    curve: list[tuple[int, float, float]] = []
    chosen: tuple[int, float, float] | None = None
    for v in cands:
        set_search_params(index, **{name: v})
        t0 = time.perf_counter()
        _, I = index.search(Q, k)
        lat = (time.perf_counter() - t0) * 1e3 / len(Q)
        r = recall_at_k(I, ground_truth_ids, k)
        curve.append((v, r, lat))
        if target_recall is not None and r >= target_recall:
            chosen = (v, r, lat)
            break
        if latency_budget_ms is not None and lat > latency_budget_ms:
            break
    if target_recall is not None:
        met = chosen is not None
        if chosen is None:
            chosen = max(curve, key=lambda c: (c[1], -c[0]))
    else:
        within = [c for c in curve if c[2] <= latency_budget_ms]
        met = bool(within)
        chosen = max(within, key=lambda c: (c[1], -c[0])) if within else curve[0]
    set_search_params(index, **{name: chosen[0]})
    return {"param": name, name: chosen[0], "recall": chosen[1], "latency_ms": chosen[2],
            "met": bool(met), "curve": curve}

