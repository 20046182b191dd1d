"""ASMK benchmark: parity and speed against the reference ``asmk`` package, plus the D2R variants (issue 5).

    python -m jobs.bench_asmk [--data /work/shared/data/museum-landmarks] [--tracks root in-photos no-box]
                              [--k 1024] [--query-ma 5] [--threads 1] [--repeats 3] [--distractors N]
                              [--json out.json]

1. Local features (cached under ``--cache``, one entry per image or query crop, shared by the tracks):
   MobileNetV2 ``features.18`` activations at ``--max-side`` and ``--scales``, the ``--topn`` strongest
   positions over all scales (pipeline.local_features), PCA to 128 learnt on ``--pca-images`` database images
   of the first track, L2. Queries with a box are cropped to it (Revisited-Oxford protocol). From the scale-1
   map of the same forward pass: FS saliency + EGM boxes (``fs_egm``, the FS preset of pipeline.egm, rounded
   outward to cells as pipeline.extract does, mapped to pixels): the regions of the D2R variants. Databases
   hold every distractor unless ``--distractors N`` keeps N random ones (features are extracted
   non-distractors first, then distractors in that random order, so a smaller run reuses the cache).
2. One k-means codebook (pipeline.codebook, FAISS, trained on the first track's database descriptors) and one
   FAISS quantisation (database single assignment, queries ``--query-ma`` nearest words, the reference HOW /
   FIRE settings) feed BOTH implementations: the same descriptors, codebook and word ids.
3. ASMK* with the reference package ``asmk==0.1.1`` (pip-installed by :func:`import_reference` into
   ``/tmp/asmk_pkg``, outside the project venv, and imported by path only here) and with ``pipeline.asmk``:
   mAP (Easy / Medium / Hard), score agreement, index sizes, and times measured in this run, interleaved, best
   of ``--repeats``, with the same thread count (``--threads``, default 1, fixed for BLAS / OpenMP / FAISS /
   torch before they load); targets: mAP within 0.5 and ours at least 5x faster, printed OK / FAIL:
   * build = aggregation + inverted file of the database, given the word ids (reference: its
     ``ASMKKernel.aggregate`` + ``IVF.add``, i.e. ``IvfBuilder.add`` without ``Codebook.quantize``);
   * query = aggregation + scoring + full ranking of all queries, given the word ids (reference: its
     ``ASMKMethod.accumulate_scores`` loop without ``Codebook.quantize``; ours from an index whose cached
     per-index arrays are cleared first).
   The FAISS quantisation is the same ``IndexFlatL2.search`` call in both; it is timed once and reported
   apart (and checked to give the reference's own ``Codebook.quantize`` word ids).
4. Our variants on the same words: D2R-ASMK* (max and average pooling over the whole image + its ``fs_egm``
   boxes, seed 002 eq. 3-4) and R-ASMK* (regional aggregation over the same regions, eq. 9): mAP Medium / Hard
   and database bytes relative to our ASMK*. ``--grid-levels`` adds the same variants over R-MAC grid boxes,
   ``--more-variants`` adds VLAD, ASMK, R-VLAD, Naive-R-ASMK and R-ASMK.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # BLAS / OpenMP threads must be fixed before numpy and faiss load
    _t = "1"
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            _t = sys.argv[i + 1]
        elif a.startswith("--threads="):
            _t = a.split("=", 1)[1]
    for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_v] = _t

import gc
import hashlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "museum-landmarks"
ASMK_PKG = Path("/tmp/asmk_pkg")
TRACKS = {"root": "gnd.json", "in-photos": "in-photos/gnd.json", "no-box": "no-box/gnd.json"}
PARITY_TOL = 0.5  # mAP points
SPEEDUP_GOAL = 5.0


# ----------------------------------------------------------------------------------------------- evaluation

def _local_compute_map(rankings: list[np.ndarray], gnd: list[dict]) -> float:
    """Revisited-Oxford mAP (reference trapezoidal AP; junk removed; queries without positives skipped)."""
    aps = []
    for r, g in zip(rankings, gnd):
        ok, junk = np.asarray(g["ok"], int), np.asarray(g["junk"], int)
        if ok.size == 0:
            continue
        kept = r[~np.isin(r, junk)]
        pos = np.flatnonzero(np.isin(kept, ok)).astype(float)
        j = np.arange(len(pos), dtype=float)
        p0 = np.where(pos == 0, 1.0, j / np.maximum(pos, 1.0))
        p1 = (j + 1) / (pos + 1)
        aps.append(((p0 + p1) / 2).sum() / ok.size)
    return float(np.mean(aps)) if aps else float("nan")


def _protocol(gnd: list[dict], p: str) -> list[dict]:
    out = []
    for g in gnd:
        e, h, j = list(g.get("easy", [])), list(g.get("hard", [])), list(g.get("junk", []))
        out.append({"easy": {"ok": e, "junk": j + h}, "medium": {"ok": e + h, "junk": j},
                    "hard": {"ok": h, "junk": j + e}}[p])
    return out


def evaluate(rankings: list[np.ndarray], gnd: list[dict]) -> dict[str, float]:
    """mAP (in %) for Easy / Medium / Hard; uses pipeline.evaluation when it is there."""
    try:
        from pipeline.evaluation import compute_map, protocol_gnd

        return {p: 100 * compute_map(rankings, protocol_gnd(gnd, p))[0] for p in ("easy", "medium", "hard")}
    except ImportError:
        return {p: 100 * _local_compute_map(rankings, _protocol(gnd, p)) for p in ("easy", "medium", "hard")}


# ----------------------------------------------------------------------------------------------- tracks

@dataclass
class Track:
    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]

    @property
    def q_keys(self) -> list[str]:
        return [image_key(q, g.get("bbx")) for q, g in zip(self.qimlist, self.gnd)]

    def composition(self) -> str:
        fam: dict[str, int] = {}
        for i in self.imlist:
            f = ("distractor" if i.startswith("distractor") else "painting" if i.startswith("painting")
                 else "painting photo" if i.startswith("qsd") else "landmark")
            fam[f] = fam.get(f, 0) + 1
        return ", ".join(f"{v} {k}s" for k, v in fam.items())


def image_key(image_id: str, bbx=None) -> str:
    """Cache key of an image (whole) or of a query crop."""
    if bbx is None:
        return image_id
    return image_id + "@" + ",".join(f"{float(v):.2f}" for v in bbx)


def distractor_rank(data: Path) -> dict[str, int]:
    """Position of every distractor in one random order (seed 0): ``--distractors N`` keeps the first N, and
    features are extracted in this order, so a smaller database is a prefix of a larger one's cache."""
    root = json.loads((data / TRACKS["root"]).read_text())["imlist"]
    pool = sorted(i for i in root if i.startswith("distractor"))
    return {pool[j]: r for r, j in enumerate(np.random.default_rng(0).permutation(len(pool)))}


