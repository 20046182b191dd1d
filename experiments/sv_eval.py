"""Measurement script: spatial-verification re-ranking of first-stage rankings on museum-landmarks.

Not a product entry point. Two steps:

1. ``extract``: keypoints of every database image and query of the three tracks (root ``gnd.json`` with
   queries cropped to their box as actors/query.py crops them, ``in-photos/``, ``no-box/``), cached as one npz
   per image under ``<cache>/<extractor>-<max_side>-<top_n>/`` (outside the repo), so later runs only read.

       python experiments/sv_eval.py extract --extractor xfeat --max-side 640

2. ``eval``: reads first-stage rankings (``<rankings>/<track>.npz``: method slug -> (n_q, <=1000) database
   indices, -1 padded, as jobs/benchmark.py writes them), re-ranks the top ``K`` of each query with spatial
   verification for each configuration of a grid, and prints / writes mAP (Revisited-Oxford protocols via
   pipeline.evaluation.evaluate_all) per track x method x configuration, plus verification time per pair.
   Inlier counts are computed once per (configuration, query, database image) and memoised across methods;
   ``min_inliers`` and the fusion rule are swept afterwards on those counts (the counts are computed with a
   low fitting floor, ``--fit-floor``; see the note in the report).

       python experiments/sv_eval.py eval --rankings /work/runs/bench_before/rankings --out /work/runs/sv_eval

Images are decoded with storage.images.decode_image (EXIF-oriented RGB), as the indexer decodes them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import evaluate_all  # noqa: E402
from pipeline.keypoints import KeypointConfig, Keypoints, build_keypoint_extractor  # noqa: E402
from pipeline.matching import MatcherConfig, build_matcher, mutual_nn_matches_many  # noqa: E402
from pipeline.verification import VerifyConfig, fit_geometry, fuse_scores  # noqa: E402
from storage.datasets import Dataset, load_gnd_json  # noqa: E402
from storage.images import decode_image  # noqa: E402
from storage.keypoint_weights import load_keypoint_weights  # noqa: E402
from storage.schemas import descriptors_to_numpy  # noqa: E402
from storage.tables import TableStore, read_parquet  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"
if not DATA.exists():
    DATA = Path("/work/shared/data/museum-landmarks")
TRACKS = {"root": "gnd.json", "in-photos": "in-photos/gnd.json", "no-box": "no-box/gnd.json"}


# ------------------------------------------------------------------------------------------------ data
def load_tracks(data: Path) -> dict[str, Dataset]:
    return {name: load_gnd_json(str(data / rel)) for name, rel in TRACKS.items()}


def crop_box(bbx: tuple[float, float, float, float] | None, w: int, h: int) -> tuple[int, int, int, int] | None:
    """Integer crop box exactly as actors.query.crop computes it."""
    if bbx is None:
        return None
    x0, y0, x1, y1 = bbx
    return (max(0, int(np.floor(x0))), max(0, int(np.floor(y0))), min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1))))


def query_key(qid: str, bbx: Any) -> str:
    if bbx is None:
        return qid
    return f"{qid}__box_" + "_".join(str(int(round(v))) for v in bbx)


def all_items(tracks: dict[str, Dataset]) -> dict[str, tuple[str, Any]]:
    """cache key -> (image id, query box or None) for every database image and query of every track."""
    items: dict[str, tuple[str, Any]] = {}
    for ds in tracks.values():
        for iid in ds.images:
            items.setdefault(iid, (iid, None))
        for qi, qid in enumerate(ds.queries):
            bbx = ds.query_bbox(qi)
            items.setdefault(query_key(qid, bbx), (qid, bbx))
    return items


def read_rgb(image_id: str, bbx: Any) -> np.ndarray:
    img = decode_image((DATA / "jpg" / f"{image_id}.jpg").read_bytes())
    arr = np.asarray(img)
    box = crop_box(bbx, arr.shape[1], arr.shape[0])
    if box is not None:
        arr = np.ascontiguousarray(arr[box[1]:box[3], box[0]:box[2]])
    return arr


def cache_dir(root: Path, kcfg: KeypointConfig) -> Path:
    ms = "" if tuple(kcfg.scales) == (1.0,) else "-s" + "+".join(f"{x:g}" for x in kcfg.scales)
    return root / f"{kcfg.extractor}-{kcfg.max_side}-{kcfg.top_n}{ms}"


def parse_scales(text: Any) -> tuple[float, ...]:
    return tuple(float(x) for x in str(text).split("+")) if text not in (None, "") else (1.0,)


def save_kp(path: Path, kp: Keypoints) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **kp.to_arrays("float16"))
    os.replace(tmp, path)


def load_kp(path: Path, extractor: str) -> Keypoints:
    with np.load(path) as z:
        return Keypoints.from_arrays({k: z[k] for k in z.files}, extractor)


def cmd_extract(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    kcfg = KeypointConfig(extractor=args.extractor, max_side=args.max_side, top_n=args.top_n, device="cpu",
                          scales=parse_scales(args.scales))
    out = cache_dir(Path(args.cache), kcfg)
    out.mkdir(parents=True, exist_ok=True)
    ex = build_keypoint_extractor(kcfg, "cpu", state_dict=load_keypoint_weights(args.extractor))
    tracks = load_tracks(DATA)
    items = all_items(tracks)
    if args.queries_only:
        qkeys = {query_key(q, ds.query_bbox(i)) for ds in tracks.values() for i, q in enumerate(ds.queries)}
        items = {k: v for k, v in items.items() if k in qkeys}
    if args.only:
        wanted = set(Path(args.only).read_text().split())
        items = {k: v for k, v in items.items() if k in wanted}
    todo = [k for k in sorted(items) if not (out / f"{k}.npz").exists()]
    print(f"[extract] {kcfg}: {len(items)} items, {len(todo)} to do -> {out}", flush=True)
    t0, t_net = time.perf_counter(), 0.0
    for n, key in enumerate(todo, 1):
        arr = read_rgb(*items[key])
        t = time.perf_counter()
        kp = ex.extract(arr)
        t_net += time.perf_counter() - t
        save_kp(out / f"{key}.npz", kp)
        if n % 200 == 0 or n == len(todo):
            el = time.perf_counter() - t0
            print(f"[extract] {n}/{len(todo)}  {el:.0f}s  extract {1000 * t_net / n:.1f} ms/img", flush=True)


# ------------------------------------------------------------------------------------------------- eval
class KpStore:
    """Cached keypoints by key, truncated to ``top_n`` (rows are sorted by score, so truncating equals
    extracting with the smaller ``top_n``)."""

    def __init__(self, root: Path, kcfg: KeypointConfig, cached_top_n: int = 1024) -> None:
        self.dir = cache_dir(root, replace(kcfg, top_n=max(cached_top_n, kcfg.top_n)))
        self.top_n = kcfg.top_n
        self.extractor = kcfg.extractor
        self.mem: dict[str, Keypoints] = {}

    def __getitem__(self, key: str) -> Keypoints:
        kp = self.mem.get(key)
        if kp is None:
            kp = load_kp(self.dir / f"{key}.npz", self.extractor).top(self.top_n)
            self.mem[key] = kp
        return kp


class IndexLocalsStore:
    """The project's cnn locals as an index run stored them (``tables/locals``: MobileNetV2 conv-map locals,
    PCA-128, positions in original pixels), as Keypoints; a boxed query keeps the locals inside its box,
    shifted to the crop's frame (the crop of actors.query.crop)."""

    def __init__(self, index: str, top_n: int) -> None:
        self.top_n = top_n
        self.rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        parts: dict[str, list] = {}
        store = TableStore(index)
        for f in store.committed_files("locals"):
            t = read_parquet(f)
            ids = np.asarray(t.column("image_id").to_pylist())
            xy = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], 1).astype(np.float32)
            st = t.column("strength").to_numpy().astype(np.float32)
            d = descriptors_to_numpy(t.column("descriptor"))
            for i in np.unique(ids):
                m = ids == i
                parts[str(i)] = (xy[m], st[m], d[m])
        self.rows = parts
        self.sizes: dict[str, tuple[int, int]] = {}
        for f in store.committed_files("images"):
            t = read_parquet(f, columns=["image_id", "width", "height"])
            for i, w, h in zip(t.column("image_id").to_pylist(), t.column("width").to_pylist(),
                               t.column("height").to_pylist()):
                self.sizes[i] = (int(w), int(h))
        self.mem: dict[str, Keypoints] = {}

    def __getitem__(self, key: str) -> Keypoints:
        if key in self.mem:
            return self.mem[key]
        iid, _, box = key.partition("__box_")
        xy, st, d = self.rows.get(iid, (np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                                         np.zeros((0, 128), np.float32)))
        size = self.sizes.get(iid, (1, 1))
        if box:
            x0, y0, x1, y1 = (float(v) for v in box.split("_"))
            c = crop_box((x0, y0, x1, y1), *size)
            m = (xy[:, 0] >= c[0]) & (xy[:, 0] < c[2]) & (xy[:, 1] >= c[1]) & (xy[:, 1] < c[3])
            xy, st, d = xy[m] - np.array(c[:2], np.float32), st[m], d[m]
            size = (c[2] - c[0], c[3] - c[1])
        order = np.argsort(-st, kind="stable")[: self.top_n]
        dd = d[order].astype(np.float32)
        dd /= np.maximum(np.linalg.norm(dd, axis=1, keepdims=True), 1e-12)
        kp = Keypoints(xy[order], st[order], dd, size, "cnn")
        self.mem[key] = kp
        return kp


