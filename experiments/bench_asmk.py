"""ASMK benchmark: our ASMK* against the reference ``asmk`` package (when installed), plus the regional variants.

    python -m experiments.bench_asmk [--config configs/benchmark.yaml] [--data DIR] [--tracks root in-photos no-box]
                                     [--max-side 640] [--k 1024] [--query-ma 5] [--threads 1] [--repeats 3]
                                     [--distractors N] [--asmk-path DIR] [--json out.json]

1. Local features (``experiments.asmk_data``; cached under ``--cache``, one entry per image or query crop,
   shared by the tracks) computed by the extract stage's function with the config's ``extract`` section:
   ``local_features`` strongest positions over ``local_scales`` at ``max_side``, PCA to ``local_dim`` learnt
   on ``local_pca_images`` database images of the first track, and the ``asmk.region_source`` boxes (FS.EGM by
   default) for the regional variants. Queries with a box are cropped to it (Revisited-Oxford protocol).
   Databases hold every distractor unless ``--distractors N`` keeps N random ones.
2. One k-means codebook (``asmk.codebook_size`` words, ``pipeline.codebook``, trained on a sample of
   ``asmk.codebook_sample`` descriptors of the first track's database) and one FAISS quantisation (database
   ``asmk.multiple_assignment``, queries ``asmk.query_multiple_assignment`` nearest words) feed BOTH
   implementations: the same descriptors, codebook and word ids.
3. ASMK* with the reference package (optional: see ``experiments.asmk_reference``; skipped with a message when
   it is not importable) and with ``pipeline.asmk``: mAP (Easy / Medium / Hard, ``pipeline.evaluation``), score
   agreement, index sizes, and times measured in this run, interleaved, best of ``--repeats``, with the same
   thread count (``--threads``, fixed for BLAS / OpenMP / FAISS / torch before they load); targets: mAP within
   0.5 and ours at least 5x faster, printed OK / FAIL:
   * build = aggregation + inverted file of the database, given the word ids;
   * query = aggregation + scoring + full ranking of all queries, given the word ids (ours from an index whose
     derived per-index arrays are recomputed every time).
4. Our other kernels of ``pipeline.asmk.KERNEL_CONFIGS`` on the same words: the config's ``asmk.kernels`` (by
   default D2R-ASMK*, max and average pooling, and R-ASMK*, seed 002 eq. 3-4 and 9) over the region source,
   with mAP Medium / Hard and database bytes relative to our ASMK*. ``--grid-levels`` adds the regional kernels
   over R-MAC grid boxes, ``--more-variants`` every other kernel of ``KERNEL_CONFIGS``.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # BLAS / OpenMP threads must be fixed before numpy and faiss load
    _t = "1"
    for _i, _a in enumerate(sys.argv):
        if _a == "--threads" and _i + 1 < len(sys.argv):
            _t = sys.argv[_i + 1]
        elif _a.startswith("--threads="):
            _t = _a.split("=", 1)[1]
    for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_v] = _t

import argparse  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

from experiments.asmk_data import (TRACKS, Features, Track, feature_config, image_key, load_features,  # noqa: E402
                                   load_tracks)
from experiments.asmk_reference import (Reference, import_reference, reference_asmk_star, reference_nbytes,  # noqa: E402
                                        same_words)
from experiments.asmk_report import print_summary, print_track  # noqa: E402
from experiments.common import (CACHE_ROOT, DEFAULT_DATA, add_config_args, check_data, config_from_args,  # noqa: E402
                                set_threads, write_json)
from pipeline.asmk import KERNEL_CONFIGS, InvertedFile, aggregate_queries, build_index, kernel_config  # noqa: E402
from pipeline.codebook import assign, train_codebook  # noqa: E402
from pipeline.config import IndexConfig  # noqa: E402
from pipeline.evaluation import PROTOCOLS, compute_map, protocol_gnd  # noqa: E402
from pipeline.pooling import rmac_grid  # noqa: E402
from pipeline.regions import cells_to_pixels  # noqa: E402

PARITY_TOL = 0.5  # mAP points
SPEEDUP_GOAL = 5.0


def evaluate(rankings: list[np.ndarray], gnd: list[dict]) -> dict[str, float]:
    """mAP (in %) for Easy / Medium / Hard (``pipeline.evaluation``)."""
    return {p: 100 * compute_map(rankings, protocol_gnd(gnd, p))[0] for p in PROTOCOLS}


def label(kernel: str) -> str:
    """Display name of a kernel of ``KERNEL_CONFIGS`` (``d2r_asmk_star`` -> ``D2R-ASMK*``)."""
    return kernel.upper().replace("_STAR", "*").replace("NAIVE", "Naive").replace("_", "-")


def grid_boxes(image_hw: np.ndarray, feat_hw: np.ndarray, levels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """R-MAC grid boxes (without the whole image, which pipeline.asmk adds) in pixels, per database image."""
    boxes, owner = [], []
    for i, (ihw, fhw) in enumerate(zip(image_hw, feat_hw)):
        b = rmac_grid(int(fhw[0]), int(fhw[1]), levels=levels, include_full=False)
        boxes.append(cells_to_pixels(b, (int(fhw[0]), int(fhw[1])), (int(ihw[0]), int(ihw[1]))))
        owner.append(np.full(len(b), i))
    return np.concatenate(boxes), np.concatenate(owner)


def full_scores(index: InvertedFile, S: np.ndarray, q_present: np.ndarray, nq: int, ndb: int) -> np.ndarray:
    """(nq, ndb) scores with rows/columns at query / database positions (images without descriptors score 0,
    as in the reference, whose score vector covers every image id)."""
    out = np.zeros((nq, ndb))
    out[np.ix_(q_present, index.images())] = S
    return out


def rankings(S_full: np.ndarray) -> list[np.ndarray]:
    return list(np.argsort(-S_full, axis=1, kind="stable"))


def interleaved_best_of(fns: dict[str, Callable], repeats: int) -> tuple[dict[str, float], dict]:
    """Run each callable ``repeats`` times, alternating between them (so slow phases of a shared machine hit
    both alike); return the best time of each and its last output."""
    best = {k: float("inf") for k in fns}
    out: dict = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k] = None
            gc.collect()
            t = time.perf_counter()
            out[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best, out


class TrackData:
    """One track's database / query descriptors and words, positions in the score matrix."""

    def __init__(self, track: Track, F: Features, words_db: np.ndarray, C: np.ndarray, query_ma: int) -> None:
        self.track, self.C = track, C
        self.db = F.gather([image_key(i) for i in track.imlist])
        self.q = F.gather(track.q_keys)
        self.db_words = words_db[self.db["rows"]]
        t = time.perf_counter()
        self.q_words = assign(self.q["des"], C, query_ma)[0]
        self.quantize_queries_s = time.perf_counter() - t
        self.nq, self.ndb, self.gnd = len(track.qimlist), len(track.imlist), track.gnd
        self.q_present = np.unique(self.q["ids"])

    def build(self, name: str, boxes: np.ndarray | None = None, owner: np.ndarray | None = None) -> InvertedFile:
        return build_index(self.db["des"], self.db_words, self.db["ids"], self.C, kernel_config(name),
                           self.db["xy"], boxes, owner)

    def query(self, index: InvertedFile, pooling: str = "max") -> tuple[np.ndarray, list[np.ndarray]]:
        agg = aggregate_queries(self.q["des"], self.q_words, self.q["ids"], self.C, index)
        S = full_scores(index, index.image_scores(agg, pooling), self.q_present, self.nq, self.ndb)
        return S, rankings(S)


