"""The trained query-region scorer (seed 000, ``jobs.train_query_scorer``): plain arrays plus a JSON document.

A scorer lives in a folder: ``scorer.npz`` (the :class:`pipeline.region_scoring.RegionScorer` arrays, no pickle)
and ``info.json`` (the learned ``lambda``, the feature names, the query-time patch config it was trained with, the
CV curves, the training queries). Its default folder is the index run's ``query_scorer`` artefact; any other
folder URI works (``--out`` / ``--scorer``). ``info.json`` is written last: it marks a complete scorer.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from storage.arrays import load_arrays, load_json, save_arrays, save_json
from storage.layout import ARTEFACT_FILES, RunLayout
from storage.uri import exists, join

SCORER_FILE = ARTEFACT_FILES["query_scorer"][1]
INFO_FILE = ARTEFACT_FILES["query_scorer_info"][1]


def scorer_files(location: str) -> tuple[str, str]:
    """(arrays URI, info URI) of the scorer in folder ``location``."""
    return join(location, SCORER_FILE), join(location, INFO_FILE)


def default_location(root: str) -> str:
    """The run's own scorer folder (``artefacts/query_scorer``)."""
    return RunLayout(root).artefact_dir(ARTEFACT_FILES["query_scorer"][0])


def resolve_location(uri: str) -> str | None:
    """The scorer folder meant by ``uri``: the folder itself when it holds a complete scorer, else the scorer
    artefact of the index run at ``uri``; None when neither exists."""
    for folder in (uri, default_location(uri)):
        if exists(scorer_files(folder)[1]):
            return folder
    return None


def save_query_scorer(location: str, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Write the scorer's arrays, then its ``info.json`` (the completeness marker)."""
    arrays_uri, info_uri = scorer_files(location)
    save_arrays(arrays_uri, **arrays)
    save_json(info_uri, info)


def load_query_scorer(location: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, info) of the scorer in folder ``location`` (``allow_pickle=False``)."""
    arrays_uri, info_uri = scorer_files(location)
    return load_arrays(arrays_uri), load_json(info_uri)


__all__ = ["save_query_scorer", "load_query_scorer", "resolve_location", "default_location", "scorer_files"]
