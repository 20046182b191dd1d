"""Figure: photo, FS saliency with FS.EGM boxes, top-2 CAM with CAM boxes, one row per image.

    python -m experiments.figure_regions --images a.jpg b.jpg c.jpg --out fig.png [--max-side 1024]
                                         [--config configs/benchmark.yaml] [--gnd gnd.json]

Maps and boxes are those of ``experiments.bench_regions`` (the extract stage's: the config's backbone,
``extract.fs`` preset and ``extract.cam_thresholds``; ``--max-side`` overrides ``extract.max_side``).
Ground-truth boxes (dashed green) are drawn when ``--gnd`` (default: museum-landmarks' ``gnd.json``) lists the
image's id as a query with a box.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from experiments.bench_regions import image_regions  # noqa: E402
from experiments.common import (DEFAULT_DATA, add_config_args, config_from_args, gnd_boxes, load_backbone,  # noqa: E402
                                read_image)
from pipeline.extract import ExtractConfig  # noqa: E402

CAM_COLOURS = ("#ffffb2", "#fecc5c", "#fd8d3c", "#f03b20", "#bd0026")  # thresholds light to dark


def _draw(ax, boxes, colour, lw=2.0, ls="-", labels=None) -> None:
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).reshape(-1, 4)):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour if isinstance(colour, str)
                               else colour[i % len(colour)], lw=lw, ls=ls))
        if labels is not None:
            ax.text(x0 + 4, y0 + 14, labels[i], color="white", fontsize=7,
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})


def draw_row(row, path: Path, bb, cfg: ExtractConfig, gt: dict[str, np.ndarray]) -> None:
    """One image: the photo, FS map + FS.EGM boxes, top-2 CAM + CAM boxes (+ ground truth on each)."""
    image = read_image(path)
    r = image_regions(bb, image, cfg)
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
    levels = "/".join(f"{100 * t:g}" for t in cfg.cam_thresholds)
    row[2].set_title(f"top-2 CAM + boxes at {levels} % (light to dark)", fontsize=9)
    for ax in row:
        if path.stem in gt:
            _draw(ax, gt[path.stem], "lime", lw=1.5, ls="--")
        ax.set_xlim(0, image.width)
        ax.set_ylim(image.height, 0)
        ax.axis("off")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, nargs="+", required=True)
    ap.add_argument("--out", required=True)
    add_config_args(ap)
    ap.add_argument("--max-side", type=int, default=None, help="sets extract.max_side")
    ap.add_argument("--gnd", type=Path, default=DEFAULT_DATA / "gnd.json")
    ap.add_argument("--dpi", type=int, default=80)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = config_from_args(args, extract__max_side=args.max_side).extract
    bb = load_backbone(cfg)
    gt = gnd_boxes(args.gnd)
    fig, axes = plt.subplots(len(args.images), 3, figsize=(13, 3.2 * len(args.images)), squeeze=False)
    for row, path in zip(axes, args.images):
        draw_row(row, path, bb, cfg, gt)
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
