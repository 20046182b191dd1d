"""Figure: photo, FS saliency with FS.EGM boxes, top-2 CAM with CAM boxes, one row per image.

    python -m jobs.figure_regions --images a.jpg b.jpg c.jpg --out fig.png [--max-side 1024] [--gnd gnd.json]

Ground-truth boxes (dashed green) are drawn when ``--gnd`` is given (default: museum-landmarks'
``gnd.json``) and lists the image's id as a query with a box.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from jobs.bench_regions import DEFAULT_DATA, image_regions  # noqa: E402
from pipeline.backbone import build_backbone  # noqa: E402
from storage.images import decode_image  # noqa: E402
from storage.weights import load_state_dict  # noqa: E402

CAM_COLOURS = ("#ffffb2", "#fecc5c", "#fd8d3c", "#f03b20", "#bd0026")  # thresholds 1 .. 40 %


def _boxes_by_id(gnd_path: Path | None) -> dict[str, list]:
    if gnd_path is None or not gnd_path.exists():
        return {}
    gnd = json.loads(gnd_path.read_text())
    out: dict[str, list] = {}
    for qid, g in zip(gnd["qimlist"], gnd["gnd"]):
        if g.get("bbx") is not None:
            out.setdefault(qid, []).append(g["bbx"])
    return out


def _draw(ax, boxes, colour, lw=2.0, ls="-", labels=None) -> None:
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).reshape(-1, 4)):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour if isinstance(colour, str)
                               else colour[i % len(colour)], lw=lw, ls=ls))
        if labels is not None:
            ax.text(x0 + 4, y0 + 14, labels[i], color="white", fontsize=7,
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--gnd", type=Path, default=DEFAULT_DATA / "gnd.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bb = build_backbone(args.backbone, load_state_dict(f"builtin:{args.backbone}"))
    gt = _boxes_by_id(args.gnd)

    n = len(args.images)
    fig, axes = plt.subplots(n, 3, figsize=(13, 3.2 * n), squeeze=False)
    for row, path in zip(axes, args.images):
        image = decode_image(path.read_bytes())
        r = image_regions(bb, image, args.max_side)
        extent = (0, image.width, image.height, 0)
        photo = np.asarray(image)
        row[0].imshow(photo)
        row[0].set_title(f"{path.stem}  ({image.width}x{image.height}, grid {r['feat_hw'][1]}x{r['feat_hw'][0]})",
                         fontsize=9)
        row[1].imshow(photo)
        row[1].imshow(r["fs"], cmap="jet", alpha=0.45, extent=extent, interpolation="bilinear")
        _draw(row[1], r["egm_px"], "red", labels=[f"{s:.2f}" for s in r["egm_scores"]])
        row[1].set_title(f"FS map + FS.EGM boxes ({len(r['egm_px'])}, label = mixing weight)", fontsize=9)
        row[2].imshow(photo)
        row[2].imshow(r["cam"], cmap="jet", alpha=0.45, extent=extent, interpolation="bilinear")
        _draw(row[2], r["cam_px"], list(CAM_COLOURS), lw=1.5)
        row[2].set_title("top-2 CAM + boxes at 1/10/20/30/40 % (light to dark)", fontsize=9)
        for ax in row:
            if path.stem in gt:
                _draw(ax, gt[path.stem], "lime", lw=1.5, ls="--")
            ax.set_xlim(0, image.width)
            ax.set_ylim(image.height, 0)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
