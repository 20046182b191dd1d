"""The benchmark's evaluation: every method over every track, ranked through :class:`SearchService`.

Queries are encoded once (cached as ``.npz``), every (method, track) is ranked by the same service users
query, restricted to the track's database, and evaluated with the Revisited-Oxford protocol
(:mod:`pipeline.evaluation`). Synthetic distractor tracks append generated descriptors to a copy of the
method's index (:meth:`service.indexes.LoadedIndex.extended`), so they too rank through the service.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.asmk import KERNEL_CONFIGS
from pipeline.descriptors import FINAL_METHODS
from pipeline.distractors import calibrate_noise, negative_pool, synthetic_globals, synthetic_regions_chunk, \
    SYNTH_CHUNK
from pipeline.evaluation import PROTOCOLS, evaluate_all, mean_pr_curve, protocol_gnd
from pipeline.ranking import FULL_RANK_MAX, RegionSet, best_region, rank_depth
from service.encoder import QueryDescriptors, crop
from service.search import PATCHES, REGIONAL_SOURCES, MethodSpec, Ranking, SearchService, is_sv, parse_method
from service.verify import query_key as sv_query_key
from service.tracks import Track, label_of
from storage.arrays import load_arrays, save_arrays
from storage.images import decode_image
from storage.readers import read_regions
from storage.uri import exists, join, read_bytes

# the classic poolings ("global baseline")
BASELINES = ("mac", "gem", "spoc", "crow", "cam_ofa", "cam_ofa_sum", "rmac")
ASMK_ORDER = ("asmk_star", "d2r_asmk_star", "r_asmk_star")
PR_CURVES = 8           # methods drawn in a track's precision-recall plot


def default_methods(available: Iterable[str], diffusion: Iterable[str] = ()) -> list[str]:
    """Every method the index supports, in report order; ``diffusion``: the methods with a published offline
    diffusion graph (``SearchService.diffusion_methods``)."""
    have = set(available) | {f"diffusion_{m}" for m in diffusion}
    g = [m for m in FINAL_METHODS if m in have]
    out = list(g)
    out += [f"{m}+aqe" for m in ("gem", "os_egm") if m in g]
    for m in ("gem", "os_egm"):  # seed 001's diffusion where its graph was published, and the local variant
        if m in g:
            out += ([f"{m}+diffusion"] if f"diffusion_{m}" in have else []) + [f"{m}+local_diffusion"]
    if "cam_ofa" in g and "regional:cam" in have:  # seed 004's CAM-box re-ranking of its own first ranking
        out.append("cam_ofa+cam")
    for s in REGIONAL_SOURCES:
        if f"regional:{s}" in have:
            out += [f"regional:{s}", f"regional:{s}@full"]
    out += [k for k in ASMK_ORDER if k in have] + sorted(k for k in have if k in KERNEL_CONFIGS and k not in ASMK_ORDER)
    if PATCHES in have:
        out.append(PATCHES)
    return out


def encode_queries(service: SearchService, items: dict[str, tuple[str, Any]], cache_dir: str, reuse: bool,
                   every: float = 5.0, patches: bool = False, keypoints: bool = False
                   ) -> tuple[dict[str, QueryDescriptors], float]:
    """Encode every ``key -> (path, bbox)`` query (progress lines: queries/s, ETA); cached encodings are read
    back with ``reuse`` (their time is not counted). ``patches`` / ``keypoints``: with the query patches of the
    ``patches`` method / the keypoints of ``+sv`` (a cached encoding without them is redone). Returns descriptors
    by key and the encoding seconds."""
    out: dict[str, QueryDescriptors] = {}
    todo = []
    for key in items:
        uri = join(cache_dir, f"{key}.npz")
        q = QueryDescriptors.from_arrays(load_arrays(uri)) if reuse and exists(uri) else None
        if q is not None and (q.has_patches or not patches) and (q.has_keypoints or not keypoints):
            out[key] = q
        else:
            todo.append(key)
    if out:
        print(f"[queries] {len(out)} encodings read from the cache", flush=True)
    t0 = last = time.time()
    spent = 0.0
    for n, key in enumerate(todo, 1):
        path, bbox = items[key]
        t = time.time()
        q = service.encode(read_bytes(path), bbox, patches=patches, keypoints=keypoints)
        q.image = None  # the keypoints are extracted: no need to hold every query's pixels
        spent += time.time() - t
        save_arrays(join(cache_dir, f"{key}.npz"), **q.to_arrays())
        out[key] = q
        now = time.time()
        if now - last >= every or n == len(todo):
            last = now
            rate = n / max(now - t0, 1e-9)
            eta = time.strftime("%H:%M:%S", time.gmtime((len(todo) - n) / rate)) if rate > 0 else "--:--:--"
            print(f"[queries] {n}/{len(todo)} encoded ({100.0 * n / len(todo):5.1f}%) {rate:5.2f} queries/s "
                  f"ETA {eta}", flush=True)
    return out, spent


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
    """Runs methods over tracks through one :class:`SearchService`; state shared between methods."""

    def __init__(self, service: SearchService, tracks: list[Track], union_ids: list[str | None],
                 qdesc: dict[str, QueryDescriptors], qkeys: dict[str, list[str]], topk: int = 0, seed: int = 0,
                 build_seconds: dict[str, float] | None = None) -> None:
        self.service, self.tracks, self.qdesc, self.qkeys = service, tracks, qdesc, qkeys
        self.union_ids = union_ids
        self.topk, self.seed = topk, seed
        self.build_seconds = build_seconds or {}
        self._region_rows: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.noise_info: dict[str, Any] = {}
        self.verify_info: dict[str, Any] = {}   # the +sv shortlists' verification (pairs, Ray tasks, seconds)

    # -------------------------------------------------------------- track <-> index ids
    def track_ids(self, t: Track) -> list[str | None]:
        """Index image id of each database image of the track (None when it was not indexed)."""
        return [self.union_ids[u] if u >= 0 else None for u in t.db_union]

    def allowed(self, t: Track) -> list[str]:
        return [i for i in self.track_ids(t) if i is not None]

    def to_track(self, t: Track, rankings: Sequence[Ranking], depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Rankings of index image ids -> (track indices, scores), (nq, depth), -1 / -inf padded.
        Synthetic ids ``synthetic:<j>`` become ``n_db + j``."""
        pos = {i: k for k, i in enumerate(self.track_ids(t)) if i is not None}
        I = np.full((len(rankings), depth), -1, np.int64)
        D = np.full((len(rankings), depth), -np.inf, np.float32)
        for r, rk in enumerate(rankings):
            ids = [pos[i] if i in pos else t.n_db + int(i.split(":", 1)[1]) for i in rk.image_ids[:depth]]
            I[r, :len(ids)], D[r, :len(ids)] = ids, rk.scores[:len(ids)]
        return I, D

    def queries(self, t: Track) -> list[QueryDescriptors]:
        return [self.qdesc[k] for k in self.qkeys[t.name]]

    def index_bytes(self, spec: MethodSpec) -> int:
        if spec.family == "asmk":
            a = self.service.asmk(spec.base)
            return int(a.index.nbytes() + a.codebook.nbytes)
        return self.service.index(spec).nbytes

    # -------------------------------------------------------------- methods
    def run(self, t: Track, spec: MethodSpec) -> Result:
        """Rank the track's queries with ``spec`` over the track's database (plus synthetic distractors)."""
        if t.synthetic:
            return self._run_synthetic(t, spec)
        depth = rank_depth(t.n_db, self.topk)
        t0 = time.time()
        rankings = self.service.rank(self.queries(t), spec, depth=depth, allowed=self.allowed(t))
        I, D = self.to_track(t, rankings, depth)
        return Result(I, D, self.build_seconds.get(spec.index_name, 0.0), time.time() - t0, self.index_bytes(spec))

    def _run_synthetic(self, t: Track, spec: MethodSpec) -> Result:
        idx = self.service.index(spec)
        allowed = self.allowed(t)
        rows = idx.rows(allowed)
        neg = idx.rows([self.track_ids(t)[i] for i in negative_pool(t.gnd(), t.n_db) if self.track_ids(t)[i]])
        key = f"{t.base}/{spec.index_name}"
        if spec.family == "global":
            X = idx.vectors()[rows]
            pool = idx.vectors()[neg] if len(neg) >= 2 else X
            if key not in self.noise_info:
                noise, target, got = calibrate_noise(pool, X, seed=self.seed)
                self.noise_info[key] = {"noise": noise, "target_nn_cos": target, "synthetic_nn_cos": got,
                                        "pool": int(len(pool))}
            ext = idx.extended(synthetic_globals(pool, t.synthetic, self.noise_info[key]["noise"], self.seed))
        else:
            rs = idx.region_set(allowed)
            in_pool = np.isin(rs.image, neg)
            in_pool = in_pool if in_pool.sum() >= 2 else np.ones(len(rs.X), bool)
            if key not in self.noise_info:
                noise, target, got = calibrate_noise(rs.X[in_pool], rs.X, rs.image[in_pool], rs.image, seed=self.seed)
                self.noise_info[key] = {"noise": noise, "target_nn_cos": target, "synthetic_nn_cos": got,
                                        "pool": int(in_pool.sum())}
            parts = [synthetic_regions_chunk(rs, neg, c // SYNTH_CHUNK, min(SYNTH_CHUNK, t.synthetic - c),
                                             self.noise_info[key]["noise"], self.seed)
                     for c in range(0, t.synthetic, SYNTH_CHUNK)]
            Xs = np.concatenate([p[0] for p in parts])
            img = np.concatenate([p[1] + c * SYNTH_CHUNK for c, p in enumerate(parts)])
            ext = idx.extended(Xs, img)
        depth = rank_depth(t.n_db + t.synthetic, self.topk)
        t0 = time.time()
        synth = [f"synthetic:{j}" for j in range(t.synthetic)]
        rankings = self.service.rank(self.queries(t), spec, depth=depth, allowed=allowed + synth, index=ext)
        I, D = self.to_track(t, rankings, depth)
        return Result(I, D, 0.0, time.time() - t0, int(ext.vectors().nbytes))

    def regions_of(self, source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """image id -> (pixel boxes, whitened descriptors) of a region source, read once per source (the report's
        example pictures ask for a few hundred images; reading the table per image took most of the run)."""
        if source not in self._region_rows:
            white = self.service.encoder.whitenings["regions"]
            rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            if source == "full" or source in REGIONAL_SOURCES:
                ids, boxes, X = read_regions(self.service.root, source)
                if len(ids):
                    X = np.asarray(white.apply(X), np.float32)
                    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
                    sorted_ids = np.asarray(ids, dtype=object)[order]
                    cuts = np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1
                    for grp in np.split(order, cuts):
                        rows[ids[grp[0]]] = (boxes[grp], X[grp])
            self._region_rows[source] = rows
        return self._region_rows[source]

    def best_box(self, q: QueryDescriptors, spec: MethodSpec, image_id: str) -> list[float] | None:
        """Pixel box of the database image's region that matches the query's items best (for pictures)."""
        ids, boxes, X = [], [], []
        for src in dict.fromkeys(("full", spec.base)):
            b, x = self.regions_of(src).get(image_id, (np.zeros((0, 4), np.float32), None))
            if len(b):
                ids += [image_id] * len(b)
                boxes.append(b)
                X.append(x)
        if not ids:
            return None
        items = [q.regions["full"]] if "full" in q.regions else []
        if spec.query_regions and spec.base in q.regions and spec.base != "full":
            items.append(q.regions[spec.base])
        if not items:
            return None
        rs = RegionSet.build(np.concatenate(X), np.zeros(len(ids), np.int64), np.concatenate(boxes))
        b = best_region(np.concatenate(items), rs, 0)
        return None if b is None else b.tolist()


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


def clean(report: dict[str, Any]) -> dict[str, Any]:
    return _clean(report)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def evaluate_track(t: Track, results: dict[str, Result], rank_dir: Path) -> dict[str, Any]:
    """Per-method mAP / mP@k, PR curves (the best PR_CURVES by medium mAP drawn), rankings saved as ``.npz``."""
    gnd = t.gnd()
    tr: dict[str, Any] = {"n_db": t.n_db + t.synthetic, "n_queries": len(gnd),
                          "query_ids": [t.dataset.queries[int(i)] for i in t.query_idx], "methods": {}, "pr": {}}
    if t.synthetic:
        tr["synthetic_distractors"] = t.synthetic
    arrays = {}
    for name, r in results.items():
        ev = evaluate_all(list(r.ids), gnd)
        tr["methods"][name] = {**ev, "index_bytes": r.index_bytes, "seconds": r.build_seconds + r.query_seconds,
                               "build_seconds": r.build_seconds, "query_seconds": r.query_seconds, **r.extra}
        levels, prec = mean_pr_curve(list(r.ids), protocol_gnd(gnd, "medium"))
        tr["pr"][name] = {"recall": levels, "precision": prec}
        arrays[slug(name)] = r.ids[:, :1000]
    save_arrays(str(rank_dir / f"{slug(t.name)}.npz"), **arrays)
    ranked = sorted(tr["methods"], key=lambda m: -(tr["methods"][m]["medium"]["map"]
                                                   if np.isfinite(tr["methods"][m]["medium"]["map"]) else -1))
    tr["pr_all"], tr["pr"] = tr["pr"], {m: tr["pr"][m] for m in ranked[:PR_CURVES]}
    tr["rankings"] = f"rankings/{slug(t.name)}.npz"
    return tr


def synthetic_summary(report: dict[str, Any], base_tracks: Sequence[Track], specs: Sequence[MethodSpec],
                      synth_ns: Sequence[int]) -> dict[str, Any]:
    """mAP per protocol against the number of synthetic distractors, per base track and method."""
    syn: dict[str, Any] = {}
    for t in base_tracks:
        by_m: dict[str, Any] = {}
        for spec in specs:
            if spec.family == "asmk":
                continue
            row = {}
            for n in synth_ns:
                m = report["tracks"][t.name if n == 0 else f"{t.name}+{n} synth"]["methods"].get(spec.name)
                if m:
                    row[str(n)] = {p: m[p]["map"] for p in PROTOCOLS}
            if len(row) > 1 or not any(synth_ns):
                by_m[spec.name] = row
        syn[t.name] = by_m
    return syn


def best_method(methods: dict[str, Any], pick: Any) -> str | None:
    """Method with the best medium mAP among those ``pick(name)`` accepts."""
    cands = [(m, (r.get("medium") or {}).get("map")) for m, r in methods.items() if pick(m)]
    cands = [(m, v) for m, v in cands if v is not None and math.isfinite(v)]
    return max(cands, key=lambda c: c[1])[0] if cands else None


def is_regional(name: str) -> bool:
    return name.startswith("regional:") or name in ("d2r_asmk_star", "r_asmk_star")


def print_table(report: dict[str, Any], file: Any = None) -> None:
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
    for tname, methods in (report.get("distractors", {}).get("synthetic") or {}).items():
        ns = sorted({int(n) for v in methods.values() for n in v}, key=int)
        print(f"\n== synthetic distractors, {tname}: medium mAP (hard mAP) vs N: "
              + "  ".join(f"{n:>13,}" for n in ns), file=file)
        for m, by_n in methods.items():
            cells = [f"{pct((by_n.get(str(n)) or {}).get('medium')):>6} "
                     f"({pct((by_n.get(str(n)) or {}).get('hard')).strip():>4})" for n in ns]
            print(f"   {m:<22} " + "  ".join(cells), file=file)


def save_query_crop(path: str, bbox: Any, out_dir: Path, key: str) -> str:
    """The query image as the encoder saw it (cropped), saved for saliency overlays; returns its path."""
    if bbox is None:
        return path
    target = out_dir / "queries" / f"{key}.jpg"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        crop(decode_image(read_bytes(path)), bbox).save(target, "JPEG", quality=90)
    return str(target)


MAX_EXAMPLE_MATCHES = 100  # inlier matches kept per example result (report.json stays small)


def _verified_matches(bench: Benchmark, q: QueryDescriptors, image_id: str | None
                      ) -> tuple[int, list[list[float]] | None]:
    """(inliers, some of the cached inlier matches ``[xq, yq, xd, yd]`` in query crop / database pixels) of a
    verified pair; (0, None) when it is not verified."""
    if image_id is None or not q.has_keypoints:
        return 0, None
    verifier = bench.service.verifier()
    n, m = verifier.pairs.get((sv_query_key(q), image_id), (0, None))
    if m is None or n < verifier.cfg.min_inliers:
        return 0, None
    step = max(1, -(-len(m) // MAX_EXAMPLE_MATCHES))
    return n, np.round(np.asarray(m[::step], np.float64), 1).tolist()


def _example_rows(t: Track, results: dict[str, Result], bench: Benchmark, shown: list[str], qi: int,
                  key: str, path: str, bbox: Any, aps: dict[str, Any], crop_path: str) -> list[dict[str, Any]]:
    gnd, q, rows = t.gnd(), bench.qdesc[key], []
    for m in shown:
        spec, r, res = parse_method(m), results[m], []
        for idx, sc in zip(r.ids[qi][:10], r.scores[qi][:10]):
            if idx < 0:
                break
            entry = {"path": t.dataset.image_path(int(idx)), "label": label_of(gnd[qi], int(idx)), "score": float(sc)}
            if spec.family == "regional" and idx < t.n_db and bench.track_ids(t)[int(idx)]:
                b = bench.best_box(q, spec, bench.track_ids(t)[int(idx)])
                if b is not None:
                    entry["boxes"] = [b]
            if is_sv(m) and idx < t.n_db:
                n, matches = _verified_matches(bench, q, bench.track_ids(t)[int(idx)])
                if matches:
                    entry["matches"], entry["inliers"] = matches, n
            res.append(entry)
        apv = aps[m][qi]
        rows.append({"query": path, "query_crop": crop_path, "bbox": None if bbox is None else list(bbox), "method": m,
                     "title": f"{t.dataset.queries[int(t.query_idx[qi])]} (medium AP "
                              f"{'-' if apv is None else f'{100 * apv:.1f}'})", "results": res})
    return rows


def add_examples(tr: dict[str, Any], t: Track, results: dict[str, Result], bench: Benchmark,
                 items: dict[str, tuple[str, Any]], n_examples: int, out: Path) -> None:
    """Example rows (best regional vs best global baseline, and the best ``+sv`` method with its inlier matches)
    and saliency overlays for ``n_examples`` queries where the first two methods' medium APs differ most (ties by
    query order)."""
    if n_examples <= 0:
        return
    methods = tr["methods"]
    reg = best_method(methods, lambda m: is_regional(m) and not is_sv(m))
    glo = best_method(methods, lambda m: m in BASELINES) or best_method(
        methods, lambda m: parse_method(m).family == "global" and not is_sv(m))
    sv = best_method(methods, is_sv)  # the best +sv method, its verified matches drawn
    shown = [m for m in dict.fromkeys((reg, glo, sv)) if m]
    if not shown:
        return
    aps = {m: methods[m]["medium"]["aps"] for m in shown}
    ap = [np.array([np.nan if v is None else v for v in aps[m]], np.float64) for m in shown]
    diff = np.abs(ap[0] - ap[1]) if len(ap) >= 2 else np.zeros_like(ap[0])
    order = np.lexsort((np.arange(len(diff)), -np.where(np.isnan(diff), -1.0, diff)))[:n_examples]
    examples, saliency = [], []
    for qi in order:
        key = bench.qkeys[t.name][qi]
        path, bbox = items[key]
        q = bench.qdesc[key]
        crop_path = save_query_crop(path, bbox, out, key)
        examples += _example_rows(t, results, bench, shown, int(qi), key, path, bbox, aps, crop_path)
        qname = t.dataset.queries[int(t.query_idx[qi])]
        for attr, src, label in (("fs_map", "fs_egm", "FS + FS.EGM boxes"), ("os_map", "os_egm", "OS + OS.EGM boxes")):
            if getattr(q, attr) is not None:
                saliency.append({"path": crop_path, "map": np.asarray(getattr(q, attr)).tolist(),
                                 "boxes": np.asarray(q.boxes.get(src, np.zeros((0, 4)))).tolist(),
                                 "caption": f"{qname}: {label}"})
    tr["examples"], tr["saliency"] = examples, saliency


__all__ = ["Benchmark", "Result", "default_methods", "encode_queries", "evaluate_track", "synthetic_summary",
           "add_examples", "clean", "slug", "best_method", "print_table", "BASELINES", "FULL_RANK_MAX"]
