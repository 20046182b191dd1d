"""Learned state of a run stored as plain arrays (no pickle): whitenings, the region graph's artefacts, the
local PCA and the ASMK codebook. Readers here return arrays; ``pipeline`` objects are built from them."""
from __future__ import annotations

from typing import Any

import numpy as np

from storage.arrays import load_arrays, load_json, load_npy, save_arrays, save_json, save_npy
from storage.layout import RunLayout
from storage.uri import exists

GLOBAL_WHITENING_PREFIX = "global-"
LEARNED_WHITENING = "learned"   # the learned R-MAC projection a run applies (whiten.kind: learned, issue 17)


def load_whitening_arrays(root: str, names: tuple[str, ...] = ()) -> dict[str, dict[str, np.ndarray]]:
    """``regions``, every ``global-<method>`` whitening of ``names`` and the ``learned`` projection that the run
    stores."""
    layout = RunLayout(root)
    out = {"regions": load_arrays(layout.whitening("regions"))}
    if exists(layout.whitening(LEARNED_WHITENING)):
        out[LEARNED_WHITENING] = load_arrays(layout.whitening(LEARNED_WHITENING))
    for method in names:
        name = GLOBAL_WHITENING_PREFIX + method
        if exists(layout.whitening(name)):
            out[name] = load_arrays(layout.whitening(name))
    return out


def save_graph_artefacts(root: str, V: np.ndarray, f: np.ndarray, g: np.ndarray, index_bytes: np.ndarray,
                         graph_arrays: dict[str, np.ndarray], image_ids: list[str], region_ids: np.ndarray,
                         info: dict[str, Any]) -> None:
    """What the graph stage leaves for object saliency and queries (``info.json`` last: it marks completeness)."""
    layout = RunLayout(root)
    save_npy(layout.artefact("graph_V"), V.astype(np.float16))
    save_npy(layout.artefact("graph_f"), f)
    save_npy(layout.artefact("graph_g"), g)
    save_npy(layout.artefact("graph_region_index"), index_bytes)
    save_arrays(layout.artefact("graph_W"), **graph_arrays)
    save_arrays(layout.artefact("graph_regions"), image_id=np.asarray(image_ids, dtype=str),
                region_id=np.asarray(region_ids).astype(np.int32))
    save_json(layout.artefact("graph_info"), info)


def has_graph(root: str) -> bool:
    return exists(RunLayout(root).artefact("graph_info"))


def load_graph_artefacts(root: str) -> dict[str, Any]:
    """What object saliency needs from the graph stage: ``f``, ``g``, the serialised region index, ``info``."""
    layout = RunLayout(root)
    return {"f": np.asarray(load_npy(layout.artefact("graph_f"))),
            "g": np.asarray(load_npy(layout.artefact("graph_g"))),
            "index_bytes": np.asarray(load_npy(layout.artefact("graph_region_index"))),
            "info": load_json(layout.artefact("graph_info"))}


def load_local_pca(root: str) -> dict[str, np.ndarray] | None:
    """The run's local-descriptor PCA (``mean``, ``projection``), or None when it has no locals."""
    uri = RunLayout(root).artefact("local_pca")
    return load_arrays(uri) if exists(uri) else None


def load_cam_whitening(root: str) -> dict[str, np.ndarray] | None:
    """The run's per-class CAM whitening (``mean``, ``projection``), or None when it has none."""
    uri = RunLayout(root).artefact("cam_whitening")
    return load_arrays(uri) if exists(uri) else None


__all__ = ["load_whitening_arrays", "save_graph_artefacts", "load_graph_artefacts", "has_graph", "load_local_pca",
           "load_cam_whitening",
           "GLOBAL_WHITENING_PREFIX", "LEARNED_WHITENING"]
