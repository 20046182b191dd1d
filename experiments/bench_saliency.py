"""Object saliency (OS) versus feature saliency (FS) on real photos (seed 001 §4.3, Fig. 8).

    python -m experiments.bench_saliency [--config configs/benchmark.yaml] [--max-side 512] [--distractors 300]
                                         [--k 10 50] [--side 3 5]

Collection: the 287 museum paintings, the 30 ``qsd2_w3`` photos (one or two paintings on a wall or
background) and ``--distractors`` Caltech-101 photos of museum-landmarks. For every image: the config's
backbone activations (``extract.max_side``), FS map ``F_hat``, FS.EGM regions (``extract.fs`` preset), their
regional MAC and mean ``F_hat``; PCA whitening to ``whiten.dim`` dimensions learned on all those regions;
mutual k-NN graph (``graph.beta``), Katz centrality (``katz.alpha``, ``katz.tol``); then the OS map (eq. 14,
``object_saliency.Theta`` / ``theta``) of every ``qsd2_w3`` photo. ``--k`` (graph k, also the OS neighbours)
and ``--side`` (OS patch side) are swept; their defaults are the config's ``graph.k`` and
``object_saliency.patch_side``.

Metric (the paper's Fig. 8 "precision"): the share of a map's total mass that lies inside the ground-truth
painting boxes (union of the photo's ``bbx`` in ``gnd.json``), each feature cell counted with the fraction
of its area inside the union. Printed for FS (``F_hat``) and OS, raw and after the EGM sharpening presets
(``extract.fs`` and ``object_saliency.egm``), next to the box area share (the score of a uniform map). "OS
held-out" removes the photo's own regions from the collection, rebuilds the graph and Katz centrality without
them and searches only the rest, i.e. the photo is treated as a new image that is not in the graph (the
whitening, learned once on all regions, is kept). Controls: ``F_hat^Theta`` (eq. 14 without its graph term)
and OS with ``g = 1`` (eq. 14 without the centrality). The final table compares every map with FS raw over
the photos (share of photos where it is higher, mean difference with a 95% bootstrap interval, Wilcoxon
signed-rank p).

EGM scale (a departure from the index, kept from the original experiment): ``sigma`` is in feature cells and
the paper's presets (FS 2.5, OS 2) are for VGG16 conv5 maps of 1024-pixel images, 64 cells on the long side;
our maps are ``max_side / 32`` cells (16 at 512), so by default (``--sigma-scale auto``) the FS.EGM sigma is
scaled by ``long_side_cells / 64``; ``--sigma-scale 1`` uses the config's sigma as the extract stage does.

Activations are cached as float16 ``.npy`` under ``--cache`` (default ``runs/cache/bench_saliency``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import wilcoxon

from experiments.common import (CACHE_ROOT, DEFAULT_DATA, add_config_args, check_data, config_from_args,
                                image_path, load_backbone, original_hw, read_image)
from pipeline.config import IndexConfig
from pipeline.egm import EGMParams, detect_regions_with
from pipeline.katz import katz_centrality
from pipeline.knn_graph import exact_search_fn, knn_graph, normalize_graph
from pipeline.object_saliency import object_saliency, patch_descriptors
from pipeline.pooling import regional_mac
from pipeline.preprocess import to_network_input
from pipeline.regions import to_cells
from pipeline.saliency import box_saliency, feature_saliency, sharpen
from pipeline.whitening import learn_pca_whitening

PAPER_LONG_SIDE_CELLS = 64  # VGG16 conv5 (stride 16) on 1024-pixel images


@dataclass
class Collection:
    ids: list[str]
    photos: list[str]
    gt: dict[str, list]                  # photo -> its painting boxes (pixels)
    shown: set[str]                      # database paintings that appear in a photo
    n_paintings: int
    n_distractors: int


def load_collection(data: Path, n_distractors: int, seed: int, paintings: int | None, photos: int | None
                    ) -> Collection:
    """Paintings, ``qsd2_w3`` photos with their boxes, and a random sample of distractors (seed ``seed``)."""
    gnd = json.loads((data / "gnd.json").read_text())
    paint = [i for i in gnd["imlist"] if i.startswith("painting_")][:paintings]
    distractors = sorted(i for i in gnd["imlist"] if i.startswith("distractor_"))
    rng = np.random.default_rng(seed)
    distractors = sorted(rng.choice(distractors, min(n_distractors, len(distractors)), replace=False).tolist())
    gt: dict[str, list] = {}
    for q, g in zip(gnd["qimlist"], gnd["gnd"]):
        if q.startswith("qsd2_w3") and g.get("bbx") is not None:
            gt.setdefault(q, []).append(g["bbx"])
    keep = sorted(gt)[:photos]
    gt = {p: gt[p] for p in keep}
    shown = set()
    for q, g in zip(gnd["qimlist"], gnd["gnd"]):
        if q in gt:
            shown.update(gnd["imlist"][j] for j in list(g.get("easy", [])) + list(g.get("hard", [])))
    return Collection(paint + keep + distractors, keep, gt, shown, len(paint), len(distractors))


def load_activations(data: Path, ids: list[str], cfg: IndexConfig, cache: Path, threads: int
                     ) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """``id -> (A (C,h,w) float32, original (H, W))`` at ``extract.max_side``, from the cache or the backbone."""
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
    todo = []
    for i in ids:
        fa, fs = cache / f"{i}.A.npy", cache / f"{i}.hw.npy"
        if fa.exists() and fs.exists():
            out[i] = (np.load(fa, allow_pickle=False).astype(np.float32),
                      tuple(int(v) for v in np.load(fs, allow_pickle=False)))
        else:
            todo.append(i)
    if not todo:
        return out
    torch.set_num_threads(threads)
    bb = load_backbone(cfg.extract)
    t0 = time.perf_counter()
    for n, i in enumerate(todo):
        img = read_image(image_path(data, i), cfg.extract.max_side)
        A = bb(to_network_input(img, cfg.extract.max_side)[None])[0].numpy().astype(np.float16)
        hw = original_hw(img)
        np.save(cache / f"{i}.A.npy", A)
        np.save(cache / f"{i}.hw.npy", np.asarray(hw, np.int64))
        out[i] = (A.astype(np.float32), hw)
        if (n + 1) % 100 == 0:
            print(f"  extracted {n + 1}/{len(todo)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


@dataclass
class Regions:
    Z: np.ndarray          # regional MACs (n, C)
    f: np.ndarray          # mean F_hat per region
    owner: np.ndarray      # image index per region
    areas: np.ndarray      # share of the map per region
    fhat: dict[str, torch.Tensor]


def fs_regions(acts: dict, ids: list[str], fs: EGMParams) -> Regions:
    """FS map, FS.EGM regions (whole image when EGM finds none), their regional MAC and mean saliency."""
    fhat: dict[str, torch.Tensor] = {}
    descs, fvals, owner, areas = [], [], [], []
    for n, i in enumerate(ids):
        A = torch.from_numpy(acts[i][0])
        F = feature_saliency(A)
        fhat[i] = F
        h, w = F.shape
        boxes, _ = detect_regions_with(F.numpy(), fs)
        cells = to_cells(boxes, h, w) if len(boxes) else np.array([[0, 0, w, h]], np.int64)
        descs.append(regional_mac(A, cells).numpy())
        fvals.append(box_saliency(F, cells).numpy())
        owner.append(np.full(len(cells), n))
        areas.append((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1]) / (h * w))
    return Regions(np.concatenate(descs).astype(np.float32), np.concatenate(fvals).astype(np.float64),
                   np.concatenate(owner), np.concatenate(areas), fhat)


def box_coverage(boxes_px: np.ndarray, image_hw: tuple[int, int], feat_hw: tuple[int, int]) -> np.ndarray:
    """Fraction of each feature cell's area inside the union of pixel boxes: (h, w) in [0, 1]."""
    H, W = image_hw
    h, w = feat_hw
    mask = np.zeros((H, W), np.float64)
    for x0, y0, x1, y1 in np.asarray(boxes_px, dtype=np.float64).reshape(-1, 4):
        mask[max(0, int(round(y0))):min(H, int(round(y1))), max(0, int(round(x0))):min(W, int(round(x1)))] = 1
    sat = np.zeros((H + 1, W + 1))
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    ys = np.round(np.arange(h + 1) * H / h).astype(int)
    xs = np.round(np.arange(w + 1) * W / w).astype(int)
    total = sat[ys[1:, None], xs[None, 1:]] - sat[ys[:-1, None], xs[None, 1:]] \
        - sat[ys[1:, None], xs[None, :-1]] + sat[ys[:-1, None], xs[None, :-1]]
    area = (ys[1:] - ys[:-1])[:, None] * (xs[1:] - xs[:-1])[None, :]
    return total / np.maximum(area, 1)


