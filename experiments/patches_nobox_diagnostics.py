"""Measurement script (issue 16): where does ``patches:5`` lose to the full image on no-box?

Scores every selective-search patch of the 60 no-box photos against the regional index once (the dense
``sim_patch_img`` of :func:`pipeline.region_scoring.sim_patch_img`) and then compares, per query and without
re-training anything on no-box:

1. how well single patch features and the product's scorer (trained on the noboxfree queries, as
   ``jobs.train_query_scorer`` does) rank a photo's patches by their DCG@10 label: mean within-photo Spearman;
2. which patches the scorer picks (their area, their width in feature-map cells);
3. patch voting with the scorer's, random and oracle (best single-patch AP) selections under several vote rules:
   the seed's sum, a heavier full image, max, Zheng et al.'s query-adaptive late fusion (CVPR 2015), z-scores,
   per-patch truncation to its top images;
4. selection restricted to patches at least ``m`` feature-map cells wide and high.

Ground truth is used for the labels, the oracle and the evaluation; nothing is chosen on it (the rules and
features are listed in advance, and every row is printed). The scorer is trained with the product's protocol.

    python experiments/patches_nobox_diagnostics.py --index runs/bench/index --data ../shared/data/museum-landmarks
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from patches_nobox_cv import load_tracks, regional_aps, train  # noqa: E402

from pipeline.evaluation import compute_map, paired_bootstrap  # noqa: E402
from pipeline.query_patches import select_patches  # noqa: E402
from pipeline.query_regions import GEOMETRY_NAMES  # noqa: E402
from pipeline.region_scoring import (PROFILE_NAMES, ScorerConfig, labels_from_similarities,  # noqa: E402
                                     patch_labels, retrieval_profile_dense, sim_patch_img)

CELL_PX, MAX_SIDE = 32, 512  # MobileNetV2's stride on the benchmark config's 512 px side


def geometry(feats: np.ndarray, d_desc: int, name: str) -> np.ndarray:
    """One box-geometry column (:data:`pipeline.query_regions.GEOMETRY_NAMES`) of scorer features whose first
    ``d_desc`` columns are the patch descriptor."""
    return feats[:, d_desc + GEOMETRY_NAMES.index(name)]


def cells_wide_high(feats: np.ndarray, d_desc: int, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Width and height of each patch in feature-map cells of the scale-1 map its descriptor is pooled from."""
    w, h = image_size
    scale = MAX_SIDE / max(w, h)
    return (geometry(feats, d_desc, "width") * w * scale / CELL_PX,
            geometry(feats, d_desc, "height") * h * scale / CELL_PX)


RULES = ("sum", "full_x5", "max", "qalf", "zscore", "trunc3", "trunc10")


