"""Seed 004 CAM descriptor: whitening each class vector (the paper's order) vs whitening the sum once (today's
pipeline), on a museum-landmarks track (root: landmark queries; ``in-photos``: clean paintings searched in
cluttered photos) against a database of the track's non-distractor images plus some distractors.

Small by design (CPU): the landmark photos plus ``n_distractors`` distractors, mobilenet_v2 (built-in ImageNet
weights, so the classifier gives CAMs) at ``max_side`` pixels. The PCA of both variants is learned on the
*other* distractors (as the paper learns it on another dataset): per-class vectors (top-``n_pca`` of each
image) for the paper's order, the per-image sums for today's order. Usage:

    python experiments/cam_whitening_order_museum.py [n_distractors] [n_pca_images] [max_side] [track]

(``track``: ``root`` (default; landmark queries only, they are database photos) or ``in-photos``.) Queries
without a box are encoded whole; boxed queries are not supported here.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.backbone import build_backbone
from pipeline.cam import cam_ofa
from pipeline.cam_aggregation import cam_class_vectors, cam_ofa_whitened, learn_cam_whitening, whitening_sample
from pipeline.evaluation import compute_map, protocol_gnd
from pipeline.preprocess import to_network_input
from pipeline.whitening import learn_pca_whitening
from storage.images import decode_image
from storage.weights import load_state_dict

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"


def main() -> None:
    n_dis = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 600
    max_side = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    torch.set_num_threads(1)
    track = sys.argv[4] if len(sys.argv) > 4 else "root"
    g = json.loads((DATA / ("gnd.json" if track == "root" else f"{track}/gnd.json")).read_text())
    imlist = g["imlist"]
    sel = [i for i, q in enumerate(g["gnd"]) if (q["set"] == "landmarks" or track != "root") and q["bbx"] is None]
    dis = [j for j, grp in enumerate(g["groups"]) if grp == "distractor"]
    rng = np.random.default_rng(0)
    rng.shuffle(dis)
    db = [j for j, grp in enumerate(g["groups"]) if grp != "distractor"] + dis[:n_dis]
    train = dis[n_dis:n_dis + n_train]
    bb = build_backbone("mobilenet_v2", load_state_dict("builtin:mobilenet_v2"))
    weight, bias = bb.classifier_weight, bb.classifier_bias

    @torch.inference_mode()
    def vectors(name: str) -> tuple[np.ndarray, np.ndarray]:
        img = decode_image((DATA / "jpg" / f"{name}.jpg").read_bytes())
        A = bb(to_network_input(img, max_side)[None])[0].float()
        return cam_class_vectors(A, weight, bias, 64), cam_ofa(A, weight, bias, n_classes=64).numpy()

    t0 = time.time()
    tr = [vectors(imlist[j]) for j in train]
    dv = [vectors(imlist[j]) for j in db]
    qv = [vectors(g["qimlist"][i]) for i in sel]
    t_fwd = time.time() - t0
    dim = min(256, len(train) - 1)
    wh_class = learn_cam_whitening(whitening_sample([v for v, _ in tr], n_pca=1), dim=dim)
    wh_sum = learn_pca_whitening(np.stack([s for _, s in tr]), dim=dim)

    def variants(v: list) -> dict[str, np.ndarray]:
        return {"unwhitened_sum": np.stack([b for _, b in v]),
                "whiten_sum_once": np.asarray(wh_sum.apply(np.stack([b for _, b in v])), np.float32),
                "whiten_per_class": cam_ofa_whitened(np.stack([a for a, _ in v]), wh_class)}

    Xd, Xq = variants(dv), variants(qv)
    pos = {j: n for n, j in enumerate(db)}
    gnd = [{key: [pos[j] for j in g["gnd"][i][key] if j in pos] for key in ("easy", "hard", "junk")} for i in sel]
    gm = protocol_gnd(gnd, "medium")
    out = {"track": track, "db": len(db), "queries": len(sel), "pca_images": len(train), "dim": dim,
           "max_side": max_side, "forward_s": round(t_fwd, 1)}
    for name in Xd:
        ranks = np.argsort(-(Xq[name] @ Xd[name].T), axis=1, kind="stable")
        out[name] = compute_map(list(ranks), gm)[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