def load_tracks(data: Path, names: list[str], limit: tuple[int, int] | None, distractors: int | None
                ) -> list[Track]:
    """The tracks' ground truth; ``distractors``: keep only that many distractor images (the same random
    ones, seed 0, in every track), with the gnd indices renumbered."""
    keep_d: set[str] | None = None
    if distractors is not None:
        keep_d = {d for d, r in distractor_rank(data).items() if r < distractors}
    out = []
    for name in names:
        g = json.loads((data / TRACKS[name]).read_text())
        imlist, qimlist, gl = g["imlist"], g["qimlist"], g["gnd"]
        if keep_d is not None:
            new = {j: n for n, j in enumerate(j for j, i in enumerate(imlist)
                                              if not i.startswith("distractor") or i in keep_d)}
            imlist = [imlist[j] for j in new]
            gl = [{**x, **{k: [new[j] for j in x.get(k, []) if j in new] for k in ("easy", "hard", "junk")}}
                  for x in gl]
        if limit:
            ndb_, nq_ = limit
            imlist, qimlist = imlist[:ndb_], qimlist[:nq_]
            gl = [{**x, **{k: [i for i in x.get(k, []) if i < ndb_] for k in ("easy", "hard", "junk")}}
                  for x in gl[:nq_]]
        out.append(Track(name, imlist, qimlist, gl))
    return out


# ----------------------------------------------------------------------------------------------- features

def _extract_one(img, bb, max_side: int, scales: list[float], topn: int):
    """Local features + fs_egm pixel boxes of one PIL image: (raw descriptors, xy, image_hw, feat_hw, boxes)."""
    import torch.nn.functional as F

    from pipeline.egm import FS, detect_regions
    from pipeline.local_features import select_local_features_multiscale
    from pipeline.preprocess import to_network_input
    from pipeline.regions import cells_to_pixels, to_cells
    from pipeline.saliency import feature_saliency

    x = to_network_input(img, max_side)[None]
    hw = (img.height, img.width)
    maps, feat_hw, boxes = [], None, np.zeros((0, 4), np.float32)
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                            antialias=s < 1)
        A = bb(xs)[0]
        if s == 1:
            feat_hw = tuple(int(v) for v in A.shape[1:])
            cells, _ = detect_regions(feature_saliency(A).numpy(), **FS)
            if len(cells):
                boxes = cells_to_pixels(to_cells(cells, *feat_hw), feat_hw, hw)
        maps.append((A, s))
    xy, _, _, des = select_local_features_multiscale(maps, n=topn, image_hw=hw)
    return np.asarray(des, np.float32), np.asarray(xy, np.float32), hw, feat_hw, boxes