def vote(rule: str, S: np.ndarray) -> np.ndarray:
    """Image scores from item rows ``S`` (1 + k, n): the full image first, then the chosen patches."""
    if rule == "sum":  # seed 000 §4.2
        return S.sum(0)
    if rule == "full_x5":  # the full image weighs as much as the five patches together
        return 5 * S[0] + S[1:].sum(0)
    if rule == "max":
        return S.max(0)
    if rule == "qalf":  # query-adaptive late fusion: rows min-max normalised by top-1 and rank 1000, weight 1/AUC@100
        srt = -np.sort(-S, axis=1)
        top, ref = srt[:, :1], srt[:, 999:1000]
        span = np.maximum(top - ref, 1e-6)
        auc = ((srt[:, :100] - ref) / span).mean(1)
        return ((S - ref) / span / np.maximum(auc, 1e-3)[:, None]).sum(0)
    if rule == "zscore":
        return ((S - S.mean(1, keepdims=True)) / S.std(1, keepdims=True)).sum(0)
    if rule.startswith("trunc"):  # each patch only separates its own top m images
        m = int(rule[5:])
        floor = -np.sort(-S[1:], axis=1)[:, m - 1:m]
        return S[0] + np.maximum(S[1:], floor).sum(0)
    raise ValueError(rule)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", default="/work/tmp/patch_cache")
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    t0 = time.time()
    t = load_tracks(args.index, args.data, args.cache)
    rq, nenc, nq, X, img, n = t.rq, t.nenc, t.nq, t.X, t.img, t.n
    base = regional_aps(nenc, nq, X, img, n)
    gnd = [{"ok": q.positives, "junk": q.junk} for q in nq]

    def aps(votes: list[np.ndarray]) -> np.ndarray:
        return compute_map([np.argsort(-v, kind="stable") for v in votes], gnd)[1]

    rl = [patch_labels(q.desc[q.sample], X, img, q.positives, q.junk, n_images=n) for q in rq]
    scorer, lam = train(rq, rl, np.array([f"r{q.photo}" for q in rq]), ScorerConfig(), X, img, n, args.k)
    print(f"product scorer (noboxfree): C={scorer.C:g} lambda={lam:+.1f} ({time.time() - t0:.0f}s)", flush=True)
    dense = [np.concatenate([sim_patch_img(q.full[None], X, img, n), sim_patch_img(q.desc, X, img, n)])
             for q in nq]
    full = aps([d[0] for d in dense])
    print(f"regional:os_egm {100 * base.mean():.2f}; full image alone {100 * full.mean():.2f}, "
          f"perfect on {(full > 0.999).sum()} of {len(nq)} photos", flush=True)

    # 1. within-photo rank correlation of features with the DCG@10 label
    d_desc = nq[0].desc.shape[1]
    names = list(GEOMETRY_NAMES) + ["fs_mean", "fs_share", "os_mean", "os_share"]
    rho: dict[str, list[float]] = {k: [] for k in names + list(PROFILE_NAMES) + ["scorer psi"]}
    for q, d in zip(nq, dense):
        lab = labels_from_similarities(d[1:], q.positives, q.junk)
        S, F = d[1:].copy(), d[0].copy()  # the profile as actors.query_scorer.patch_profiles: junk left out
        S[:, q.junk], F[q.junk] = -np.inf, -np.inf
        prof = retrieval_profile_dense(S, F)
        for j, name in enumerate(names):
            rho[name].append(spearmanr(q.feats[:, d_desc + j], lab)[0])
        for j, name in enumerate(PROFILE_NAMES):
            rho[name].append(spearmanr(prof[:, j], lab)[0])
        rho["scorer psi"].append(spearmanr(scorer.predict(q.feats), lab)[0])
    print("mean within-photo Spearman with the patch label:")
    for name, v in rho.items():
        print(f"  {name:20s} {np.nanmean(v):+.3f}")

    # 2. what the scorer picks
    chosen = [select_patches(scorer.predict(q.feats), q.desc, args.k, lam) for q in nq]
    area = np.concatenate([geometry(q.feats, d_desc, "area")[c] for q, c in zip(nq, chosen)])
    cells = np.concatenate([np.minimum(*cells_wide_high(q.feats, d_desc, e.image_size))[c]
                            for q, e, c in zip(nq, nenc, chosen)])
    all_area = np.concatenate([geometry(q.feats, d_desc, "area") for q in nq])
    print(f"scorer's patches: median area {100 * np.median(area):.2f} % of the photo (all patches "
          f"{100 * np.median(all_area):.2f} %), {100 * np.mean(cells < 1):.0f} % under one feature-map cell "
          "wide or high")

    # 3. selections x vote rules
    oracle = []
    for q, d, g in zip(nq, dense, gnd):
        pa = compute_map([np.argsort(-r, kind="stable") for r in d[1:]], [g] * (len(d) - 1))[1]
        oracle.append(np.argsort(-pa, kind="stable")[:args.k])
    selections = {"scorer": chosen, "oracle": oracle}
    for seed in range(3):
        r = np.random.default_rng(seed)
        selections[f"random{seed}"] = [r.choice(len(q.desc), args.k, replace=False) for q in nq]
    for name, sel in selections.items():
        row = []
        for rule in RULES:
            a = aps([vote(rule, d[np.r_[0, 1 + c]]) for d, c in zip(dense, sel)])
            b = paired_bootstrap(base, a)
            row.append(f"{rule} {100 * a.mean():.1f} ({100 * b['diff']:+.1f})")
        print(f"{name:8s} " + " | ".join(row), flush=True)

    # 4. minimum patch size in feature-map cells
    for m in (2, 3, 4):
        sel = []
        for q, e in zip(nq, nenc):
            cw, ch = cells_wide_high(q.feats, d_desc, e.image_size)
            ok = np.flatnonzero((cw >= m) & (ch >= m))
            ok = ok if len(ok) >= args.k else np.argsort(-(cw * ch))[:args.k]
            sel.append(ok[select_patches(scorer.predict(q.feats[ok]), q.desc[ok], args.k, lam)])
        a = aps([vote("sum", d[np.r_[0, 1 + c]]) for d, c in zip(dense, sel)])
        print(f"scorer, patches >= {m} cells: {100 * a.mean():.1f} ({100 * (a - base).mean():+.1f})", flush=True)
    print(f"done ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
