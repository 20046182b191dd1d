"""Query side of an index run: encode a query image exactly like the database, and read the database's descriptors.

:class:`QueryEncoder` loads what an index run stored (its config, backbone, whitenings, local PCA, and the
graph artefacts ``V``/``f``/``g`` for object saliency) and turns a query image, optionally cropped to a box,
into the same descriptors the database has: final global descriptors of every method, whitened regional
descriptors per source, saliency maps and boxes, and PCA-reduced local descriptors. Runs in-process (no Ray):
search services and benchmarks call it per query.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from actors.descriptors import OWN_WHITENING, artefact_uri, final_descriptors, load_graph_artefacts, load_whitening
from actors.object_saliency import ObjectSaliencyComputer, OSParams
from pipeline.backbone import build_backbone
from pipeline.extract import ExtractConfig, extract_features, scaled_sizes
from pipeline.pooling import l2n_np
from pipeline.preprocess import to_network_input
from pipeline.saliency import feature_saliency
from storage.arrays import load_arrays, load_json
from storage.schemas import descriptor_array, descriptors_to_numpy
from storage.tables import TableStore
from storage.uri import exists, join
from storage.weights import load_state_dict


@dataclass
class QueryDescriptors:
    """Everything a query image yields (numpy float32; boxes in the query image's pixels, after cropping)."""

    globals: dict[str, np.ndarray] = field(default_factory=dict)
    regions: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: dict[str, np.ndarray] = field(default_factory=dict)
    fs_map: np.ndarray | None = None
    os_map: np.ndarray | None = None
    local_xy: np.ndarray | None = None
    local_desc: np.ndarray | None = None
    image_size: tuple[int, int] = (0, 0)


def crop(image: Image.Image, bbox: Iterable[float] | None) -> Image.Image:
    """Crop to ``(x0, y0, x1, y1)`` pixels (clipped to the image; at least 1 pixel), or return the image."""
    if bbox is None:
        return image
    x0, y0, x1, y1 = (float(v) for v in bbox)
    x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    x1, y1 = min(image.width, int(np.ceil(x1))), min(image.height, int(np.ceil(y1)))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty query box {tuple(bbox)} for a {image.width}x{image.height} image")
    return image.crop((x0, y0, x1, y1))


class QueryEncoder:
    """Encodes queries in the descriptor spaces of the index run at ``root``."""

    def __init__(self, root: str, device: str | None = None) -> None:
        self.root = root
        self.cfg = load_json(join(root, "config.json"))
        e = self.cfg["extract"]
        weights = e.get("weights") or (f"builtin:{e['backbone']}" if e["backbone"] in (
            "mobilenet_v2", "efficientnet_lite0") else None)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone = build_backbone(e["backbone"], load_state_dict(weights) if weights else None, e.get("layer"),
                                       device=self.device)
        self.classifier = None
        if self.backbone.classifier_weight is not None:
            self.classifier = (self.backbone.classifier_weight, self.backbone.classifier_bias)
        self.config = ExtractConfig.from_section(e)
        self.store = TableStore(root)
        self.whitenings = {"regions": load_whitening(root, "regions")}
        for m in OWN_WHITENING:
            if exists(artefact_uri(root, "whitening", f"global-{m}.npz")):
                self.whitenings[f"global-{m}"] = load_whitening(root, f"global-{m}")
        self.methods = list(self.cfg["descriptors"]["methods"])
        self.os: ObjectSaliencyComputer | None = None
        if exists(artefact_uri(root, "graph", "info.json")):
            g = load_graph_artefacts(root)
            o = self.cfg["object_saliency"]
            params = OSParams(k=o["k"], patch_side=o["patch_side"], beta=self.cfg["graph"]["beta"], Theta=o["Theta"],
                              theta=o["theta"], rho=o["rho"], tau=o["tau"], sigma=o["sigma"])
            self.os = ObjectSaliencyComputer(self.whitenings["regions"], g["f"], g["g"],
                                             faiss.deserialize_index(g["index_bytes"]), params)
        self.local_pca: dict[str, np.ndarray] | None = None
        pca_uri = artefact_uri(root, "local_pca", "pca.npz")
        if exists(pca_uri):
            self.local_pca = load_arrays(pca_uri)

    # ------------------------------------------------------------------ query
    @torch.inference_mode()
    def encode(self, image: Image.Image, bbox: Iterable[float] | None = None) -> QueryDescriptors:
        """Descriptors of ``image`` (RGB), cropped to ``bbox`` first when given (Revisited-Oxford queries)."""
        img = crop(image.convert("RGB"), bbox)
        acts = []
        for w, h in scaled_sizes(img.width, img.height, self.config):
            x = to_network_input(img, max(w, h)).to(self.device)
            acts.append(self.backbone(x[None])[0])
        hw = (img.height, img.width)
        feats = extract_features(acts, self.config, hw, self.classifier)
        q = QueryDescriptors(image_size=(img.width, img.height))
        q.fs_map = feature_saliency(acts[0].float()).cpu().numpy()
        region_rows = [("extract", feats)]
        globals_raw = dict(feats.globals)
        if self.os is not None:
            q.os_map = self.os.saliency(acts[0].float())
            osf = self.os.features(acts[0], hw, saliency=q.os_map)
            region_rows.append(("object_saliency", osf))
            globals_raw.update(osf.globals)
        # regional descriptors per source, whitened like the database's
        for _, f in region_rows:
            src = np.asarray(f.region_source)
            for s in np.unique(src):
                m = src == s
                q.regions[str(s)] = np.asarray(self.whitenings["regions"].apply(f.region_desc[m]), np.float32)
                q.boxes[str(s)] = f.region_boxes[m]
        # final globals through the same code as the database's descriptors stage
        reg_t = pa.table({"image_id": ["q"] * len(feats.region_source), "source": feats.region_source,
                          "descriptor": descriptor_array(feats.region_desc, "float32")})
        names = list(globals_raw)
        glob_t = pa.table({"image_id": ["q"] * len(names), "method": names,
                           "descriptor": descriptor_array(np.stack([globals_raw[n] for n in names]), "float32")})
        _, meths, X = final_descriptors(reg_t, glob_t, self.methods, self.whitenings)
        q.globals = {m: X[i] for i, m in enumerate(meths)}
        if feats.local_desc is not None and self.local_pca is not None:
            q.local_xy = feats.local_xy
            q.local_desc = l2n_np((l2n_np(feats.local_desc) - self.local_pca["mean"]) @ self.local_pca["projection"])
        return q

    # ------------------------------------------------------------------ database
    def _filter(self, t: pa.Table, image_ids: Iterable[str] | None) -> pa.Table:
        if image_ids is None:
            return t
        return t.filter(pc.is_in(t.column("image_id"), value_set=pa.array(list(image_ids), pa.string())))

    def database_globals(self, method: str, image_ids: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
        """Final descriptors of ``method`` for the database (optionally only ``image_ids``)."""
        t = self.store.read("globals", ["descriptors"], filter_expr=pc.field("method") == method)
        t = self._filter(t, image_ids)
        return t.column("image_id").to_pylist(), descriptors_to_numpy(t.column("descriptor"))

    def database_regions(self, source: str, image_ids: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
        """Whitened regional descriptors of ``source`` and the image of each region."""
        stage = "object_saliency" if source.startswith("os_") else "extract"
        t = self._filter(self.store.read("regions", [stage], filter_expr=pc.field("source") == source), image_ids)
        X = descriptors_to_numpy(t.column("descriptor"))
        return t.column("image_id").to_pylist(), np.asarray(self.whitenings["regions"].apply(X), np.float32)

    def database_boxes(self, source: str, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Pixel boxes of ``source`` regions per image."""
        stage = "object_saliency" if source.startswith("os_") else "extract"
        t = self._filter(self.store.read("regions", [stage], columns=["image_id", "source", "x0", "y0", "x1", "y1"]),
                         image_ids)
        t = t.filter(pc.equal(t.column("source"), source))
        ids = np.asarray(t.column("image_id").to_pylist())
        B = np.stack([t.column(c).to_numpy() for c in ("x0", "y0", "x1", "y1")], axis=1) if len(ids) else np.zeros((0, 4))
        return {i: B[ids == i] for i in np.unique(ids)}

    def database_locals(self, image_ids: Iterable[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Local descriptors of the database: image id per descriptor, positions (n, 2) and descriptors (n, D)."""
        t = self._filter(self.store.read("locals", ["extract"]), image_ids)
        xy = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], axis=1) if t.num_rows else np.zeros((0, 2))
        return t.column("image_id").to_pylist(), xy.astype(np.float32), descriptors_to_numpy(t.column("descriptor"))


__all__ = ["QueryEncoder", "QueryDescriptors", "crop"]
