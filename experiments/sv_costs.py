"""Costs of learned keypoints and spatial verification on THIS machine, against a reference measured in the
same run (the machine is shared: ratios to the in-run reference are the numbers to read).

1. Keypoint extraction time per image vs the MobileNetV2 forward at 512 px (the project's backbone,
   pipeline.backbone.build_backbone("mobilenet_v2", storage.weights.load_state_dict("builtin:mobilenet_v2"))),
   interleaved image by image so load changes hit both; decoding excluded from both, the keypoint
   extractor's own resize included (the backbone gets an already resized, normalised tensor).
2. Bytes per image at N keypoints: raw (x, y, score float32 + descriptors float16 / int8) and a real Parquet
   table (storage.schemas.locals_schema layout: one row per keypoint, zstd) written for a sample of images.
3. Time to verify a top-100 shortlist per query (matching + MAGSAC), keypoints already in memory.

    python experiments/sv_costs.py --threads 1 --images 24 --queries 12

Prints `uptime` before and after. Keypoints for 2. and 3. are read from the sv_eval.py cache when present,
else extracted here.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.sv_eval import DATA, KpStore, load_rankings, load_tracks, query_key, read_rgb  # noqa: E402
from pipeline.backbone import build_backbone  # noqa: E402
from pipeline.keypoints import KeypointConfig, Keypoints, build_keypoint_extractor  # noqa: E402
from pipeline.matching import MatcherConfig, build_matcher  # noqa: E402
from pipeline.preprocess import IMAGENET_MEAN, IMAGENET_STD, resized_size  # noqa: E402
from pipeline.verification import VerifyConfig, verify_shortlist  # noqa: E402
from storage.keypoint_weights import load_keypoint_weights  # noqa: E402
from storage.weights import load_state_dict  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def mnv2_input(img: np.ndarray, side: int = 512) -> torch.Tensor:
    import cv2

    w, h = resized_size(img.shape[1], img.shape[0], side)
    x = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def sample_ids(tracks, n: int) -> list[str]:
    """A fixed, mixed sample: paintings, wall photos, landmarks and distractors in database proportion."""
    ds = tracks["root"]
    photos = tracks["in-photos"].images
    fam = {"painting": [i for i in ds.images if i.startswith("painting_")],
           "photo": [i for i in photos if i.startswith("qsd")],
           "landmark": [i for i in ds.images if not i.startswith(("painting_", "distractor_"))],
           "distractor": [i for i in ds.images if i.startswith("distractor_")]}
    per = max(1, n // 4)
    out = []
    for ids in fam.values():
        step = max(1, len(ids) // per)
        out += ids[::step][:per]
    return out


def time_extraction(args, tracks) -> dict:
    ids = sample_ids(tracks, args.images)
    imgs = [read_rgb(i, None) for i in ids]
    bb = build_backbone("mobilenet_v2", load_state_dict("builtin:mobilenet_v2"))
    configs = [("xfeat", s) for s in args.xfeat_sides] + [("aliked", s) for s in args.aliked_sides]
    extractors = {}
    for name, side in configs:
        cfg = KeypointConfig(extractor=name, max_side=side, top_n=args.top_n, device="cpu")
        extractors[(name, side)] = build_keypoint_extractor(cfg, "cpu", state_dict=load_keypoint_weights(name))
    with torch.inference_mode():  # warm-up
        bb(mnv2_input(imgs[0]))
        for ex in extractors.values():
            ex.extract(imgs[0])
    t_ref: list[float] = []
    t_kp: dict = {k: [] for k in extractors}
    n_kp: dict = {k: [] for k in extractors}
    for img in imgs:
        for _ in range(args.repeats):
            x = mnv2_input(img)
            t = time.perf_counter()
            with torch.inference_mode():
                bb(x)
            t_ref.append(time.perf_counter() - t)
            for k, ex in extractors.items():
                if k[0] == "aliked" and len(t_kp[k]) >= args.aliked_images:
                    continue
                t = time.perf_counter()
                kp = ex.extract(img)
                t_kp[k].append(time.perf_counter() - t)
                n_kp[k].append(len(kp))
    ref = float(np.median(t_ref))
    out = {"images": len(imgs), "repeats": args.repeats, "mobilenet_v2_512_ms": 1000 * ref,
           "mobilenet_v2_512_mean_ms": 1000 * float(np.mean(t_ref)), "extractors": {}}
    print(f"\n[extraction] {len(imgs)} images x {args.repeats}; MobileNetV2 @512 forward: median "
          f"{1000 * ref:.1f} ms, mean {1000 * np.mean(t_ref):.1f} ms")
    print(f"{'extractor':>10s} {'max_side':>8s} {'median ms':>10s} {'mean ms':>8s} {'ratio(median)':>14s} "
          f"{'ratio(mean)':>12s} {'kp/img':>7s}")
    for (name, side), ts in t_kp.items():
        med, mean = float(np.median(ts)), float(np.mean(ts))
        r = {"median_ms": 1000 * med, "mean_ms": 1000 * mean, "ratio_median": med / ref,
             "ratio_mean": mean / float(np.mean(t_ref)), "keypoints_mean": float(np.mean(n_kp[(name, side)])),
             "n": len(ts)}
        out["extractors"][f"{name}@{side}"] = r
        print(f"{name:>10s} {side:8d} {r['median_ms']:10.1f} {r['mean_ms']:8.1f} {r['ratio_median']:14.2f} "
              f"{r['ratio_mean']:12.2f} {r['keypoints_mean']:7.0f}")
    return out


def keypoints_table(kps: dict[str, Keypoints], dtype: str) -> pa.Table:
    """One row per keypoint as storage.schemas.locals_schema lays out locals (scale column = score here,
    descriptor fixed_size_list<float16> or, for dtype int8, <int8>)."""
    ids, lid, x, y, sc, desc = [], [], [], [], [], []
    for k, kp in kps.items():
        a = kp.to_arrays("int8" if dtype == "int8" else "float16")
        ids += [k] * len(kp)
        lid.append(np.arange(len(kp), dtype=np.int32))
        x.append(a["xy"][:, 0])
        y.append(a["xy"][:, 1])
        sc.append(a["scores"])
        desc.append(a["descriptors"])
    d = np.concatenate(desc)
    return pa.table({"image_id": pa.array(ids, pa.string()), "local_id": np.concatenate(lid),
                     "x": np.concatenate(x), "y": np.concatenate(y), "score": np.concatenate(sc),
                     "descriptor": pa.FixedSizeListArray.from_arrays(pa.array(d.reshape(-1)), d.shape[1])})


def measure_storage(args, tracks, store_root: Path) -> dict:
    ds = tracks["root"]
    rng = np.random.default_rng(0)
    ids = [ds.images[i] for i in sorted(rng.choice(len(ds.images), args.storage_images, replace=False))]
    out = {}
    print(f"\n[storage] {len(ids)} database images (random, fixed seed), xfeat @{args.eval_side}")
    print(f"{'N':>6s} {'desc':>8s} {'kp/img':>7s} {'raw KB/img':>11s} {'parquet zstd KB/img':>20s}")
    for n in args.storage_ns:
        store = KpStore(store_root, KeypointConfig(extractor="xfeat", max_side=args.eval_side, top_n=n))
        kps = {i: store[i] for i in ids}
        mean_kp = float(np.mean([len(k) for k in kps.values()]))
        for dtype, db in (("float16", 2), ("int8", 1)):
            raw = float(np.mean([len(k) * (12 + db * k.dim) for k in kps.values()]))
            buf = io.BytesIO()
            pq.write_table(keypoints_table(kps, dtype), buf, compression="zstd")
            pqb = len(buf.getvalue()) / len(ids)
            # full-N images only (the budget is about the default N; small images have fewer keypoints)
            full = [i for i, k in kps.items() if len(k) == n]
            raw_full = n * (12 + db * 64)
            out[f"N{n}_{dtype}"] = {"keypoints_mean": mean_kp, "raw_bytes_mean": raw, "parquet_bytes_mean": pqb,
                                    "raw_bytes_full_n": raw_full, "images_at_full_n": len(full)}
            print(f"{n:6d} {dtype:>8s} {mean_kp:7.0f} {raw / 1024:11.1f} {pqb / 1024:20.1f}   "
                  f"(an image with all {n}: raw {raw_full / 1024:.1f} KB)")
        if True:  # Parquet for full-N images alone
            full = {i: k for i, k in kps.items() if len(k) == n}
            for dtype in ("float16", "int8"):
                if full:
                    buf = io.BytesIO()
                    pq.write_table(keypoints_table(full, dtype), buf, compression="zstd")
                    b = len(buf.getvalue()) / len(full)
                    out[f"N{n}_{dtype}"]["parquet_bytes_full_n"] = b
                    print(f"{'':6s} {dtype:>8s} parquet zstd, the {len(full)} images with all {n} keypoints: "
                          f"{b / 1024:.1f} KB/img")
    return out


def time_verification(args, tracks, store_root: Path) -> dict:
    rank_dir = Path(args.rankings)
    out = {}
    kcfg = KeypointConfig(extractor="xfeat", max_side=args.eval_side, top_n=args.top_n)
    store = KpStore(store_root, kcfg)
    print(f"\n[verify] top-{args.k} per query, xfeat @{args.eval_side} N={args.top_n}, keypoints in memory")
    for mname in args.matchers:
        mcfg = MatcherConfig(name=mname, min_similarity=args.min_sim)
        matcher = build_matcher(mcfg, "cpu", None if mname == "mnn" else load_keypoint_weights(mname))
        vcfg = VerifyConfig(matcher=mcfg, ransac_threshold=args.thr, min_inliers=args.tau, shortlist=args.k)
        times, pairs = [], []
        nq = args.queries if mname == "mnn" else args.glue_queries
        for tname in ("no-box", "in-photos", "root"):
            ds = tracks[tname]
            try:
                ranks = load_rankings(rank_dir, tname)
                ids = ranks[args.method] if args.method in ranks else next(iter(ranks.values()))
            except FileNotFoundError:
                rng = np.random.default_rng(0)
                ids = np.stack([rng.choice(len(ds.images), args.k, replace=False) for _ in ds.queries])
            step = max(1, len(ds.queries) // max(1, nq // 3))
            for qi in list(range(0, len(ds.queries), step))[: max(1, nq // 3)]:
                q = store[query_key(ds.queries[qi], ds.query_bbox(qi))]
                dbs = [store[ds.images[j]] for j in ids[qi, :args.k] if j >= 0]
                k = args.k if mname == "mnn" else args.glue_k
                t = time.perf_counter()
                verify_shortlist(q, dbs[:k], vcfg, matcher)
                dt = time.perf_counter() - t
                times.append(dt * args.k / len(dbs[:k]))
                pairs.append(len(dbs[:k]))
        r = {"queries": len(times), "pairs_per_query": float(np.mean(pairs)),
             "s_per_query_top_k_median": float(np.median(times)), "s_per_query_top_k_mean": float(np.mean(times)),
             "s_per_query_top_k_max": float(np.max(times))}
        out[mname] = r
        print(f"{mname:>12s}: {r['queries']} queries, top-{args.k} (extrapolated from {r['pairs_per_query']:.0f} "
              f"pairs for glue): median {r['s_per_query_top_k_median']:.3f} s, mean {r['s_per_query_top_k_mean']:.3f}"
              f" s, max {r['s_per_query_top_k_max']:.3f} s")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--xfeat-sides", type=int, nargs="+", default=[512, 640, 768, 1024])
    p.add_argument("--aliked-sides", type=int, nargs="*", default=[640])
    p.add_argument("--aliked-images", type=int, default=8)
    p.add_argument("--top-n", type=int, default=1024)
    p.add_argument("--storage-images", type=int, default=300)
    p.add_argument("--storage-ns", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--eval-side", type=int, default=640)
    p.add_argument("--cache", default="/work/runs/kp_cache")
    p.add_argument("--rankings", default="/work/runs/bench_before/rankings")
    p.add_argument("--method", default="")
    p.add_argument("--matchers", nargs="+", default=["mnn", "lighterglue"])
    p.add_argument("--queries", type=int, default=12)
    p.add_argument("--glue-queries", type=int, default=3)
    p.add_argument("--glue-k", type=int, default=10)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--min-sim", type=float, default=0.82)
    p.add_argument("--thr", type=float, default=8.0)
    p.add_argument("--tau", type=int, default=15)
    p.add_argument("--skip", nargs="*", default=[], help="parts to skip: extraction storage verify")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    __import__("cv2").setNumThreads(args.threads)
    print(f"[load] before: {uptime()}")
    print(f"[threads] torch {torch.get_num_threads()}, opencv {__import__('cv2').getNumThreads()}")
    tracks = load_tracks(DATA)
    res = {"args": vars(args), "uptime_before": uptime()}
    if "extraction" not in args.skip:
        res["extraction"] = time_extraction(args, tracks)
    if "storage" not in args.skip:
        res["storage"] = measure_storage(args, tracks, Path(args.cache))
    if "verify" not in args.skip:
        res["verify"] = time_verification(args, tracks, Path(args.cache))
    res["uptime_after"] = uptime()
    print(f"\n[load] after: {res['uptime_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
