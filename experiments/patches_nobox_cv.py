"""Measurement script (issue 16): does the patch scorer work when it learns from whole cluttered photos?

The product's scorer (``jobs.train_query_scorer --split noboxfree``) learns from the root queries cropped to
their boxes (landmark photos and ``qsd1_*`` painting crops): none of its training patches lies on a wall, a frame
or a visitor, which is what the no-box photos are full of and what seed 000's scorer exists to reject (its
training queries are whole People-at-Landmarks photos). This script compares, on the no-box track, patch voting
with (a) a scorer trained on the noboxfree queries as the product does and (b) scorers trained on whole wall
photos, cross-fitted: the no-box photos are split into folds so that no two folds share a photo *or a painting*
(photos showing the same painting are one group), each fold is scored by a model (C by inner grouped CV, lambda
by inner out-of-fold mAP) trained only on the other folds (plus the noboxfree queries). Ground truth is used for
the training labels of the training folds and for the evaluation of the held-out fold only.

Each scorer reads the paper's features (``--profile``: plus the retrieval-profile columns, as
``jobs.train_query_scorer --profile``); ``--assignment N`` renames the painting groups at random (seed N) before
the outer folds, which moves photos between folds: the spread of those runs is the noise of this estimate. The
script also ranks no-box with ``regional:os_egm`` (the query's full view and OS.EGM regions, max over items, as
``jobs.search``) and prints each row's paired-bootstrap interval against it.

    python experiments/patches_nobox_cv.py --index runs/bench13/index --data ../shared/data/museum-landmarks
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.query_scorer import TrainingQuery, corpus_items, patch_profiles  # noqa: E402
from jobs.train_query_scorer import corpus_ids, encode_queries, positives  # noqa: E402
from pipeline.evaluation import compute_map, paired_bootstrap  # noqa: E402
from pipeline.query_patches import lambda_aps, noboxfree_queries, object_groups, pick_lambda  # noqa: E402
from pipeline.query_regions import ProposalConfig  # noqa: E402
from pipeline.region_scoring import (LAMBDA_GRID, RegionScorer, ScorerConfig, grouped_folds, patch_labels,  # noqa: E402
                                     sim_patch_img)
from service.encoder import QueryDescriptors, QueryEncoder  # noqa: E402
from storage.datasets import Dataset, load_gnd_json  # noqa: E402


def make_queries(ds, idx, encoded, per_photo: int, rng) -> list[TrainingQuery]:
    out = []
    for i, q in zip(idx, encoded):
        P = len(q.patch_feat)
        sample = np.sort(rng.choice(P, min(P, per_photo), replace=False))
        g = ds.gnd[int(i)]
        out.append(TrainingQuery(ds.queries[int(i)], ds.queries[int(i)], positives(g),
                                 np.asarray(g.get("junk", []), np.int64), np.asarray(q.regions["full"][0], np.float32),
                                 np.asarray(q.patch_desc, np.float32), np.asarray(q.patch_feat, np.float32), sample))
    return out


@dataclass
class Tracks:
    """The root and no-box ground truth, their encoded training queries and the labelled corpus's items."""

    root: Dataset
    nobox: Dataset
    rq: list[TrainingQuery]  # the noboxfree root queries (the product's training protocol)
    nenc: list[QueryDescriptors]  # the no-box photos, encoded with patches
    nq: list[TrainingQuery]  # the same photos as training queries
    X: np.ndarray  # items of regional_os_egm, grouped by corpus image
    img: np.ndarray
    n: int


def load_tracks(index: str, data: str, cache: str, per_photo: int = 200, seed: int = 0) -> Tracks:
    """Encode (or read from ``cache``) the noboxfree root queries and the no-box photos of ``data`` with
    selective-search patches, each with a seeded sample of ``per_photo`` patches, and load the corpus items."""
    root = load_gnd_json(f"{data}/gnd.json")
    nobox = load_gnd_json(f"{data}/no-box/gnd.json")
    if root.images != nobox.images:
        raise SystemExit("root and no-box database lists differ")
    enc = QueryEncoder(index)
    props = ProposalConfig()
    rng = np.random.default_rng(seed)
    ridx = noboxfree_queries(root.queries, nobox.queries)
    nidx = np.arange(len(nobox.queries))
    rq = make_queries(root, ridx, encode_queries(enc, root, ridx, props, cache), per_photo, rng)
    nenc = encode_queries(enc, nobox, nidx, props, cache)
    nq = make_queries(nobox, nidx, nenc, per_photo, rng)
    X, img = corpus_items(index, "os_egm", corpus_ids(index, root))
    return Tracks(root, nobox, rq, nenc, nq, X, img, root.n_images)


