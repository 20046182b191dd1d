"""Offline stages between extraction and indexing: whitening, region graph + centrality, final descriptors.

* ``whiten``: PCA-whitening learned on a sample of regional MACs (supervised Lw when matching pairs are
  given) and one whitening per sum/GAP-pooled global method; stored as arrays under ``artefacts/whitening``.
* ``graph``: the whitened ``fs_egm`` regions of the whole corpus → mutual k-NN graph (Ray block search) →
  Katz centrality (CG; row-block matvec over Ray actors for large graphs). Stored under ``artefacts/graph``
  with the region descriptors ``V``, saliencies ``f``, centralities ``g`` and a serialised FAISS index over
  ``V`` that the object-saliency stage and query-time OS use.
* ``descriptors``: per extraction shard (Ray tasks), the final whitened global descriptors of every method
  (R-MAC, FS.EGM, OS.EGM, OS.EGM-4 and the whitened MAC/GeM/SPoC/CroW/CAM-OfA), committed shard by shard.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.katz import katz_centrality
from pipeline.knn_graph import build_knn_index, graph_to_arrays, normalize_graph
from pipeline.pooling import l2n_np
from pipeline.whitening import Whitening, learn_pca_whitening, learn_supervised_whitening
from storage.arrays import load_arrays, load_json, save_arrays, save_json, save_npy
from storage.schemas import descriptor_array, descriptors_to_numpy, globals_schema
from storage.tables import StageManifest, TableStore, read_parquet
from storage.uri import exists, join

log = logging.getLogger("indexer")

MAC_FAMILY = ("mac", "rmac", "fs_egm", "os_egm", "os_egm4")
OWN_WHITENING = ("gem", "spoc", "crow", "cam_ofa")
SUM_INPUTS = {"fs_egm": "fs_egm_sum", "os_egm": "os_egm_sum", "os_egm4": "os_egm4_sum"}


def artefact_uri(root: str, *parts: str) -> str:
    return join(root, "artefacts", *parts)


def _sample_rows(table_files: list[str], sources: list[str], n: int, seed: int = 0) -> tuple[np.ndarray, pa.Table]:
    """Up to ``n`` regional descriptors of the given sources, sampled uniformly across shards."""
    rng = np.random.default_rng(seed)
    per_file = max(1, n // max(1, len(table_files)))
    parts, metas = [], []
    for uri in table_files:
        t = read_parquet(uri)
        t = t.filter(pc.is_in(t.column("source"), value_set=pa.array(sources)))
        if t.num_rows > per_file:
            t = t.take(np.sort(rng.choice(t.num_rows, per_file, replace=False)))
        parts.append(descriptors_to_numpy(t.column("descriptor")))
        metas.append(t.drop_columns(["descriptor"]))
    if not parts:
        return np.zeros((0, 0), np.float32), pa.table({})
    return np.concatenate(parts), pa.concat_tables(metas)


def load_whitening(root: str, name: str) -> Whitening:
    """A stored whitening (``regions`` or ``global-<method>``)."""
    return Whitening.from_arrays(load_arrays(artefact_uri(root, "whitening", f"{name}.npz")))


def run_whiten(root: str, cfg: Any, reuse: bool = False) -> dict[str, Any]:
    """Learn the regional whitening and per-method global whitenings; ``reuse`` keeps existing ones."""
    t0 = time.time()
    store = TableStore(root)
    target = artefact_uri(root, "whitening", "regions.npz")
    summary: dict[str, Any] = {}
    if reuse and exists(target):
        log.info("[whiten] reusing %s", target)
        return {"reused": True}
    X, meta = _sample_rows(store.committed_files("regions", ["extract"]), list(cfg.sources), cfg.sample)
    if len(X) < 2:
        raise RuntimeError("whiten: no region descriptors to learn from (did extraction produce regions?)")
    dim = int(min(cfg.dim, X.shape[1], len(X) - 1))
    if cfg.pairs:
        pairs_t = read_parquet(cfg.pairs)
        key = {(i, r): j for j, (i, r) in enumerate(zip(meta.column("image_id").to_pylist(),
                                                        meta.column("region_id").to_pylist()))}
        pairs = [(key[(a, ra)], key[(b, rb)]) for a, ra, b, rb in zip(*[pairs_t.column(c).to_pylist() for c in (
            "image_id_a", "region_id_a", "image_id_b", "region_id_b")]) if (a, ra) in key and (b, rb) in key]
        white = learn_supervised_whitening(X, np.asarray(pairs, np.int64), dim=dim)
        summary["kind"] = "supervised"
    else:
        white = learn_pca_whitening(X, dim=dim)
        summary["kind"] = "pca"
    save_arrays(target, **white.to_arrays())
    summary.update(regions_sampled=int(len(X)), dim=dim)
    # GAP/sum-pooled globals live in other spaces than regional MACs: their own whitening, with a
    # dimension small enough for the number of images (a whitening needs several samples per dimension)
    g = store.read("globals", ["extract"])
    for method in OWN_WHITENING:
        rows = g.filter(pc.equal(g.column("method"), method))
        if rows.num_rows < 8:
            continue
        Xg = descriptors_to_numpy(rows.column("descriptor"))
        d = int(min(cfg.dim, Xg.shape[1], max(2, len(Xg) // 4)))
        save_arrays(artefact_uri(root, "whitening", f"global-{method}.npz"), **learn_pca_whitening(Xg, dim=d).to_arrays())
        summary[f"dim_{method}"] = d
    summary["seconds"] = time.time() - t0
    save_json(artefact_uri(root, "whitening", "info.json"), summary)
    return summary


def run_graph(root: str, cfg: Any, num_cpus: float = 1.0, num_workers: int = 2) -> dict[str, Any]:
    """Region k-NN graph + Katz centrality over the whitened ``cfg.source`` regions of the corpus."""
    from actors.graph import build_knn_graph_ray, katz_centrality_ray

    t0 = time.time()
    store = TableStore(root)
    white = load_whitening(root, "regions")
    V_parts, ids, rids, sal = [], [], [], []
    for uri in store.committed_files("regions", ["extract"]):
        t = read_parquet(uri)
        t = t.filter(pc.equal(t.column("source"), cfg.source))
        if t.num_rows == 0:
            continue
        V_parts.append(white.apply(descriptors_to_numpy(t.column("descriptor"))).astype(np.float32))
        ids += t.column("image_id").to_pylist()
        rids.append(t.column("region_id").to_numpy())
        sal.append(t.column("saliency").to_numpy())
    if not V_parts:
        raise RuntimeError(f"graph: no '{cfg.source}' regions found; enable that region source in extract")
    V = np.concatenate(V_parts)
    f = np.concatenate(sal).astype(np.float32)
    n = len(V)
    t_knn = time.time()
    W = build_knn_graph_ray(V_parts, k=cfg.k, beta=cfg.beta, block_rows=cfg.block_rows, num_workers=num_workers,
                            num_cpus=num_cpus, exact_threshold=cfg.exact_threshold)
    t_knn = time.time() - t_knn
    Wn = normalize_graph(W)
    t_katz = time.time()
    if n > 2_000_000:
        g, info = katz_centrality_ray(Wn, alpha=cfg.alpha, n_blocks=max(2, num_workers), tol=cfg.tol)
    else:
        g, info = katz_centrality(Wn, alpha=cfg.alpha, tol=cfg.tol)
    t_katz = time.time() - t_katz
    g = np.asarray(g, np.float32)
    index = build_knn_index(V, exact_threshold=cfg.exact_threshold, use_gpu=False)
    import faiss

    base = artefact_uri(root, "graph")
    save_npy(join(base, "V.npy"), V.astype(np.float16))
    save_npy(join(base, "f.npy"), f)
    save_npy(join(base, "g.npy"), g)
    save_npy(join(base, "region_index.npy"), faiss.serialize_index(index))
    save_arrays(join(base, "graph.npz"), **graph_to_arrays(W))
    save_arrays(join(base, "regions.npz"), image_id=np.asarray(ids, dtype=str),
                region_id=np.concatenate(rids).astype(np.int32))
    summary = {"regions": n, "edges": int(W.nnz), "k": cfg.k, "beta": cfg.beta, "alpha": cfg.alpha,
               "cg_iterations": int(info.get("iterations", -1)), "cg_residual": float(info.get("residual", np.nan)),
               "knn_seconds": t_knn, "katz_seconds": t_katz, "seconds": time.time() - t0,
               "isolated_regions": int((np.diff(W.indptr) == 0).sum())}
    save_json(join(base, "info.json"), summary)
    return summary


def load_graph_artefacts(root: str) -> dict[str, Any]:
    """What object saliency needs from the graph stage: V, f, g and the serialised region index."""
    from storage.arrays import load_npy

    base = artefact_uri(root, "graph")
    return {"f": np.asarray(load_npy(join(base, "f.npy"))), "g": np.asarray(load_npy(join(base, "g.npy"))),
            "index_bytes": np.asarray(load_npy(join(base, "region_index.npy"))),
            "info": load_json(join(base, "info.json"))}


# ------------------------------------------------------------------------------------------ descriptors
def final_descriptors(regions: pa.Table, globals_: pa.Table, methods: list[str], whitenings: dict[str, Whitening]
                      ) -> tuple[list[str], list[str], np.ndarray]:
    """Final global descriptors of one shard: (image ids, methods, (N, d) descriptors).

    ``rmac`` = L2(sum_R w(m_A(R))) over full + grid regions (seed 003); FS/OS.EGM = w(sum_R L2(m_A(R)))
    (seed 001); MAC-family use the regional whitening, GAP/sum-pooled globals their own.
    """
    out_ids: list[str] = []
    out_methods: list[str] = []
    out_vecs: list[np.ndarray] = []
    wr = whitenings["regions"]

    def emit(ids: list[str], method: str, X: np.ndarray) -> None:
        out_ids.extend(ids)
        out_methods.extend([method] * len(ids))
        out_vecs.append(X.astype(np.float32))

    if "rmac" in methods and regions.num_rows:
        t = regions.filter(pc.is_in(regions.column("source"), value_set=pa.array(["full", "grid"])))
        t = t.sort_by("image_id")
        ids = t.column("image_id").to_numpy(zero_copy_only=False)
        if len(ids):
            R = wr.apply(descriptors_to_numpy(t.column("descriptor")))
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            emit(list(ids[starts]), "rmac", l2n_np(np.add.reduceat(R, starts, axis=0)))
    gm = globals_.column("method").to_numpy(zero_copy_only=False)
    gids = globals_.column("image_id").to_numpy(zero_copy_only=False)
    for method in methods:
        if method == "rmac":
            continue
        source = SUM_INPUTS.get(method, method)
        mask = gm == source
        if not mask.any():
            continue
        X = descriptors_to_numpy(globals_.column("descriptor").filter(pa.array(mask)))
        white = whitenings.get(f"global-{method}") if method in OWN_WHITENING else wr
        emit(list(gids[mask]), method, white.apply(X) if white is not None else l2n_np(X))
    if not out_vecs:
        return [], [], np.zeros((0, 0), np.float32)
    dims = {v.shape[1] for v in out_vecs}
    if len(dims) != 1:  # one file has one width: zero-padding keeps inner products and norms unchanged
        width = max(dims)
        out_vecs = [np.pad(v, ((0, 0), (0, width - v.shape[1]))) for v in out_vecs]
    return out_ids, out_methods, np.concatenate(out_vecs)


@ray.remote(num_cpus=0.5)
def _descriptor_shard(root: str, shard: str, files: dict[str, str], os_files: dict[str, str] | None,
                      methods: list[str], dtype: str) -> dict[str, Any]:
    store = TableStore(root)
    whitenings = {"regions": load_whitening(root, "regions")}
    for m in OWN_WHITENING:
        uri = artefact_uri(root, "whitening", f"global-{m}.npz")
        if exists(uri):
            whitenings[f"global-{m}"] = load_whitening(root, f"global-{m}")
    regions = read_parquet(files["regions"])
    globals_ = read_parquet(files["globals"])
    if os_files and os_files.get("globals"):
        globals_ = pa.concat_tables([globals_, read_parquet(os_files["globals"])])
    ids, meths, X = final_descriptors(regions, globals_, methods, whitenings)
    if not len(X):
        X = np.zeros((0, 1), np.float32)
    table = pa.table({"image_id": pa.array(ids, pa.string()), "method": pa.array(meths, pa.string()),
                      "descriptor": descriptor_array(X, dtype)}, schema=globals_schema(X.shape[1], dtype))
    written = {"globals": store.write("globals", "descriptors", shard, table)}
    StageManifest(root, "descriptors").commit(shard, written, rows=len(ids))
    return {"shard": shard, "rows": len(ids)}


def run_descriptors(root: str, methods: list[str], dtype: str = "float16") -> dict[str, Any]:
    """Final descriptors for every committed extraction shard not yet done (Ray tasks, one per shard)."""
    t0 = time.time()
    extract = StageManifest(root, "extract").committed()
    os_stage = StageManifest(root, "object_saliency").committed()
    done = StageManifest(root, "descriptors").committed()
    wanted = [m for m in methods if not m.startswith("os_egm") or os_stage]
    refs = [_descriptor_shard.remote(root, s, m["files"], os_stage.get(s, {}).get("files"), wanted, dtype)
            for s, m in sorted(extract.items()) if s not in done]
    rows = sum(r["rows"] for r in ray.get(refs))
    return {"shards": len(refs), "skipped_shards": len(done), "rows": rows, "methods": wanted,
            "seconds": time.time() - t0}
