"""Evaluation tracks of the benchmark: datasets (database + queries + ground truth) and their place in the index.

A folder holding ``gnd.json`` and sub-folders with their own ``gnd.json`` (museum-landmarks: ``in-photos/``,
``no-box/``) gives one *track* per file (``root``, ``in-photos``, ``no-box``); a single file or ``roxford5k`` /
``rparis6k`` (``<data-root>/<name>/gnd_<name>.pkl``) gives one track. The union of the tracks' databases is
indexed once; each track is evaluated on its own database by restricting the rankings to it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from storage.datasets import Dataset, load_dataset, load_distractor_list, load_gnd_json, load_revisitop, \
    load_revisitop1m
from storage.uri import exists, get_fs, is_local, join, listdir


@dataclass
class Track:
    """One evaluation track: a dataset (database + queries + ground truth) and its place in the index."""

    name: str
    dataset: Dataset
    query_idx: np.ndarray                      # queries used (after --limit-queries)
    db_union: np.ndarray | None = None         # (n_db,) position of each database image in the union list
    base: str | None = None                    # the track this one adds distractors to
    synthetic: int = 0                         # number of synthetic distractors (derived tracks only)

    @property
    def n_db(self) -> int:
        return self.dataset.n_images

    def gnd(self) -> list[dict[str, Any]]:
        return [self.dataset.gnd[int(i)] for i in self.query_idx]


def resolve_tracks(dataset: str, data_root: str | None) -> list[tuple[str, Dataset]]:
    """``(track name, Dataset)`` for a benchmark name, a ground-truth file or a dataset folder."""
    low = dataset.lower()
    if low in ("roxford5k", "rparis6k"):
        return [(low, load_revisitop(low, data_root or "data"))]
    if dataset.endswith((".json", ".pkl")):
        ds = load_dataset(dataset)
        return [(ds.name, ds)]
    root_gnd = join(dataset, "gnd.json")
    if not exists(root_gnd):
        pkls = [u for u in listdir(dataset) if re.search(r"/gnd_[^/]+\.pkl$", u)]
        if len(pkls) == 1:
            ds = load_dataset(pkls[0])
            return [(ds.name, ds)]
        raise FileNotFoundError(f"{dataset}: no gnd.json (or single gnd_<name>.pkl) found")
    tracks = [("root", load_gnd_json(root_gnd))]
    for sub in listdir(dataset):
        name = sub.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(".") and exists(join(sub, "gnd.json")):
            tracks.append((name, load_gnd_json(join(sub, "gnd.json"), name)))
    return tracks


def canonical(path: str) -> str:
    """One spelling per file: local paths resolved (links followed), URIs unchanged."""
    return os.path.realpath(path) if is_local(path) and "://" not in path else path


def distractor_list(spec: str) -> tuple[list[str], str]:
    """Names and root of a distractor list file (paths relative to ``<folder>/jpg`` if it exists)."""
    names = load_distractor_list(spec)
    folder = spec.rsplit("/", 1)[0] if "/" in spec else "."
    fs, p = get_fs(join(folder, "jpg"))
    return names, (join(folder, "jpg") if fs.isdir(p) else folder)


def add_real_distractors(tracks: list[Track], spec: str | None, data_root: str | None,
                         notes: list[str]) -> list[Track]:
    """Derived tracks with real distractor images appended to the database: ``N`` R1M images for the revisitop
    datasets, or the images of a list file."""
    if not spec:
        return tracks
    out = list(tracks)
    if spec.isdigit():
        n = int(spec)
        revisitop = [t for t in tracks if t.dataset.name in ("roxford5k", "rparis6k")]
        if not revisitop:
            notes.append(f"--distractors {n}: this dataset has no R1M list; museum-landmarks' distractor_* images "
                         "(3,050 Caltech-101 photos, never relevant) are already in every track's database, so "
                         "every reported number already includes them.")
            return out
        names, root = load_revisitop1m(data_root or "data")
        names = names[:n]
        for t in revisitop:
            out.append(Track(f"{t.name}+R1M", t.dataset.with_distractors(names, root), t.query_idx, base=t.name))
        notes.append(f"+R1M tracks: the first {len(names):,} images of revisitop1m.txt appended as negatives.")
        return out
    names, root = distractor_list(spec)
    for t in tracks:
        out.append(Track(f"{t.name}+distractors", t.dataset.with_distractors(names, root), t.query_idx,
                         base=t.name))
    notes.append(f"+distractors tracks: {len(names):,} images of {spec} appended as negatives.")
    return out


def union_paths(tracks: Sequence[Track]) -> list[str]:
    """Sorted canonical paths of every database image of every track (what gets indexed)."""
    paths = set()
    for t in tracks:
        paths.update(canonical(p) for p in t.dataset.image_paths())
    return sorted(paths)


def query_key(path: str, bbox: Sequence[float] | None) -> str:
    """Cache key of a (query image, box) pair."""
    b = None if bbox is None else [round(float(v), 3) for v in bbox]
    return hashlib.sha1(json.dumps([canonical(path), b]).encode()).hexdigest()[:20]


def label_of(g: dict[str, Any], idx: int) -> str:
    """Medium-protocol label of a database index for a query: pos / junk / neg."""
    positives = set(np.asarray(g.get("easy", []), np.int64).tolist()) | set(np.asarray(g.get("hard", []),
                                                                                       np.int64).tolist())
    if idx in positives:
        return "pos"
    if idx in set(np.asarray(g.get("junk", []), np.int64).tolist()):
        return "junk"
    return "neg"


__all__ = ["Track", "resolve_tracks", "canonical", "add_real_distractors", "union_paths", "query_key", "label_of"]