def load_rankings(rank_dir: Path, track: str) -> dict[str, np.ndarray]:
    with np.load(rank_dir / f"{track}.npz") as z:
        return {k: z[k] for k in z.files}


def track_gnd(ds: Dataset) -> list[dict[str, Any]]:
    return [{k: g[k] for k in ("easy", "hard", "junk")} for g in ds.gnd]


def summary(ev: dict[str, Any]) -> dict[str, float]:
    return {p[0].upper(): round(100 * ev[p]["map"], 2) for p in ("easy", "medium", "hard")}


def parse_grid(spec: str) -> list[dict[str, Any]]:
    """``"max_side=640,1024;top_n=512,1024;..."`` -> list of dicts (cartesian product)."""
    keys, values = [], []
    for part in filter(None, spec.split(";")):
        k, v = part.split("=")
        keys.append(k.strip())
        vals = []
        for x in v.split(","):
            x = x.strip()
            try:
                vals.append(int(x))
            except ValueError:
                try:
                    vals.append(float(x))
                except ValueError:
                    vals.append(x)
        values.append(vals)
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


KP_KEYS = ("extractor", "max_side", "top_n", "matcher", "q_max_side", "q_top_n", "q_scales")


def shortlists(tracks: dict[str, Dataset], rank_dir: Path, methods: str, K: int, top_methods: int = 0):
    """(track, method, ids (n_q, <=1000), per-query cache keys) for the selected methods: the named ones, or
    per track the ``top_methods`` best first stages by Hard mAP (then Medium)."""
    for tname, ds in tracks.items():
        rankings = load_rankings(rank_dir, tname)
        qkeys = [query_key(q, ds.query_bbox(i)) for i, q in enumerate(ds.queries)]
        names = [m for m in rankings if not methods or m in methods.split(",")]
        if top_methods:
            gnd = track_gnd(ds)

            def key(m: str) -> tuple[float, float]:
                ev = summary(evaluate_all(list(rankings[m]), gnd))
                return (-np.nan_to_num(ev["H"], nan=-1.0), -np.nan_to_num(ev["M"], nan=-1.0))

            names = sorted(names, key=key)[:top_methods]
        for m in names:
            yield tname, ds, m, rankings[m], qkeys