def compare_reference(ref: Reference, td: TrackData, cfg: IndexConfig, fns_build: dict, fns_query: dict) -> dict:
    """Register the reference's timed build / query next to ours; its own quantisation must give our words."""
    t = time.perf_counter()
    same_q = same_words(ref, td.C, td.q["des"], td.q_words, cfg.asmk.query_multiple_assignment)
    alpha = kernel_config("asmk_star").alpha
    build, query, state = reference_asmk_star(ref, td.C, (td.db["des"], td.db_words, td.db["ids"]),
                                              (td.q["des"], td.q_words, td.q["ids"]), alpha)
    fns_build["asmk"], fns_query["asmk"] = build, query
    return {"state": state, "reference_quantize_queries_s": time.perf_counter() - t,
            "same_query_words_as_reference_quantize": bool(same_q)}


def parity(res: dict, td: TrackData, outq: dict, tb: dict, tq: dict, state: dict, S_ours: np.ndarray,
           R_ours: list[np.ndarray]) -> None:
    """Reference mAP, score / top-10 agreement, sizes and speed-ups, into ``res``."""
    q_order, R_ref, scores_ref = outq["asmk"]
    ref_lists = [np.empty(0, dtype=np.int64)] * td.nq
    for qi, r in zip(q_order, R_ref):
        ref_lists[int(qi)] = r
    map_ref = evaluate(ref_lists, td.gnd)
    used, alloc = reference_nbytes(state["ivf"])
    S_ref = np.zeros((td.nq, td.ndb))
    S_ref[q_order[:, None], R_ref] = scores_ref
    same_top10 = float(np.mean([np.array_equal(R_ref[i][:10], R_ours[qi][:10]) for i, qi in enumerate(q_order)]))
    dm = {p: res["ours"]["map"][p] - map_ref[p] for p in map_ref}
    res["reference"] = {"build_s": tb["asmk"], "query_s": tq["asmk"], "nbytes": used, "nbytes_allocated": alloc,
                        "nnz": int(state["ivf"].counts.sum()), "map": map_ref}
    res["parity"] = {"map_diff": dm, "ok": bool(all(abs(v) <= PARITY_TOL for v in dm.values() if not np.isnan(v))),
                     "max_abs_score_diff": float(np.abs(S_ours - S_ref).max()), "same_top10_fraction": same_top10}
    res["speedup"] = {"build": tb["asmk"] / tb["ours"], "query": tq["asmk"] / tq["ours"]}


