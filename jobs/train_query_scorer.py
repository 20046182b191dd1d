"""Train the query-region scorer of the ``patches[:k]`` search method (seed 000 §3.2, §4.2; ALGORITHMS.md §9).

    python -m jobs.train_query_scorer --dataset <folder with gnd.json | gnd.json> --index <run> [--out <uri>]
        [--split noboxfree|cv] [--source os_egm] [--proposals selective_search|egm|grid] [--max-proposals 2000]
        [--patches-per-photo 200] [--profile] [--cache DIR] [--num-cpus N] [--ray-address ADDR]

1. **Training queries** (``--split``): ``noboxfree`` (default) keeps the root queries whose source photo is not a
   query photo of the ``no-box`` track next to the ground truth (museum-landmarks: the landmark and ``qsd1_*``
   queries; ``qsd2_*`` are the no-box wall photos cropped to a painting), so ``patches`` can be evaluated on no-box
   with no photo seen in training; ``cv`` takes every query of ``--dataset`` (the scorer's CV is grouped by object,
   so its out-of-fold numbers never score a photo with a model that saw it or another photo of its object; the
   saved scorer has seen every photo). Train on photos of the kind you will query with: ``--dataset
   <museum-landmarks>/no-box --split cv`` learns from whole cluttered wall photos, as seed 000 does.
2. **Patches**: each query (cropped to its box) is encoded by the run's encoder with its patches (``--proposals``).
3. **Labels** (Ray, a task per query): DCG@10 of retrieving the labelled corpus (the ground truth's database, as
   indexed in ``regional_<source>``) with each of ``--patches-per-photo`` sampled patches alone; with
   ``--profile``, also every patch's retrieval-profile features against that corpus
   (:func:`pipeline.region_scoring.retrieval_profile`), which join the paper's features.
4. **Scorer**: a linear L2-regularised SVR, ``C`` by grouped CV (groups = objects: photos that share a source
   photo or a positive, :func:`pipeline.query_patches.object_groups`); the CV error per ``C``.
5. **lambda** (Ray, a task per query): the mAP of greedy diverse top-k patch voting for lambda in -5 .. 5 (step
   0.2) with out-of-fold unaries of *every* patch, as at query time; the best one is kept.
6. **Artefact**: arrays (no pickle) + ``info.json`` (lambda, C, feature names, the patch config, CV curves) in
   ``--out`` (default: the run's ``query_scorer`` artefact, which ``SearchService`` loads for ``patches``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from typing import Any, Sequence

import numpy as np

from actors.common import init_ray
from actors.query_scorer import TrainingQuery, corpus_items, label_patches, lambda_curve
from jobs.index import setup_logging
from pipeline.config import to_plain
from pipeline.query_patches import (PatchSearchConfig, fold_scorers, noboxfree_queries, object_groups, pick_lambda,
                                    proposal_tag, source_photo)
from pipeline.query_regions import PROPOSAL_SOURCES, ProposalConfig
from pipeline.region_scoring import LAMBDA_GRID, PROFILE_NAMES, RegionScorer, ScorerConfig
from service.encoder import QueryDescriptors, QueryEncoder
from service.errors import UserError, run_cli
from service.tracks import canonical, query_key
from storage.arrays import load_arrays, save_arrays
from storage.datasets import Dataset, load_gnd_json
from storage.images import decode_image
from storage.query_scorer import default_location, save_query_scorer
from storage.readers import image_uris
from storage.uri import exists, join, read_bytes

log = logging.getLogger("indexer")
NOBOX_TRACK = "no-box"
GND_FILE = "gnd.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train_query_scorer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a folder with gnd.json (and no-box/gnd.json), or a gnd.json")
    p.add_argument("--index", required=True, help="output root of the index run (its regional index and encoder)")
    p.add_argument("--out", default=None, help="scorer folder URI (default: the run's query_scorer artefact)")
    p.add_argument("--split", choices=("noboxfree", "cv"), default="noboxfree")
    p.add_argument("--source", default=PatchSearchConfig.source, help="regional index the patches are matched to")
    p.add_argument("--proposals", choices=PROPOSAL_SOURCES, default=ProposalConfig.source)
    p.add_argument("--max-proposals", type=int, default=ProposalConfig.max_proposals)
    p.add_argument("--patches-per-photo", type=int, default=200, help="sampled patches per query for the SVR")
    p.add_argument("--k", type=int, default=PatchSearchConfig.k, help="patches chosen at query time")
    p.add_argument("--folds", type=int, default=ScorerConfig.n_folds)
    p.add_argument("--limit-queries", type=int, default=None, help="first N training queries (smoke runs)")
    p.add_argument("--cache", default=None, help="folder caching the training queries' encodings")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="add retrieval-profile columns to the paper's features (descriptor, geometry, saliency)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def load_datasets(dataset: str) -> tuple[Dataset, list[str]]:
    """The root ground truth and the query ids of the no-box track next to it (empty when there is none)."""
    gnd = dataset if dataset.endswith(".json") else join(dataset, GND_FILE)
    if not exists(gnd):
        raise UserError(f"{dataset}: no {GND_FILE} found")
    folder = gnd.rsplit("/", 1)[0] if "/" in gnd else "."
    nobox = join(folder, NOBOX_TRACK, GND_FILE)
    return load_gnd_json(gnd), (load_gnd_json(nobox).queries if exists(nobox) else [])


def training_indices(ds: Dataset, nobox_ids: Sequence[str], split: str, limit: int | None) -> np.ndarray:
    """Indices of the training queries of ``split`` (queries without positives are dropped)."""
    if split == "noboxfree":
        if not nobox_ids:
            log.warning("no %s track next to the ground truth: noboxfree keeps every query", NOBOX_TRACK)
        idx = noboxfree_queries(ds.queries, nobox_ids)
    else:
        idx = np.arange(len(ds.queries))
    idx = np.array([i for i in idx if len(positives(ds.gnd[i]))], np.int64)
    return idx[:limit] if limit else idx


def positives(g: dict[str, Any]) -> np.ndarray:
    """Medium-protocol positives (easy + hard) of a query."""
    return np.concatenate([np.asarray(g.get("easy", []), np.int64), np.asarray(g.get("hard", []), np.int64)])


def corpus_ids(root: str, ds: Dataset) -> list[str | None]:
    """The run's image id of each database image of ``ds`` (None where it is not indexed)."""
    by_uri = {canonical(u): i for i, u in image_uris(root).items()}
    ids = [by_uri.get(canonical(p)) for p in ds.image_paths()]
    if not any(ids):
        raise UserError(f"none of the dataset's {len(ids)} database images is in the index run {root}")
    return ids


