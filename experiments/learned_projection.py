"""Does the learned R-MAC projection (seed 003), trained on pairs the index discovers itself, beat PCA-whitening?

Reads the stored regional MACs of an indexed run (``tables/regions/*.parquet``, sources ``full`` + ``grid``:
the R-MAC grid of seed 003), learns a PCA-whitening on database regions, mines weak positive pairs from the
mutual region k-NN of the database (no spatial verification stage exists yet, so weak positives only; ground
truth is used only to report the precision of the mined pairs and the final mAP), trains the shift + FC layer
and compares R-MAC mAP (revisited protocol on ``gnd.json``) of PCA-whitening vs learned projection.

With ``--keypoints DIR`` (a cache of XFeat keypoints, one ``<image id>.npz`` with ``xy``, ``descriptors``
each) the candidates are spatially verified first (mutual nearest-neighbour matches, an affine model by
RANSAC as in seed 003 §4, inliers counted) and training uses the verified positives instead.

Queries are described from their *uncropped* images (the regions stored by the index), so the numbers are a
relative comparison, not the benchmark's official query-box protocol.

    python experiments/learned_projection.py --run /work/runs/bench_before/index \
        --data /work/shared/data/museum-landmarks --epochs 10
"""
from __future__ import annotations

import argparse
import glob
import json
import time

import cv2
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.evaluation import evaluate_all
from pipeline.knn_graph import exact_search_fn
from pipeline.pair_mining import MiningConfig, cap_per_image, candidates_from_knn, classify_pairs, training_pairs
from pipeline.projection import LearnedProjection, ProjectionConfig, TripletData, train_projection
from pipeline.whitening import learn_pca_whitening