@dataclass
class Features:
    """Per-key local features, concatenated: rows ``start[i]:start[i]+count[i]`` belong to ``keys[i]``."""

    keys: list[str]
    des: np.ndarray
    xy: np.ndarray
    start: np.ndarray
    count: np.ndarray
    image_hw: np.ndarray
    feat_hw: np.ndarray
    boxes: np.ndarray
    box_start: np.ndarray
    box_count: np.ndarray

    def __post_init__(self) -> None:
        self.pos = {k: i for i, k in enumerate(self.keys)}

    def gather(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Descriptors, positions and per-row image index (0..len(keys)-1) of ``keys`` in that order, plus
        their fs_egm boxes with the owning image index."""
        p = np.array([self.pos[k] for k in keys], dtype=np.int64)
        cnt, st = self.count[p], self.start[p]
        rows = np.repeat(st - np.cumsum(cnt) + cnt, cnt) + np.arange(int(cnt.sum()))
        bc, bs = self.box_count[p], self.box_start[p]
        brows = np.repeat(bs - np.cumsum(bc) + bc, bc) + np.arange(int(bc.sum()))
        return {"rows": rows, "des": self.des[rows], "xy": self.xy[rows], "ids": np.repeat(np.arange(len(keys)), cnt),
                "boxes": self.boxes[brows], "box_image": np.repeat(np.arange(len(keys)), bc),
                "image_hw": self.image_hw[p], "feat_hw": self.feat_hw[p]}


def load_features(args, tracks: list[Track], pca_pool: list[str]) -> Features:
    """Features of every database image and query (crop) of ``tracks``; extracted once per key, cached.
    The PCA is learnt on ``--pca-images`` random images of ``pca_pool`` (the full database of the first track,
    whatever ``--distractors`` keeps, so that every database size shares one PCA and one feature cache)."""
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"ms{args.max_side}_s{'-'.join(str(s) for s in args.scales)}_n{args.topn}_d{args.pca}"
    data = Path(args.data)
    crops: dict[str, tuple[str, object]] = {}
    for t in tracks:
        for i in t.imlist:
            crops[image_key(i)] = (i, None)
        for q, g in zip(t.qimlist, t.gnd):
            crops[image_key(q, g.get("bbx"))] = (q, g.get("bbx"))
    rank = distractor_rank(data)
    keys = sorted(crops, key=lambda k: (rank.get(k, -1), k))  # non-distractors first, then in rank order
    chunks = [keys[c:c + args.chunk] for c in range(0, len(keys), args.chunk)]
    paths = [cache / f"part_{tag}_{hashlib.sha1(' '.join(ch).encode()).hexdigest()[:16]}.npz" for ch in chunks]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        import torch

        from pipeline.backbone import build_backbone
        from pipeline.local_features import apply_pca, learn_pca
        from storage.images import decode_image
        from storage.weights import load_state_dict

        if 1.0 not in args.scales:
            raise SystemExit("--scales must contain 1 (the fs_egm boxes come from the scale-1 map)")
        torch.set_num_threads(int(args.threads))
        bb = build_backbone("mobilenet_v2", load_state_dict("builtin:mobilenet_v2")).eval()

        def extract(key: str):
            image_id, bbx = crops[key]
            img = decode_image((data / "jpg" / f"{image_id}.jpg").read_bytes())
            if bbx is not None:
                x0, y0, x1, y1 = bbx
                img = img.crop((round(x0), round(y0), round(x1), round(y1)))
            with torch.inference_mode():
                return _extract_one(img, bb, args.max_side, args.scales, args.topn)

        pca_path = cache / f"pca_{tag}_{tracks[0].name}_{len(pca_pool)}.npz"
        raw: dict[str, tuple] = {}
        if pca_path.exists():
            with np.load(pca_path, allow_pickle=False) as z:
                pca = (z["mean"], z["projection"])
        else:
            rng = np.random.default_rng(0)
            db = pca_pool
            sample = rng.choice(len(db), min(args.pca_images, len(db)), replace=False)
            t = time.perf_counter()
            raw = {image_key(db[i]): extract(image_key(db[i])) for i in sample}
            pca = learn_pca(np.concatenate([f[0] for f in raw.values()]), dim=args.pca)
            np.savez(pca_path, mean=pca[0], projection=pca[1])
            print(f"[features] PCA {pca[1].shape} from {len(sample)} database images of track "
                  f"{tracks[0].name} in {time.perf_counter() - t:.0f}s", flush=True)
        done = sum(len(chunks[i]) for i in range(len(chunks)) if i not in todo)
        t_all = time.perf_counter()
        n_todo = sum(len(chunks[i]) for i in todo)
        for n_done, i in enumerate(todo):
            t = time.perf_counter()
            feats = [raw.pop(k) if k in raw else extract(k) for k in chunks[i]]
            des = [apply_pca(f[0], *pca) if len(f[0]) else np.zeros((0, args.pca), np.float32) for f in feats]
            np.savez(paths[i], keys=np.array(chunks[i]), des=np.concatenate(des).astype(np.float32),
                     xy=np.concatenate([f[1] for f in feats]), count=np.array([len(d) for d in des]),
                     image_hw=np.array([f[2] for f in feats]), feat_hw=np.array([f[3] for f in feats]),
                     boxes=np.concatenate([f[4] for f in feats]).astype(np.float32),
                     box_count=np.array([len(f[4]) for f in feats]))
            done += len(chunks[i])
            el = time.perf_counter() - t_all
            left = n_todo - sum(len(chunks[j]) for j in todo[:n_done + 1])
            print(f"[features] {done}/{len(keys)} images ({time.perf_counter() - t:.0f}s for {len(feats)}; "
                  f"~{el / max(n_todo - left, 1) * left / 60:.0f} min left)", flush=True)
    parts = []
    for p, ch in zip(paths, chunks):
        with np.load(p, allow_pickle=False) as z:
            parts.append({k: z[k] for k in z.files})
            if list(parts[-1]["keys"]) != ch:
                raise RuntimeError(f"cache {p} does not hold the expected keys")
    count = np.concatenate([p["count"] for p in parts]).astype(np.int64)
    box_count = np.concatenate([p["box_count"] for p in parts]).astype(np.int64)
    return Features(keys, np.concatenate([p["des"] for p in parts]), np.concatenate([p["xy"] for p in parts]),
                    np.cumsum(count) - count, count, np.concatenate([p["image_hw"] for p in parts]),
                    np.concatenate([p["feat_hw"] for p in parts]), np.concatenate([p["boxes"] for p in parts]),
                    np.cumsum(box_count) - box_count, box_count)


def grid_boxes(image_hw: np.ndarray, feat_hw: np.ndarray, levels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """R-MAC grid boxes (without the whole image, which pipeline.asmk adds) in pixels, per database image."""
    from pipeline.pooling import rmac_grid
    from pipeline.regions import cells_to_pixels

    boxes, owner = [], []
    for i, (ihw, fhw) in enumerate(zip(image_hw, feat_hw)):
        b = rmac_grid(int(fhw[0]), int(fhw[1]), levels=levels, include_full=False)
        boxes.append(cells_to_pixels(b, (int(fhw[0]), int(fhw[1])), (int(ihw[0]), int(ihw[1]))))
        owner.append(np.full(len(b), i))
    return np.concatenate(boxes), np.concatenate(owner)


# ----------------------------------------------------------------------------------------------- reference asmk

def import_reference():
    """Import asmk 0.1.1 from ``/tmp/asmk_pkg`` (never from the project venv), pip-installing it there first.

    asmk 0.1.1 is an sdist with a Cython extension (``asmk.hamming``); pip builds it with its own isolated
    build requirements (Cython, numpy from PyPI) and ``--no-deps`` keeps its runtime requirements (numpy,
    faiss) those of the venv.
    """
    if not (ASMK_PKG / "asmk" / "asmk_method.py").exists():
        print("[asmk] installing asmk==0.1.1 into", ASMK_PKG, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(ASMK_PKG), "--no-deps",
                        "asmk==0.1.1"], check=True)
    if str(ASMK_PKG) not in sys.path:
        sys.path.insert(0, str(ASMK_PKG))
    import asmk
    from asmk import codebook as cdb_pkg
    from asmk import index as idx_pkg
    from asmk import inverted_file as ivf_pkg
    from asmk import io_helpers
    from asmk import kernel as kern_pkg

    if not str(Path(asmk.__file__).resolve()).startswith(str(ASMK_PKG)):
        raise RuntimeError(f"asmk imported from {asmk.__file__}, not {ASMK_PKG}")
    return cdb_pkg, idx_pkg, kern_pkg, ivf_pkg, io_helpers


def reference_nbytes(ivf) -> tuple[int, int]:
    """(used, allocated) bytes of the reference IVF's arrays: posting vectors + image ids (int64) per word,
    trimmed to ``counts`` or as allocated (its lists grow by 1.5x), plus norm_factor / counts / idf."""
    used = alloc = int(np.asarray(ivf.norm_factor).nbytes + ivf.counts.nbytes + ivf.idf.nbytes)
    for v, ids, c in zip(ivf.ivf_vecs, ivf.ivf_image_ids, ivf.counts):
        if v is None:
            continue
        used += int(v[:c].nbytes + ids[:c].nbytes)
        alloc += int(v.nbytes + ids.nbytes)
    return used, alloc


# ----------------------------------------------------------------------------------------------- helpers

def full_scores(index, S: np.ndarray, q_present: np.ndarray, nq: int, ndb: int) -> np.ndarray:
    """(nq, ndb) scores with rows/columns at query / database positions (images without descriptors score 0,
    as in the reference, whose score vector covers every image id)."""
    out = np.zeros((nq, ndb))
    out[np.ix_(q_present, index.images())] = S
    return out


def rankings(S_full: np.ndarray) -> list[np.ndarray]:
    return list(np.argsort(-S_full, axis=1, kind="stable"))


def interleaved_best_of(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Run each callable ``repeats`` times, alternating between them (so slow phases of a shared machine hit
    both alike); return the best time of each and its last output."""
    best = {k: float("inf") for k in fns}
    out = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k] = None
            gc.collect()
            t = time.perf_counter()
            out[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best, out


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------- one track

def run_track(args, track: Track, F: Features, C: np.ndarray, words1: np.ndarray, ref_mods) -> dict:
    """Parity, timings and variants on one track; ``words1``: the nearest word of every row of ``F.des``."""
    from pipeline.asmk import ASMKConfig, aggregate_queries, build_index
    from pipeline.codebook import assign

    db = F.gather([image_key(i) for i in track.imlist])
    q = F.gather(track.q_keys)
    db_des, db_ids, db_xy = db["des"], db["ids"], db["xy"]
    q_des, q_ids = q["des"], q["ids"]
    nq, ndb, gl = len(track.qimlist), len(track.imlist), track.gnd
    q_present = np.unique(q_ids)
    res: dict = {"track": track.name, "n_db_images": ndb, "database": track.composition(), "n_queries": nq,
                 "n_q_cropped": sum(g.get("bbx") is not None for g in gl), "n_db_des": len(db_des),
                 "n_q_des": len(q_des)}
    print(f"\n=== track {track.name}: {ndb} database images ({track.composition()}), {nq} queries "
          f"({res['n_q_cropped']} cropped to their box); {len(db_des):,} database and {len(q_des):,} query "
          f"descriptors", flush=True)

    # -- one quantisation for both implementations --------------------------------------------------------
    db_words = words1[db["rows"]]
    t = time.perf_counter()
    q_words = assign(q_des, C, args.query_ma)[0]
    res["quantize_queries_s"] = time.perf_counter() - t

    # -- ours, ASMK* ---------------------------------------------------------------------------------------
    cfg = ASMKConfig("asmk_star")

    def ours_build():
        return build_index(db_des, db_words, db_ids, C, cfg)

    index = ours_build()

    def ours_query():
        index._cache.clear()  # per-index derived arrays (gamma, idf, kernel table) are recomputed every time
        agg = aggregate_queries(q_des, q_words, q_ids, C, index)
        S = full_scores(index, index.image_scores(agg), q_present, nq, ndb)
        return S, rankings(S)

    fns_build = {"ours": ours_build}
    fns_query = {"ours": ours_query}

    # -- reference asmk 0.1.1, ASMK* ---------------------------------------------------------------------------
    if ref_mods is not None:
        cdb_pkg, idx_pkg, kern_pkg, ivf_pkg, io_helpers = ref_mods
        cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=len(C))
        cdb.index(np.ascontiguousarray(C, dtype=np.float32))
        # its own quantisation must give the words we feed it (same FAISS IndexFlatL2 search; the database
        # words were checked once for all rows in main())
        t = time.perf_counter()
        same_q = np.array_equal(cdb.quantize(q_des, multiple_assignment=args.query_ma)[1], q_words)
        res["reference_quantize_queries_s"] = time.perf_counter() - t
        res["same_query_words_as_reference_quantize"] = bool(same_q)
        kern = kern_pkg.ASMKKernel(cdb, binary=True)
        sim_params = {"alpha": args.alpha, "similarity_threshold": 0.0}
        ref_state: dict = {}

        def ref_build():  # IvfBuilder.add without Codebook.quantize: kernel.aggregate + IVF.add
            ivf = ivf_pkg.IVF.initialize_empty(codebook_size=len(C), use_idf=False)
            ivf.add(*kern.aggregate(db_des, db_words, db_ids.copy()))
            ref_state["ivf"] = ivf
            return ivf

        ref_build()

        def similarity_func(*x):  # as in ASMKMethod.accumulate_scores
            return kern.similarity(*x, **sim_params)

        def ref_query():  # ASMKMethod.accumulate_scores without Codebook.quantize
            ivf = ref_state["ivf"]
            acc = []
            for imid, seq in io_helpers.slice_unique(q_ids):
                ades, words = kern.aggregate_image(q_des[seq], q_words[seq])
                ranks, scores = ivf.search(ades, words, similarity_func=similarity_func, topk=None)
                acc.append((imid, ranks, scores))
            imids, ranks, scores = zip(*acc)
            return np.array(imids), np.vstack(ranks), np.vstack(scores)

        fns_build["asmk"] = ref_build
        fns_query["asmk"] = ref_query

    tb, _ = interleaved_best_of(fns_build, args.repeats)
    index = ours_build()  # (the timed builds replaced it; keep one for the variants)
    tq, outq = interleaved_best_of(fns_query, args.repeats)
    S_ours, R_ours = outq["ours"]
    map_ours = evaluate(R_ours, gl)
    base_bytes, base_nnz = index.nbytes(), index.nnz
    res["ours"] = {"build_s": tb["ours"], "query_s": tq["ours"], "nbytes": base_bytes, "nnz": base_nnz,
                   "map": map_ours}
    if ref_mods is not None:
        q_order, R_ref, scores_ref = outq["asmk"]
        ref_lists = [np.empty(0, dtype=np.int64)] * nq
        for qi, r in zip(q_order, R_ref):
            ref_lists[int(qi)] = r
        map_ref = evaluate(ref_lists, gl)
        used, alloc = reference_nbytes(ref_state["ivf"])
        S_ref = np.zeros((nq, ndb))
        S_ref[q_order[:, None], R_ref] = scores_ref
        diff = np.abs(S_ours - S_ref)
        same_top10 = float(np.mean([np.array_equal(R_ref[i][:10], R_ours[qi][:10])
                                    for i, qi in enumerate(q_order)]))
        dm = {p: map_ours[p] - map_ref[p] for p in map_ref}
        res["reference"] = {"build_s": tb["asmk"], "query_s": tq["asmk"], "nbytes": used,
                            "nbytes_allocated": alloc, "nnz": int(ref_state["ivf"].counts.sum()), "map": map_ref}
        ok = all(abs(v) <= PARITY_TOL for v in dm.values() if not np.isnan(v))
        res["parity"] = {"map_diff": dm, "ok": bool(ok), "max_abs_score_diff": float(diff.max()),
                         "same_top10_fraction": same_top10}
        res["speedup"] = {"build": tb["asmk"] / tb["ours"], "query": tq["asmk"] / tq["ours"]}

    # -- our variants on the same words ----------------------------------------------------------------------------
    rows: list[dict] = []

    def variant(name: str, vcfg, pooling: str, built: dict, boxes=None, owner=None, timed=None) -> None:
        key = (vcfg.kernel, vcfg.regional)
        t = time.perf_counter()
        if key not in built:
            built[key] = build_index(db_des, db_words, db_ids, C, vcfg, db_xy, boxes, owner)
        idx = built[key]
        tb_ = time.perf_counter() - t
        t = time.perf_counter()
        agg = aggregate_queries(q_des, q_words, q_ids, C, idx)
        R = rankings(full_scores(idx, idx.image_scores(agg, pooling), q_present, nq, ndb))
        tq_ = time.perf_counter() - t
        if timed is not None:
            tb_, tq_ = timed
        m = evaluate(R, gl)
        rows.append({"method": name, "map": m, "nbytes": idx.nbytes(), "nnz": idx.nnz, "n_items": idx.n_items,
                     "size_rel": idx.nbytes() / base_bytes, "vectors_rel": idx.nnz / base_nnz,
                     "build_s": tb_, "query_s": tq_})

    plain: dict = {("asmk_star", "none"): index}
    variant("ASMK* (ours)", cfg, "max", plain, timed=(tb["ours"], tq["ours"]))
    if args.more_variants:
        for name, vcfg in (("VLAD", ASMKConfig("vlad")), ("ASMK", ASMKConfig("asmk"))):
            variant(name, vcfg, "max", plain)
    sources = [("fs_egm", db["boxes"], db["box_image"])]
    for lv in args.grid_levels:
        sources.append((f"grid L{lv}", *grid_boxes(db["image_hw"], db["feat_hw"], lv)))
    res["regions_per_image"] = {}
    for src, boxes, owner in sources:
        rpi = 1 + len(boxes) / ndb
        res["regions_per_image"][src] = rpi
        built: dict = {}
        todo = [("D2R-ASMK* max", ASMKConfig("asmk_star", "d2r"), "max"),
                ("D2R-ASMK* avg", ASMKConfig("asmk_star", "d2r"), "avg"),
                ("R-ASMK*", ASMKConfig("asmk_star", "rasmk"), "max")]
        if args.more_variants:
            todo += [("R-VLAD", ASMKConfig("vlad", "rvlad"), "max"),
                     ("Naive-R-ASMK", ASMKConfig("asmk", "naive_rasmk"), "max"),
                     ("R-ASMK", ASMKConfig("asmk", "rasmk"), "max")]
        for name, vcfg, pooling in todo:
            variant(f"{name} ({src}, {rpi:.2f} regions/image)", vcfg, pooling, built, boxes, owner)
    res["variants"] = rows
    print_track(args, res)
    return res