def centrality(V: np.ndarray, k: int, cfg: IndexConfig):
    """Mutual k-NN graph of the rows of ``V`` and its Katz centrality (seed 001 §3.6-3.7, the config's
    ``graph.beta``, ``katz.alpha``, ``katz.tol``)."""
    W = knn_graph(V, k=min(k, len(V) - 1), beta=cfg.graph.beta)
    g, info = katz_centrality(normalize_graph(W), alpha=cfg.katz.alpha, tol=cfg.katz.tol, maxiter=cfg.katz.maxiter)
    return g, info, W


def mass_inside(S: np.ndarray, cov: np.ndarray) -> float:
    S = np.clip(np.asarray(S, np.float64), 0, None)
    return float((S * cov).sum() / S.sum()) if S.sum() > 0 else float("nan")


ROW_NAMES = ("OS in graph", "OS in graph, sharpened", "OS held-out (graph rebuilt without the photo)",
             "control: OS with g = 1", "control: OS held-out with g = 1")


def os_rows(col: Collection, acts: dict, R: Regions, whiten, search_all, k: int, side: int, g: np.ndarray,
            held_out: dict, cov: dict, cfg: IndexConfig) -> dict[str, np.ndarray]:
    """Mass inside the boxes of each OS variant (``ROW_NAMES``), one value per photo."""
    osc = cfg.object_saliency
    params = {"k": k, "beta": cfg.graph.beta, "Theta": osc.Theta, "theta": osc.theta}
    rows: dict[str, list[float]] = {n: [] for n in ROW_NAMES}
    for p in col.photos:
        u = patch_descriptors(torch.from_numpy(acts[p][0]), side, whiten)
        keep, g_out, sub = held_out[p]
        F, f = R.fhat[p], R.f
        S = object_saliency(F, u, f, g, search=search_all, **params)
        S_out = object_saliency(F, u, f[keep], g_out, search=sub, **params)
        rows["OS in graph"].append(mass_inside(S, cov[p]))
        rows["OS in graph, sharpened"].append(mass_inside(sharpen(S, osc.egm.tau, osc.egm.rho), cov[p]))
        rows["OS held-out (graph rebuilt without the photo)"].append(mass_inside(S_out, cov[p]))
        S_flat = object_saliency(F, u, f, np.ones_like(g), search=search_all, **params)
        rows["control: OS with g = 1"].append(mass_inside(S_flat, cov[p]))
        S_out_flat = object_saliency(F, u, f[keep], np.ones_like(g_out), search=sub, **params)
        rows["control: OS held-out with g = 1"].append(mass_inside(S_out_flat, cov[p]))
    return {name: np.asarray(v) for name, v in rows.items()}