def load_regions(run: str, sources: tuple[str, ...]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, regions float32 (R, D), offsets (N+1,)) for the given region sources, images sorted."""
    ids, descs = [], []
    for path in sorted(glob.glob(f"{run}/tables/regions/*.parquet")):
        t = pq.read_table(path, columns=["image_id", "region_id", "source", "descriptor"])
        t = t.filter(pc.is_in(t["source"], value_set=__import__("pyarrow").array(list(sources))))
        if t.num_rows == 0:
            continue
        ids.append(np.asarray(t["image_id"].to_pylist()))
        flat = t["descriptor"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        descs.append(flat.reshape(t.num_rows, -1).astype(np.float32))
    image_of = np.concatenate(ids)
    X = np.concatenate(descs)
    order = np.argsort(image_of, kind="stable")
    image_of, X = image_of[order], X[order]
    names, start = np.unique(image_of, return_index=True)
    return list(names), X, np.r_[start, len(image_of)].astype(np.int64)


def rmac(model: LearnedProjection, X: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    data = TripletData(X, offsets, np.zeros((0, 2)))
    return model.describe(data).numpy()


def evaluate(desc_by_name: dict[str, np.ndarray], gnd: dict) -> dict[str, float]:
    db = np.stack([desc_by_name[n] for n in gnd["imlist"]])
    q = np.stack([desc_by_name[n] for n in gnd["qimlist"]])
    ranks = np.argsort(-(q @ db.T), axis=1)
    res = evaluate_all(list(ranks), gnd["gnd"])
    return {p: round(100 * res[p]["map"], 2) for p in ("easy", "medium", "hard")}


def verify_pairs(cand: dict, names: list[str], keypoints: str, min_cos: float = 0.82,
                 threshold: float = 8.0, max_kp: int = 512) -> np.ndarray:
    """Affine RANSAC inliers of every candidate pair from cached XFeat keypoints (mutual NN, cosine >= min_cos)."""
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def kp(i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in cache:
            z = np.load(f"{keypoints}/{names[i]}.npz")
            top = np.argsort(-z["scores"])[:max_kp]
            d = z["descriptors"][top].astype(np.float32)
            cache[i] = (z["xy"][top].astype(np.float32),
                        d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12))
        return cache[i]

    out = np.zeros(cand["image_a"].size, np.int64)
    t0 = time.time()
    for t, (a, b) in enumerate(zip(cand["image_a"], cand["image_b"])):
        if t % 2000 == 0:
            print(f"  verifying {t}/{out.size} ({time.time() - t0:.0f}s)", flush=True)
        (xa, da), (xb, db) = kp(int(a)), kp(int(b))
        if len(xa) < 3 or len(xb) < 3:
            continue
        S = da @ db.T
        ab, ba = S.argmax(1), S.argmax(0)
        m = np.flatnonzero((ba[ab] == np.arange(len(ab))) & (S[np.arange(len(ab)), ab] >= min_cos))
        if m.size < 3:
            out[t] = m.size
            continue
        _, inl = cv2.estimateAffine2D(xa[m], xb[ab[m]], method=cv2.RANSAC, ransacReprojThreshold=threshold,
                                      maxIters=1000, confidence=0.99)
        out[t] = 0 if inl is None else int(inl.sum())
    return out


def _true_pairs(groups: np.ndarray) -> int:
    """Image pairs of the same (non-distractor) ground-truth group: the ceiling of what mining can find."""
    sizes = [int((groups == g).sum()) for g in set(groups) - {"distractor"}]
    return sum(n * (n - 1) // 2 for n in sizes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--span", type=int, default=512, help="width of the initial whitening the training steps in")
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--weak-min-sim", type=float, default=MiningConfig().weak_min_sim)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keypoints", default=None, help="XFeat keypoint cache folder: verify the candidates")
    ap.add_argument("--cap", type=int, default=10)
    ap.add_argument("--save", default=None, help="write the verified candidates and inliers to this .npz")
    ap.add_argument("--min-inliers", type=int, default=MiningConfig().min_inliers)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    gnd = json.load(open(f"{args.data}/gnd.json"))
    names, X, offsets = load_regions(args.run, ("full", "grid"))
    index = {n: i for i, n in enumerate(names)}
    db = np.array([index[n] for n in gnd["imlist"]])
    print(f"{len(names)} images, {X.shape[0]} regions of dim {X.shape[1]} ({time.time() - t0:.0f}s)")

    # database-only arrays (training never sees the queries that are not database images)
    lengths = np.diff(offsets)
    db_rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in db])
    Xdb, off_db = X[db_rows], np.r_[0, np.cumsum(lengths[db])]
    rng = np.random.default_rng(0)
    sample = Xdb[rng.choice(Xdb.shape[0], min(100_000, Xdb.shape[0]), replace=False)]
    w = learn_pca_whitening(sample, dim=args.span)
    pca = LearnedProjection.from_whitening(w.mean, w.projection, args.dim)
    base = rmac(pca, X, offsets)
    res_pca = evaluate({n: base[i] for i, n in enumerate(names)}, gnd)
    print("PCA-whitening", args.dim, res_pca, f"({time.time() - t0:.0f}s)")

    # mining: mutual region k-NN among database regions (whitened to dim), weak positives
    with torch.no_grad():
        V = pca.project(torch.from_numpy(Xdb)).numpy()
    sims, ids = exact_search_fn(V)(V, args.k + 1)
    region_image = np.repeat(np.arange(len(db)), np.diff(off_db))
    cand = candidates_from_knn(ids, sims, region_image)
    groups = np.array(gnd["groups"])
    same = (groups[cand["image_a"]] == groups[cand["image_b"]]) & (groups[cand["image_a"]] != "distractor")
    print(f"candidates {cand['image_a'].size}, true matches among them {int(same.sum())}; "
          f"true matching db pairs {_true_pairs(groups)}")
    for thr in (0.5, 0.6, 0.7, 0.8):
        lab = classify_pairs(cand, None, MiningConfig(weak_min_sim=thr))
        sel = lab == "weak_positive"
        precision = same[sel].mean() if sel.any() else float("nan")
        print(f"  weak_min_sim {thr}: {int(sel.sum())} weak positives, precision {precision:.3f}")
    if args.keypoints:
        # verify only mutual-neighbour pairs (the only ones that can become positives; their failures are the
        # hardest negatives), at most --cap per image: the verification is the expensive step on a CPU
        mutual = cand["mutual_links"] >= 2
        keep = cap_per_image({c: v[mutual] for c, v in cand.items()}, args.cap)
        same_k = (groups[keep["image_a"]] == groups[keep["image_b"]]) & (groups[keep["image_a"]] != "distractor")
        t2 = time.time()
        db_names = [names[i] for i in db]
        inliers = verify_pairs(keep, db_names, args.keypoints)
        if args.save:
            np.savez(args.save, inliers=inliers, names=np.array(db_names), **keep)
        print(f"verified {keep['image_a'].size} mutual-neighbour pairs ({int(same_k.sum())} true) in "
              f"{time.time() - t2:.0f}s")
        mcfg = MiningConfig(min_inliers=args.min_inliers)
        for lab in ("positive", "hard_negative", "ambiguous"):
            sel = classify_pairs(keep, inliers, mcfg) == lab
            print(f"  {lab}: {int(sel.sum())}, true matches among them {int(same_k[sel].sum())}")
        labels = classify_pairs(keep, inliers, mcfg)
        pos = training_pairs(keep, labels)
        print(f"training on {pos.shape[0]} verified positive pairs "
              f"(precision {same_k[labels == 'positive'].mean():.3f})")
    else:
        labels = classify_pairs(cand, None, MiningConfig(weak_min_sim=args.weak_min_sim))
        pos = training_pairs(cand, labels)
        print(f"training on {pos.shape[0]} weak positive pairs "
              f"(precision {same[labels == 'weak_positive'].mean():.3f})")

    data = TripletData(Xdb, off_db, pos)
    cfg = ProjectionConfig(dim=args.dim, epochs=args.epochs)
    t1 = time.time()
    arrays = train_projection(cfg, data, w.to_arrays(),
                              epoch_callback=lambda e, s, a: print("  epoch", e,
                                                                   {k: round(v, 4) for k, v in s.items()}))
    learned = rmac(LearnedProjection.from_arrays(arrays), X, offsets)
    res_learned = evaluate({n: learned[i] for i, n in enumerate(names)}, gnd)
    print("learned", res_learned, f"(training {time.time() - t1:.0f}s)")


if __name__ == "__main__":
    main()
