"""The RPN of issue 17 (seed 003 §3.2): its training samples from a run, and the optional ``rpn`` image pass.

* :func:`rpn_samples` — (scale-1 activation map, target boxes in cells) of a seeded sample of indexed images; the
  targets are the run's own OS.EGM boxes (``regions`` rows with ``source = os_egm``), so the RPN learns to
  propose what the corpus found recurring. The maps are recomputed with the run's backbone (frozen).
* :func:`run_rpn_stage` — a third pass of the image mapper (as object saliency): every successfully extracted
  image's proposals become ``regions`` rows with ``source = rpn`` (``pipeline.rpn_regions.rpn_features``). The
  RPN it applies is kept in the run (``artefacts/rpn``) for the query side.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.common import ActorResources, Progress
from actors.extract import ImageShardMapper, ImageStageSpec, run_image_stage
from pipeline.backbone import build_backbone
from pipeline.config import IndexConfig, config_from_dict
from pipeline.extract import scaled_sizes
from pipeline.preprocess import to_network_input
from pipeline.rpn import rpn_from_arrays
from pipeline.rpn_regions import RPN_SOURCE, pixels_to_cells, rpn_features
from storage.corpus import filter_ids
from storage.images import decode_image
from storage.readers import image_uris, read_regions
from storage.run import load_run_config
from storage.tables import TableStore
from storage.training import default_rpn_location, load_rpn, save_rpn
from storage.uri import read_bytes
from storage.weights import load_state_dict

RPN_TABLES = ("regions", "errors")
TARGET_SOURCE = "os_egm"


def rpn_samples(root: str, n_images: int, seed: int = 0) -> tuple[list[tuple[torch.Tensor, np.ndarray]], list[str]]:
    """Training samples of the RPN: up to ``n_images`` images with OS.EGM boxes, seeded; returns the samples
    (activation map (C, h, w), boxes (G, 4) in continuous cells) and their image ids."""
    ids, boxes, _ = read_regions(root, TARGET_SOURCE, with_descriptors=False)
    if not ids:
        raise RuntimeError(f"{root}: no {TARGET_SOURCE} regions (run the object_saliency stage first)")
    ids_arr = np.asarray(ids, dtype=str)
    names = np.unique(ids_arr)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(names, size=min(n_images, len(names)), replace=False).tolist())
    cfg = config_from_dict(load_run_config(root)).extract
    weights = cfg.weights_spec
    backbone = build_backbone(cfg.backbone, load_state_dict(weights) if weights else None, cfg.layer,
                              device=torch.device("cpu"))
    uris = image_uris(root, chosen)
    samples = []
    progress = Progress("train_rpn maps", len(chosen), every=10.0)
    with torch.no_grad():   # not inference_mode: the maps feed a training graph (they are constants there)
        for i in chosen:
            img = decode_image(read_bytes(uris[i])).convert("RGB")
            w, h = next(iter(scaled_sizes(img.width, img.height, cfg)))
            A = backbone(to_network_input(img, size=(w, h))[None])[0].float()
            cells = pixels_to_cells(boxes[ids_arr == i], tuple(A.shape[-2:]), (img.height, img.width))
            samples.append((A.clone(), cells))  # a normal tensor: the backbone may run in inference mode
            progress.update(1)
    return samples, chosen


@dataclass
class RPNMapperFactory:
    """Builds an RPN mapper inside an actor (picklable: arrays and configs only)."""

    spec: ImageStageSpec
    arrays: dict[str, np.ndarray]
    proposals: int

    def __call__(self) -> ImageShardMapper:
        head, cfg = rpn_from_arrays(self.arrays)
        return ImageShardMapper(self.spec, compute=lambda acts, hw: rpn_features(head, cfg, acts[0], hw,
                                                                                 self.proposals))


def run_rpn_stage(cfg: IndexConfig, manifest: pa.Table, resources: ActorResources) -> dict[str, Any]:
    """RPN pass over the images that extracted successfully (scale-1 maps only, no locals)."""
    arrays, info = load_rpn(cfg.regions.rpn or cfg.out)
    if cfg.regions.rpn:   # keep the applied RPN in the run: the query side proposes with the same one
        save_rpn(default_rpn_location(cfg.out), arrays, info)
    extract = replace(cfg.extract, scales=cfg.extract.scales[:1], local_features=0)
    spec = ImageStageSpec(cfg.out, RPN_SOURCE, extract, tables=RPN_TABLES, torch_threads=resources.torch_threads)
    good = TableStore(cfg.out).read("images", ["extract"], columns=["image_id"]).column("image_id").to_pylist()
    out = run_image_stage(spec, filter_ids(manifest, set(good)), resources,
                          RPNMapperFactory(spec, arrays, cfg.regions.proposals))
    return {**out, "rpn": cfg.regions.rpn or "run", "proposals": cfg.regions.proposals}


__all__ = ["rpn_samples", "run_rpn_stage", "RPNMapperFactory"]