def asmk_star(td: TrackData, ref: Reference | None, cfg: IndexConfig, repeats: int, res: dict) -> InvertedFile:
    """Our ASMK* (and the reference's, when given), timed interleaved; fills ``res['ours']`` and the parity."""
    index = td.build("asmk_star")
    arrays = index.to_arrays()

    def ours_query():  # a fresh index object: its derived arrays (gamma, idf, kernel table) are recomputed
        return td.query(InvertedFile.from_arrays(arrays))

    fns_build, fns_query = {"ours": lambda: td.build("asmk_star")}, {"ours": ours_query}
    extra = compare_reference(ref, td, cfg, fns_build, fns_query) if ref is not None else {}
    tb, _ = interleaved_best_of(fns_build, repeats)
    tq, outq = interleaved_best_of(fns_query, repeats)
    S_ours, R_ours = outq["ours"]
    res["ours"] = {"build_s": tb["ours"], "query_s": tq["ours"], "nbytes": index.nbytes(), "nnz": index.nnz,
                   "map": evaluate(R_ours, td.gnd)}
    if ref is not None:
        res.update({k: v for k, v in extra.items() if k != "state"})
        parity(res, td, outq, tb, tq, extra["state"], S_ours, R_ours)
    return index


def variant_row(td: TrackData, name: str, pooling: str, source: str, built: dict, base: InvertedFile,
                boxes: np.ndarray | None = None, owner: np.ndarray | None = None) -> dict:
    """mAP, size and (single, untimed-quality) times of one kernel on the track's words."""
    t = time.perf_counter()
    if name not in built:
        built[name] = td.build(name, boxes, owner)
    idx = built[name]
    tb = time.perf_counter() - t
    t = time.perf_counter()
    _, R = td.query(idx, pooling)
    tq = time.perf_counter() - t
    return {"kernel": name, "pooling": pooling, "source": source, "map": evaluate(R, td.gnd),
            "nbytes": idx.nbytes(), "nnz": idx.nnz, "n_items": idx.n_items, "size_rel": idx.nbytes() / base.nbytes(),
            "vectors_rel": idx.nnz / base.nnz, "build_s": tb, "query_s": tq,
            "method": f"{label(name)}{' ' + pooling if name.startswith('d2r') else ''}"}


