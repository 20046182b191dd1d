"""Object saliency (OS) versus feature saliency (FS) on real photos (seed 001 §4.3, Fig. 8).

    python -m jobs.bench_saliency [--max-side 512] [--distractors 300] [--k 10 50] [--side 3 5]

Collection: the 287 museum paintings, the 30 ``qsd2_w3`` photos (one or two paintings on a wall or
background) and ``--distractors`` Caltech-101 photos of museum-landmarks. For every image: MobileNet-v2
activations (``--max-side``), FS map ``F_hat``, FS.EGM regions, their regional MAC and mean ``F_hat``; PCA
whitening to 256 dimensions learned on all those regions; mutual k-NN graph, Katz centrality (alpha 0.99,
beta 3); then the OS map (eq. 14) of every ``qsd2_w3`` photo.

Metric (the paper's Fig. 8 "precision"): the share of a map's total mass that lies inside the ground-truth
painting boxes (union of the photo's ``bbx`` in ``gnd.json``), each feature cell counted with the fraction
of its area inside the union. Printed for FS (``F_hat``) and OS, raw and after the EGM sharpening presets
(FS: tau 0.4, rho 5; OS: tau 0, rho 2), next to the box area share (the score of a uniform map). "OS
held-out" removes the photo's own regions from the collection, rebuilds the graph and Katz centrality without
them and searches only the rest, i.e. the photo is treated as a new image that is not in the graph (the
whitening, learned once on all regions, is kept). Controls: ``F_hat^2`` (eq. 14 without its graph term) and
OS with ``g = 1`` (eq. 14 without the centrality). The final table compares every map with FS raw over the
photos (share of photos where it is higher, mean difference with a 95% bootstrap interval, Wilcoxon
signed-rank p).

EGM scale: ``sigma`` is in feature cells. The paper's presets (FS 2.5, OS 2) are for VGG16 conv5 maps of
1024-pixel images, 64 cells on the long side; our maps are ``max_side / 32`` cells (16 at 512), so sigma
is scaled by ``long_side_cells / 64`` (``--sigma-scale`` overrides it; 1 gives the paper's cell values).

Activations are cached as float16 ``.npy`` under ``--cache`` (default /tmp/bench_cache).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import wilcoxon

from pipeline.egm import FS as FS_PRESET
from pipeline.egm import OS as OS_PRESET
from pipeline.egm import detect_regions
from pipeline.katz import katz_centrality
from pipeline.knn_graph import exact_search_fn, knn_graph, normalize_graph
from pipeline.object_saliency import object_saliency, patch_descriptors
from pipeline.pooling import regional_mac
from pipeline.regions import to_cells
from pipeline.saliency import box_saliency, feature_saliency, sharpen
from pipeline.whitening import learn_pca_whitening

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"
PAPER_LONG_SIDE_CELLS = 64  # VGG16 conv5 (stride 16) on 1024-pixel images


def load_activations(ids: list[str], max_side: int, cache: Path, threads: int) -> dict[str, tuple[np.ndarray, tuple]]:
    """``id -> (A (C,h,w) float32, original (H, W))``, from the cache or the backbone."""
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[np.ndarray, tuple]] = {}
    todo = []
    for i in ids:
        fa, fs = cache / f"{i}.A.npy", cache / f"{i}.hw.npy"
        if fa.exists() and fs.exists():
            out[i] = (np.load(fa, allow_pickle=False).astype(np.float32),
                      tuple(int(v) for v in np.load(fs, allow_pickle=False)))
        else:
            todo.append(i)
    if todo:
        from pipeline.backbone import build_backbone
        from pipeline.preprocess import to_network_input
        from storage.images import decode_image
        from storage.weights import load_state_dict

        torch.set_num_threads(threads)
        bb = build_backbone("mobilenet_v2", load_state_dict("builtin:mobilenet_v2")).eval()
        t0 = time.perf_counter()
        for n, i in enumerate(todo):
            img = decode_image((DATA / "jpg" / f"{i}.jpg").read_bytes())
            A = bb(to_network_input(img, max_side)[None])[0].numpy()
            hw = (img.height, img.width)
            np.save(cache / f"{i}.A.npy", A.astype(np.float16))
            np.save(cache / f"{i}.hw.npy", np.asarray(hw, np.int64))
            out[i] = (A.astype(np.float16).astype(np.float32), hw)
            if (n + 1) % 100 == 0:
                print(f"  extracted {n + 1}/{len(todo)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


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


def centrality(V: np.ndarray, k: int, beta: float = 3.0, alpha: float = 0.99):
    """Mutual k-NN graph of the rows of ``V`` and its Katz centrality (seed 001 §3.6-3.7)."""
    W = knn_graph(V, k=k, beta=beta)
    g, info = katz_centrality(normalize_graph(W), alpha=alpha, tol=1e-8)
    return g, info, W


def mass_inside(S: np.ndarray, cov: np.ndarray) -> float:
    S = np.clip(np.asarray(S, np.float64), 0, None)
    return float((S * cov).sum() / S.sum()) if S.sum() > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--distractors", type=int, default=300)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 50], help="graph k (also the OS neighbours)")
    ap.add_argument("--side", type=int, nargs="+", default=[3, 5], help="OS patch side(s) in cells")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--sigma-scale", type=float, default=None)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/bench_cache"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    gnd = json.loads((DATA / "gnd.json").read_text())
    paintings = [i for i in gnd["imlist"] if i.startswith("painting_")]
    distractors = sorted(i for i in gnd["imlist"] if i.startswith("distractor_"))
    rng = np.random.default_rng(args.seed)
    distractors = sorted(rng.choice(distractors, min(args.distractors, len(distractors)), replace=False).tolist())
    gt: dict[str, list] = {}
    shown: set[str] = set()  # database paintings that appear in a qsd2_w3 photo (their positives)
    for q, g in zip(gnd["qimlist"], gnd["gnd"]):
        if q.startswith("qsd2_w3") and g.get("bbx") is not None:
            gt.setdefault(q, []).append(g["bbx"])
            shown.update(gnd["imlist"][j] for j in list(g.get("easy", [])) + list(g.get("hard", [])))
    photos = sorted(gt)
    ids = paintings + photos + distractors
    print(f"collection: {len(paintings)} paintings, {len(photos)} qsd2_w3 photos "
          f"({sum(len(b) for b in gt.values())} boxes), {len(distractors)} distractors; max_side {args.max_side}")

    t0 = time.perf_counter()
    acts = load_activations(ids, args.max_side, args.cache / f"mobilenet_v2_{args.max_side}", args.threads)
    print(f"activations: {time.perf_counter() - t0:.1f} s")

    # ---- FS maps, FS.EGM regions, regional MAC, region saliency
    t0 = time.perf_counter()
    long_cells = max(max(a.shape[1:]) for a, _ in acts.values())
    sigma_scale = args.sigma_scale if args.sigma_scale is not None else long_cells / PAPER_LONG_SIDE_CELLS
    fs_params = dict(FS_PRESET, sigma=FS_PRESET["sigma"] * sigma_scale)
    fhat: dict[str, torch.Tensor] = {}
    descs, fvals, owner, areas = [], [], [], []
    for n, i in enumerate(ids):
        A = torch.from_numpy(acts[i][0])
        F = feature_saliency(A)
        fhat[i] = F
        h, w = F.shape
        boxes, _ = detect_regions(F.numpy(), **fs_params)
        cells = to_cells(boxes, h, w) if len(boxes) else np.array([[0, 0, w, h]], np.int64)
        descs.append(regional_mac(A, cells).numpy())
        fvals.append(box_saliency(F, cells).numpy())
        owner.append(np.full(len(cells), n))
        areas.append((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1]) / (h * w))
    Z = np.concatenate(descs).astype(np.float32)
    f = np.concatenate(fvals).astype(np.float64)
    owner = np.concatenate(owner)
    areas = np.concatenate(areas)
    print(f"FS.EGM (sigma {fs_params['sigma']:.2f} cells, maps up to {long_cells} cells): {len(Z)} regions, "
          f"{len(Z) / len(ids):.1f} per image, median box area {np.median(areas):.0%} of the map; "
          f"{time.perf_counter() - t0:.1f} s")

    whiten = learn_pca_whitening(Z, dim=args.dim)
    V = np.ascontiguousarray(whiten(Z), dtype=np.float32)
    kind = np.array(["painting" if i.startswith("painting_") else "photo" if i.startswith("qsd2") else "distractor"
                     for i in ids])[owner]
    in_photo = np.isin(np.asarray(ids)[owner], sorted(shown))  # regions of paintings that recur in a photo

    # ---- ground truth coverage per photo
    cov = {p: box_coverage(np.asarray(gt[p]), acts[p][1], tuple(fhat[p].shape)) for p in photos}
    chance = np.mean([c.mean() for c in cov.values()])
    fs_raw = np.array([mass_inside(fhat[p].numpy(), cov[p]) for p in photos])
    fs_sharp = np.array([mass_inside(sharpen(fhat[p].numpy(), FS_PRESET["tau"], FS_PRESET["rho"]), cov[p])
                         for p in photos])
    print(f"\nshare of map mass inside the GT painting boxes (mean over {len(photos)} photos; box area share "
          f"= uniform map = {chance:.3f})")
    fs_theta = np.array([mass_inside(fhat[p].numpy() ** 2, cov[p]) for p in photos])
    print(f"  FS  raw {fs_raw.mean():.3f}   sharpened (tau 0.4, rho 5) {fs_sharp.mean():.3f}   "
          f"F_hat^Theta = F_hat^2 (OS without its graph term) {fs_theta.mean():.3f}")

    photo_index = {p: ids.index(p) for p in photos}
    # (map, graph/patch, values per photo, reference map, its values): paired comparisons for the final table
    table = [("FS raw (F_hat)", "", fs_raw, "", None),
             ("FS sharpened (tau 0.4, rho 5)", "", fs_sharp, "FS raw", fs_raw),
             ("control: F_hat^2 (OS without its graph term)", "", fs_theta, "FS raw", fs_raw)]
    for k in args.k:
        g, info, W = centrality(V, k)
        deg = np.diff(W.indptr)
        print(f"\n  graph k = {k}: {W.nnz} edges, isolated regions {np.mean(deg == 0):.0%}; CG "
              f"{info['iterations']} it, residual {info['residual']:.1e}; median g: paintings "
              f"{np.median(g[kind == 'painting']):.3f} (of the {len(shown)} shown in a photo "
              f"{np.median(g[in_photo]):.3f}, others {np.median(g[(kind == 'painting') & ~in_photo]):.3f}), "
              f"photos {np.median(g[kind == 'photo']):.3f}, distractors {np.median(g[kind == 'distractor']):.3f}; "
              f"g 5-95% range {np.percentile(g, 5):.3f}-{np.percentile(g, 95):.3f}")
        search_all = exact_search_fn(V)
        held_out = {}  # photo -> (keep, g without the photo's regions, search over V[keep])
        for p in photos:
            keep = np.flatnonzero(owner != photo_index[p])
            g_out, _, _ = centrality(V[keep], k)
            held_out[p] = (keep, g_out, exact_search_fn(V[keep]))
        for side in args.side:
            rows = {"OS in graph": [], "OS in graph, sharpened (tau 0, rho 2)": [],
                    "OS held-out (graph rebuilt without the photo)": [], "control: OS with g = 1": [],
                    "control: OS held-out with g = 1": []}
            for p in photos:
                A = torch.from_numpy(acts[p][0])
                u = patch_descriptors(A, side, whiten)
                S = object_saliency(fhat[p], u, f, g, search=search_all, k=k)
                keep, g_out, sub = held_out[p]
                S_out = object_saliency(fhat[p], u, f[keep], g_out, search=sub, k=k)
                rows["OS in graph"].append(mass_inside(S, cov[p]))
                rows["OS in graph, sharpened (tau 0, rho 2)"].append(
                    mass_inside(sharpen(S, OS_PRESET["tau"], OS_PRESET["rho"]), cov[p]))
                rows["OS held-out (graph rebuilt without the photo)"].append(mass_inside(S_out, cov[p]))
                S_flat = object_saliency(fhat[p], u, f, np.ones_like(g), search=search_all, k=k)
                rows["control: OS with g = 1"].append(mass_inside(S_flat, cov[p]))
                S_out_flat = object_saliency(fhat[p], u, f[keep], np.ones_like(g_out), search=sub, k=k)
                rows["control: OS held-out with g = 1"].append(mass_inside(S_out_flat, cov[p]))
            rows = {name: np.asarray(vals) for name, vals in rows.items()}
            where = f"k {k}, side {side}"
            for name, vals in rows.items():
                ref = ("FS sharpened", fs_sharp) if "sharpened" in name else ("FS raw", fs_raw)
                table.append((name, where, vals) + ref)
            table.append(("OS held-out (graph rebuilt without the photo)", where,
                          rows["OS held-out (graph rebuilt without the photo)"], "F_hat^2", fs_theta))
            table.append(("OS in graph", where, rows["OS in graph"], "OS with g = 1",
                          rows["control: OS with g = 1"]))
            table.append(("OS held-out (graph rebuilt without the photo)", where,
                          rows["OS held-out (graph rebuilt without the photo)"], "OS held-out with g = 1",
                          rows["control: OS held-out with g = 1"]))
            for name, vals in rows.items():
                print(f"    side {side}: {name:<46s} {np.nanmean(vals):.3f}   (above FS raw on "
                      f"{np.mean(vals > fs_raw):.0%} of photos, above F_hat^2 on {np.mean(vals > fs_theta):.0%})")

    # README-ready table: mean share of mass inside the boxes, paired comparison with a reference map
    print(f"\n| map | graph / patch | mass inside boxes (mean of {len(photos)} photos) | compared with | "
          f"photos higher | mean difference [95% bootstrap CI] | Wilcoxon p |\n|---|---|---|---|---|---|---|")
    print(f"| uniform map (box area share) | | {chance:.3f} | | | | |")
    boot = np.random.default_rng(args.seed).integers(0, len(photos), (10_000, len(photos)))
    for name, where, vals, ref_name, ref in table:
        if ref is None:
            print(f"| {name} | {where} | {vals.mean():.3f} | | | | |")
            continue
        d = vals - ref
        lo, hi = np.percentile(d[boot].mean(axis=1), [2.5, 97.5])
        pval = wilcoxon(vals, ref).pvalue if not np.allclose(d, 0) else 1.0
        print(f"| {name} | {where} | {vals.mean():.3f} | {ref_name} ({ref.mean():.3f}) | {np.mean(d > 0):.0%} | "
              f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | {pval:.2g} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
