"""The ``diffusion`` stage: seed 001's offline diffusion graph (Iscen et al.) over the final global descriptors.

For every configured method, the mutual k-NN affinity ``max(x.y, 0)^gamma`` of the database's descriptors is
normalised to ``S = D^-1/2 W D^-1/2`` (:mod:`pipeline.diffusion`) and published as snapshot ``diffusion_<method>``
(CSR arrays, degrees and the image id of every vertex). Queries then only pay their k-NN search and CG.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pipeline.diffusion import DiffusionStageConfig, build_diffusion_graph
from storage.arrays import npy_bytes
from storage.layout import SnapshotFiles
from storage.readers import read_globals
from storage.snapshot import SnapshotWriter

log = logging.getLogger("indexer")


def _trimmed(X: np.ndarray) -> np.ndarray:
    """Without the all-zero columns the descriptors table pads narrower methods with."""
    nz = np.flatnonzero(np.any(X != 0, axis=0))
    return np.ascontiguousarray(X[:, : int(nz[-1] + 1) if len(nz) else X.shape[1]])


def run_diffusion_stage(root: str, cfg: DiffusionStageConfig) -> dict[str, Any]:
    """Build and publish one diffusion graph per method of ``cfg.methods``."""
    out: dict[str, Any] = {}
    for method in cfg.methods:
        t0 = time.time()
        ids, X = read_globals(root, method, trim=True)
        if not ids:
            log.warning("[diffusion] no descriptors for method %s: skipped", method)
            continue
        graph = build_diffusion_graph(_trimmed(X), cfg.params)
        n_edges = int(len(graph["indices"]))
        with SnapshotWriter(root, f"diffusion_{method}", method=method, factory="mutual-knn-graph",
                            counts={"vertices": len(ids), "edges": n_edges},
                            parameters={"kind": "diffusion", "params": cfg.params.__dict__}) as w:
            for key, a in graph.items():
                w.write_bytes(SnapshotFiles.array(key), npy_bytes(np.asarray(a)))
            w.write_bytes(SnapshotFiles.IMAGE_IDS, npy_bytes(np.asarray(ids, dtype=str)))
        out[f"diffusion_{method}"] = {"version": w.version, "vertices": len(ids), "edges": n_edges,
                                      "seconds": time.time() - t0}
        log.info("[diffusion] %s: %d vertices, %d edges", method, len(ids), n_edges)
    return out


__all__ = ["run_diffusion_stage"]
