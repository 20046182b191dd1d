"""Region proposals against painting boxes: FS saliency precision, FS.EGM / CAM box IoU, EGM cost.

    python -m jobs.bench_regions [--max-side 1024] [--limit N] [--out regions.json]

Over the ``qsd2_w3`` photos of museum-landmarks (one or two paintings on a wall, a box per painting in
``gnd.json``; a photo with two paintings is listed twice, its boxes are united) this reports

(a) saliency "precision" of seed 001 §4.3: the share of a map's mass inside the ground-truth boxes, for
    the FS map ``F_hat``, the sharpened FS map that EGM actually sees (``tau=0.4, rho=5``), and a
    uniform map (= the share of the image area the paintings cover: the chance level);
(b) mean best IoU: for every ground-truth painting, the IoU of the best-matching box of each method
    (FS.EGM, CAM boxes of the top-2 averaged CAM at 1/10/20/30/40 %, and the whole image as reference),
    averaged over paintings; plus the number of boxes per photo;
(c) cost: EGM time per photo (sharpen + EGM) and FS-map time against the backbone forward time per photo,
    measured in the same run, as ratios.

Maps live on the feature grid; a cell's share of "inside" is the fraction of its pixel footprint covered
by the union of the boxes (8 x 8 sub-samples per cell).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.backbone import build_backbone
from pipeline.cam import cam_boxes, top_cam_map
from pipeline.egm import FS, detect_regions
from pipeline.preprocess import to_network_input
from pipeline.regions import box_iou, cells_to_pixels
from pipeline.saliency import feature_saliency, sharpen
from storage.arrays import save_json
from storage.images import decode_image
from storage.weights import load_state_dict

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"


def painting_photos(gnd_path: Path, prefix: str = "qsd2_w3") -> dict[str, np.ndarray]:
    """Photo id -> (n, 4) float pixel boxes of all its paintings (duplicated query entries united)."""
    gnd = json.loads(gnd_path.read_text())
    out: dict[str, list] = {}
    for qid, g in zip(gnd["qimlist"], gnd["gnd"]):
        if qid.startswith(prefix) and g.get("bbx") is not None:
            out.setdefault(qid, []).append(g["bbx"])
    return {k: np.asarray(v, dtype=np.float64) for k, v in sorted(out.items())}


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


def image_regions(bb: torch.nn.Module, image, max_side: int) -> dict:
    """Everything the bench and the figure need for one PIL image, with per-step timings."""
    x = to_network_input(image, max_side)
    t0 = time.perf_counter()
    A = bb(x[None])[0]
    t1 = time.perf_counter()
    F = feature_saliency(A)
    t2 = time.perf_counter()
    boxes, scores = detect_regions(F.numpy(), **FS)
    t3 = time.perf_counter()
    cam = top_cam_map(A, bb.classifier_weight, bb.classifier_bias, k=2)
    cboxes = cam_boxes(cam)
    h, w = A.shape[1:]
    hw = (image.height, image.width)
    return {"A": A, "fs": F.numpy(), "cam": cam.numpy(), "feat_hw": (h, w),
            "egm_px": cells_to_pixels(boxes, (h, w), hw), "egm_scores": scores,
            "cam_px": cells_to_pixels(cboxes, (h, w), hw),
            "t_forward": t1 - t0, "t_fs": t2 - t1, "t_egm": t3 - t2}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=None, help="first N photos only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (same for every timed step)")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--out", default=None, help="write the results as JSON here (path or URI)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    photos = painting_photos(args.data / "gnd.json")
    ids = list(photos)[: args.limit] if args.limit else list(photos)
    bb = build_backbone(args.backbone, load_state_dict(f"builtin:{args.backbone}"))
    if bb.classifier_weight is None:
        raise SystemExit(f"{args.backbone}: no GAP+linear classifier on this layer, CAM boxes unavailable")
    bb(torch.zeros(1, 3, 224, 224))  # warm-up

    prec = {"uniform": [], "fs": [], "fs_sharpened": []}
    best_iou = {"fs_egm": [], "cam": [], "full_image": []}
    n_boxes = []
    t_fwd, t_fs, t_egm = [], [], []
    for qid in ids:
        image = decode_image((args.data / "jpg" / f"{qid}.jpg").read_bytes())
        r = image_regions(bb, image, args.max_side)
        gt = photos[qid]
        cov = cell_coverage(gt, r["feat_hw"], (image.height, image.width))
        prec["uniform"].append(float(cov.mean()))
        prec["fs"].append(mass_share(r["fs"], cov))
        prec["fs_sharpened"].append(mass_share(sharpen(r["fs"], FS["tau"], FS["rho"]), cov))
        full = np.array([[0, 0, image.width, image.height]], dtype=np.float64)
        for name, boxes in (("fs_egm", r["egm_px"]), ("cam", r["cam_px"]), ("full_image", full)):
            iou = box_iou(gt, boxes).max(axis=1) if len(boxes) else np.zeros(len(gt))
            best_iou[name].extend(iou.tolist())
        n_boxes.append(len(r["egm_px"]))
        t_fwd.append(r["t_forward"])
        t_fs.append(r["t_fs"])
        t_egm.append(r["t_egm"])

    res = {
        "photos": len(ids), "paintings": sum(len(photos[q]) for q in ids), "max_side": args.max_side,
        "backbone": args.backbone, "threads": args.threads,
        "precision": {k: float(np.mean(v)) for k, v in prec.items()},
        "mean_best_iou": {k: float(np.mean(v)) for k, v in best_iou.items()},
        "share_iou_ge_0.5": {k: float(np.mean(np.asarray(v) >= 0.5)) for k, v in best_iou.items()},
        "fs_egm_boxes_per_photo": {"mean": float(np.mean(n_boxes)), "min": int(np.min(n_boxes)),
                                   "max": int(np.max(n_boxes))},
        "cam_boxes_per_photo": 5,
        "seconds_per_photo": {"forward": float(np.mean(t_fwd)), "fs_map": float(np.mean(t_fs)),
                              "egm": float(np.mean(t_egm))},
        "ratio_egm_to_forward": float(np.sum(t_egm) / np.sum(t_fwd)),
        "ratio_fs_to_forward": float(np.sum(t_fs) / np.sum(t_fwd)),
    }
    print(f"{res['photos']} photos, {res['paintings']} paintings, max side {args.max_side}, "
          f"{args.backbone}, {args.threads} thread(s)")
    print("(a) share of saliency mass inside the painting boxes")
    for k, v in res["precision"].items():
        print(f"    {k:<14} {v:.3f}")
    print("(b) per painting, IoU of the best box     mean   share>=0.5")
    for k in best_iou:
        print(f"    {k:<14}                        {res['mean_best_iou'][k]:.3f}   {res['share_iou_ge_0.5'][k]:.3f}")
    nb = res["fs_egm_boxes_per_photo"]
    print(f"    FS.EGM boxes per photo: mean {nb['mean']:.2f} (min {nb['min']}, max {nb['max']}); CAM: 5")
    s = res["seconds_per_photo"]
    print(f"(c) per photo: forward {s['forward'] * 1e3:.1f} ms, FS map {s['fs_map'] * 1e3:.2f} ms, "
          f"EGM {s['egm'] * 1e3:.2f} ms")
    print(f"    EGM / forward = {res['ratio_egm_to_forward']:.3f}, FS / forward = {res['ratio_fs_to_forward']:.4f}")
    if args.out:
        save_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