def encode_queries(enc: QueryEncoder, ds: Dataset, idx: np.ndarray, proposals: ProposalConfig,
                   cache: str | None) -> list[QueryDescriptors]:
    """Encodings with patches of the queries ``idx`` (cropped to their boxes), read from / written to ``cache``."""
    tag = proposal_tag(proposals)
    out = []
    for n, i in enumerate(idx, 1):
        path, bbox = ds.query_path(int(i)), ds.query_bbox(int(i))
        uri = join(cache, f"{query_key(path, bbox)}-{tag}.npz") if cache else None
        if uri and exists(uri):
            out.append(QueryDescriptors.from_arrays(load_arrays(uri)))
            continue
        q = enc.encode(decode_image(read_bytes(path)), bbox, proposals)
        if uri:
            save_arrays(uri, **q.to_arrays())
        out.append(q)
        if n % 10 == 0 or n == len(idx):
            log.info("[queries] %d/%d encoded with patches", n, len(idx))
    return out


def training_queries(ds: Dataset, idx: np.ndarray, encoded: list[QueryDescriptors], per_photo: int,
                     seed: int) -> list[TrainingQuery]:
    """Training queries with their ground truth and a seeded sample of ``per_photo`` patches each."""
    rng = np.random.default_rng(seed)
    out = []
    for i, q in zip(idx, encoded):
        if "full" not in q.regions:
            raise UserError("the run's regions have no 'full' source: patches needs the full-image item")
        P = len(q.patch_feat)
        sample = np.sort(rng.choice(P, min(P, per_photo), replace=False)) if P else np.zeros(0, np.int64)
        g = ds.gnd[int(i)]
        out.append(TrainingQuery(ds.queries[int(i)], source_photo(ds.queries[int(i)]), positives(g),
                                 np.asarray(g.get("junk", []), np.int64), np.asarray(q.regions["full"][0], np.float32),
                                 np.asarray(q.patch_desc, np.float32), np.asarray(q.patch_feat, np.float32), sample))
    out = [t for t in out if len(t.sample)]
    for t, g in zip(out, object_groups([t.photo for t in out], [t.positives for t in out])):
        t.group = g
    return out


