"""Seed 001's global diffusion (Iscen et al. parameters) vs plain k-NN on museum-landmarks' landmark queries.

Landmark queries are database photos (each queries the rest of its group; its own copy is junk), so their
descriptors are the database's: no query encoding needed. Reads the raw (unwhitened, L2-normalised) global
descriptors an extract stage stored. Usage:

    python experiments/diffusion_seed001_museum.py RUN_ROOT [method ...] [key=value ...]

RUN_ROOT is an index run (``tables/globals/*.parquet``); methods default to mac gem crow; ``key=value``
overrides a :class:`DiffusionConfig` field (e.g. ``k=10 maxiter=200``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from pipeline.diffusion import DiffusionConfig, build_diffusion_graph, diffusion_scores, query_vector
from pipeline.evaluation import compute_map, protocol_gnd
from pipeline.query_expansion import diffusion_rerank
from storage.schemas import descriptors_to_numpy
from storage.tables import TableStore


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"


def load_globals(root: Path, method: str, imlist: list[str]) -> np.ndarray:
    """The raw (unwhitened) extracted globals of ``method`` in ``imlist`` order."""
    t = TableStore(str(root)).read("globals", ["extract"], columns=["image_id", "method", "descriptor"],
                                   filter_expr=pc.field("method") == method)
    ids = t.column("image_id").to_pylist()
    X = descriptors_to_numpy(t.column("descriptor"))
    pos = {i: n for n, i in enumerate(ids)}
    X = X[[pos[i] for i in imlist]]
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def main() -> None:
    root = Path(sys.argv[1])
    args = sys.argv[2:]
    methods = [a for a in args if "=" not in a] or ["mac", "gem", "crow"]
    over = dict(a.split("=", 1) for a in args if "=" in a)
    types = {f: type(getattr(DiffusionConfig(), f)) for f in over}
    g = json.loads((DATA / "gnd.json").read_text())
    imlist = g["imlist"]
    sel = [i for i, q in enumerate(g["gnd"]) if q["set"] == "landmarks"]
    gnd = [g["gnd"][i] for i in sel]
    qidx = np.array([imlist.index(g["qimlist"][i]) for i in sel])
    gm = protocol_gnd(gnd, "medium")
    cfg = DiffusionConfig(**{f: types[f](v) for f, v in over.items()})
    for m in methods:
        X = load_globals(root, m, imlist)
        Q = X[qidx]
        S = Q @ X.T
        knn = np.argsort(-S, axis=1, kind="stable")
        t0 = time.time()
        graph = build_diffusion_graph(X, cfg)
        t_graph = time.time() - t0
        kq = np.argsort(-S, axis=1, kind="stable")[:, :cfg.kq]
        Y = np.stack([query_vector(S[i, kq[i]][None], kq[i][None], len(X), cfg) for i in range(len(sel))], axis=1)
        t0 = time.time()
        F, info = diffusion_scores(graph, Y, cfg)
        t_cg = (time.time() - t0) / len(sel)
        # diffusion scores are 0 outside the query's connected component: fall back to the k-NN order there
        dif = np.lexsort((np.argsort(knn, axis=1), -F.T), axis=1)
        _, loc = diffusion_rerank(Q, X[knn[:, :100]], knn[:, :100])
        local = np.concatenate([loc, knn[:, 100:]], axis=1)
        row = {"method": m, "k": cfg.k, "kq": cfg.kq, "maxiter": cfg.maxiter, "n_db": len(X), "queries": len(sel),
               "knn": compute_map(list(knn), gm)[0], "diffusion_global": compute_map(list(dif), gm)[0],
               "diffusion_local_top100": compute_map(list(local), gm)[0],
               "graph_edges": int(graph["indptr"][-1]), "graph_s": round(t_graph, 2),
               "cg_ms_per_query": round(1000 * t_cg, 2), "cg_iterations": info["iterations"],
               "cg_residual": info["residual"]}
        print(json.dumps(row))


if __name__ == "__main__":
    main()
