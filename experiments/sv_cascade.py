"""Measurement script: spatial verification with a second, learned matcher on the images that matter most.

MNN + MAGSAC++ verifies a first stage's top ``K`` (the product's ``+sv``); then LighterGlue re-verifies the set
``S`` = the first stage's top ``T`` and the MNN-fused top ``T`` (at most ``2T`` pairs per query), and its inlier
count replaces MNN's for those images before the same tiered fusion (``verify.min_inliers``) re-orders the top
``K``. Reads the first-stage rankings of a ``jobs.benchmark`` run and the keypoint caches of
``experiments/sv_eval.py extract`` (database 640 px / 1,024; queries 1,024 px, scales 1 + 0.5, 2,048). Prints mAP
per track x method for the first stage, MNN ``+sv`` and the cascade, and the glue matcher's time per pair.

    python experiments/sv_cascade.py --rankings runs/bench/rankings --methods cam_ona,os_egm_diffusion --top 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sv_eval import DATA, KpStore, load_tracks, parse_scales, query_key, summary, track_gnd  # noqa: E402

from pipeline.evaluation import evaluate_all  # noqa: E402
from pipeline.keypoints import KeypointConfig  # noqa: E402
from pipeline.matching import MatcherConfig, build_matcher, mutual_nn_matches_many  # noqa: E402
from pipeline.verification import VerifyConfig, fit_geometry, rerank_shortlist, rescore_positions  # noqa: E402
from storage.keypoint_weights import load_keypoint_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rankings", required=True)
    ap.add_argument("--methods", required=True)
    ap.add_argument("--tracks", default="root,in-photos,no-box")
    ap.add_argument("--cache", default="/work/runs/kp_cache")
    ap.add_argument("--top", type=int, default=10, help="T: first-stage top T and MNN-fused top T re-verified")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--glue", default="lighterglue")
    ap.add_argument("--memo", default="/work/tmp/sv_cascade_memo.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--glue-query-top", type=int, default=0, help="keypoints of the query given to the glue "
                    "matcher, strongest first (0 = all)")
    ap.add_argument("--glue-db-top", type=int, default=0, help="the same for the database image (0 = all)")
    ap.add_argument("--depth-confidence", type=float, default=None, help="LightGlue's early stopping "
                    "(None = the model's reference value; LighterGlue: off)")
    ap.add_argument("--mnn-memo", default="/work/tmp/sv_cascade_mnn.json", help="MNN inlier counts, reused")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)
    cfg = VerifyConfig()  # the product's defaults: MNN 0.75, MAGSAC++ 12 px, tiered at 30 inliers
    db = KpStore(Path(args.cache), KeypointConfig(extractor="xfeat", max_side=640, top_n=1024, device="cpu"))
    qs = KpStore(Path(args.cache), KeypointConfig(extractor="xfeat", max_side=1024, top_n=2048, device="cpu",
                                                  scales=parse_scales("1+0.5")), cached_top_n=2048)
    glue = build_matcher(MatcherConfig(name=args.glue, depth_confidence=args.depth_confidence), "cpu",
                         load_keypoint_weights(args.glue))

    def glue_kp(kp, top: int):
        return kp.top(top) if top > 0 else kp
    memo_path = Path(args.memo)
    memo: dict[str, int] = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    mnn_path = Path(args.mnn_memo)
    mnn_memo: dict[str, int] = json.loads(mnn_path.read_text()) if mnn_path.exists() else {}
    tracks = load_tracks(DATA)
    t_glue, n_glue = 0.0, 0
    rows = []
    for tname in args.tracks.split(","):
        ds = tracks[tname]
        gnd = track_gnd(ds)
        with np.load(Path(args.rankings) / f"{tname}.npz") as z:
            rankings = {m: z[m] for m in args.methods.split(",")}
        qkeys = [query_key(q, ds.query_bbox(i)) for i, q in enumerate(ds.queries)]
        for m, ids in rankings.items():
            mnn_lists, casc_lists = [], []
            for qi, qk in enumerate(qkeys):
                short = [int(j) for j in ids[qi, :args.k] if j >= 0]
                names = [ds.images[j] for j in short]
                todo = [n for n in names if f"{qk}|{n}" not in mnn_memo]
                if todo:
                    q = qs[qk]
                    res = mutual_nn_matches_many(q.descriptors, [db[n].descriptors for n in todo],
                                                 cfg.matcher.min_similarity)
                    for n, (pairs, _) in zip(todo, res):
                        _, _, mask = fit_geometry(q.xy[pairs[:, 0]], db[n].xy[pairs[:, 1]], cfg)
                        mnn_memo[f"{qk}|{n}"] = int(mask.sum())
                inl = np.array([mnn_memo[f"{qk}|{n}"] for n in names], np.float64)
                mnn_lists.append(rerank_shortlist(ids[qi], None, inl, cfg))
                inl2 = inl.copy()
                for r in rescore_positions(-np.arange(len(inl), dtype=np.float64), inl,
                                           replace(cfg, rescore_top=args.top)):
                    j = short[r]
                    key = f"{qk}|{ds.images[j]}"
                    if key not in memo:
                        t = time.perf_counter()
                        pairs, _ = glue.match(glue_kp(qs[qk], args.glue_query_top),
                                              glue_kp(db[ds.images[j]], args.glue_db_top))
                        _, _, mask = fit_geometry(qs[qk].xy[pairs[:, 0]], db[ds.images[j]].xy[pairs[:, 1]], cfg)
                        t_glue += time.perf_counter() - t
                        n_glue += 1
                        memo[key] = int(mask.sum())
                        if n_glue % 200 == 0:
                            memo_path.write_text(json.dumps(memo))
                            print(f"  [{args.glue}] {n_glue} pairs, {1000 * t_glue / n_glue:.0f} ms/pair", flush=True)
                    inl2[r] = memo[key]
                casc_lists.append(rerank_shortlist(ids[qi], None, inl2, cfg))
            row = {"track": tname, "method": m, "first": summary(evaluate_all(list(ids), gnd)),
                   "mnn_sv": summary(evaluate_all(mnn_lists, gnd)), "cascade": summary(evaluate_all(casc_lists, gnd))}
            rows.append(row)
            print(f"{tname:10s} {m:22s} first {row['first']}  +sv {row['mnn_sv']}  +sv cascade(T={args.top}) "
                  f"{row['cascade']}", flush=True)
    memo_path.write_text(json.dumps(memo))
    mnn_path.write_text(json.dumps(mnn_memo))
    print(f"[{args.glue}] {n_glue} new pairs, {1000 * t_glue / max(n_glue, 1):.0f} ms/pair")
    Path(args.memo).with_suffix(".rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
