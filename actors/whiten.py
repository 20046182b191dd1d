"""The ``whiten`` stage: PCA-whitening of regional MACs (supervised Lw when matching pairs are given), and one
whitening per GAP/sum-pooled global method, learned on samples of the extracted tables and stored as arrays.
Memory is bounded by the sample sizes, not by the corpus: the tables are read one file at a time."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.common import Progress
from pipeline.descriptors import OWN_WHITENING
from pipeline.whitening import (WhitenConfig, Whitening, learn_pca_whitening, learn_supervised_whitening,
                                whitenings_from_arrays)
from storage.arrays import save_arrays, save_json
from storage.artefacts import load_whitening_arrays
from storage.layout import RunLayout
from storage.schemas import descriptors_to_numpy
from storage.tables import TableStore, read_parquet
from storage.uri import exists


def sample_regions(table_files: list[str], sources: tuple[str, ...], n: int, seed: int = 0
                   ) -> tuple[np.ndarray, pa.Table]:
    """Up to ``n`` regional descriptors of the given sources, sampled uniformly across shards."""
    rng = np.random.default_rng(seed)
    per_file = max(1, n // max(1, len(table_files)))
    parts, metas = [], []
    progress = Progress("whiten: regions sample", len(table_files), unit="files", every=10.0)
    for uri in table_files:
        progress.update(1)
        t = read_parquet(uri)
        t = t.filter(pc.is_in(t.column("source"), value_set=pa.array(list(sources))))
        if t.num_rows > per_file:
            t = t.take(np.sort(rng.choice(t.num_rows, per_file, replace=False)))
        parts.append(descriptors_to_numpy(t.column("descriptor")))
        metas.append(t.drop_columns(["descriptor"]))
    if not parts:
        return np.zeros((0, 0), np.float32), pa.table({})
    return np.concatenate(parts), pa.concat_tables(metas)


def sample_globals(table_files: list[str], methods: tuple[str, ...], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Up to ``n`` raw global descriptors of each method, drawn uniformly without replacement from that method's
    rows across ``table_files`` (kept in file and row order), reading one file at a time; all of them when a
    method has at most ``n`` rows. Kept in the tables' own dtype (float16 by default) until used: the sample of
    a method is at most ``n`` rows whatever the corpus size."""
    wanted = pa.array(list(methods))
    counts = {m: [] for m in methods}
    progress = Progress("whiten: globals, pass 1 of 2", len(table_files), unit="files", every=10.0)
    for uri in table_files:                  # pass 1: rows per method per file (the method column only)
        progress.update(1)
        col = read_parquet(uri, columns=["method"]).column("method")
        for m in methods:
            counts[m].append(int(pc.sum(pc.equal(col, m)).as_py() or 0))
    rng = np.random.default_rng(seed)
    take: dict[str, np.ndarray] = {}
    starts: dict[str, np.ndarray] = {}
    for m in methods:
        total = int(sum(counts[m]))
        take[m] = np.sort(rng.choice(total, n, replace=False)) if total > n else np.arange(total)
        starts[m] = np.r_[0, np.cumsum(counts[m])]
    parts: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    progress = Progress("whiten: globals, pass 2 of 2", len(table_files), unit="files", every=10.0)
    for f, uri in enumerate(table_files):    # pass 2: the chosen rows, file by file
        progress.update(1)
        if not any(counts[m][f] for m in methods):
            continue
        t = read_parquet(uri, columns=["method", "descriptor"])
        t = t.filter(pc.is_in(t.column("method"), value_set=wanted))
        native = np.float16 if t.schema.field("descriptor").type.value_type == pa.float16() else np.float32
        for m in methods:
            lo, hi = np.searchsorted(take[m], [starts[m][f], starts[m][f + 1]])
            if hi > lo:
                rows = t.filter(pc.equal(t.column("method"), m)).take(take[m][lo:hi] - starts[m][f])
                parts[m].append(descriptors_to_numpy(rows.column("descriptor"), native))
    return {m: np.concatenate(parts[m]) for m in methods if parts[m]}


def _pair_rows(pairs_uri: str, meta: pa.Table) -> np.ndarray:
    """Row indices (into the sample) of the matching pairs listed in a Parquet file."""
    pairs_t = read_parquet(pairs_uri)
    key = {(i, r): j for j, (i, r) in enumerate(zip(meta.column("image_id").to_pylist(),
                                                    meta.column("region_id").to_pylist()))}
    cols = [pairs_t.column(c).to_pylist() for c in ("image_id_a", "region_id_a", "image_id_b", "region_id_b")]
    pairs = [(key[(a, ra)], key[(b, rb)]) for a, ra, b, rb in zip(*cols) if (a, ra) in key and (b, rb) in key]
    return np.asarray(pairs, np.int64)


def run_whiten_stage(root: str, cfg: WhitenConfig, reuse: bool = False) -> dict[str, Any]:
    """Learn the regional whitening and per-method global whitenings; ``reuse`` keeps existing ones."""
    t0 = time.time()
    layout = RunLayout(root)
    store = TableStore(root)
    if reuse and exists(layout.whitening("regions")):
        return {"reused": True}
    X, meta = sample_regions(store.committed_files("regions", ["extract"]), cfg.sources, cfg.sample)
    if len(X) < 2:
        raise RuntimeError("whiten: no region descriptors to learn from (did extraction produce regions?)")
    dim = int(min(cfg.dim, X.shape[1], len(X) - 1))
    summary: dict[str, Any] = {}
    if cfg.pairs:
        white = learn_supervised_whitening(X, _pair_rows(cfg.pairs, meta), dim=dim)
        summary["kind"] = "supervised"
    else:
        white = learn_pca_whitening(X, dim=dim)
        summary["kind"] = "pca"
    save_arrays(layout.whitening("regions"), **white.to_arrays())
    summary.update(regions_sampled=int(len(X)), dim=dim)
    # GAP/sum-pooled globals live in other spaces than regional MACs: their own whitening, with a
    # dimension small enough for the number of images (a whitening needs several samples per dimension)
    samples = sample_globals(store.committed_files("globals", ["extract"]), OWN_WHITENING, cfg.sample)
    for method in OWN_WHITENING:
        if len(samples.get(method, ())) < 8:
            continue
        Xg = samples.pop(method).astype(np.float32)
        d = int(min(cfg.dim, Xg.shape[1], max(2, len(Xg) // 4)))
        save_arrays(layout.whitening(f"global-{method}"), **learn_pca_whitening(Xg, dim=d).to_arrays())
        summary[f"dim_{method}"] = d
    summary["seconds"] = time.time() - t0
    save_json(layout.artefact("whitening_info"), summary)
    return summary


def load_whitenings(root: str) -> dict[str, Whitening]:
    """Every whitening of a run: ``regions`` and the ``global-<method>`` ones that exist."""
    return whitenings_from_arrays(load_whitening_arrays(root, OWN_WHITENING))


__all__ = ["run_whiten_stage", "load_whitenings", "sample_regions", "sample_globals"]
