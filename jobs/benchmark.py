"""Retrieval benchmark: index a dataset, encode its queries, search with every method, evaluate, report.

    python -m jobs.benchmark --dataset <gnd.json | gnd_*.pkl | dataset folder | roxford5k | rparis6k>
        [--data-root DIR] --out DIR [--tracks root,in-photos,no-box] [--methods gem,regional:fs_egm,...]
        [--distractors N | LIST_URI] [--synthetic-distractors 0,10000,100000] [--max-side 512]
        [--limit-queries N] [--examples 4] [--reuse]

Steps:

1. **Datasets.** A folder holding ``gnd.json`` and sub-folders with their own ``gnd.json`` (museum-landmarks:
   ``in-photos/``, ``no-box/``) gives one *track* per file (``root``, ``in-photos``, ``no-box``); a single file
   or ``roxford5k`` / ``rparis6k`` (``<data-root>/<name>/gnd_<name>.pkl``) gives one track.
2. **Index.** The union of the tracks' database images is written to ``<out>/index_images.txt`` and indexed
   once by ``jobs.index`` into ``<out>/index`` (stages extract → whiten → graph → object_saliency →
   descriptors; image ids are file stems). A rerun resumes / skips finished stages; ``--reuse`` skips the
   index job altogether when ``<out>/index/run.json`` shows every stage done.
3. **Queries** are encoded in-process by :class:`actors.query.QueryEncoder`, cropped to their ``bbx``
   (cached under ``<out>/queries/cache`` with ``--reuse``).
4. **Methods** (``--methods``, default: every one the index supports):

   * global: ``mac gem spoc crow cam_ofa rmac fs_egm os_egm os_egm4`` -- exact inner-product search over the
     track's database (``pipeline.faiss_index.brute_force_knn``, ties by database index);
     ``<global>+aqe`` -- average query expansion over the top 10 (seed 003), then a second search;
     ``<global>+diffusion`` -- the top 100 re-ranked by diffusion (``pipeline.query_expansion``);
   * regional (D2R-style regional search, seed 002 eq. 3): ``regional:<source>`` for ``fs_egm``, ``os_egm``,
     ``grid``: the database items of an image are its full-image region and its ``<source>`` regions (whitened
     regional MACs); the query's items are its full-image descriptor *and* its ``<source>`` regions; an
     image's score is the max over (query item, database item) inner products. ``regional:<source>@full``
     uses the query's full-image descriptor only (the paper's asymmetric setting);
   * ASMK family (needs the run's local features): ``asmk_star``, ``d2r_asmk_star`` (ASMK* regional search
     over the whole image + ``fs_egm`` boxes, max pooling), ``r_asmk_star`` (R-ASMK*, regional aggregation
     over the same boxes, database side only), built with ``pipeline.asmk`` on the codebook
     ``<index>/artefacts/asmk/codebook.npy``, or one trained here (k-means on a sample of the locals).

5. **Evaluation** of every (method, track) with ``pipeline.evaluation.evaluate_all`` (Easy / Medium / Hard
   mAP and mP@1/5/10), index size in bytes and time (the method's own index build + the track's searches;
   the shared extraction/graph pipeline and the query encoding are reported once under ``index`` /
   ``queries``). Writes ``<out>/report.json``, ``<out>/rankings/<track>.npz`` (top rankings, database
   indices of the track, ``-1`` padded) and ``<out>/report.html`` (``jobs.report.render_report``: results
   tables, medium-protocol PR curves, ``--examples`` example queries per track with the top 10 of the best
   regional method and of the best global baseline, and the queries' FS / OS saliency maps with boxes).
6. **Distractors.**
   ``--synthetic-distractors 0,10000,100000`` appends N synthetic distractors to the global and regional
   searches of every track (not to ASMK): each is a random convex mixture of two *real negatives* (database
   images listed in no query's easy/hard/junk lists) plus Gaussian noise scaled per dimension by the
   database's standard deviation, re-normalised; the noise level is calibrated so that a synthetic
   descriptor is, on average, as similar to its nearest real database descriptor as a real image is to its
   nearest *other* real image (a "new image" near the data, neither a near-duplicate nor noise). Regional distractors copy the region
   layout of a random real negative image and mix each of its regions with a random negative region. Lists are
   nested (the first 10k of the 100k set are the 10k set), so the mAP drop is monotone in N by construction
   of the set, not by chance. Results go to ``report["distractors"]`` and to tracks ``<track>+<N> synth``.
   ``--distractors N`` uses real images: for ``roxford5k`` / ``rparis6k`` the first N of the R1M list
   (``storage.datasets.load_revisitop1m``) are indexed with the database and evaluated as track
   ``<track>+R1M``; a URI of a list file appends the listed images (relative to ``<list folder>/jpg`` when it
   exists, else to the list's folder). museum-landmarks' 3,050 ``distractor_*`` images are already part of
   every track's database (never relevant to a query), so ``--distractors N`` adds nothing there.

A table of the results is printed at the end; query encoding prints progress lines (queries/s, ETA).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jobs.config import AsmkSection
from pipeline.evaluation import PROTOCOLS, evaluate_all, mean_pr_curve, protocol_gnd
from pipeline.faiss_index import brute_force_knn
from pipeline.query_expansion import average_qe, diffusion_rerank, gather
from storage.arrays import load_arrays, load_json, save_arrays, save_json
from storage.datasets import (Dataset, load_dataset, load_distractor_list, load_gnd_json, load_revisitop,
                              load_revisitop1m)
from storage.uri import exists, get_fs, is_local, join, listdir, read_bytes

log = logging.getLogger("benchmark")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "benchmark.yaml"
INDEX_STAGES = ("extract", "whiten", "graph", "object_saliency", "descriptors")

GLOBAL_METHODS = ("mac", "gem", "spoc", "crow", "cam_ofa", "rmac", "fs_egm", "os_egm", "os_egm4")
BASELINES = ("mac", "gem", "spoc", "crow", "cam_ofa", "rmac")     # the classic poolings ("global baseline")
REGIONAL_SOURCES = ("fs_egm", "os_egm", "grid")
ASMK_METHODS = ("asmk_star", "d2r_asmk_star", "r_asmk_star")
RERANKS = ("aqe", "diffusion")

AQE_N = 10              # average QE over the top 10 (seed 003)
DIFFUSION_M = 100       # results re-ranked by diffusion
DIFFUSION_K = 10        # mutual k-NN inside those results
FULL_RANK_MAX = 200_000  # rank the whole database up to this size, else the top --topk
SYNTH_CHUNK = 8192       # synthetic distractors are generated in seeded chunks (nested sets, bounded memory)
PR_CURVES = 8           # methods drawn in a track's precision-recall plot


# ============================================================================================ methods
@dataclass(frozen=True)
class MethodSpec:
    """A benchmark method parsed from its name (see the module docstring for the names)."""

    name: str
    family: str                 # "global" | "regional" | "asmk"
    base: str                   # global method, region source or ASMK variant
    rerank: str = ""            # "" | "aqe" | "diffusion" (global only)
    query_regions: bool = True  # regional: the query's regions are items too (False: "@full")


def parse_method(name: str) -> MethodSpec:
    """Parse ``gem``, ``gem+aqe``, ``os_egm+diffusion``, ``regional:fs_egm[@full]``, ``asmk_star`` ...."""
    n = name.strip()
    if n in ASMK_METHODS:
        return MethodSpec(n, "asmk", n)
    if n.startswith("regional:"):
        src = n[len("regional:"):]
        query_regions = True
        if src.endswith("@full"):
            src, query_regions = src[:-len("@full")], False
        if src not in REGIONAL_SOURCES:
            raise ValueError(f"unknown region source in {name!r}; expected one of {REGIONAL_SOURCES}")
        return MethodSpec(n, "regional", src, query_regions=query_regions)
    base, _, rerank = n.partition("+")
    if base not in GLOBAL_METHODS:
        raise ValueError(f"unknown method {name!r}: globals {GLOBAL_METHODS}, '+aqe' / '+diffusion' variants, "
                         f"'regional:<{'|'.join(REGIONAL_SOURCES)}>[@full]', {ASMK_METHODS}")
    if rerank and rerank not in RERANKS:
        raise ValueError(f"unknown re-ranking {rerank!r} in {name!r}; expected one of {RERANKS}")
    return MethodSpec(n, "global", base, rerank)


def default_methods(globals_: Iterable[str], sources: Iterable[str], has_locals: bool) -> list[str]:
    """Every method the index supports, in report order."""
    g = [m for m in GLOBAL_METHODS if m in set(globals_)]
    out = list(g)
    out += [f"{m}+aqe" for m in ("gem", "os_egm") if m in g]
    diff = "os_egm" if "os_egm" in g else ("gem" if "gem" in g else None)
    if diff:
        out.append(f"{diff}+diffusion")
    src = set(sources)
    for s in REGIONAL_SOURCES:
        if s in src:
            out += [f"regional:{s}", f"regional:{s}@full"]
    if has_locals:
        out += list(ASMK_METHODS)
    return out


# ============================================================================================ datasets
@dataclass
class Track:
    """One evaluation track: a dataset (database + queries + ground truth) and its place in the index."""

    name: str
    dataset: Dataset
    query_idx: np.ndarray                      # queries used (after --limit-queries)
    db_union: np.ndarray | None = None         # (n_db,) position of each database image in the union list
    base: str | None = None                    # the track this one adds real distractors to
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
    """Derived tracks with real distractor images appended to the database (see module docstring)."""
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


# ============================================================================================ index
def index_complete(index_root: str, stages: Sequence[str] = INDEX_STAGES) -> bool:
    """Whether ``run.json`` of an index run shows every stage of ``stages`` done."""
    uri = join(index_root, "run.json")
    if not exists(uri):
        return False
    run = load_json(uri).get("stages", {})
    return all((run.get(s) or {}).get("status") == "done" for s in stages)


def run_index(list_uri: str, index_root: str, config: str, max_side: int, sets: Sequence[str], reuse: bool,
              num_cpus: int | None = None, ray_address: str | None = None) -> None:
    """Run ``jobs.index`` over the union list (skipped with ``reuse`` when the run is complete)."""
    if reuse and index_complete(index_root):
        log.info("index %s is complete: reused", index_root)
        return
    import ray

    from jobs.index import main as index_main

    was_up = ray.is_initialized()
    argv = ["--config", config, "--images", list_uri, "--out", index_root, "--full",
            "--stages", ",".join(INDEX_STAGES), "--set", f"extract.max_side={int(max_side)}",
            # the list is exactly what to index: no demo subset patterns from the config (they would drop
            # e.g. the in-photos track's qsd* database photos)
            "--set", "include=[]", "--set", "exclude=[]"]
    for s in sets:
        argv += ["--set", s]
    if num_cpus:
        argv += ["--num-cpus", str(num_cpus)]
    if ray_address:
        argv += ["--ray-address", ray_address]
    rc = index_main(argv)
    if not was_up and ray.is_initialized():
        ray.shutdown()  # frees the workers' memory and cores for query encoding
    if rc != 0:
        raise RuntimeError(f"jobs.index failed with exit code {rc}; rerun to resume (see its log above)")


def index_summary(index_root: str) -> dict[str, Any]:
    """Per-stage seconds and counts of the index run."""
    run = load_json(join(index_root, "run.json")).get("stages", {})
    stages = {s: {"seconds": float(e.get("seconds", 0.0)), "peak_rss_bytes": e.get("peak_rss_bytes")}
              for s, e in run.items()}
    res = (run.get("extract") or {}).get("result", {})
    return {"root": index_root, "stages": stages, "seconds": float(sum(v["seconds"] for v in stages.values())),
            "images": res.get("images"), "errors": res.get("errors")}


def uri_to_id(index_root: str) -> dict[str, str]:
    """Image id of every indexed URI (from the run's corpus manifest)."""
    from storage.tables import read_parquet

    m = read_parquet(join(index_root, "corpus", "manifest.parquet"), columns=["image_id", "uri"])
    return dict(zip(m.column("uri").to_pylist(), m.column("image_id").to_pylist()))


# ============================================================================================ queries
def query_key(path: str, bbox: Sequence[float] | None) -> str:
    """Cache key of a (query image, box) pair."""
    b = None if bbox is None else [round(float(v), 3) for v in bbox]
    return hashlib.sha1(json.dumps([canonical(path), b]).encode()).hexdigest()[:20]


def qd_to_arrays(q: Any) -> dict[str, np.ndarray]:
    """QueryDescriptors → flat dict of arrays (npz, no pickle)."""
    out: dict[str, np.ndarray] = {"image_size": np.asarray(q.image_size, np.int64)}
    for k, v in q.globals.items():
        out[f"g__{k}"] = np.asarray(v, np.float32)
    for k, v in q.regions.items():
        out[f"r__{k}"] = np.asarray(v, np.float32)
    for k, v in q.boxes.items():
        out[f"b__{k}"] = np.asarray(v, np.float32)
    for k in ("fs_map", "os_map", "local_xy", "local_desc"):
        v = getattr(q, k)
        if v is not None:
            out[k] = np.asarray(v, np.float32)
    return out


def qd_from_arrays(a: dict[str, np.ndarray]) -> Any:
    """Inverse of :func:`qd_to_arrays`."""
    from actors.query import QueryDescriptors

    q = QueryDescriptors(image_size=tuple(int(v) for v in a["image_size"]))
    for k, v in a.items():
        if k.startswith("g__"):
            q.globals[k[3:]] = v
        elif k.startswith("r__"):
            q.regions[k[3:]] = v
        elif k.startswith("b__"):
            q.boxes[k[3:]] = v
    for k in ("fs_map", "os_map", "local_xy", "local_desc"):
        if k in a:
            setattr(q, k, a[k])
    return q


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def encode_queries(enc: Any, items: dict[str, tuple[str, Any]], cache_dir: str, reuse: bool,
                   every: float = 5.0) -> tuple[dict[str, Any], float]:
    """Encode every ``key -> (path, bbox)`` query; returns descriptors by key and the encoding seconds.

    Prints a progress line (queries/s, ETA) at most every ``every`` seconds. Cached encodings are read back
    with ``reuse`` (their time is not counted).
    """
    from storage.images import decode_image

    out: dict[str, Any] = {}
    todo = []
    for key in items:
        uri = join(cache_dir, f"{key}.npz")
        if reuse and exists(uri):
            out[key] = qd_from_arrays(load_arrays(uri))
        else:
            todo.append(key)
    if len(out):
        print(f"[queries] {len(out)} encodings read from the cache", flush=True)
    t0 = last = time.time()
    spent = 0.0
    for n, key in enumerate(todo, 1):
        path, bbox = items[key]
        t = time.time()
        q = enc.encode(decode_image(read_bytes(path)), bbox)
        spent += time.time() - t
        save_arrays(join(cache_dir, f"{key}.npz"), **qd_to_arrays(q))
        out[key] = q
        now = time.time()
        if now - last >= every or n == len(todo):
            last = now
            rate = n / max(now - t0, 1e-9)
            print(f"[queries] {n}/{len(todo)} encoded ({100.0 * n / len(todo):5.1f}%) {rate:5.2f} queries/s "
                  f"ETA {_fmt_eta((len(todo) - n) / rate)}", flush=True)
    return out, spent


# ============================================================================================ search
def trim_width(*mats: np.ndarray) -> list[np.ndarray]:
    """Drop the all-zero trailing columns the descriptor tables pad narrower methods with (same width for all)."""
    width = 1
    for M in mats:
        nz = np.flatnonzero(np.any(np.asarray(M) != 0, axis=0)) if np.asarray(M).size else np.empty(0)
        if nz.size:
            width = max(width, int(nz[-1]) + 1)
    return [fit_width(M, width) for M in mats]


def fit_width(M: np.ndarray, width: int) -> np.ndarray:
    """``M`` cut or zero-padded to ``width`` columns (float32, contiguous)."""
    M = np.asarray(M, np.float32)
    M = M[:, :width] if M.shape[1] >= width else np.pad(M, ((0, 0), (0, width - M.shape[1])))
    return np.ascontiguousarray(M)


def rank_depth(n_total: int, topk: int) -> int:
    """Ranking length: the whole database up to FULL_RANK_MAX images, else ``topk`` (default 1000)."""
    if topk and topk > 0:
        return int(min(topk, n_total))
    return int(n_total if n_total <= FULL_RANK_MAX else min(1000, n_total))


def rank_scores(S: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns of a score matrix (nq, n) by score, ties by id; -inf entries become id -1."""
    S = np.asarray(S)
    n = S.shape[1]
    cols = np.arange(n) if ids is None else np.asarray(ids, np.int64)
    k = int(min(k, n))
    key_ids = np.broadcast_to(cols, S.shape)
    order = np.lexsort((key_ids, -S.astype(np.float64)), axis=-1)[:, :k]
    sc = np.take_along_axis(S, order, axis=1).astype(np.float32)
    I = cols[order]
    I = np.where(np.isneginf(sc), -1, I)
    return sc, I


def global_search(X: np.ndarray, ids: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search of ``Q`` over rows ``X`` labelled ``ids``; (scores, ids) (nq, k), ties by id."""
    if len(X) == 0:
        return np.full((len(Q), 0), -np.inf, np.float32), np.full((len(Q), 0), -1, np.int64)
    D, I = brute_force_knn(X, Q, min(k, len(X)), ids=np.asarray(ids, np.int64))
    return D.astype(np.float32), I


def query_expand(Q: np.ndarray, X: np.ndarray, I: np.ndarray, n: int = AQE_N) -> np.ndarray:
    """Average QE: ``L2(q + sum of the top n results' descriptors)``; ``X`` indexed by result id."""
    return average_qe(Q, gather(X, I[:, :n]), n=n)


def diffusion_reorder(Q: np.ndarray, X: np.ndarray, D: np.ndarray, I: np.ndarray, m: int = DIFFUSION_M,
                      k: int = DIFFUSION_K) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion re-ranking of the top ``m`` of each ranking; the rest keeps its order after them."""
    m = int(min(m, I.shape[1]))
    if m < 2:
        return D, I
    f, top = diffusion_rerank(Q, gather(X, I[:, :m]), I[:, :m], k=k)
    scores = np.concatenate([np.where(np.isfinite(f), f, -np.inf), D[:, m:]], axis=1).astype(np.float32)
    return scores, np.concatenate([top, I[:, m:]], axis=1)


@dataclass
class RegionSet:
    """Database items of a regional search, grouped by image: ``X`` (R, d) rows sorted by ``image``."""

    X: np.ndarray
    image: np.ndarray       # (R,) image index of each row (sorted)
    boxes: np.ndarray       # (R, 4) pixel boxes
    starts: np.ndarray      # first row of each distinct image
    images: np.ndarray      # distinct image indices (sorted)

    @classmethod
    def build(cls, X: np.ndarray, image: np.ndarray, boxes: np.ndarray | None = None) -> "RegionSet":
        image = np.asarray(image, np.int64)
        order = np.argsort(image, kind="stable")
        img = image[order]
        starts = np.flatnonzero(np.r_[True, img[1:] != img[:-1]]) if len(img) else np.empty(0, np.int64)
        b = np.zeros((len(img), 4), np.float32) if boxes is None else np.asarray(boxes, np.float32)[order]
        return cls(np.ascontiguousarray(np.asarray(X, np.float32)[order]), img, b, starts, img[starts])

    @property
    def nbytes(self) -> int:
        """Flat float32 region index + its row → image map."""
        return int(self.X.shape[0] * self.X.shape[1] * 4 + self.X.shape[0] * 8)


def regional_image_scores(items: Sequence[np.ndarray], rs: RegionSet, n_images: int,
                          budget: int = 1 << 25) -> np.ndarray:
    """(nq, n_images) D2R scores: max over (query item, database item of the image) of the inner product.

    ``items[q]`` (m_q, d) are query ``q``'s descriptors. Images without items score ``-inf``. Exact, blocked so
    that a score block holds at most ``budget`` floats.
    """
    nq = len(items)
    out = np.full((nq, n_images), -np.inf, np.float32)
    R = len(rs.X)
    if R == 0 or nq == 0:
        return out
    sizes = np.array([len(x) for x in items])
    cols = int(max(1024, min(R, budget // max(1, int(sizes.max())))))
    q0 = 0
    while q0 < nq:  # query batches whose stacked items fit the budget with one column block
        q1 = q0 + 1
        while q1 < nq and sizes[q0:q1 + 1].sum() * cols <= budget:
            q1 += 1
        batch = [np.asarray(x, np.float32) for x in items[q0:q1]]
        valid = np.array([len(x) > 0 for x in batch])
        Qs = np.concatenate([x for x in batch if len(x)]) if valid.any() else np.zeros((0, rs.X.shape[1]))
        qstarts = np.r_[0, np.cumsum([len(x) for x in batch if len(x)])[:-1]].astype(np.int64)
        best = np.full((q1 - q0, R), -np.inf, np.float32)
        if len(Qs):
            for c0 in range(0, R, cols):
                S = Qs @ rs.X[c0:c0 + cols].T
                best[valid, c0:c0 + cols] = np.maximum.reduceat(S, qstarts, axis=0)
        out[q0:q1, rs.images] = np.maximum.reduceat(best, rs.starts, axis=1)
        q0 = q1
    return out


def best_region(item: np.ndarray, rs: RegionSet, image: int) -> np.ndarray | None:
    """Pixel box of ``image``'s region that matches the query items best (for the report)."""
    i = np.searchsorted(rs.images, image)
    if i >= len(rs.images) or rs.images[i] != image or len(item) == 0:
        return None
    a = rs.starts[i]
    b = rs.starts[i + 1] if i + 1 < len(rs.starts) else len(rs.X)
    s = (np.asarray(item, np.float32) @ rs.X[a:b].T).max(axis=0)
    return rs.boxes[a + int(np.argmax(s))]


# ============================================================================================ distractors
def negative_pool(gnd: Sequence[dict[str, Any]], n_db: int) -> np.ndarray:
    """Database indices listed in no query's easy / hard / junk lists (relevant to nothing)."""
    used = np.zeros(n_db, bool)
    for g in gnd:
        for key in ("easy", "hard", "junk", "ok"):
            v = np.asarray(g.get(key, []), np.int64).ravel()
            used[v[(v >= 0) & (v < n_db)]] = True
    return np.flatnonzero(~used)


def _l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _mix(A: np.ndarray, B: np.ndarray, lam: np.ndarray, sd: np.ndarray, noise: float,
         rng: np.random.Generator) -> np.ndarray:
    return _l2n(lam * A + (1.0 - lam) * B + noise * sd * rng.standard_normal(A.shape, dtype=np.float32))


def calibrate_noise(pool: np.ndarray, reference: np.ndarray, pool_groups: np.ndarray | None = None,
                    ref_groups: np.ndarray | None = None, seed: int = 0, n: int = 1000, n_ref: int = 5000,
                    iters: int = 14) -> tuple[float, float, float]:
    """Noise level at which synthetic mixtures are as far from the real data as real images are from each other.

    Statistic: the mean nearest-neighbour cosine to ``reference``. Target: over a sample of ``pool`` rows, the
    best cosine to a reference row of *another* image (``pool_groups`` / ``ref_groups`` give the image of each
    row; by default every row is its own image). Synthetic rows (new images) take the best over all reference
    rows. (The plain mean cosine is useless here: whitened descriptors are centred, so it is ~0 for any noise.)
    Returns ``(noise, target, achieved)``; bisection on [0, 8] (the statistic falls as the noise grows).
    """
    rng = np.random.default_rng(seed)
    pool = np.asarray(pool, np.float32)
    reference = np.asarray(reference, np.float32)
    pg = np.arange(len(pool)) if pool_groups is None else np.asarray(pool_groups)
    rg = None if ref_groups is None else np.asarray(ref_groups)
    ri = rng.choice(len(reference), min(len(reference), n_ref), replace=False)
    ref = reference[ri]
    pi = rng.choice(len(pool), min(len(pool), n), replace=False)
    sim = pool[pi] @ ref.T
    if rg is None:  # rows are images: exclude the row itself (and exact duplicates)
        sim = np.where(sim > 0.9999, -np.inf, sim)
    else:
        sim = np.where(pg[pi][:, None] == rg[ri][None, :], -np.inf, sim)
    best = sim.max(axis=1)
    target = float(best[np.isfinite(best)].mean()) if np.isfinite(best).any() else 0.0
    sd = pool.std(axis=0).astype(np.float32)
    a, b = rng.integers(len(pool), size=n), rng.integers(len(pool), size=n)
    lam = rng.uniform(0, 1, (n, 1)).astype(np.float32)
    eps = rng.standard_normal((n, pool.shape[1]), dtype=np.float32)

    def nn_cos(noise: float) -> float:
        Y = _l2n(lam * pool[a] + (1 - lam) * pool[b] + noise * sd * eps)
        return float((Y @ ref.T).max(axis=1).mean())

    lo, hi = 0.0, 8.0
    if nn_cos(lo) <= target:
        return lo, target, nn_cos(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if nn_cos(mid) > target:
            lo = mid
        else:
            hi = mid
    noise = 0.5 * (lo + hi)
    return noise, target, nn_cos(noise)


def synthetic_globals(pool: np.ndarray, n: int, noise: float, seed: int = 0) -> np.ndarray:
    """``n`` synthetic distractor descriptors: ``L2(lam a + (1 - lam) b + noise * sd * eps)``.

    ``a``, ``b`` random rows of ``pool`` (real negatives), ``lam ~ U(0, 1)``, ``eps ~ N(0, I)``, ``sd`` the
    pool's per-dimension standard deviation. Generated in seeded chunks of SYNTH_CHUNK, so the first ``m`` of
    ``synthetic_globals(pool, n)`` equal ``synthetic_globals(pool, m)`` (nested sets).
    """
    pool = np.asarray(pool, np.float32)
    sd = pool.std(axis=0).astype(np.float32)
    parts = []
    for c in range(0, n, SYNTH_CHUNK):
        rng = np.random.default_rng([seed, c // SYNTH_CHUNK])
        a, b = rng.integers(len(pool), size=SYNTH_CHUNK), rng.integers(len(pool), size=SYNTH_CHUNK)
        lam = rng.uniform(0, 1, (SYNTH_CHUNK, 1)).astype(np.float32)
        parts.append(_mix(pool[a], pool[b], lam, sd, noise, rng)[: n - c])
    return np.concatenate(parts) if parts else np.zeros((0, pool.shape[1]), np.float32)


def synthetic_regions_chunk(rs: RegionSet, pool_images: np.ndarray, chunk: int, size: int, noise: float,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic images ``chunk*SYNTH_CHUNK ...`` (first ``size`` of the chunk): regions and image offsets.

    Each synthetic image copies the region layout of a random real negative image (its rows) and mixes each
    of those regions with a random region of the negative images, plus per-dimension noise. Returns ``X``
    (T, d) and the synthetic image index within the chunk (T,).
    """
    pos = np.searchsorted(rs.images, pool_images)
    ok = (pos < len(rs.images)) & (rs.images[np.minimum(pos, len(rs.images) - 1)] == pool_images)
    pos = pos[ok]
    ends = np.r_[rs.starts[1:], len(rs.X)]
    s0, cnt = rs.starts[pos], ends[pos] - rs.starts[pos]
    pool_rows = np.concatenate([np.arange(a, a + c) for a, c in zip(s0, cnt)])
    sd = rs.X[pool_rows].std(axis=0).astype(np.float32)
    rng = np.random.default_rng([seed, 1_000_003, chunk])
    donor = rng.integers(len(pos), size=SYNTH_CHUNK)   # the whole chunk is drawn, then cut: nested sets
    lam = rng.uniform(0, 1, SYNTH_CHUNK).astype(np.float32)
    c = cnt[donor]
    img = np.repeat(np.arange(SYNTH_CHUNK), c)
    rows = np.repeat(s0[donor], c) + (np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c))
    partner = pool_rows[rng.integers(len(pool_rows), size=len(rows))]
    eps = rng.standard_normal((len(rows), rs.X.shape[1]), dtype=np.float32)
    n = int(np.searchsorted(img, size))
    lam_r = lam[img[:n]][:, None]
    X = _l2n(lam_r * rs.X[rows[:n]] + (1.0 - lam_r) * rs.X[partner[:n]] + noise * sd * eps[:n])
    return X, img[:n]


# ============================================================================================ ASMK
def asmk_config(name: str) -> Any:
    from pipeline.asmk import ASMKConfig

    return {"asmk_star": ASMKConfig(kernel="asmk_star"),
            "d2r_asmk_star": ASMKConfig(kernel="asmk_star", regional="d2r"),
            "r_asmk_star": ASMKConfig(kernel="asmk_star", regional="rasmk")}[name]


def load_codebook(index_root: str, out: str, des: np.ndarray, k: int, sample: int, reuse: bool, seed: int = 0
                  ) -> tuple[np.ndarray, str, float]:
    """The run's codebook, or one trained on a sample of the locals (saved to ``<out>/asmk/codebook.npy``)."""
    from pipeline.codebook import train_codebook
    from storage.arrays import load_npy, save_npy

    run_cb = join(index_root, "artefacts", "asmk", "codebook.npy")
    if exists(run_cb):
        return np.asarray(load_npy(run_cb, mmap=False), np.float32), run_cb, 0.0
    own = join(out, "asmk", "codebook.npy")
    if reuse and exists(own):
        return np.asarray(load_npy(own, mmap=False), np.float32), own, 0.0
    t0 = time.time()
    rng = np.random.default_rng(seed)
    X = des[rng.choice(len(des), min(len(des), sample), replace=False)] if len(des) > sample else des
    k = int(min(k, max(2, len(X) // 40)))  # FAISS wants >= 39 points per centroid
    C = train_codebook(X, k, seed=seed)
    save_npy(own, C)
    return C, own, time.time() - t0


# ============================================================================================ benchmark
@dataclass
class Result:
    """Rankings of one (method, track): track database indices, -1 padded; scores alongside."""

    ids: np.ndarray
    scores: np.ndarray
    build_seconds: float
    query_seconds: float
    index_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


class Benchmark:
    """Runs every method over every track (see the module docstring); state shared between methods."""

    def __init__(self, enc: Any, tracks: list[Track], union_ids: list[str | None], qdesc: dict[str, Any],
                 qkeys: dict[str, list[str]], topk: int = 0, seed: int = 0) -> None:
        self.enc, self.tracks, self.qdesc, self.qkeys = enc, tracks, qdesc, qkeys
        self.union_ids = union_ids
        self.topk, self.seed = topk, seed
        self.id_to_union = {i: u for u, i in enumerate(union_ids) if i is not None}
        self._globals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._regions: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.region_sets: dict[tuple[str, str], RegionSet] = {}
        self.notes: list[str] = []

    # -------------------------------------------------------------- database access
    def union_of(self, image_ids: Iterable[str]) -> np.ndarray:
        """Union positions of index image ids (-1 for ids outside the union)."""
        return np.array([self.id_to_union.get(i, -1) for i in image_ids], np.int64)

    def db_globals(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """(union positions, X) of a method's final descriptors (float32)."""
        if method not in self._globals:
            ids, X = self.enc.database_globals(method)
            u = self.union_of(ids)
            keep = u >= 0
            self._globals[method] = (u[keep], np.asarray(X, np.float32)[keep])
        return self._globals[method]

    def db_regions(self, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(union positions, pixel boxes, whitened X) of a region source."""
        if source not in self._regions:
            import pyarrow.compute as pc

            from storage.schemas import descriptors_to_numpy

            stage = "object_saliency" if source.startswith("os_") else "extract"
            t = self.enc.store.read("regions", [stage], columns=["image_id", "source", "x0", "y0", "x1", "y1",
                                                                 "descriptor"],
                                    filter_expr=pc.field("source") == source)
            if t.num_rows == 0:
                self._regions[source] = (np.empty(0, np.int64), np.zeros((0, 4), np.float32),
                                         np.zeros((0, 1), np.float32))
            else:
                u = self.union_of(t.column("image_id").to_pylist())
                B = np.stack([t.column(c).to_numpy() for c in ("x0", "y0", "x1", "y1")], axis=1).astype(np.float32)
                X = np.asarray(self.enc.whitenings["regions"].apply(descriptors_to_numpy(t.column("descriptor"))),
                               np.float32)
                keep = u >= 0
                self._regions[source] = (u[keep], B[keep], X[keep])
        return self._regions[source]

    def track_map(self, t: Track) -> np.ndarray:
        """(n_union,) track database index of every union image (-1 when not in the track)."""
        m = np.full(len(self.union_ids), -1, np.int64)
        ok = t.db_union >= 0
        m[t.db_union[ok]] = np.flatnonzero(ok)
        return m

    def track_globals(self, t: Track, method: str) -> tuple[np.ndarray, np.ndarray]:
        """(track indices, X rows) of the track's database images that have ``method`` descriptors."""
        u, X = self.db_globals(method)
        ti = self.track_map(t)[u]
        keep = ti >= 0
        return ti[keep], X[keep]

    def region_set(self, t: Track, source: str) -> RegionSet:
        """Database items of regional search for a track: full-image region + ``source`` regions per image."""
        key = (t.name, source)
        if key not in self.region_sets:
            parts = [self.db_regions("full"), self.db_regions(source)] if source != "full" else [self.db_regions(source)]
            tm = self.track_map(t)
            Xs, imgs, boxes = [], [], []
            for u, B, X in parts:
                if len(u) == 0:
                    continue
                ti = tm[u]
                keep = ti >= 0
                Xs.append(X[keep]), imgs.append(ti[keep]), boxes.append(B[keep])
            if not Xs:
                rs = RegionSet.build(np.zeros((0, 1), np.float32), np.empty(0, np.int64))
            else:
                X, = trim_width(np.concatenate(Xs))
                rs = RegionSet.build(X, np.concatenate(imgs), np.concatenate(boxes))
            self.region_sets[key] = rs
        return self.region_sets[key]

    # -------------------------------------------------------------- queries
    def query_globals(self, t: Track, method: str) -> np.ndarray:
        rows = []
        for k in self.qkeys[t.name]:
            g = self.qdesc[k].globals
            if method not in g:
                raise KeyError(f"the query encoder produced no {method!r} descriptor")
            rows.append(np.asarray(g[method], np.float32))
        return np.stack(rows)

    def query_items(self, t: Track, spec: MethodSpec, width: int) -> list[np.ndarray]:
        items = []
        for k in self.qkeys[t.name]:
            r = self.qdesc[k].regions
            parts = [r["full"]] if "full" in r else []
            if spec.query_regions and spec.base in r and spec.base != "full":
                parts.append(r[spec.base])
            items.append(fit_width(np.concatenate(parts) if parts else np.zeros((0, width)), width))
        return items

    # -------------------------------------------------------------- methods
    def run_global(self, t: Track, spec: MethodSpec, synth: np.ndarray | None = None) -> Result:
        """Exact search (+ optional AQE / diffusion); ``synth`` rows are appended as indices n_db, n_db+1, ..."""
        t0 = time.time()
        ti, X = self.track_globals(t, spec.base)
        Q = self.query_globals(t, spec.base)
        X, Q = trim_width(X, Q)
        ids = ti
        if synth is not None and len(synth):
            X = np.concatenate([X, fit_width(synth, X.shape[1])])
            ids = np.concatenate([ti, t.n_db + np.arange(len(synth))])
        n_total = t.n_db + (0 if synth is None else len(synth))
        Xfull = np.zeros((n_total, X.shape[1]), np.float32)  # by result id, for QE / diffusion
        Xfull[ids] = X
        build = time.time() - t0
        t1 = time.time()
        k = rank_depth(n_total, self.topk)
        D, I = global_search(X, ids, Q, k)
        if spec.rerank == "aqe":
            D, I = global_search(X, ids, query_expand(Q, Xfull, I), k)
        elif spec.rerank == "diffusion":
            D, I = diffusion_reorder(Q, Xfull, D, I)
        return Result(I, D, build, time.time() - t1, int(X.shape[0] * X.shape[1] * 4),
                      {"dim": int(X.shape[1]), "indexed": int(len(X))})

    def run_regional(self, t: Track, spec: MethodSpec, synth_n: int = 0, noise: float = 0.0) -> Result:
        """D2R regional search (exact max-pooling); ``synth_n`` synthetic images scored chunk by chunk."""
        t0 = time.time()
        rs = self.region_set(t, spec.base)
        build = time.time() - t0
        t1 = time.time()
        items = self.query_items(t, spec, rs.X.shape[1])
        S = regional_image_scores(items, rs, t.n_db)
        nbytes = rs.nbytes
        if synth_n:
            pool = negative_pool(t.gnd(), t.n_db)
            parts = [S]
            for c in range(0, synth_n, SYNTH_CHUNK):
                size = min(SYNTH_CHUNK, synth_n - c)
                Xs, img = synthetic_regions_chunk(rs, pool, c // SYNTH_CHUNK, size, noise, self.seed)
                parts.append(regional_image_scores(items, RegionSet.build(Xs, img), size))
                nbytes += int(Xs.shape[0] * (Xs.shape[1] * 4 + 8))
            S = np.concatenate(parts, axis=1)
        D, I = rank_scores(S, rank_depth(S.shape[1], self.topk))
        return Result(I, D, build, time.time() - t1, nbytes, {"regions": int(len(rs.X))})

    def run_asmk(self, names: Sequence[str], index_root: str, out: str, reuse: bool) -> dict[str, dict[str, Result]]:
        """ASMK*, D2R-ASMK*, R-ASMK* over the union database; rankings filtered per track."""
        from pipeline.asmk import aggregate_queries, build_index
        from pipeline.codebook import assign

        acfg = self.enc.cfg.get("asmk", {})
        ids, xy, des = self.enc.database_locals()
        u = self.union_of(ids)
        keep = u >= 0
        u, xy, des = u[keep], np.asarray(xy, np.float32)[keep], np.asarray(des, np.float32)[keep]
        if len(des) == 0:
            self.notes.append("ASMK methods skipped: the index run has no local features.")
            return {}
        t0 = time.time()
        C, cb_uri, _ = load_codebook(index_root, out, des, int(acfg.get("codebook_size", 1024)),
                                     int(acfg.get("codebook_sample", 200_000)), reuse, self.seed)
        multiple = int(acfg.get("multiple_assignment", 1))
        query_multiple = min(len(C), int(acfg.get("query_multiple_assignment",
                                                  AsmkSection.query_multiple_assignment)))
        words = assign(des, C, multiple=multiple)[0]
        prep = time.time() - t0
        self.notes.append(f"ASMK: {len(C)} visual words ({cb_uri}), {len(des):,} database local descriptors of "
                          f"dimension {des.shape[1]}, database {multiple}-assignment, query {query_multiple}-"
                          "assignment; the index covers the union of the "
                          "tracks' databases (sizes and build times are the union's; rankings are filtered per "
                          "track).")
        src = acfg.get("region_source", "fs_egm")
        bu, boxes, _ = self.db_regions(src) if any(n != "asmk_star" for n in names) else (None, None, None)
        # queries: every distinct query of every track at once
        keys = sorted({k for t in self.tracks for k in self.qkeys[t.name]})
        key_pos = {k: j for j, k in enumerate(keys)}
        q_des, q_ids = [], []
        for j, k in enumerate(keys):
            d = self.qdesc[k].local_desc
            if d is not None and len(d):
                q_des.append(np.asarray(d, np.float32))
                q_ids.append(np.full(len(d), j, np.int64))
        qd = np.concatenate(q_des) if q_des else np.zeros((0, des.shape[1]), np.float32)
        qi = np.concatenate(q_ids) if q_ids else np.zeros(0, np.int64)
        qw = assign(qd, C, multiple=query_multiple)[0] if len(qd) else np.zeros((0, query_multiple), np.int64)
        results: dict[str, dict[str, Result]] = {t.name: {} for t in self.tracks}
        for name in names:
            cfg = asmk_config(name)
            t1 = time.time()
            inv = build_index(des, words, u, C, cfg, xy, boxes if cfg.regional != "none" else None,
                              bu if cfg.regional != "none" else None)
            build = time.time() - t1 + prep
            t2 = time.time()
            agg = aggregate_queries(qd, qw, qi, C, inv)
            I_items, D_items = inv.search(agg, topk=None, pooling="max")
            qsec = time.time() - t2
            row_of = {int(j): r for r, j in enumerate(agg.item_image)}
            nbytes = int(inv.nbytes() + C.nbytes)
            for t in self.tracks:
                if t.synthetic:
                    continue
                tm = self.track_map(t)
                k = rank_depth(t.n_db, self.topk)
                I = np.full((len(t.query_idx), k), -1, np.int64)
                D = np.full((len(t.query_idx), k), -np.inf, np.float32)
                for r, key in enumerate(self.qkeys[t.name]):
                    row = row_of.get(key_pos[key])
                    if row is None:
                        continue
                    ti = tm[I_items[row]]
                    ok = ti >= 0
                    n = min(k, int(ok.sum()))
                    I[r, :n], D[r, :n] = ti[ok][:n], D_items[row][ok][:n]
                results[t.name][name] = Result(I, D, build, qsec * len(t.query_idx) / max(1, len(keys)), nbytes,
                                               {"items": int(inv.n_items), "postings": int(inv.nnz)})
        return results


# ============================================================================================ report
def _clean(o: Any) -> Any:
    """JSON-safe copy: NaN / inf → None, numpy → Python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def label_of(g: dict[str, Any], idx: int) -> str:
    """Medium-protocol label of a database index for a query: pos / junk / neg."""
    if idx in set(np.asarray(g.get("easy", []), np.int64).tolist()) | set(np.asarray(g.get("hard", []),
                                                                                      np.int64).tolist()):
        return "pos"
    if idx in set(np.asarray(g.get("junk", []), np.int64).tolist()):
        return "junk"
    return "neg"


def best_method(methods: dict[str, Any], pick: Any) -> str | None:
    """Method with the best medium mAP among those ``pick(name)`` accepts."""
    cands = [(m, (r.get("medium") or {}).get("map")) for m, r in methods.items() if pick(m)]
    cands = [(m, v) for m, v in cands if v is not None and math.isfinite(v)]
    return max(cands, key=lambda c: c[1])[0] if cands else None


def is_regional(name: str) -> bool:
    return name.startswith("regional:") or name in ("d2r_asmk_star", "r_asmk_star")


def is_baseline(name: str) -> bool:
    return name in BASELINES


def print_table(report: dict[str, Any], file: Any = sys.stdout) -> None:
    """Plain-text results table (percent, like the revisitop reference)."""
    def pct(v: Any) -> str:
        return "   -" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:5.1f}"

    for tname, tr in report["tracks"].items():
        print(f"\n== {report.get('dataset', '')} / {tname}: {tr.get('n_queries')} queries, {tr.get('n_db')} database "
              f"images", file=file)
        print(f"{'method':<24} {'E mAP':>6} {'M mAP':>6} {'H mAP':>6} {'M P@1':>6} {'M P@10':>6} {'H P@10':>6} "
              f"{'index':>10} {'time s':>8}", file=file)
        for m, r in tr["methods"].items():
            e, md, h = (r.get(p) or {} for p in PROTOCOLS)
            size = r.get("index_bytes")
            size_s = "-" if size is None else (f"{size / 2**20:.1f}MiB" if size >= 2**20 else f"{size / 1024:.1f}KiB")
            print(f"{m:<24} {pct(e.get('map')):>6} {pct(md.get('map')):>6} {pct(h.get('map')):>6} "
                  f"{pct(md.get('mp@1')):>6} {pct(md.get('mp@10')):>6} {pct(h.get('mp@10')):>6} {size_s:>10} "
                  f"{r.get('seconds', 0.0):8.2f}", file=file)
    syn = report.get("distractors", {}).get("synthetic")
    if syn:
        print("\n== synthetic distractors: medium mAP (hard mAP) vs N", file=file)
        for tname, methods in syn.items():
            ns = sorted({int(n) for v in methods.values() for n in v}, key=int)
            print(f"-- {tname}: " + "  ".join(f"{n:>13,}" for n in ns), file=file)
            for m, by_n in methods.items():
                cells = []
                for n in ns:
                    v = by_n.get(str(n)) or {}
                    cells.append(f"{pct(v.get('medium')):>6} ({pct(v.get('hard')).strip():>4})")
                print(f"   {m:<22} " + "  ".join(cells), file=file)


def save_query_crop(path: str, bbox: Any, out_dir: Path, key: str) -> str:
    """The query image as the encoder saw it (cropped), saved for saliency overlays; returns its path."""
    if bbox is None:
        return path
    from actors.query import crop
    from storage.images import decode_image

    target = out_dir / "queries" / f"{key}.jpg"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        crop(decode_image(read_bytes(path)), bbox).save(target, "JPEG", quality=90)
    return str(target)


# ============================================================================================ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="gnd.json / gnd_*.pkl, a dataset folder, roxford5k or rparis6k")
    p.add_argument("--data-root", default=None, help="folder of the download job's layout (revisitop names, R1M)")
    p.add_argument("--out", required=True, help="output folder (report.json, report.html, index/, rankings/)")
    p.add_argument("--tracks", default=None, help="comma-separated track names (default: all)")
    p.add_argument("--methods", nargs="*", default=None, help="method names, space or comma separated")
    p.add_argument("--distractors", default=None, help="N (R1M images) or the URI of a distractor list")
    p.add_argument("--synthetic-distractors", default=None, help="comma-separated N, e.g. 0,10000,100000")
    p.add_argument("--synthetic-methods", default=None,
                   help="methods run with synthetic distractors (default: every global and regional method)")
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--limit-queries", type=int, default=None, help="first N queries of each track")
    p.add_argument("--examples", type=int, default=4, help="example queries per track in the HTML report")
    p.add_argument("--reuse", action="store_true", help="reuse a complete index and cached query encodings")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="index config (YAML; default configs/benchmark.yaml)")
    p.add_argument("--index-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an index config key (passed to jobs.index --set)")
    p.add_argument("--topk", type=int, default=0, help=f"ranking depth (0: whole database up to {FULL_RANK_MAX:,})")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray the index job starts")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _split(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for x in (values or []) for v in x.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    index_root = str(out / "index")
    notes: list[str] = []

    # ---- 1. tracks and the union database
    pairs = resolve_tracks(args.dataset, args.data_root)
    if args.tracks:
        wanted = _split([args.tracks])
        unknown = sorted(set(wanted) - {n for n, _ in pairs})
        if unknown:
            log.error("unknown tracks %s; available: %s", unknown, [n for n, _ in pairs])
            return 2
        pairs = [(n, d) for n, d in pairs if n in wanted]
    tracks = [Track(n, d, np.arange(d.n_queries if args.limit_queries is None else min(d.n_queries,
                                                                                       args.limit_queries)))
              for n, d in pairs]
    tracks = add_real_distractors(tracks, args.distractors, args.data_root, notes)
    paths = union_paths(tracks)
    list_uri = str(out / "index_images.txt")
    text = "".join(p + "\n" for p in paths)
    if not Path(list_uri).exists() or Path(list_uri).read_text() != text:
        Path(list_uri).write_text(text)
    print(f"[benchmark] {len(tracks)} tracks, {len(paths):,} database images to index", flush=True)

    # ---- index
    t0 = time.time()
    try:
        run_index(list_uri, index_root, args.config, args.max_side, args.index_set, args.reuse, args.num_cpus,
                  args.ray_address)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    index_wall = time.time() - t0
    u2i = uri_to_id(index_root)
    union_ids = [u2i.get(p) for p in paths]
    path_pos = {p: i for i, p in enumerate(paths)}
    for t in tracks:
        t.db_union = np.array([path_pos[canonical(p)] for p in t.dataset.image_paths()], np.int64)

    from actors.query import QueryEncoder

    enc = QueryEncoder(index_root)
    avail_globals = set(enc.store.read("globals", ["descriptors"], columns=["method"]).column("method").to_pylist())
    avail_sources = set(enc.store.read("regions", ["extract"], columns=["source"]).column("source").to_pylist())
    avail_sources |= set(enc.store.read("regions", ["object_saliency"], columns=["source"]).column("source")
                         .to_pylist()) if enc.store.committed_files("regions", ["object_saliency"]) else set()
    has_locals = bool(enc.store.committed_files("locals", ["extract"])) and enc.local_pca is not None
    names = _split(args.methods) or default_methods(avail_globals, avail_sources, has_locals)
    specs = []
    for n in names:
        try:
            s = parse_method(n)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
        missing = (s.family == "global" and s.base not in avail_globals) or \
                  (s.family == "regional" and s.base not in avail_sources) or (s.family == "asmk" and not has_locals)
        if missing:
            notes.append(f"{n}: not available in this index run, skipped.")
            log.warning("%s: not available in this index run, skipped", n)
            continue
        specs.append(s)

    # ---- 2. queries
    items: dict[str, tuple[str, Any]] = {}
    qkeys: dict[str, list[str]] = {}
    for t in tracks:
        ks = []
        for i in t.query_idx:
            path, bbox = t.dataset.query_path(int(i)), t.dataset.query_bbox(int(i))
            k = query_key(path, bbox)
            items[k] = (path, bbox)
            ks.append(k)
        qkeys[t.name] = ks
    print(f"[queries] {len(items)} distinct queries to encode", flush=True)
    # cached encodings are only valid for the index run that produced them
    version = (load_json(join(index_root, "run.json"))["stages"].get("descriptors") or {}).get("output_version", "x")
    qdesc, encode_s = encode_queries(enc, items, str(out / "queries" / "cache" / str(version)), args.reuse)

    # ---- synthetic distractor tracks (derived from every base track)
    synth_ns = sorted({int(v) for v in _split([args.synthetic_distractors])}) if args.synthetic_distractors else []
    base_tracks = [t for t in tracks if t.base is None]
    for t in base_tracks:
        for n in synth_ns:
            if n > 0:
                tracks.append(Track(f"{t.name}+{n} synth", t.dataset, t.query_idx, t.db_union, base=t.name,
                                    synthetic=n))
                qkeys[tracks[-1].name] = qkeys[t.name]

    bench = Benchmark(enc, tracks, union_ids, qdesc, qkeys, args.topk, args.seed)
    results: dict[str, dict[str, Result]] = {t.name: {} for t in tracks}
    noise_info: dict[str, Any] = {}
    synth_methods = set(_split([args.synthetic_methods])) if args.synthetic_methods else None
    for spec in specs:
        if spec.family == "asmk":
            continue
        for t in tracks:
            if t.synthetic and synth_methods is not None and spec.name not in synth_methods:
                continue
            if t.synthetic and spec.family == "global":
                # synthetic rows of this method, nested over N, noise calibrated once per (track, method)
                ti, X = bench.track_globals(t, spec.base)
                X, = trim_width(X)
                pool = X[np.isin(ti, negative_pool(t.gnd(), t.n_db))]
                pool = pool if len(pool) >= 2 else X
                key = f"{t.base}/{spec.base}"
                if key not in noise_info:
                    noise, target, got = calibrate_noise(pool, X, seed=args.seed)
                    noise_info[key] = {"noise": noise, "target_nn_cos": target, "synthetic_nn_cos": got,
                                       "pool": int(len(pool))}
                synth = synthetic_globals(pool, t.synthetic, noise_info[key]["noise"], args.seed)
                results[t.name][spec.name] = bench.run_global(t, spec, synth)
            elif t.synthetic and spec.family == "regional":
                rs = bench.region_set(t, spec.base)
                key = f"{t.base}/regional:{spec.base}"
                if key not in noise_info:
                    pool_img = negative_pool(t.gnd(), t.n_db)
                    rows = np.isin(rs.image, pool_img)
                    rows = rows if rows.sum() >= 2 else np.ones(len(rs.X), bool)
                    noise, target, got = calibrate_noise(rs.X[rows], rs.X, rs.image[rows], rs.image, seed=args.seed)
                    noise_info[key] = {"noise": noise, "target_nn_cos": target, "synthetic_nn_cos": got,
                                       "pool": int(rows.sum())}
                results[t.name][spec.name] = bench.run_regional(t, spec, t.synthetic, noise_info[key]["noise"])
            elif spec.family == "global":
                results[t.name][spec.name] = bench.run_global(t, spec)
            else:
                results[t.name][spec.name] = bench.run_regional(t, spec)
            r = results[t.name][spec.name]
            print(f"[search] {t.name:<22} {spec.name:<24} {r.query_seconds:7.2f} s", flush=True)
    asmk_names = [s.name for s in specs if s.family == "asmk"]
    if asmk_names:
        for tname, by_m in bench.run_asmk(asmk_names, index_root, str(out), args.reuse).items():
            results[tname].update(by_m)
    notes += bench.notes

    # ---- 3. evaluation and report
    report: dict[str, Any] = {
        "dataset": tracks[0].dataset.name if len({t.dataset.name for t in tracks}) == 1 else args.dataset,
        "title": f"Retrieval benchmark: {Path(args.dataset).name}",
        "notes": notes,
        "index": {**index_summary(index_root), "wall_seconds_this_run": index_wall, "images_listed": len(paths),
                  "images_indexed": int(sum(i is not None for i in union_ids)),
                  "max_side": args.max_side, "config": args.config, "sets": args.index_set},
        "queries": {"distinct": len(items), "encode_seconds": encode_s,
                    "seconds_per_query": encode_s / max(1, len(items))},
        "methods": [s.name for s in specs],
        "tracks": {},
    }
    rank_dir = out / "rankings"
    rank_dir.mkdir(exist_ok=True)
    for t in tracks:
        gnd = t.gnd()
        first = next((m for m in GLOBAL_METHODS if m in avail_globals), None)
        present = bench.track_globals(t, first)[0] if first else np.empty(0)
        tr: dict[str, Any] = {"n_db": t.n_db + t.synthetic, "n_queries": len(gnd),
                              "query_ids": [t.dataset.queries[int(i)] for i in t.query_idx],
                              "missing_db_images": int(t.n_db - len(present)), "methods": {}, "pr": {}}
        if t.synthetic:
            tr["synthetic_distractors"] = t.synthetic
        arrays = {}
        for name, r in results[t.name].items():
            ev = evaluate_all(list(r.ids), gnd)
            sec = r.build_seconds + r.query_seconds
            tr["methods"][name] = {**ev, "index_bytes": r.index_bytes, "seconds": sec,
                                   "build_seconds": r.build_seconds, "query_seconds": r.query_seconds, **r.extra}
            levels, prec = mean_pr_curve(list(r.ids), protocol_gnd(gnd, "medium"))
            tr["pr"][name] = {"recall": levels, "precision": prec}
            arrays[slug(name)] = r.ids[:, :1000]
        save_arrays(str(rank_dir / f"{slug(t.name)}.npz"), **arrays)
        # the plot shows the best PR_CURVES methods by medium mAP (a legend of 20 hides the curves);
        # every curve stays in report.json under "pr_all"
        ranked = sorted(tr["methods"], key=lambda m: -(tr["methods"][m]["medium"]["map"]
                                                       if np.isfinite(tr["methods"][m]["medium"]["map"]) else -1))
        tr["pr_all"], tr["pr"] = tr["pr"], {m: tr["pr"][m] for m in ranked[:PR_CURVES]}
        tr["rankings"] = f"rankings/{slug(t.name)}.npz"
        report["tracks"][t.name] = tr

    if synth_ns:
        syn: dict[str, Any] = {}
        for t in base_tracks:
            by_m: dict[str, Any] = {}
            for spec in specs:
                if spec.family == "asmk":
                    continue
                row = {}
                for n in synth_ns:
                    tn = t.name if n == 0 else f"{t.name}+{n} synth"
                    m = report["tracks"][tn]["methods"].get(spec.name)
                    if m:
                        row[str(n)] = {p: m[p]["map"] for p in PROTOCOLS}
                if len(row) > 1 or not any(synth_ns):
                    by_m[spec.name] = row
            syn[t.name] = by_m
        report["distractors"] = {"synthetic": syn, "noise": noise_info}
        notes.append("Synthetic distractors (global and regional methods only): mixtures of two real negatives + "
                     "per-dimension noise calibrated to the real nearest-neighbour cosine; see "
                     "report['distractors']['noise'].")

    # ---- examples and saliency (base tracks only)
    for t in base_tracks:
        tr = report["tracks"][t.name]
        add_examples(tr, t, results[t.name], bench, qdesc, qkeys[t.name], items, args.examples, out)

    save_json(str(out / "report.json"), _clean(report))
    from jobs.report import render_report

    html = render_report(_clean(report), out)
    print_table(_clean(report))
    print(f"\n[benchmark] report: {out / 'report.json'}  {html}", flush=True)
    return 0


def add_examples(tr: dict[str, Any], t: Track, results: dict[str, Result], bench: Benchmark, qdesc: dict[str, Any],
                 keys: list[str], items: dict[str, tuple[str, Any]], n_examples: int, out: Path) -> None:
    """Example rows (best regional vs best global baseline) and saliency overlays for ``n_examples`` queries.

    Queries are those where the two methods' medium APs differ most (ties by query order), so the page shows
    where regional search helps and where it hurts.
    """
    if n_examples <= 0:
        return
    methods = tr["methods"]
    reg = best_method(methods, is_regional)
    glo = best_method(methods, is_baseline) or best_method(methods, lambda m: parse_method(m).family == "global")
    shown = [m for m in (reg, glo) if m]
    if not shown:
        return
    ap = [np.array([np.nan if v is None else v for v in methods[m]["medium"]["aps"]], np.float64) for m in shown]
    diff = np.abs(ap[0] - ap[1]) if len(ap) == 2 else np.zeros_like(ap[0])
    diff = np.where(np.isnan(diff), -1.0, diff)
    order = np.lexsort((np.arange(len(diff)), -diff))[:n_examples]
    gnd = t.gnd()
    examples, saliency = [], []
    for qi in order:
        key = keys[qi]
        path, bbox = items[key]
        q = qdesc[key]
        for m in shown:
            r = results[m]
            res = []
            spec = parse_method(m)
            rs = bench.region_sets.get((t.name, spec.base)) if spec.family == "regional" else None
            qitems = bench.query_items(t, spec, rs.X.shape[1])[qi] if rs is not None else None
            for idx, sc in zip(r.ids[qi][:10], r.scores[qi][:10]):
                if idx < 0:
                    break
                entry = {"path": t.dataset.image_path(int(idx)), "label": label_of(gnd[qi], int(idx)),
                         "score": float(sc)}
                if rs is not None:
                    b = best_region(qitems, rs, int(idx))
                    if b is not None:
                        entry["boxes"] = [b.tolist()]
                res.append(entry)
            apv = methods[m]["medium"]["aps"][qi]
            examples.append({"query": path, "bbox": None if bbox is None else list(bbox), "method": m,
                             "title": f"{t.dataset.queries[int(t.query_idx[qi])]} (medium AP "
                                      f"{'-' if apv is None else f'{100 * apv:.1f}'})", "results": res})
        crop_path = save_query_crop(path, bbox, out, key)
        qname = t.dataset.queries[int(t.query_idx[qi])]
        if q.fs_map is not None:
            saliency.append({"path": crop_path, "map": np.asarray(q.fs_map).tolist(),
                             "boxes": np.asarray(q.boxes.get("fs_egm", np.zeros((0, 4)))).tolist(),
                             "caption": f"{qname}: FS + FS.EGM boxes"})
        if q.os_map is not None:
            saliency.append({"path": crop_path, "map": np.asarray(q.os_map).tolist(),
                             "boxes": np.asarray(q.boxes.get("os_egm", np.zeros((0, 4)))).tolist(),
                             "caption": f"{qname}: OS + OS.EGM boxes"})
    tr["examples"] = examples
    tr["saliency"] = saliency


if __name__ == "__main__":
    sys.exit(main())