# ----------------------------------------------------------------------------------------------- report

def print_track(args, res: dict) -> None:
    W = 58
    hdr = (f"{'method':{W}s} {'Easy':>6s} {'Medium':>7s} {'Hard':>6s} {'db bytes':>10s} {'/ASMK*':>7s} "
           f"{'build s':>8s} {'query s':>8s}")
    print(hdr)
    print("-" * len(hdr))

    def line(name, m, nbytes, rel, b, q, extra=""):
        bs = f"{b:8.2f}" if b is not None else f"{'':8s}"
        qs = f"{q:8.2f}" if q is not None else f"{'':8s}"
        print(f"{name:{W}s} {m['easy']:6.2f} {m['medium']:7.2f} {m['hard']:6.2f} {fmt_bytes(nbytes):>10s} "
              f"{rel:7.2f} {bs} {qs}{extra}")

    base = res["ours"]["nbytes"]
    if "reference" in res:
        r = res["reference"]
        line("ASMK* (asmk 0.1.1 reference)", r["map"], r["nbytes"], r["nbytes"] / base, r["build_s"], r["query_s"])
    for v in res["variants"]:
        timed = v["method"].startswith("ASMK* (ours)")
        line(v["method"], v["map"], v["nbytes"], v["size_rel"], v["build_s"] if timed else None,
             v["query_s"] if timed else None)
    if "reference" in res:
        p, s = res["parity"], res["speedup"]
        dm = p["map_diff"]
        print(f"|ours - asmk| ASMK* mAP: Easy {abs(dm['easy']):.3f}  Medium {abs(dm['medium']):.3f}  Hard "
              f"{abs(dm['hard']):.3f} -> {'OK' if p['ok'] else 'FAIL'} (<= {PARITY_TOL})   max |score diff| "
              f"{p['max_abs_score_diff']:.1e}, identical top-10 lists {100 * p['same_top10_fraction']:.1f}%")
        print(f"speed-up ours vs asmk (same words, {args.threads} thread(s), best of {args.repeats}): build "
              f"x{s['build']:.1f}  query x{s['query']:.1f}  -> "
              f"{'OK' if min(s.values()) >= SPEEDUP_GOAL else 'FAIL'} (>= x{SPEEDUP_GOAL:.0f})")
        print(f"FAISS quantisation of the queries ({args.query_ma}-NN; same call for both, not in these times): "
              f"{res['quantize_queries_s']:.2f}s; the reference's Codebook.quantize gives the same words: "
              f"{res['same_query_words_as_reference_quantize']}")
        print(f"reference index bytes: {fmt_bytes(res['reference']['nbytes'])} used (int64 image ids), "
              f"{fmt_bytes(res['reference']['nbytes_allocated'])} allocated; same number of (image, word) "
              f"vectors: {res['reference']['nnz'] == res['ours']['nnz']}")
    print("(D2R / R-ASMK* build and query times are not benchmark timings: single untimed runs, in the JSON)",
          flush=True)