def kernels_to_run(cfg: IndexConfig, more: bool) -> tuple[list[str], list[str]]:
    """(image-level, regional) kernels: the config's ``asmk.kernels`` (+ every other with ``--more-variants``)."""
    names = list(KERNEL_CONFIGS) if more else list(cfg.asmk.kernels)
    plain = [n for n in names if kernel_config(n).regional == "none" and n != "asmk_star"]
    regional = [n for n in names if kernel_config(n).regional != "none"]
    return plain, regional


def run_variants(td: TrackData, index: InvertedFile, cfg: IndexConfig, args: argparse.Namespace, res: dict
                 ) -> list[dict]:
    """ASMK* and every other kernel to run, over the region source and the requested grids."""
    plain_names, regional = kernels_to_run(cfg, args.more_variants)
    plain: dict = {"asmk_star": index}
    rows = [{**variant_row(td, "asmk_star", "max", "", plain, index), "build_s": res["ours"]["build_s"],
             "query_s": res["ours"]["query_s"], "timed": True}]
    rows += [variant_row(td, n, "max", "", plain, index) for n in plain_names]
    sources = [(cfg.asmk.region_source, td.db["boxes"], td.db["box_image"])]
    sources += [(f"grid L{lv}", *grid_boxes(td.db["image_hw"], td.db["feat_hw"], lv)) for lv in args.grid_levels]
    res["regions_per_image"] = {}
    for src, boxes, owner in sources:
        rpi = 1 + len(boxes) / td.ndb
        res["regions_per_image"][src] = rpi
        built: dict = {}
        for name in regional:
            for pooling in (("max", "avg") if kernel_config(name).regional == "d2r" else ("max",)):
                row = variant_row(td, name, pooling, src, built, index, boxes, owner)
                row["method"] += f" ({src}, {rpi:.2f} regions/image)"
                rows.append(row)
    return rows


def run_track(args: argparse.Namespace, cfg: IndexConfig, track: Track, F: Features, C: np.ndarray,
              words_db: np.ndarray, ref: Reference | None) -> dict:
    """Parity, timings and variants on one track; ``words_db``: the database words of every row of ``F.des``."""
    td = TrackData(track, F, words_db, C, cfg.asmk.query_multiple_assignment)
    res: dict = {"track": track.name, "n_db_images": td.ndb, "database": track.composition(), "n_queries": td.nq,
                 "n_q_cropped": sum(g.get("bbx") is not None for g in td.gnd), "n_db_des": len(td.db["des"]),
                 "n_q_des": len(td.q["des"]), "quantize_queries_s": td.quantize_queries_s}
    print(f"\n=== track {track.name}: {td.ndb} database images ({track.composition()}), {td.nq} queries "
          f"({res['n_q_cropped']} cropped to their box); {len(td.db['des']):,} database and {len(td.q['des']):,} "
          f"query descriptors", flush=True)
    index = asmk_star(td, ref, cfg, args.repeats, res)
    res["variants"] = run_variants(td, index, cfg, args, res)
    print_track(args, res, PARITY_TOL, SPEEDUP_GOAL)
    return res


