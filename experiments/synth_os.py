"""The object-saliency stage on a synthetic corpus: simulated activation maps, the real compute function.

The real stage (``actors.object_saliency``) decodes every image and runs the backbone to get its scale-1
activation map. A synthetic corpus has no images, so :class:`SimOSMapper` makes each image's map (C, H, W) from
the same per-image plan the corpus generator used (``experiments.synth_corpus``: feature-map size, object, object
box, latent codes; a pure function of the image id, so reruns and retries are identical): every cell mixes the
image's object code and background code in proportion to its overlap with the object box, through the same
channel basis and ReLU6-like non-linearity as the stored regional MACs. Everything after the map is the real
stage: :class:`pipeline.object_saliency.ObjectSaliencyComputer` (patch descriptors, k-NN among the graph's
regions through the stored FAISS index, eq. 14, OS.EGM, OS sums), the same ``ShardTables`` rows, the same runner
(``actors.runner.run_shards``: actor pool, retries, commits). Simulated: decoding and the backbone forward pass
(their cost is the extraction stage's, measured separately), and the map's content.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from actors.common import ActorResources
from actors.extract import ImageStageSpec, run_image_stage
from actors.object_saliency import OS_TABLES
from actors.runner import ShardResult
from experiments.synth_corpus import BANK_ROWS, LATENT, Bases, SynthSpec, Stats, hashed_normal, image_index, image_plan
from pipeline.config import IndexConfig
from pipeline.object_saliency import ObjectSaliencyComputer, ObjectSaliencyConfig
from pipeline.whitening import Whitening
from storage.arrays import load_arrays
from storage.artefacts import load_graph_artefacts
from storage.corpus import filter_ids
from storage.layout import RunLayout
from storage.run import RunManifest
from storage.shard_writer import ShardTables
from storage.tables import TableStore


def activation_map(bases: Bases, spec: SynthSpec, plan: dict[str, np.ndarray], j: int, idx: int) -> torch.Tensor:
    """Simulated scale-1 activation map (C, H, W) of image ``idx`` (row ``j`` of ``plan``)."""
    H, W = int(plan["feat_height"][j]), int(plan["feat_width"][j])
    y, x = np.mgrid[0:H, 0:W]
    cells = np.stack([x / W, y / H, (x + 1) / W, (y + 1) / H], -1).reshape(-1, 4)
    ob = plan["box"][j]
    iw = np.clip(np.minimum(cells[:, 2], ob[2]) - np.maximum(cells[:, 0], ob[0]), 0, None)
    ih = np.clip(np.minimum(cells[:, 3], ob[3]) - np.maximum(cells[:, 1], ob[1]), 0, None)
    omega = (iw * ih * W * H)[:, None].astype(np.float32)
    z_obj = hashed_normal(spec.seed, 10, plan["object"][j:j + 1], LATENT)
    z_bg = hashed_normal(spec.seed, 11, np.array([idx]), LATENT)
    rng = np.random.default_rng([spec.seed, 200, idx])
    lat = (0.3 + 0.9 * omega) * z_obj + (1 - 0.6 * omega) * z_bg + 0.35 * rng.standard_normal(
        (H * W, LATENT), dtype=np.float32)
    # ``synth_corpus.activations`` in torch (the stage's thread setting applies; numpy's BLAS would use its own)
    t = bases.torch()
    y = torch.from_numpy(lat) @ t["B"] + 0.25 * t["bank"][torch.from_numpy(rng.integers(BANK_ROWS, size=H * W))]
    A = ((y + t["offset"]) * t["gain"]).clamp_(0.0, 6.0)
    return A.T.reshape(-1, H, W).contiguous()


class SimOSMapper:
    """One shard of the object-saliency stage over simulated maps (see the module docstring)."""

    def __init__(self, spec: ImageStageSpec, synth: SynthSpec, computer: ObjectSaliencyComputer) -> None:
        self.spec, self.synth, self.os = spec, synth, computer
        self.bases = Bases(synth.seed, synth.channels, synth.local_dim, synth.keypoint_dim)
        self.stats = Stats()
        self.store = TableStore(spec.root)

    def __call__(self, shard: int | str, rows_in: list[dict[str, Any]]) -> ShardResult:
        idx = np.array([image_index(r["image_id"]) for r in rows_in], np.int64)
        plan = image_plan(self.synth, idx, self.stats)
        rows = ShardTables(self.spec.tables, self.synth.channels, self.spec.extract.descriptor_dtype)
        good = 0
        for j, r in enumerate(rows_in):
            hw = (int(plan["height"][j]), int(plan["width"][j]))
            try:
                f = self.os.features(activation_map(self.bases, self.synth, plan, j, int(idx[j])), hw)
            except Exception as exc:  # noqa: BLE001 - recorded as the image's error, as the real mapper does
                rows.add_error(r["image_id"], r["uri"], self.spec.stage, "internal", f"{type(exc).__name__}: {exc}")
                continue
            rows.add_regions(r["image_id"], f.region_source, f.region_level, f.region_boxes, f.region_score,
                             f.region_saliency, f.region_desc)
            rows.add_globals(r["image_id"], f.globals)
            good += 1
        files = rows.write(self.store, self.spec.stage, shard)
        return ShardResult(files, {"images": good, "errors": len(rows.errors)}, [e["reason"] for e in rows.errors])


@dataclass
class SimOSMapperFactory:
    """Picklable factory (arrays and configs only), like ``actors.object_saliency.OSMapperFactory``."""

    spec: ImageStageSpec
    synth: SynthSpec
    whitening: dict[str, np.ndarray]
    f: np.ndarray
    g: np.ndarray
    index_bytes: np.ndarray
    config: ObjectSaliencyConfig
    beta: float

    def __call__(self) -> SimOSMapper:
        threads = max(1, self.spec.torch_threads or torch.get_num_threads())
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        index = faiss.deserialize_index(np.asarray(self.index_bytes))
        computer = ObjectSaliencyComputer(Whitening.from_arrays(self.whitening), self.f, self.g, index, self.config,
                                          self.beta)
        return SimOSMapper(self.spec, self.synth, computer)


def synth_spec(root: str) -> SynthSpec:
    """The generator's spec, as recorded in ``run.json``'s extract entry."""
    entry = RunManifest(root).stage("extract") or {}
    data = (entry.get("result") or {}).get("synthetic")
    if not data:
        raise RuntimeError(f"{root} is not a synthetic corpus (no extract.result.synthetic in run.json)")
    return SynthSpec(**data)


def run_sim_object_saliency_stage(cfg: IndexConfig, manifest: pa.Table, resources: ActorResources,
                                  fraction: float = 1.0) -> dict[str, Any]:
    """The object-saliency stage over the simulated maps of the images that extracted; with ``fraction`` < 1
    only the first ``ceil(fraction * shards)`` shards (a stated sample: the rest stays uncommitted)."""
    extract = replace(cfg.extract, scales=cfg.extract.scales[:1], local_features=0)
    spec = ImageStageSpec(cfg.out, "object_saliency", extract, tables=OS_TABLES,
                          torch_threads=resources.torch_threads)
    g = load_graph_artefacts(cfg.out)
    good = TableStore(cfg.out).read("images", ["extract"], columns=["image_id"]).column("image_id").to_pylist()
    rows = filter_ids(manifest, set(good))
    if fraction < 1.0:
        shards = sorted(set(rows.column("shard").to_pylist()))
        keep = shards[:max(1, math.ceil(fraction * len(shards)))]
        rows = rows.filter(pc.is_in(rows.column("shard"), value_set=pa.array(keep, pa.int32())))
    factory = SimOSMapperFactory(spec, synth_spec(cfg.out), load_arrays(RunLayout(cfg.out).whitening("regions")),
                                 g["f"], g["g"], g["index_bytes"], cfg.object_saliency, cfg.graph_beta)
    out = run_image_stage(spec, rows, resources, factory)
    out["simulated_maps"] = True
    out["fraction_of_shards"] = fraction
    return out


__all__ = ["activation_map", "SimOSMapper", "SimOSMapperFactory", "run_sim_object_saliency_stage", "synth_spec"]