def sweep_k(col: Collection, acts: dict, R: Regions, whiten, V: np.ndarray, k: int, sides: list[int], cov: dict,
            base: dict[str, np.ndarray], cfg: IndexConfig) -> list[tuple]:
    """Graph and held-out graphs at ``k``; OS rows for every patch side; table entries with their references."""
    kind = np.array(["painting" if i.startswith("painting_") else "photo" if i.startswith("qsd2") else "distractor"
                     for i in col.ids])[R.owner]
    in_photo = np.isin(np.asarray(col.ids)[R.owner], sorted(col.shown))
    g, info, W = centrality(V, k, cfg)
    deg = np.diff(W.indptr)
    med = {kd: float(np.median(g[kind == kd])) if (kind == kd).any() else float("nan")
           for kd in ("painting", "photo", "distractor")}
    print(f"\n  graph k = {k}: {W.nnz} edges, isolated regions {np.mean(deg == 0):.0%}; CG {info['iterations']} it, "
          f"residual {info['residual']:.1e}; median g: paintings {med['painting']:.3f} (shown in a photo "
          f"{np.median(g[in_photo]) if in_photo.any() else float('nan'):.3f}), photos {med['photo']:.3f}, "
          f"distractors {med['distractor']:.3f}; g 5-95% range {np.percentile(g, 5):.3f}-{np.percentile(g, 95):.3f}")
    search_all = exact_search_fn(V)
    held_out = {}
    for p in col.photos:
        keep = np.flatnonzero(R.owner != col.ids.index(p))
        g_out, _, _ = centrality(V[keep], k, cfg)
        held_out[p] = (keep, g_out, exact_search_fn(V[keep]))
    table = []
    for side in sides:
        rows = os_rows(col, acts, R, whiten, search_all, k, side, g, held_out, cov, cfg)
        where = f"k {k}, side {side}"
        for name, vals in rows.items():
            ref = ("FS sharpened", base["fs_sharp"]) if "sharpened" in name else ("FS raw", base["fs_raw"])
            table.append((name, where, vals) + ref)
            print(f"    side {side}: {name:<46s} {np.nanmean(vals):.3f}   (above FS raw on "
                  f"{np.mean(vals > base['fs_raw']):.0%} of photos, above F_hat^Theta on "
                  f"{np.mean(vals > base['fs_theta']):.0%})")
        held = rows["OS held-out (graph rebuilt without the photo)"]
        table += [("OS held-out (graph rebuilt without the photo)", where, held, "F_hat^Theta", base["fs_theta"]),
                  ("OS in graph", where, rows["OS in graph"], "OS with g = 1", rows["control: OS with g = 1"]),
                  ("OS held-out (graph rebuilt without the photo)", where, held, "OS held-out with g = 1",
                   rows["control: OS held-out with g = 1"])]
    return table


