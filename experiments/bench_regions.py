"""Region proposals against painting boxes: FS saliency precision, FS.EGM / CAM box IoU, EGM cost.

    python -m experiments.bench_regions [--config configs/benchmark.yaml] [--max-side 1024] [--limit N]
                                        [--json regions.json]

Over the ``qsd2_w3`` photos of museum-landmarks (one or two paintings on a wall, a box per painting in
``gnd.json``; a photo with two paintings is listed twice, its boxes are united) this reports

(a) saliency "precision" of seed 001 §4.3: the share of a map's mass inside the ground-truth boxes, for
    the FS map ``F_hat``, the sharpened FS map that EGM actually sees (the config's ``extract.fs`` preset), and
    a uniform map (= the share of the image area the paintings cover: the chance level);
(b) mean best IoU: for every ground-truth painting, the IoU of the best-matching box of each method
    (FS.EGM, CAM boxes of the top-2 averaged CAM at the config's ``extract.cam_thresholds``, and the whole
    image as reference), averaged over paintings; plus the number of boxes per photo. The boxes are the ones
    the extract stage stores (EGM / CAM boxes rounded outward to feature cells, mapped to pixels);
(c) cost: EGM time per photo (sharpen + EGM) and FS-map time against the backbone forward time per photo,
    measured in the same run, as ratios.

Backbone, weights, input size and presets come from the index config (``--max-side`` overrides
``extract.max_side``). Maps live on the feature grid; a cell's share of "inside" is the fraction of its pixel
footprint covered by the union of the boxes (8 x 8 sub-samples per cell).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from experiments.common import (DEFAULT_DATA, add_config_args, check_data, classifier_of, config_from_args,
                                gnd_boxes, image_path, load_backbone, read_image, write_json)
from pipeline.backbone import Backbone
from pipeline.cam import cam_boxes, top_cam_map
from pipeline.egm import detect_regions_with
from pipeline.extract import ExtractConfig
from pipeline.preprocess import to_network_input
from pipeline.regions import box_iou, cells_to_pixels, to_cells
from pipeline.saliency import feature_saliency, sharpen


def cell_coverage(boxes_px: np.ndarray, feat_hw: tuple[int, int], image_hw: tuple[int, int],
                  sub: int = 8) -> np.ndarray:
    """(h, w) fraction of each feature cell's pixel footprint inside the union of ``boxes_px``."""
    fh, fw = feat_hw
    ih, iw = image_hw
    offs = (np.arange(sub) + 0.5) / sub
    xs = ((np.arange(fw)[:, None] + offs[None, :]) * (iw / fw)).ravel()  # (fw*sub,)
    ys = ((np.arange(fh)[:, None] + offs[None, :]) * (ih / fh)).ravel()
    b = boxes_px.reshape(-1, 4)
    inside = ((xs[None, None, :] >= b[:, None, None, 0]) & (xs[None, None, :] < b[:, None, None, 2])
              & (ys[None, :, None] >= b[:, None, None, 1]) & (ys[None, :, None] < b[:, None, None, 3])).any(0)
    return inside.reshape(fh, sub, fw, sub).mean(axis=(1, 3))


def mass_share(S: np.ndarray, coverage: np.ndarray) -> float:
    """Share of the mass of map ``S`` inside the covered area (seed 001 §4.3 precision)."""
    total = float(S.sum())
    return float((S * coverage).sum() / total) if total > 0 else float("nan")


@torch.inference_mode()
def image_regions(bb: Backbone, image: Image.Image, cfg: ExtractConfig) -> dict:
    """FS map, FS.EGM boxes, top-2 CAM and CAM boxes of one image as the extract stage computes them (scale 1,
    ``cfg.fs`` preset, ``cfg.cam_thresholds``), with per-step timings; boxes in image pixels."""
    if bb.classifier_weight is None:
        raise SystemExit(f"{cfg.backbone} layer {bb.layer}: no GAP+linear classifier, CAM boxes unavailable")
    device = next(bb.parameters()).device
    x = to_network_input(image, cfg.max_side).to(device)
    t0 = time.perf_counter()
    A = bb(x[None])[0]
    t1 = time.perf_counter()
    F = feature_saliency(A).cpu().numpy()
    t2 = time.perf_counter()
    boxes, scores = detect_regions_with(F, cfg.fs)
    t3 = time.perf_counter()
    cam = top_cam_map(A, *classifier_of(bb), k=2).cpu().numpy()
    cboxes = cam_boxes(cam, thresholds=cfg.cam_thresholds)
    h, w = A.shape[1:]
    hw = (image.height, image.width)
    egm_cells = to_cells(boxes, h, w) if len(boxes) else np.zeros((0, 4), np.int64)
    return {"A": A, "fs": F, "cam": cam, "feat_hw": (h, w), "egm_raw": boxes,
            "egm_px": cells_to_pixels(egm_cells, (h, w), hw), "egm_scores": np.asarray(scores),
            "cam_px": cells_to_pixels(to_cells(cboxes, h, w), (h, w), hw),
            "t_forward": t1 - t0, "t_fs": t2 - t1, "t_egm": t3 - t2}


