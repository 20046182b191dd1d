"""Object-saliency stage (seed 001 §3.8-3.9): a second pass of the image mapper with another compute function.

Each actor recomputes an image's scale-1 activations, and :class:`pipeline.object_saliency.ObjectSaliencyComputer`
turns them into the OS map (patch descriptors → k-NN among the graph's regions → eq. 14), OS.EGM regions
(``regions`` rows with ``source = os_egm``) and the ``os_egm_sum`` / ``os_egm4_sum`` globals (whitened later
by the descriptors stage). Only ``V``'s index, ``f`` and ``g`` are needed, so images that are not in the graph
(new images at reindex time) are handled the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import torch

from actors.common import ActorResources
from actors.extract import ImageShardMapper, ImageStageSpec, run_image_stage
from storage.artefacts import load_graph_artefacts
from pipeline.config import IndexConfig
from pipeline.object_saliency import ObjectSaliencyComputer, ObjectSaliencyConfig
from pipeline.whitening import Whitening
from storage.arrays import load_arrays
from storage.corpus import filter_ids
from storage.layout import RunLayout
from storage.tables import TableStore

OS_TABLES = ("regions", "globals", "errors")


@dataclass
class OSMapperFactory:
    """Builds an object-saliency mapper inside an actor (picklable: arrays and configs only)."""

    spec: ImageStageSpec
    whitening: dict[str, np.ndarray]
    f: np.ndarray
    g: np.ndarray
    index_bytes: np.ndarray
    config: ObjectSaliencyConfig
    beta: float

    def __call__(self) -> ImageShardMapper:
        faiss.omp_set_num_threads(max(1, self.spec.torch_threads or torch.get_num_threads()))
        index = faiss.deserialize_index(np.asarray(self.index_bytes))
        os = ObjectSaliencyComputer(Whitening.from_arrays(self.whitening), self.f, self.g, index, self.config,
                                    self.beta)
        return ImageShardMapper(self.spec, compute=lambda acts, hw: os.features(acts[0], hw))


def run_object_saliency_stage(cfg: IndexConfig, manifest: pa.Table, resources: ActorResources) -> dict[str, Any]:
    """OS pass over the images that extracted successfully (scale-1 maps only, no locals)."""
    extract = replace(cfg.extract, scales=cfg.extract.scales[:1], local_features=0)
    spec = ImageStageSpec(cfg.out, "object_saliency", extract, tables=OS_TABLES,
                          torch_threads=resources.torch_threads)
    g = load_graph_artefacts(cfg.out)
    good = TableStore(cfg.out).read("images", ["extract"], columns=["image_id"]).column("image_id").to_pylist()
    rows = filter_ids(manifest, set(good))
    factory = OSMapperFactory(spec, load_arrays(RunLayout(cfg.out).whitening("regions")), g["f"], g["g"],
                              g["index_bytes"], cfg.object_saliency, cfg.graph_beta)
    return run_image_stage(spec, rows, resources, factory)


__all__ = ["OSMapperFactory", "run_object_saliency_stage"]