def print_table(table: list[tuple], chance: float, n_photos: int, seed: int) -> None:
    """README-ready table: mean share of mass inside the boxes, paired comparison with a reference map."""
    print(f"\n| map | graph / patch | mass inside boxes (mean of {n_photos} photos) | compared with | "
          f"photos higher | mean difference [95% bootstrap CI] | Wilcoxon p |\n|---|---|---|---|---|---|---|")
    print(f"| uniform map (box area share) | | {chance:.3f} | | | | |")
    boot = np.random.default_rng(seed).integers(0, n_photos, (10_000, n_photos))
    for name, where, vals, ref_name, ref in table:
        if ref is None:
            print(f"| {name} | {where} | {vals.mean():.3f} | | | | |")
            continue
        d = vals - ref
        lo, hi = np.percentile(d[boot].mean(axis=1), [2.5, 97.5])
        pval = wilcoxon(vals, ref).pvalue if not np.allclose(d, 0) and len(d) > 1 else 1.0
        print(f"| {name} | {where} | {vals.mean():.3f} | {ref_name} ({ref.mean():.3f}) | {np.mean(d > 0):.0%} | "
              f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | {pval:.2g} |")


def fs_baselines(col: Collection, acts: dict, R: Regions, cov: dict, cfg: IndexConfig) -> dict[str, np.ndarray]:
    """FS raw, FS sharpened with the FS preset, and ``F_hat^Theta`` (OS without its graph term), per photo."""
    fs, Theta = cfg.extract.fs, cfg.object_saliency.Theta
    return {"fs_raw": np.array([mass_inside(R.fhat[p].numpy(), cov[p]) for p in col.photos]),
            "fs_sharp": np.array([mass_inside(sharpen(R.fhat[p].numpy(), fs.tau, fs.rho), cov[p])
                                  for p in col.photos]),
            "fs_theta": np.array([mass_inside(R.fhat[p].numpy() ** Theta, cov[p]) for p in col.photos])}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_config_args(ap)
    ap.add_argument("--max-side", type=int, default=None, help="sets extract.max_side")
    ap.add_argument("--distractors", type=int, default=300)
    ap.add_argument("--paintings", type=int, default=None, help="first N paintings only (smoke runs)")
    ap.add_argument("--photos", type=int, default=None, help="first N qsd2_w3 photos only (smoke runs)")
    ap.add_argument("--k", type=int, nargs="+", default=None, help="graph k, also the OS neighbours "
                    "(default: the config's graph.k)")
    ap.add_argument("--side", type=int, nargs="+", default=None,
                    help="OS patch side(s) in cells (default: the config's object_saliency.patch_side)")
    ap.add_argument("--sigma-scale", default="auto", help="'auto' (long side cells / 64) or a number")
    ap.add_argument("--cache", type=Path, default=CACHE_ROOT / "bench_saliency")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args, extract__max_side=args.max_side)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = check_data(args.data)
    col = load_collection(data, args.distractors, args.seed, args.paintings, args.photos)
    print(f"collection: {col.n_paintings} paintings, {len(col.photos)} qsd2_w3 photos "
          f"({sum(len(b) for b in col.gt.values())} boxes), {col.n_distractors} distractors; "
          f"max_side {cfg.extract.max_side}")
    t0 = time.perf_counter()
    cache = args.cache / f"{cfg.extract.backbone}_{cfg.extract.layer or 'default'}_{cfg.extract.max_side}"
    acts = load_activations(data, col.ids, cfg, cache, args.threads)
    print(f"activations: {time.perf_counter() - t0:.1f} s")
    long_cells = max(max(a.shape[1:]) for a, _ in acts.values())
    scale = long_cells / PAPER_LONG_SIDE_CELLS if args.sigma_scale == "auto" else float(args.sigma_scale)
    fs = dataclasses.replace(cfg.extract.fs, sigma=cfg.extract.fs.sigma * scale)
    R = fs_regions(acts, col.ids, fs)
    print(f"FS.EGM (sigma {fs.sigma:.2f} cells, maps up to {long_cells} cells): {len(R.Z)} regions, "
          f"{len(R.Z) / len(col.ids):.1f} per image, median box area {np.median(R.areas):.0%} of the map")
    whiten = learn_pca_whitening(R.Z, dim=min(cfg.whiten.dim, R.Z.shape[1], len(R.Z) - 1))
    V = np.ascontiguousarray(whiten(R.Z), dtype=np.float32)
    cov = {p: box_coverage(np.asarray(col.gt[p]), acts[p][1], tuple(R.fhat[p].shape)) for p in col.photos}
    chance = float(np.mean([c.mean() for c in cov.values()]))
    base = fs_baselines(col, acts, R, cov, cfg)
    print(f"\nshare of map mass inside the GT painting boxes (mean over {len(col.photos)} photos; box area share "
          f"= uniform map = {chance:.3f})\n  FS raw {base['fs_raw'].mean():.3f}   "
          f"sharpened {base['fs_sharp'].mean():.3f}"
          f"   F_hat^Theta (OS without its graph term) {base['fs_theta'].mean():.3f}")
    table = [("FS raw (F_hat)", "", base["fs_raw"], "", None),
             ("FS sharpened", "", base["fs_sharp"], "FS raw", base["fs_raw"]),
             ("control: F_hat^Theta (OS without its graph term)", "", base["fs_theta"], "FS raw", base["fs_raw"])]
    for k in args.k or [cfg.graph.k]:
        table += sweep_k(col, acts, R, whiten, V, k, args.side or [cfg.object_saliency.patch_side], cov, base, cfg)
    print_table(table, chance, len(col.photos), args.seed)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