def measure(bb: Backbone, data: Path, photos: dict[str, np.ndarray], cfg: ExtractConfig) -> dict:
    """Per-photo precision, best IoUs, box counts and timings over ``photos``."""
    m = {"precision": {"uniform": [], "fs": [], "fs_sharpened": []},
         "iou": {"fs_egm": [], "cam": [], "full_image": []}, "n_boxes": [], "t_forward": [], "t_fs": [],
         "t_egm": []}
    for qid, gt in photos.items():
        image = read_image(image_path(data, qid))
        r = image_regions(bb, image, cfg)
        cov = cell_coverage(gt, r["feat_hw"], (image.height, image.width))
        m["precision"]["uniform"].append(float(cov.mean()))
        m["precision"]["fs"].append(mass_share(r["fs"], cov))
        m["precision"]["fs_sharpened"].append(mass_share(sharpen(r["fs"], cfg.fs.tau, cfg.fs.rho), cov))
        full = np.array([[0, 0, image.width, image.height]], dtype=np.float64)
        for name, boxes in (("fs_egm", r["egm_px"]), ("cam", r["cam_px"]), ("full_image", full)):
            iou = box_iou(gt, boxes).max(axis=1) if len(boxes) else np.zeros(len(gt))
            m["iou"][name].extend(iou.tolist())
        m["n_boxes"].append(len(r["egm_px"]))
        for k in ("t_forward", "t_fs", "t_egm"):
            m[k].append(r[k])
    return m


def summarise(m: dict, photos: dict[str, np.ndarray], cfg: ExtractConfig, threads: int) -> dict:
    nb = m["n_boxes"]
    return {
        "photos": len(photos), "paintings": int(sum(len(b) for b in photos.values())), "max_side": cfg.max_side,
        "backbone": cfg.backbone, "threads": threads, "fs_preset": dataclasses.asdict(cfg.fs),
        "precision": {k: float(np.mean(v)) for k, v in m["precision"].items()},
        "mean_best_iou": {k: float(np.mean(v)) for k, v in m["iou"].items()},
        "share_iou_ge_0.5": {k: float(np.mean(np.asarray(v) >= 0.5)) for k, v in m["iou"].items()},
        "fs_egm_boxes_per_photo": {"mean": float(np.mean(nb)), "min": int(np.min(nb)), "max": int(np.max(nb))},
        "cam_boxes_per_photo": len(cfg.cam_thresholds),
        "seconds_per_photo": {"forward": float(np.mean(m["t_forward"])), "fs_map": float(np.mean(m["t_fs"])),
                              "egm": float(np.mean(m["t_egm"]))},
        "ratio_egm_to_forward": float(np.sum(m["t_egm"]) / np.sum(m["t_forward"])),
        "ratio_fs_to_forward": float(np.sum(m["t_fs"]) / np.sum(m["t_forward"])),
    }


def print_results(res: dict) -> None:
    print(f"{res['photos']} photos, {res['paintings']} paintings, max side {res['max_side']}, "
          f"{res['backbone']}, {res['threads']} thread(s), FS preset {res['fs_preset']}")
    print("(a) share of saliency mass inside the painting boxes")
    for k, v in res["precision"].items():
        print(f"    {k:<14} {v:.3f}")
    print("(b) per painting, IoU of the best box     mean   share>=0.5")
    for k, v in res["mean_best_iou"].items():
        print(f"    {k:<14}                        {v:.3f}   {res['share_iou_ge_0.5'][k]:.3f}")
    nb = res["fs_egm_boxes_per_photo"]
    print(f"    FS.EGM boxes per photo: mean {nb['mean']:.2f} (min {nb['min']}, max {nb['max']}); "
          f"CAM: {res['cam_boxes_per_photo']}")
    s = res["seconds_per_photo"]
    print(f"(c) per photo: forward {s['forward'] * 1e3:.1f} ms, FS map {s['fs_map'] * 1e3:.2f} ms, "
          f"EGM {s['egm'] * 1e3:.2f} ms")
    print(f"    EGM / forward = {res['ratio_egm_to_forward']:.3f}, FS / forward = {res['ratio_fs_to_forward']:.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_config_args(ap)
    ap.add_argument("--max-side", type=int, default=None, help="sets extract.max_side")
    ap.add_argument("--limit", type=int, default=None, help="first N photos only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (same for every timed step)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = config_from_args(args, extract__max_side=args.max_side).extract
    data = check_data(args.data)
    photos = gnd_boxes(data / "gnd.json", "qsd2_w3")
    if args.limit:
        photos = dict(list(photos.items())[:args.limit])
    bb = load_backbone(cfg)
    bb(torch.zeros(1, 3, 224, 224))  # warm-up
    res = summarise(measure(bb, data, photos, cfg), photos, cfg, args.threads)
    print_results(res)
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