def codebook(F: Features, tracks: list[Track], cfg: IndexConfig, cache: Path) -> np.ndarray:
    """``asmk.codebook_size`` words trained on a sample (``asmk.codebook_sample``) of the first track's
    database descriptors, as the asmk stage does; cached."""
    des = F.gather([image_key(i) for i in tracks[0].imlist])["des"]
    k, n = cfg.asmk.codebook_size, min(cfg.asmk.codebook_sample, len(des))
    path = cache / f"codebook_k{k}_{des.shape[1]}_{len(des)}_{n}_{tracks[0].name}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return z["centroids"]
    t = time.perf_counter()
    sample = des[np.sort(np.random.default_rng(0).choice(len(des), n, replace=False))]
    C = train_codebook(sample, min(k, n), seed=0, gpu=False)
    np.savez(path, centroids=C)
    print(f"[codebook] k={len(C)} from {n:,} descriptors of track {tracks[0].name} in {time.perf_counter() - t:.0f}s",
          flush=True)
    return C


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_config_args(ap)
    ap.add_argument("--tracks", nargs="+", default=list(TRACKS), choices=list(TRACKS))
    ap.add_argument("--cache", type=Path, default=CACHE_ROOT / "bench_asmk")
    ap.add_argument("--chunk", type=int, default=250, help="images per feature-cache file")
    ap.add_argument("--max-side", type=int, default=None, help="sets extract.max_side")
    ap.add_argument("--k", type=int, default=None, help="sets asmk.codebook_size")
    ap.add_argument("--query-ma", type=int, default=None, help="sets asmk.query_multiple_assignment")
    ap.add_argument("--distractors", type=int, default=None,
                    help="keep only this many distractors (random, seed 0, the same in every track); default all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grid-levels", type=int, nargs="*", default=[],
                    help="also run the regional kernels over R-MAC grid boxes with these levels")
    ap.add_argument("--more-variants", action="store_true", help="every kernel of pipeline.asmk.KERNEL_CONFIGS")
    ap.add_argument("--asmk-path", default=None, help="folder holding the reference asmk package (optional)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--features-only", action="store_true", help="extract and cache the features, then stop")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--limit", type=int, nargs=2, default=None, metavar=("DB", "Q"),
                    help="smoke test: first DB database images and Q queries of each track (mAP not comparable)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    cfg = config_from_args(args, extract__max_side=args.max_side, asmk__codebook_size=args.k,
                           asmk__query_multiple_assignment=args.query_ma)
    fcfg = feature_config(cfg.extract, cfg.asmk.region_source)
    data = check_data(args.data)
    cache = args.cache / (f"limit_{args.limit[0]}_{args.limit[1]}" if args.limit else "full")
    t_start = time.perf_counter()
    tracks = load_tracks(data, args.tracks, tuple(args.limit) if args.limit else None, args.distractors)
    pool = load_tracks(data, [tracks[0].name], tuple(args.limit) if args.limit else None, None)[0].imlist
    F = load_features(data, tracks, pool, fcfg, cache, args.chunk, args.threads)
    print(f"[features] {len(F.keys)} images / query crops, {len(F.des):,} descriptors of dimension {F.des.shape[1]}, "
          f"{len(F.boxes):,} {cfg.asmk.region_source} boxes ({time.perf_counter() - t_start:.0f}s)", flush=True)
    if args.features_only:
        return 0
    C = codebook(F, tracks, cfg, cache)
    ref = None if args.skip_reference else import_reference(args.asmk_path)
    words_db = assign(F.des, C, cfg.asmk.multiple_assignment)[0]  # shared by the tracks
    res: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "config": cfg.to_dict(), "k": len(C),
                 "dim": int(F.des.shape[1]), "reference": ref.version if ref else None, "tracks": []}
    if ref is not None:
        res["same_db_words_as_reference_quantize"] = same_words(ref, C, F.des, words_db, cfg.asmk.multiple_assignment)
        print(f"[quantise] the reference's Codebook.quantize gives the same database words: "
              f"{res['same_db_words_as_reference_quantize']}", flush=True)
    print(f"\nsettings: {fcfg.backbone}, max side {fcfg.max_side}, local scales {list(fcfg.local_scales)}, top "
          f"{fcfg.n_locals} locals/image, PCA {F.des.shape[1]}; k={len(C)} words; database "
          f"{cfg.asmk.multiple_assignment}-NN, query {cfg.asmk.query_multiple_assignment}-NN assignment; "
          f"{args.threads} thread(s); {'LIMITED smoke run; ' if args.limit else ''}reference: "
          f"{ref.version if ref else 'not installed'}")
    for tr in tracks:
        res["tracks"].append(run_track(args, cfg, tr, F, C, words_db, ref))
    print_summary(args, res["tracks"], cfg.asmk.region_source)
    res["wall_s"] = time.perf_counter() - t_start
    print(f"\nwall time {res['wall_s']:.0f}s", flush=True)
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
