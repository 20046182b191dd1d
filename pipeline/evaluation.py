"""Revisited Oxford / Paris evaluation protocol (ALGORITHMS.md §10).

Numbers follow the reference implementation of Radenović et al., "Revisiting Oxford and Paris" (CVPR 2018),
repository filipradenovic/revisitop, ``python/evaluate.py`` (``compute_ap`` / ``compute_map``) and the
protocol construction of ``python/example_evaluate.py``:

* ``ok`` ids are positives, ``junk`` ids are removed from the ranking before AP is computed (a positive's
  position is decreased by the number of junk images ranked strictly before it; an id listed both as ok and as
  junk counts as a positive and is *also* removed for the positives after it, exactly like the reference).
* AP is the trapezoidal area under the precision/recall steps: for the ``j``-th positive (0-based) at junk-free
  0-based position ``r_j``, ``AP += (P0 + P1) / (2 n)`` with ``P0 = j / r_j`` (``1`` when ``r_j == 0``),
  ``P1 = (j + 1) / (r_j + 1)`` and ``n`` the length of the ``ok`` list.
* mP@k: with 1-based junk-free positions ``p`` of the positives, ``kq = min(k, max(p))`` and
  ``P@k = #{p <= kq} / kq`` -- the denominator is capped by the position of the *last* positive, not by the
  number of positives (the reference's definition; it makes P@k = 1 when every positive is in the top k).
* Queries whose ``ok`` list is empty are skipped: their AP / P@k are NaN and they are excluded from the means
  (the reference divides by ``nq - nempty``).

Extension for truncated rankings (top-k lists from an index; the reference always ranks the whole database):
positives that are not in a query's list count as "not found" -- they add nothing to AP (their recall step is
lost) and, for mP@k, are treated as ranked after the end of the list, so ``kq = k``. For a full ranking with a
valid ground truth this is identical to the reference. Negative ids (FAISS pads missing results with ``-1``)
are dropped from a ranking before evaluation.

All values are fractions in [0, 1] (the reference prints them multiplied by 100).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")


def _ids(x: Any) -> np.ndarray:
    """1-D int64 array from a list / array / None of database ids."""
    if x is None:
        return np.empty(0, dtype=np.int64)
    return np.asarray(x, dtype=np.int64).ravel()


def compute_ap(ranks: Sequence[int] | np.ndarray, nres: int) -> float:
    """Average precision with the reference trapezoidal interpolation.

    ``ranks``: sorted 0-based positions of the retrieved positives in the junk-filtered ranking;
    ``nres``: number of positives of the query (positives missing from ``ranks`` lower the AP).
    """
    if nres <= 0:
        raise ValueError("compute_ap needs at least one positive (nres > 0)")
    r = np.asarray(ranks, dtype=np.float64).ravel()
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    prec_0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    prec_1 = (j + 1.0) / (r + 1.0)
    return float(np.sum((prec_0 + prec_1) * 0.5) / nres)


def _per_query_rankings(ranks: np.ndarray | Sequence[Sequence[int]], nq: int) -> list[np.ndarray]:
    """Split ``ranks`` into one 1-D id array per query.

    A 2-D ndarray is read as the reference's ``(n_db, n_q)`` layout (column ``i`` = ranking of query ``i``);
    anything else is a sequence of per-query rankings (possibly truncated, possibly of different lengths).
    """
    if isinstance(ranks, np.ndarray) and ranks.ndim == 2:
        if ranks.shape[1] != nq:
            raise ValueError(f"ranks has shape {ranks.shape}; expected (n_db, {nq}) with one column per query")
        cols = [ranks[:, i] for i in range(nq)]
    else:
        cols = list(ranks)
        if len(cols) != nq:
            raise ValueError(f"got {len(cols)} rankings for {nq} queries")
    out = []
    for c in cols:
        a = np.asarray(c).ravel()
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError("rankings must hold integer database ids")
        a = a.astype(np.int64, copy=False)
        out.append(a[a >= 0] if a.size and a.min() < 0 else a)  # no copy of full (n_db,) columns
    return out


def junk_filtered_positions(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> tuple[np.ndarray, bool]:
    """0-based positions of the positives in ``ranking`` once junk is removed, and whether all were found.

    Equivalent to the reference's loop: each positive moves up by the number of junk entries strictly
    before it (``searchsorted`` on the sorted junk positions).
    """
    ranking = np.asarray(ranking, dtype=np.int64).ravel()
    hit = np.isin(ranking, ok)
    pos = np.flatnonzero(hit)
    if junk.size:
        jpos = np.flatnonzero(np.isin(ranking, junk))
        pos = pos - np.searchsorted(jpos, pos, side="left")
    complete = bool(np.isin(ok, ranking[hit]).all()) if ok.size else True
    return pos, complete


def _precision_at(pos1: np.ndarray, kappas: np.ndarray, complete: bool) -> np.ndarray:
    """Reference P@k for 1-based junk-free positive positions ``pos1``: ``#{p <= kq} / kq``, kq = min(k, max p)."""
    if pos1.size == 0:
        return np.zeros(kappas.size, dtype=np.float64)
    last = float(pos1.max()) if complete else np.inf
    kq = np.minimum(kappas.astype(np.float64), last)
    return (pos1[None, :] <= kq[:, None]).sum(axis=1) / kq