def painting_groups(queries: list[TrainingQuery]) -> np.ndarray:
    """CV groups: photos that share a photo or a positive are one group (no painting on both sides of a fold)."""
    return object_groups([q.photo for q in queries], [q.positives for q in queries])


def train(queries, labels, groups, cfg: ScorerConfig, X, img, n_images, k) -> tuple[RegionScorer, float]:
    """C by grouped CV, lambda by the out-of-fold mAP of the training queries (as jobs.train_query_scorer)."""
    Xf = np.concatenate([q.feats[q.sample] for q in queries])
    y = np.concatenate(labels)
    g = np.concatenate([np.full(len(q.sample), gr, dtype=object) for q, gr in zip(queries, groups)]).astype(str)
    scorer = RegionScorer.fit(Xf, y, g, cfg)
    folds = grouped_folds(g, cfg.n_folds)
    psis = [None] * len(queries)
    for tr, te in folds:
        model = RegionScorer.fit_fixed(Xf[tr], y[tr], scorer.C, cfg)
        held = set(np.unique(g[te]).tolist())
        for n, (q, gr) in enumerate(zip(queries, groups)):
            if gr in held:
                psis[n] = model.predict(q.feats)
    grid = np.asarray(LAMBDA_GRID)
    aps = np.stack([lambda_aps(psi, q.desc, q.full, X, img, n_images, q.positives, q.junk, grid, k)
                    for q, psi in zip(queries, psis)])
    lam = pick_lambda(grid, np.nanmean(aps, 0))
    return scorer, lam


def evaluate(scorer: RegionScorer, lam: float, queries, X, img, n_images, k) -> np.ndarray:
    return np.array([lambda_aps(scorer.predict(q.feats), q.desc, q.full, X, img, n_images, q.positives, q.junk,
                                [lam], k)[0] for q in queries])


def regional_aps(encoded, queries, X, img, n_images) -> np.ndarray:
    """Per-query AP of ``regional:os_egm``: max over the query's full view and OS.EGM regions (exact search)."""
    ranks = [np.argsort(-sim_patch_img(np.concatenate([e.regions["full"], e.regions["os_egm"]]), X, img,
                                       n_images).max(0), kind="stable") for e in encoded]
    return compute_map(ranks, [{"ok": q.positives, "junk": q.junk} for q in queries])[1]