def _mh(m: dict) -> str:
    return f"{m['medium']:5.2f}/{m['hard']:5.2f}"


def print_summary(args, results: list[dict]) -> None:
    print("\n=== summary: mAP Medium / Hard; database size relative to our ASMK*; times: best of "
          f"{args.repeats}, {args.threads} thread(s), same words for both")
    hdr = (f"{'track':10s} {'asmk ASMK*':>13s} {'ours ASMK*':>13s} {'|diff| M/H':>12s} {'D2R-ASMK* max':>19s} "
           f"{'R-ASMK*':>19s} {'build asmk/ours s':>19s} {'x':>5s} {'query asmk/ours s':>19s} {'x':>5s}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        o = r["ours"]["map"]
        d2r = next(v for v in r["variants"] if v["method"].startswith("D2R-ASMK* max (fs_egm"))
        ra = next(v for v in r["variants"] if v["method"].startswith("R-ASMK* (fs_egm"))
        if "reference" in r:
            rf, dm, s = r["reference"], r["parity"]["map_diff"], r["speedup"]
            ref_s = _mh(rf["map"])
            dif = f"{abs(dm['medium']):.2f}/{abs(dm['hard']):.2f}"
            bt = f"{rf['build_s']:.2f}/{r['ours']['build_s']:.2f}"
            qt = f"{rf['query_s']:.2f}/{r['ours']['query_s']:.2f}"
            bx, qx = f"{s['build']:.1f}", f"{s['query']:.1f}"
        else:
            ref_s = dif = bt = qt = bx = qx = "-"
        d2r_s = f"{_mh(d2r['map'])} {d2r['size_rel']:.2f}x"
        ra_s = f"{_mh(ra['map'])} {ra['size_rel']:.2f}x"
        print(f"{r['track']:10s} {ref_s:>13s} {_mh(o):>13s} {dif:>12s} {d2r_s:>19s} {ra_s:>19s} {bt:>19s} "
              f"{bx:>5s} {qt:>19s} {qx:>5s}")


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--tracks", nargs="+", default=list(TRACKS), choices=list(TRACKS))
    ap.add_argument("--cache", default="/tmp/bench_cache/asmk")
    ap.add_argument("--chunk", type=int, default=250, help="images per feature-cache file")
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.4142])
    ap.add_argument("--topn", type=int, default=300)
    ap.add_argument("--pca", type=int, default=128)
    ap.add_argument("--pca-images", type=int, default=300)
    ap.add_argument("--distractors", type=int, default=None,
                    help="keep only this many distractors (random, seed 0, the same in every track); default all")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--query-ma", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grid-levels", type=int, nargs="*", default=[],
                    help="also run the regional variants over R-MAC grid boxes with these levels")
    ap.add_argument("--more-variants", action="store_true", help="also VLAD, ASMK, R-VLAD, Naive-R-ASMK, R-ASMK")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--features-only", action="store_true", help="extract and cache the features, then stop")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--limit", type=int, nargs=2, default=None, metavar=("DB", "Q"),
                    help="smoke test: first DB database images and Q queries of each track (mAP not comparable)")
    args = ap.parse_args(argv)

    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    from pipeline.asmk import ASMKConfig
    from pipeline.codebook import assign, train_codebook

    if ASMKConfig().alpha != args.alpha or ASMKConfig().tau != 0.0:
        raise SystemExit("--alpha must match pipeline.asmk's ASMKConfig (alpha=3, tau=0)")
    data = Path(args.data)
    if not (data / "gnd.json").exists():
        raise SystemExit(f"dataset not found: {data}")
    if args.limit:
        args.cache = str(Path(args.cache) / f"limit_{args.limit[0]}_{args.limit[1]}")
    t_start = time.perf_counter()
    tracks = load_tracks(data, args.tracks, tuple(args.limit) if args.limit else None, args.distractors)
    pca_pool = json.loads((data / TRACKS[tracks[0].name]).read_text())["imlist"]
    F = load_features(args, tracks, pca_pool[:args.limit[0]] if args.limit else pca_pool)
    print(f"[features] {len(F.keys)} images / query crops, {len(F.des):,} descriptors of dimension "
          f"{F.des.shape[1]}, {len(F.boxes):,} fs_egm boxes ({time.perf_counter() - t_start:.0f}s)", flush=True)
    if args.features_only:
        return {}

    cb_des = F.gather([image_key(i) for i in tracks[0].imlist])["des"]
    cb_path = Path(args.cache) / f"codebook_k{args.k}_{cb_des.shape[1]}_{len(cb_des)}_{tracks[0].name}.npz"
    if cb_path.exists():
        with np.load(cb_path, allow_pickle=False) as z:
            C = z["centroids"]
    else:
        t = time.perf_counter()
        C = train_codebook(cb_des, args.k, niter=20, seed=0, gpu=False)
        np.savez(cb_path, centroids=C)
        print(f"[codebook] k={args.k} from {len(cb_des):,} descriptors of track {tracks[0].name} "
              f"in {time.perf_counter() - t:.0f}s", flush=True)
    del cb_des
    ref_mods = None if args.skip_reference else import_reference()
    t = time.perf_counter()
    words1 = assign(F.des, C, 1)[0]  # database words of every image (single assignment), shared by the tracks
    res_q = {"quantize_all_s": time.perf_counter() - t}
    msg = f"[quantise] nearest word of all {len(F.des):,} descriptors in {res_q['quantize_all_s']:.0f}s (FAISS)"
    if ref_mods is not None:
        cdb = ref_mods[0].Codebook(ref_mods[1].initialize_index(None), size=len(C))
        cdb.index(np.ascontiguousarray(C, dtype=np.float32))
        res_q["same_words_as_reference_quantize"] = bool(
            np.array_equal(cdb.quantize(F.des, multiple_assignment=1)[1], words1))
        msg += f"; the reference's Codebook.quantize gives the same words: {res_q['same_words_as_reference_quantize']}"
    print(msg, flush=True)

    res: dict = {"settings": dict(vars(args)), "k": args.k, "dim": int(F.des.shape[1]), **res_q, "tracks": []}
    db_note = ("every distractor" if args.distractors is None else
               f"all non-distractor images + {args.distractors} random distractors (seed 0, the same in every track)")
    print(f"\nsettings: MobileNetV2 features.18, max side {args.max_side}, scales {args.scales}, top {args.topn} "
          f"locals/image, PCA {args.pca}; k={args.k} words; database single assignment, query {args.query_ma}-NN "
          f"assignment; ASMK* alpha={args.alpha:g} tau=0, no idf; {args.threads} thread(s); database: "
          f"{db_note}"
          f"{'; LIMITED smoke run' if args.limit else ''}")
    for tr in tracks:
        res["tracks"].append(run_track(args, tr, F, C, words1, ref_mods))
    print_summary(args, res["tracks"])
    res["wall_s"] = time.perf_counter() - t_start
    print(f"\nwall time {res['wall_s']:.0f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    return res


if __name__ == "__main__":
    main()