def fit_scorer(queries: list[TrainingQuery], labels: list[np.ndarray], cfg: ScorerConfig
               ) -> tuple[RegionScorer, list[np.ndarray]]:
    """The SVR (``C`` by grouped CV) and the out-of-fold unaries of every patch of every query."""
    X = np.concatenate([q.feats[q.sample] for q in queries])
    y = np.concatenate(labels)
    groups = np.concatenate([np.full(len(q.sample), q.group, dtype=object) for q in queries]).astype(str)
    scorer = RegionScorer.fit(X, y, groups, cfg)
    for C, mse in zip(scorer.cv["Cs"], scorer.cv["mse"]):
        print(f"[scorer] C={C:<8g} CV mean squared error {mse:.5f}", flush=True)
    models = fold_scorers(X, y, groups, scorer.C, cfg)
    psis = []
    for q in queries:
        model = next(m for held, m in models if q.group in held)
        psis.append(model.predict(q.feats))
    label_var = float(np.var(y))
    cv_error = float(scorer.cv["mse"].min())
    print(f"[scorer] chosen C={scorer.C:g}: CV error {cv_error:.5f} (label variance {label_var:.5f}, "
          f"{len(y)} patches of {len({q.photo for q in queries})} photos in {len(set(groups))} object groups)",
          flush=True)
    if cv_error >= label_var:
        print(f"[scorer] warning: CV error {cv_error:.5f} >= label variance {label_var:.5f}: on "
              "objects it was not trained on, the scorer predicts patch usefulness no better than a constant, so "
              "patches:k picks patches mostly by lambda's diversity term; more (and more varied) training photos "
              "are what helps", flush=True)
    return scorer, psis


def choose_lambda(X: np.ndarray, img: np.ndarray, n_images: int, queries: list[TrainingQuery],
                  psis: list[np.ndarray], k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(best lambda, grid, mAP per lambda) of patch voting with out-of-fold unaries (Ray task per query)."""
    grid = np.asarray(LAMBDA_GRID, np.float64)
    aps = lambda_curve(X, img, n_images, queries, psis, grid, k)
    maps = np.nanmean(aps, axis=0)
    lam = pick_lambda(grid, maps)
    for g, m in zip(grid, maps):
        if abs(g) < 1e-9 or abs(g - lam) < 1e-9 or abs(g + 0.4) < 1e-9 or abs(abs(g) - 5) < 1e-9:
            print(f"[lambda] {g:+.1f}: out-of-fold mAP {100 * m:.2f}", flush=True)
    print(f"[lambda] chosen {lam:+.1f} (mAP {100 * maps[grid == lam][0]:.2f}, medium protocol, "
          f"{len(queries)} queries)", flush=True)
    return lam, grid, maps


def run(args: argparse.Namespace) -> int:
    ds, nobox = load_datasets(args.dataset)
    qidx = training_indices(ds, nobox, args.split, args.limit_queries)
    if len(qidx) < 2:
        raise UserError(f"the {args.split} split leaves {len(qidx)} training queries; at least 2 photos are needed")
    proposals = ProposalConfig(source=args.proposals, max_proposals=args.max_proposals)
    print(f"[train] {len(qidx)} training queries ({args.split}), proposals {args.proposals}", flush=True)
    enc = QueryEncoder(args.index)
    queries = training_queries(ds, qidx, encode_queries(enc, ds, qidx, proposals, args.cache),
                               args.patches_per_photo, args.seed)
    if len({q.group for q in queries}) < 2:
        raise UserError("the training queries show a single object (they share positives): cross-validation needs "
                        "at least two objects")
    X, img = corpus_items(args.index, args.source, corpus_ids(args.index, ds))
    if len(X) == 0:
        raise UserError(f"the run has no regional_{args.source} items of the dataset's images")
    init_ray(args.ray_address, args.num_cpus)
    labels = label_patches(X, img, ds.n_images, queries, profile=args.profile)
    cfg = ScorerConfig(n_folds=args.folds)
    scorer, psis = fit_scorer(queries, labels, cfg)
    lam, grid, maps = choose_lambda(X, img, ds.n_images, queries, psis, args.k)
    patch_cfg = PatchSearchConfig(proposals=proposals, k=args.k, lam=lam, source=args.source)
    names = enc.patch_feature_names() + (list(PROFILE_NAMES) if args.profile else [])
    info = {"config": to_plain(patch_cfg), "feature_names": names, "C": scorer.C, "groups": "object",
            "lambda": lam, "split": args.split, "n_queries": len(queries), "queries": [q.name for q in queries],
            "n_patches": int(sum(len(q.sample) for q in queries)), "cv_Cs": scorer.cv["Cs"].tolist(),
            "cv_mse": scorer.cv["mse"].tolist(), "lambda_grid": grid.tolist(), "lambda_map": maps.tolist(),
            "cv_map": float(maps[grid == lam][0]), "dataset": args.dataset, "index": args.index,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    out = args.out or default_location(args.index)
    save_query_scorer(out, scorer.to_arrays(), info)
    print(f"[train] scorer written to {out}: C={scorer.C:g}, lambda={lam:+.1f}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run_cli(lambda: run(args), args.verbose, "jobs.train_query_scorer")


if __name__ == "__main__":
    sys.exit(main())