def compute_map(
    ranks: np.ndarray | Sequence[Sequence[int]],
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean AP and mean precision at ``kappas`` over the queries of ``gnd`` (reference ``compute_map``).

    ``ranks``: ``(n_db, n_q)`` int array (reference layout) or a list of per-query ranked id arrays
    (truncated top-k lists allowed; a FAISS result ``I`` of shape ``(n_q, k)`` is passed as ``list(I)``).
    ``gnd[i]``: dict with ``ok`` and optional ``junk`` id lists.
    Returns ``(map, aps (n_q,), mpr (K,), prs (n_q, K))``; skipped queries (no positives) hold NaN in
    ``aps`` / ``prs``; ``map`` / ``mpr`` are NaN when every query is skipped.
    """
    nq = len(gnd)
    rankings = _per_query_rankings(ranks, nq)
    kap = np.asarray(list(kappas), dtype=np.int64).ravel()
    if np.any(kap <= 0):
        raise ValueError("kappas must be positive")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, kap.size), np.nan)
    for i, g in enumerate(gnd):
        ok = _ids(g.get("ok"))
        if ok.size == 0:
            continue  # no positives: excluded from the averages, as in the reference
        pos, complete = junk_filtered_positions(rankings[i], ok, _ids(g.get("junk")))
        aps[i] = compute_ap(pos, ok.size)
        prs[i] = _precision_at(pos + 1, kap, complete)
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(kap.size, np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def protocol_gnd(gnd: Sequence[Mapping[str, Any]], protocol: str) -> list[dict[str, np.ndarray]]:
    """Per-query ``{'ok', 'junk'}`` for the Easy / Medium / Hard setups of the revisited protocol.

    easy: ok = easy, junk = junk + hard; medium: ok = easy + hard, junk = junk;
    hard: ok = hard, junk = junk + easy.
    """
    protocol = protocol.lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    out = []
    for g in gnd:
        easy, hard, junk = _ids(g.get("easy")), _ids(g.get("hard")), _ids(g.get("junk"))
        if protocol == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif protocol == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        else:
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def evaluate_all(
    ranks: np.ndarray | Sequence[Sequence[int]],
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, Any]]:
    """mAP and mP@k for the three protocols, JSON-ready.

    Returns ``{protocol: {"map": float, "mp@<k>": float, ..., "aps": [float | None per query],
    "n_queries": number of queries evaluated}}`` (None / NaN where a query or the protocol has no positives).
    """
    rankings = _per_query_rankings(ranks, len(gnd))
    result: dict[str, dict[str, Any]] = {}
    for protocol in PROTOCOLS:
        m, aps, mpr, _ = compute_map(rankings, protocol_gnd(gnd, protocol), kappas)
        entry: dict[str, Any] = {"map": m}
        for k, v in zip(kappas, mpr):
            entry[f"mp@{int(k)}"] = float(v)
        entry["aps"] = [None if np.isnan(a) else float(a) for a in aps]
        entry["n_queries"] = int((~np.isnan(aps)).sum())
        result[protocol] = entry
    return result


def precision_recall_curve(
    ranked_ids: Sequence[int] | np.ndarray, ok: Sequence[int] | np.ndarray, junk: Sequence[int] | np.ndarray = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each position of the junk-filtered ranking of one query (for plots)."""
    ranking = np.asarray(ranked_ids, dtype=np.int64).ravel()
    ok_ids, junk_ids = _ids(ok), _ids(junk)
    if ok_ids.size == 0:
        raise ValueError("precision_recall_curve needs at least one positive")
    kept = ranking[~np.isin(ranking, junk_ids) & (ranking >= 0)]
    tp = np.cumsum(np.isin(kept, ok_ids))
    precision = tp / np.arange(1, kept.size + 1, dtype=np.float64)
    recall = tp / float(ok_ids.size)
    return precision, recall


def mean_pr_curve(
    ranks: np.ndarray | Sequence[Sequence[int]],
    gnd: Sequence[Mapping[str, Any]],
    recall_levels: Sequence[float] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision over queries with positives, at ``recall_levels`` (default 0, 0.05, ..., 1).

    Interpolated precision at recall ``r`` is the best precision reached at any recall >= r (0 if the query
    never reaches ``r``); precision maxima sit on the positives, so only their junk-free positions are needed.
    ``gnd`` holds ``ok`` / ``junk`` lists (e.g. from :func:`protocol_gnd`).
    """
    levels = np.linspace(0.0, 1.0, 21) if recall_levels is None else np.asarray(recall_levels, dtype=np.float64)
    rankings = _per_query_rankings(ranks, len(gnd))
    curves = []
    for ranking, g in zip(rankings, gnd):
        ok = _ids(g.get("ok"))
        if ok.size == 0:
            continue
        pos, _ = junk_filtered_positions(ranking, ok, _ids(g.get("junk")))
        if pos.size == 0:
            curves.append(np.zeros(levels.size))
            continue
        k = np.arange(1, pos.size + 1, dtype=np.float64)
        prec = k / (pos + 1.0)
        rec = k / ok.size
        best_after = np.maximum.accumulate(prec[::-1])[::-1]  # max precision at recall >= rec[i]
        idx = np.searchsorted(rec, levels - 1e-12, side="left")  # first positive reaching each level
        curves.append(np.where(idx < pos.size, best_after[np.minimum(idx, pos.size - 1)], 0.0))
    if not curves:
        return levels, np.full(levels.size, np.nan)
    return levels, np.mean(curves, axis=0)


def paired_bootstrap(ap_a: Sequence[float] | np.ndarray, ap_b: Sequence[float] | np.ndarray,
                     n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """How sure is "method B beats method A" on these queries? Paired bootstrap over queries of ``mAP(B) - mAP(A)``.

    ``ap_a``, ``ap_b``: per-query APs of the two methods on the same queries (NaN = a query without positives
    under the protocol; dropped from both). Queries are resampled with replacement ``n_resamples`` times (seeded)
    and the difference of means is taken on each resample; returns the observed difference ``diff``, the
    percentile interval ``low`` / ``high`` at ``confidence``, and the counts of queries where B is ``better`` /
    ``worse`` / ``n`` in all. On a small track (60 no-box queries, mostly one positive each) one query moving from
    rank 1 to rank 4 changes mAP by 1.25 points: the interval says whether a difference is more than that noise.
    """
    a = np.asarray(ap_a, np.float64).ravel()
    b = np.asarray(ap_b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"per-query APs of different lengths: {a.size} vs {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    d = b[keep] - a[keep]
    if d.size == 0:
        nan = float("nan")
        return {"diff": nan, "low": nan, "high": nan, "better": 0, "worse": 0, "n": 0}
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for s in range(0, n_resamples, 1000):  # blocks bound memory at 1000 x n
        m = min(1000, n_resamples - s)
        means[s:s + m] = d[rng.integers(0, d.size, (m, d.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high),
            "better": int((d > 1e-12).sum()), "worse": int((d < -1e-12).sum()), "n": int(d.size)}