def slug_point(point: dict[str, Any]) -> str:
    return "_".join(f"{k}{v}" for k, v in point.items())


def rerank_all(ids: np.ndarray, inl: np.ndarray, K: int, cfg: VerifyConfig) -> list[np.ndarray]:
    """Fused re-ranking of the top ``K`` of every query (first-stage score = -rank / K)."""
    out = []
    for qi in range(len(ids)):
        k = int((ids[qi, :K] >= 0).sum())
        s = -np.arange(k, dtype=np.float64) / max(k, 1)
        order = np.argsort(-fuse_scores(s, inl[qi, :k], cfg), kind="stable")
        out.append(np.concatenate([ids[qi, :k][order], ids[qi, k:]]))
    return out


def cmd_eval(args: argparse.Namespace) -> None:
    """Grid over keypoint settings (outer: extractor, max_side, top_n, matcher -- tentative matches computed
    once each, with no similarity floor) and fitting settings (inner: min_sim post-filter, thr, iters), then
    min_inliers x fusion swept on the inlier counts."""
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)
    tracks = load_tracks(DATA)
    if args.tracks:
        tracks = {t: tracks[t] for t in args.tracks.split(",")}
    rank_dir = Path(args.rankings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = parse_grid(args.grid)
    taus = [int(t) for t in args.taus.split(",")]
    K = args.k
    rows: list[dict[str, Any]] = []
    kp_points: dict[tuple, list[dict[str, Any]]] = {}
    for point in grid:
        kp_points.setdefault(tuple(point.get(k) for k in KP_KEYS), []).append(point)
    lists = list(shortlists(tracks, rank_dir, args.methods, K, args.top_methods))
    for kp_key, points in kp_points.items():
        p0 = points[0]
        kcfg = KeypointConfig(extractor=p0.get("extractor", "xfeat"), max_side=int(p0.get("max_side", 640)),
                              top_n=int(p0.get("top_n", 1024)), device="cpu")
        mname = p0.get("matcher", "mnn")
        matcher = build_matcher(MatcherConfig(name=mname, min_similarity=-1.0), "cpu",
                                load_keypoint_weights(mname) if mname != "mnn" else None)
        store: Any = IndexLocalsStore(args.index, kcfg.top_n) if kcfg.extractor == "cnn" else \
            KpStore(Path(args.cache), kcfg)
        qstore = store  # the query is extracted once at search time: it may use other settings
        if p0.get("q_max_side") or p0.get("q_top_n") or p0.get("q_scales"):
            qcfg = replace(kcfg, max_side=int(p0.get("q_max_side") or kcfg.max_side),
                           top_n=int(p0.get("q_top_n") or kcfg.top_n), scales=parse_scales(p0.get("q_scales")))
            qstore = KpStore(Path(args.cache), qcfg, cached_top_n=qcfg.top_n)
        matches: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        t_match, n_match = 0.0, 0
        for tname, ds, m, ids, qkeys in lists:
            for qi, qk in enumerate(qkeys):
                todo = [ds.images[j] for j in ids[qi, :K] if j >= 0 and (qk, ds.images[j]) not in matches]
                if todo:
                    t = time.perf_counter()
                    if mname == "mnn":  # no floor, no ratio test: both are applied per fitting setting
                        res = mutual_nn_matches_many(qstore[qk].descriptors, [store[i].descriptors for i in todo],
                                                     -1.0, return_ratio=True)
                    else:
                        res = [(p_, c_, np.zeros(len(c_), np.float32))
                               for p_, c_ in matcher.match_many(qstore[qk], [store[i] for i in todo])]
                    t_match += time.perf_counter() - t
                    n_match += len(todo)
                    for i, r in zip(todo, res):
                        matches[(qk, i)] = r
        ms_match = 1000 * t_match / max(n_match, 1)
        print(f"[match] {dict(zip(KP_KEYS, kp_key))}: {n_match} pairs, {ms_match:.2f} ms/pair", flush=True)
        for point in points:
            vcfg = VerifyConfig(ransac_threshold=float(point.get("thr", 8.0)), min_inliers=args.fit_floor,
                                max_iters=int(point.get("iters", 2000)), shortlist=K)
            min_sim = float(point.get("min_sim", 0.82 if mname == "mnn" else -1.0))
            inl_memo: dict[tuple[str, str], int] = {}
            t_fit = 0.0
            t0 = time.perf_counter()
            max_ratio = float(point.get("ratio", 1.0))
            for (qk, iid), (pairs, conf, ratio) in matches.items():
                keep = (conf >= min_sim) & (ratio <= max_ratio)
                pr = pairs[keep]
                t = time.perf_counter()
                pcfg = vcfg
                if point.get("thr_px") == "extraction":
                    # threshold in pixels of the keypoint extraction's input (the database image at most
                    # max_side), turned into the database image's original pixels
                    side = max(store[iid].image_size)
                    pcfg = replace(vcfg, ransac_threshold=vcfg.ransac_threshold * max(1.0, side / kcfg.max_side))
                _, _, mask = fit_geometry(qstore[qk].xy[pr[:, 0]], store[iid].xy[pr[:, 1]], pcfg)
                t_fit += time.perf_counter() - t
                inl_memo[(qk, iid)] = int(mask.sum())
            ms_fit = 1000 * t_fit / max(len(matches), 1)
            print(f"[fit] {json.dumps(point)}: {len(matches)} pairs, {ms_fit:.2f} ms/pair "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            for tname, ds, m, ids, qkeys in lists:
                gnd = track_gnd(ds)
                inl = np.zeros((len(ids), K), dtype=np.int64)
                for qi, qk in enumerate(qkeys):
                    short = [ds.images[j] for j in ids[qi, :K] if j >= 0]
                    inl[qi, :len(short)] = [inl_memo[(qk, i)] for i in short]
                row = {"track": tname, "method": m, **point, "K": K, "ms_match_pair": ms_match,
                       "ms_fit_pair": ms_fit, "base": summary(evaluate_all(list(ids), gnd))}
                for fusion, tau in itertools.product(("tiered", "additive"), taus):
                    fcfg = replace(vcfg, fusion=fusion, min_inliers=tau, fusion_weight=args.weight,
                                   inlier_cap=args.cap)
                    row[f"{fusion}@{tau}"] = summary(evaluate_all(rerank_all(ids, inl, K, fcfg), gnd))
                # upper bound of any re-ranking of the top K: its positives (medium) first, in rank order
                oracle = []
                for qi in range(len(ids)):
                    k = int((ids[qi, :K] >= 0).sum())
                    okset = set(gnd[qi]["easy"].tolist()) | set(gnd[qi]["hard"].tolist())
                    first = [j for j in ids[qi, :k] if j in okset]
                    rest = [j for j in ids[qi, :k] if j not in okset]
                    oracle.append(np.concatenate([np.asarray(first + rest, np.int64), ids[qi, k:]]))
                row["oracle"] = summary(evaluate_all(oracle, gnd))
                np.savez(out / f"inliers_{slug_point(point)}_{tname}_{m}.npz", inliers=inl, ids=ids[:, :K])
                # how separable are positives from negatives by inliers (medium protocol positives)
                pos = [inl[qi, r] for qi in range(len(ids)) for r in range(K) if ids[qi, r] >= 0 and
                       (ids[qi, r] in set(gnd[qi]["easy"].tolist()) | set(gnd[qi]["hard"].tolist()))]
                neg = [inl[qi, r] for qi in range(len(ids)) for r in range(K) if ids[qi, r] >= 0 and
                       ids[qi, r] not in set(gnd[qi]["easy"].tolist()) | set(gnd[qi]["hard"].tolist()) |
                       set(gnd[qi]["junk"].tolist())]
                row["inliers_pos_pct"] = np.percentile(pos, [5, 10, 25, 50]).tolist() if pos else []
                row["inliers_neg_pct"] = np.percentile(neg, [50, 99, 99.9, 100]).tolist() if neg else []
                rows.append(row)
                best = max((k for k in row if "@" in k), key=lambda k: row[k]["H"])
                print(f"{tname:17s} {m:24s} oracle@{K} {row['oracle']}")
                print(f"{tname:17s} {m:24s} {json.dumps(point)}  base {row['base']}  tiered@15 "
                      f"{row.get('tiered@15')}  best {best} {row[best]}  pos p5/p10 "
                      f"{row['inliers_pos_pct'][:2]} neg p99/p99.9/max {row['inliers_neg_pct'][1:]}", flush=True)
            with open(out / "rows.json", "w") as f:
                json.dump(rows, f, indent=1)


def cmd_dev_rankings(args: argparse.Namespace) -> None:
    """Development first-stage rankings from an index's ``globals`` table (cosine on stored descriptors; a
    query uses its own uncropped image's descriptor, so boxed queries are not cropped here)."""
    tracks = load_tracks(DATA)
    methods = args.dev_methods.split(",")
    desc: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    for f in TableStore(args.index).committed_files("globals"):
        t = read_parquet(f)
        ids, meth = t.column("image_id").to_pylist(), t.column("method").to_pylist()
        d = descriptors_to_numpy(t.column("descriptor"))
        for i, m, v in zip(ids, meth, d):
            if m in desc:
                desc[m][i] = v / max(np.linalg.norm(v), 1e-12)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for tname, ds in tracks.items():
        arrays = {}
        for m in methods:
            dim = len(next(iter(desc[m].values())))
            X = np.stack([desc[m].get(i, np.zeros(dim, np.float32)) for i in ds.images])
            Q = np.stack([desc[m].get(q, np.zeros(dim, np.float32)) for q in ds.queries])
            S = Q @ X.T
            arrays[f"dev_{m}"] = np.argsort(-S, axis=1, kind="stable")[:, :1000].astype(np.int64)
            print(tname, m, summary(evaluate_all(list(arrays[f"dev_{m}"]), track_gnd(ds))), flush=True)
        np.savez(out / f"{tname}.npz", **arrays)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--extractor", default="xfeat")
    e.add_argument("--max-side", type=int, default=640)
    e.add_argument("--top-n", type=int, default=1024)
    e.add_argument("--cache", default="/work/runs/kp_cache")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--only", help="file listing cache keys to extract (default: every image of every track)")
    e.add_argument("--queries-only", action="store_true", help="only the queries of the three tracks")
    e.add_argument("--scales", default="", help="e.g. 1+0.5 (multipliers of --max-side)")
    v = sub.add_parser("eval")
    v.add_argument("--rankings", default="/work/runs/bench_before/rankings")
    v.add_argument("--out", default="/work/runs/sv_eval")
    v.add_argument("--cache", default="/work/runs/kp_cache")
    v.add_argument("--methods", default="", help="comma-separated method slugs (default: all)")
    v.add_argument("--tracks", default="", help="comma-separated tracks (default: root,in-photos,no-box)")
    v.add_argument("--top-methods", type=int, default=0, help="per track, the N best first stages (Hard mAP)")
    v.add_argument("--index", default="/work/runs/bench_before/index", help="index run whose locals table "
                   "the cnn extractor reads")
    v.add_argument("--grid", default="extractor=xfeat;max_side=640;top_n=1024;matcher=mnn;min_sim=0.82;thr=8")
    v.add_argument("--taus", default="8,10,12,15,20,25,30")
    v.add_argument("--k", type=int, default=100)
    v.add_argument("--fit-floor", type=int, default=6)
    v.add_argument("--weight", type=float, default=1.0, help="additive fusion weight (rank score in (-1, 0])")
    v.add_argument("--cap", type=int, default=50, help="additive fusion inlier cap")
    v.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("dev-rankings")
    r.add_argument("--index", default="/work/runs/bench_before/index")
    r.add_argument("--dev-methods", default="gem,mac,fs_egm_sum")
    r.add_argument("--out", default="/work/runs/sv_dev_rankings")
    args = p.parse_args()
    {"extract": cmd_extract, "eval": cmd_eval, "dev-rankings": cmd_dev_rankings}[args.cmd](args)


if __name__ == "__main__":
    main()
