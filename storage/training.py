"""What the corpus-trained models of issue 17 read and write: mined pairs, the learned projection, the RPN, and
the graph input of pair mining (its keypoints come through :class:`storage.readers.KeypointReader`). Arrays
only (``.npz`` / ``.npy``, no pickle) and Parquet.

* mined pairs: one Parquet file (:func:`storage.schemas.pairs_schema`), by default the run's ``mined_pairs``
  artefact, with an ``info.json`` beside it (counts, thresholds, whether keypoints verified the pairs);
* a learned projection: a folder with ``projection.npz`` (``mean``, ``projection``: the keys of
  ``pipeline.whitening.Whitening``) and ``info.json`` (the training config, the pairs it learned from, the
  epochs' statistics), written last: it marks a complete checkpoint. The default folder is the run's
  ``learned_projection`` artefact; ``jobs.index`` copies the one it applies into the run as the ``learned``
  whitening, which the query side loads with the others.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from storage.artefacts import LEARNED_WHITENING
from storage.arrays import load_arrays, load_json, load_npy, save_arrays, save_json
from storage.layout import ARTEFACT_FILES, RunLayout
from storage.schemas import pairs_schema
from storage.tables import read_parquet, write_parquet
from storage.uri import exists, join

PROJECTION_FILE = ARTEFACT_FILES["learned_projection"][1]
PROJECTION_INFO_FILE = ARTEFACT_FILES["learned_projection_info"][1]


# ------------------------------------------------------------------------------------------------ mined pairs
def default_pairs_location(root: str) -> str:
    """The run's own mined-pairs table (``artefacts/mined_pairs/pairs.parquet``)."""
    return RunLayout(root).artefact("mined_pairs")


def save_pairs(uri: str, columns: dict[str, Any], info: dict[str, Any] | None = None,
               info_uri: str | None = None) -> int:
    """Write the mined pairs (columns of :func:`pairs_schema`) to ``uri``; ``info`` as JSON to ``info_uri``."""
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in pairs_schema()}, schema=pairs_schema())
    n = write_parquet(uri, table)
    if info is not None and info_uri is not None:
        save_json(info_uri, info)
    return n


def load_pairs(uri: str) -> pa.Table:
    """The mined pairs at ``uri`` (a Parquet file written by :func:`save_pairs`; a run root is read as its
    default table)."""
    return read_parquet(uri if uri.endswith(".parquet") else default_pairs_location(uri))


# ------------------------------------------------------------------------------------------ learned projection
def default_projection_location(root: str) -> str:
    """The run's own learned-projection folder (``artefacts/learned_projection``)."""
    return RunLayout(root).artefact_dir(ARTEFACT_FILES["learned_projection"][0])


def save_projection(location: str, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Write the projection's arrays, then ``info.json`` (the completeness marker)."""
    save_arrays(join(location, PROJECTION_FILE), **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    save_json(join(location, PROJECTION_INFO_FILE), info)


def load_projection(location: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, info) of the projection in folder ``location`` (or in the run at ``location``)."""
    return _load_trained(location, default_projection_location(location), PROJECTION_FILE, PROJECTION_INFO_FILE,
                         "no learned projection", "jobs.train_projection")


def save_learned_whitening(root: str, arrays: dict[str, np.ndarray]) -> None:
    """The projection a run applies, stored as its ``learned`` whitening (read back with the others)."""
    save_arrays(RunLayout(root).whitening(LEARNED_WHITENING), **arrays)


# ------------------------------------------------------------------------------------------ region proposal net
RPN_FILE = ARTEFACT_FILES["rpn"][1]
RPN_INFO_FILE = ARTEFACT_FILES["rpn_info"][1]


def default_rpn_location(root: str) -> str:
    """The run's own RPN folder (``artefacts/rpn``): where ``jobs.train_rpn`` writes by default and where the
    ``rpn`` stage keeps the RPN it applied (the query side proposes with it)."""
    return RunLayout(root).artefact_dir(ARTEFACT_FILES["rpn"][0])


def save_rpn(location: str, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Write the RPN's arrays (``pipeline.rpn.rpn_to_arrays``), then ``info.json`` (the completeness marker)."""
    save_arrays(join(location, RPN_FILE), **arrays)
    save_json(join(location, RPN_INFO_FILE), info)


def load_rpn(location: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, info) of the RPN in folder ``location`` (or in the run at ``location``)."""
    return _load_trained(location, default_rpn_location(location), RPN_FILE, RPN_INFO_FILE, "no trained RPN",
                         "jobs.train_rpn")


def _load_trained(location: str, run_default: str, arrays_file: str, info_file: str, missing: str,
                  job: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, info) from folder ``location``, else from the run's default folder; ``info_file`` marks a
    complete write."""
    for folder in (location, run_default):
        if exists(join(folder, info_file)):
            return load_arrays(join(folder, arrays_file)), load_json(join(folder, info_file))
    raise FileNotFoundError(f"{location}: {missing} ({info_file} missing; train one with "
                            f"python -m {job} --index <run>)")


def has_rpn(root: str) -> bool:
    return exists(join(default_rpn_location(root), RPN_INFO_FILE))


# ------------------------------------------------------------------------------------------ mining inputs
def load_mining_graph(root: str) -> dict[str, Any]:
    """The graph stage's artefacts pair mining reads: ``W`` arrays (mutual k-NN graph, ``graph_to_arrays``),
    ``V`` (whitened regions, float32), ``index_bytes`` (the FAISS index over ``V``), ``image_id`` / ``region_id``
    per region row and ``info`` (k, beta)."""
    layout = RunLayout(root)
    regions = load_arrays(layout.artefact("graph_regions"))
    return {"W": load_arrays(layout.artefact("graph_W")),
            "V": np.asarray(load_npy(layout.artefact("graph_V")), np.float32),
            "index_bytes": np.asarray(load_npy(layout.artefact("graph_region_index"))),
            "image_id": regions["image_id"], "region_id": regions["region_id"],
            "info": load_json(layout.artefact("graph_info"))}


__all__ = ["default_pairs_location", "save_pairs", "load_pairs", "default_projection_location", "save_projection",
           "load_projection", "save_learned_whitening", "load_mining_graph",
           "LEARNED_WHITENING", "PROJECTION_FILE", "default_rpn_location", "save_rpn", "load_rpn", "has_rpn"]