def report(name: str, aps: np.ndarray, base: np.ndarray) -> None:
    b = paired_bootstrap(base, aps)
    print(f"{name}: no-box mAP {100 * np.nanmean(aps):.2f}, vs regional:os_egm {100 * b['diff']:+.1f} "
          f"[{100 * b['low']:+.1f}, {100 * b['high']:+.1f}], better on {b['better']}, worse on {b['worse']}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", default="/work/tmp/patch_cache")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--inner-folds", type=int, default=5)
    ap.add_argument("--per-photo", type=int, default=200)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="add the retrieval-profile columns")
    ap.add_argument("--assignment", type=int, default=None, help="seed of a random outer-fold assignment")
    ap.add_argument("--rows", default="abc", help="which rows to compute (a, b, c: see the docstring)")
    args = ap.parse_args()
    t0 = time.time()
    t = load_tracks(args.index, args.data, args.cache, args.per_photo, args.seed)
    nobox, rq, nenc, nq, X, img, n = t.nobox, t.rq, t.nenc, t.nq, t.X, t.img, t.n
    print(f"encoded {len(rq)} noboxfree + {len(nq)} no-box queries ({time.time() - t0:.0f}s)", flush=True)
    if args.profile:
        for q in rq + nq:
            prof = patch_profiles(X, img, n, q.full, q.desc, q.junk)
            q.feats = np.concatenate([q.feats, prof.astype(q.feats.dtype)], axis=1)
    base = regional_aps(nenc, nq, X, img, n)
    print(f"regional:os_egm no-box mAP {100 * np.mean(base):.2f}", flush=True)
    rl = [patch_labels(q.desc[q.sample], X, img, q.positives, q.junk, n_images=n) for q in rq]
    nl = [patch_labels(q.desc[q.sample], X, img, q.positives, q.junk, n_images=n) for q in nq]
    print(f"labels: noboxfree mean {np.mean(np.concatenate(rl)):.3f}, wall photos mean "
          f"{np.mean(np.concatenate(nl)):.3f} ({time.time() - t0:.0f}s)", flush=True)
    cfg = ScorerConfig(n_folds=args.inner_folds)
    rgroups = np.array([f"r{q.photo}" for q in rq])
    ap_a = np.full(len(nq), np.nan)
    if "a" in args.rows:  # (a) the product's protocol: noboxfree only
        sa, la = train(rq, rl, rgroups, cfg, X, img, n, args.k)
        ap_a = evaluate(sa, la, nq, X, img, n, args.k)
        print(f"(a) noboxfree scorer: C={sa.C:g} lambda={la:+.1f}  no-box mAP {100 * np.nanmean(ap_a):.2f}",
              flush=True)
    # (b) cross-fitted over wall photos (+ the noboxfree queries on the training side)
    ngroups = painting_groups(nq)
    if args.assignment is not None:  # GroupKFold deals groups out by size, ties by label: new labels, new folds
        names = np.unique(ngroups)
        perm = np.random.default_rng(args.assignment).permutation(len(names))
        ngroups = np.array([f"h{perm[np.searchsorted(names, g)]:04d}" for g in ngroups])
    print(f"{len(set(ngroups))} painting-disjoint groups of the {len(nq)} wall photos", flush=True)
    ap_b = np.full(len(nq), np.nan)
    ap_c = np.full(len(nq), np.nan)
    for fold, (tr_rows, te_rows) in enumerate(grouped_folds(ngroups, args.folds)):
        tr = sorted(set(tr_rows.tolist()))
        te = sorted(set(te_rows.tolist()))
        assert not set(ngroups[tr]) & set(ngroups[te])
        assert not {p for i in tr for p in nq[i].positives.tolist()} & {p for i in te for p in nq[i].positives.tolist()}
        if "b" in args.rows:
            sb, lb = train([nq[i] for i in tr] + rq, [nl[i] for i in tr] + rl,
                           np.concatenate([ngroups[tr], rgroups]), cfg, X, img, n, args.k)
            ap_b[te] = evaluate(sb, lb, [nq[i] for i in te], X, img, n, args.k)
            print(f"  fold {fold}: walls+noboxfree C={sb.C:g} lambda={lb:+.1f} mAP {100 * np.nanmean(ap_b[te]):.1f}",
                  flush=True)
        if "c" in args.rows:
            sc, lc = train([nq[i] for i in tr], [nl[i] for i in tr], ngroups[tr], cfg, X, img, n, args.k)
            ap_c[te] = evaluate(sc, lc, [nq[i] for i in te], X, img, n, args.k)
            print(f"  fold {fold}: {len(te)} photos held out; walls only C={sc.C:g} lambda={lc:+.1f} "
                  f"mAP {100 * np.nanmean(ap_c[te]):.1f} ({time.time() - t0:.0f}s)", flush=True)
    for row, name, aps in (("a", "(a) noboxfree scorer", ap_a), ("b", "(b) cross-fitted wall photos + noboxfree", ap_b),
                           ("c", "(c) cross-fitted wall photos only", ap_c)):
        if row in args.rows:
            report(name, aps, base)
    np.savez(f"{args.cache}/nobox_cv_aps.npz", a=ap_a, b=ap_b, c=ap_c, regional=base, queries=np.array(nobox.queries))


if __name__ == "__main__":
    main()
