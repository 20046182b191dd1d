"""Encode a query image in the descriptor spaces of an index run, exactly as the database was encoded.

:class:`QueryEncoder` loads what an index run stored (its config, backbone, whitenings, local PCA, and the
graph artefacts for object saliency) and turns a query image, optionally cropped to a box, into the same
descriptors the database has: final global descriptors of every method, whitened regional descriptors per
source, saliency maps and boxes, and PCA-reduced local descriptors; on request (``patches=``, selective search
costs ~2 s per image) also the query's patches for the ``patches`` method (seed 000): boxes, descriptors in the
regional index's space and the region scorer's features. Runs in-process (no Ray).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import faiss
import numpy as np
import torch
from PIL import Image

from pipeline.config import IndexConfig, config_from_dict
from pipeline.descriptors import OWN_WHITENING, DescriptorRows, final_descriptors
from pipeline.backbone import build_backbone
from pipeline.extract import ImageFeatures, extract_features, scaled_sizes
from pipeline.keypoints import KeypointExtractor, Keypoints, build_keypoint_extractor
from pipeline.local_features import apply_pca
from pipeline.object_saliency import ObjectSaliencyComputer, given_box_features
from pipeline.preprocess import to_network_input
from pipeline.query_patches import encode_patches
from pipeline.query_regions import ProposalConfig, feature_names
from pipeline.rpn import rpn_from_arrays
from pipeline.rpn_regions import RPN_SOURCE, rpn_features
from pipeline.saliency import feature_saliency
from pipeline.whitening import Whitening, whitenings_from_arrays
from service.errors import UserError
from storage.keypoint_weights import load_keypoint_weights
from storage.readers import has_keypoints
from storage.artefacts import has_graph, load_cam_whitening, load_graph_artefacts, load_local_pca, \
    load_whitening_arrays
from storage.run import load_run_config
from storage.shard_writer import pad_width
from storage.training import has_rpn, load_rpn
from storage.weights import load_state_dict


_OPTIONAL = ("fs_map", "os_map", "local_xy", "local_desc", "patch_boxes", "patch_desc", "patch_feat", "kp_xy",
             "kp_scores", "kp_desc")


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
    patch_boxes: np.ndarray | None = None   # (P, 4) pixel boxes of the query's patches (seed 000)
    patch_desc: np.ndarray | None = None    # (P, d) their whitened regional MACs (the regional index's space)
    patch_feat: np.ndarray | None = None    # (P, F) their region-scorer features
    kp_xy: np.ndarray | None = None         # (n, 2) the query's keypoints (spatial verification), crop pixels
    kp_scores: np.ndarray | None = None     # (n,)
    kp_desc: np.ndarray | None = None       # (n, D) L2-normalised
    # the (cropped) query for its keypoints, at most the keypoints' query side (``info["original_size"]``: the crop's
    # size, the frame keypoint positions are in); not stored
    image: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def has_keypoints(self) -> bool:
        return self.kp_desc is not None

    @property
    def keypoints(self) -> Keypoints | None:
        """The query's keypoints (None until :meth:`QueryEncoder.add_keypoints` ran)."""
        if self.kp_desc is None:
            return None
        return Keypoints(np.asarray(self.kp_xy, np.float32).reshape(-1, 2), np.asarray(self.kp_scores, np.float32),
                         np.asarray(self.kp_desc, np.float32), (int(self.image_size[0]), int(self.image_size[1])))

    @property
    def has_patches(self) -> bool:
        return self.patch_feat is not None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict of arrays (an ``.npz`` cache; no pickle)."""
        out: dict[str, np.ndarray] = {"image_size": np.asarray(self.image_size, np.int64)}
        for prefix, d in (("g__", self.globals), ("r__", self.regions), ("b__", self.boxes)):
            out.update({prefix + k: np.asarray(v, np.float32) for k, v in d.items()})
        for k in _OPTIONAL:
            v = getattr(self, k)
            if v is not None:
                out[k] = np.asarray(v, np.float32)
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "QueryDescriptors":
        q = cls(image_size=tuple(int(v) for v in a["image_size"]))
        for k, v in a.items():
            for prefix, d in (("g__", q.globals), ("r__", q.regions), ("b__", q.boxes)):
                if k.startswith(prefix):
                    d[k[len(prefix):]] = v
        for k in _OPTIONAL:
            if k in a:
                setattr(q, k, a[k])
        return q


def parse_bbox(text: str | Iterable[float] | None) -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` (or four numbers) -> a box; :class:`UserError` when malformed or empty."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    try:
        box = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"malformed box {text!r}: expected four numbers x0,y0,x1,y1 in pixels") from None
    if len(box) != 4 or not all(np.isfinite(box)):
        raise UserError(f"malformed box {text!r}: expected four numbers x0,y0,x1,y1 in pixels")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise UserError(f"empty box {text!r}: need x1 > x0 and y1 > y0")
    return box  # type: ignore[return-value]


def crop(image: Image.Image, bbox: Iterable[float] | None) -> Image.Image:
    """Crop to ``(x0, y0, x1, y1)`` pixels (clipped to the image; at least 1 pixel), or return the image."""
    if bbox is None:
        return image
    x0, y0, x1, y1 = (float(v) for v in bbox)
    x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    x1, y1 = min(image.width, int(np.ceil(x1))), min(image.height, int(np.ceil(y1)))
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"the box {tuple(bbox)} lies outside the {image.width}x{image.height} query image")
    return image.crop((x0, y0, x1, y1))


QUERY_EGM = ("box", "detect")


class QueryEncoder:
    """Encodes queries in the descriptor spaces of the index run at ``root``.

    ``query_egm`` says what a query given with a box uses as its FS.EGM / OS.EGM regions: ``"box"`` (seed 001:
    regions are detected on database images only, the given box is used as is) or ``"detect"`` (EGM runs inside
    the box, as on database images). A query without a box always runs EGM on the whole photo.
    """

    def __init__(self, root: str, device: str | None = None, query_egm: str = "box") -> None:
        if query_egm not in QUERY_EGM:
            raise UserError(f"query_egm must be one of {QUERY_EGM}, got {query_egm!r}")
        self.root, self.query_egm = root, query_egm
        self.cfg: IndexConfig = config_from_dict(load_run_config(root))
        self.config = self.cfg.extract
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        weights = self.config.weights_spec
        self.backbone = build_backbone(self.config.backbone, load_state_dict(weights) if weights else None,
                                       self.config.layer, device=self.device)
        self.classifier = None
        if self.backbone.classifier_weight is not None:
            self.classifier = (self.backbone.classifier_weight, self.backbone.classifier_bias)
        self.whitenings = whitenings_from_arrays(load_whitening_arrays(root, OWN_WHITENING))
        self.methods = self.cfg.descriptors.methods
        self.os: ObjectSaliencyComputer | None = None
        if has_graph(root):
            g = load_graph_artefacts(root)
            self.os = ObjectSaliencyComputer(self.whitenings["regions"], g["f"], g["g"],
                                             faiss.deserialize_index(g["index_bytes"]), self.cfg.object_saliency,
                                             self.cfg.graph_beta)
        self.local_pca = load_local_pca(root)
        cam = load_cam_whitening(root)
        self.cam_whitening = Whitening.from_arrays(cam) if cam is not None else None
        self.rpn = None   # the run's RPN (regions.source: rpn): queries get rpn regions like the database
        if self.cfg.regions.source == RPN_SOURCE and has_rpn(root):
            self.rpn = rpn_from_arrays(load_rpn(root)[0])
        self._kp_extractor: KeypointExtractor | None = None

    @property
    def keypoints_available(self) -> bool:
        """Whether the run stored keypoints (so queries get theirs and ``+sv`` can verify)."""
        if not hasattr(self, "_has_kp"):
            self._has_kp = self.config.keypoints.enabled and has_keypoints(self.root)
        return self._has_kp

    def add_keypoints(self, q: QueryDescriptors) -> QueryDescriptors:
        """The query's keypoints, extracted as the run's config says for queries (``extract.keypoints``:
        ``query_max_side``, ``query_top_n``, ``query_scales``; ``cnn``: its PCA-reduced locals), in pixels of the
        (cropped) query. Needs ``q.image`` unless they are already there."""
        if q.has_keypoints:
            return q
        kcfg = self.config.keypoints
        if not self.keypoints_available:
            raise UserError("this run has no keypoints table: spatial verification (+sv) needs "
                            "extract.keypoints.name other than none at index time")
        if kcfg.name == "cnn":
            xy, d = q.local_xy, q.local_desc
            if d is None:
                raise UserError("cnn keypoints need the run's local features (extract.local_features > 0)")
            q.kp_xy, q.kp_scores = np.asarray(xy, np.float32), np.zeros(len(d), np.float32)
            q.kp_desc = (d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)).astype(np.float32)
            return q
        if q.image is None:
            raise UserError("the query's keypoints were not extracted and its image is gone: encode it again")
        if self._kp_extractor is None:
            self._kp_extractor = build_keypoint_extractor(kcfg.extractor_config(query=True), self.device,
                                                          state_dict=load_keypoint_weights(kcfg.name))
        kp = self._kp_extractor.extract(np.asarray(q.image.convert("RGB")), original_size=tuple(q.image_size))
        q.kp_xy, q.kp_scores, q.kp_desc = kp.xy, kp.scores, kp.descriptors
        return q

    def _regions(self, q: QueryDescriptors, feats: list[ImageFeatures]) -> None:
        """Regional descriptors per source, whitened like the database's."""
        for f in feats:
            src = np.asarray(f.region_source)
            for s in np.unique(src):
                m = src == s
                q.regions[str(s)] = np.asarray(self.whitenings["regions"].apply(f.region_desc[m]), np.float32)
                q.boxes[str(s)] = f.region_boxes[m]

    def patch_feature_names(self) -> list[str]:
        """Column names of the patch features this run's queries get (FS mass, and OS mass with a region graph)."""
        d = int(self.whitenings["regions"].projection.shape[1])
        return feature_names(d, ("fs", "os") if self.os is not None else ("fs",))

    @torch.inference_mode()
    def encode(self, image: Image.Image, bbox: Iterable[float] | None = None,
               patches: ProposalConfig | None = None, keypoints: bool = False) -> QueryDescriptors:
        """Descriptors of ``image`` (RGB), cropped to ``bbox`` first when given (Revisited-Oxford queries);
        with ``patches``, also the query's patches proposed that way (:func:`pipeline.query_patches.encode_patches`
        on the scale-1 map the regions come from, saliency mass of the FS and OS maps); with ``keypoints``, also
        its keypoints (:meth:`add_keypoints`; otherwise they are extracted when ``+sv`` first needs them)."""
        img = crop(image.convert("RGB"), bbox)
        acts = []
        for w, h in scaled_sizes(img.width, img.height, self.config):
            x = to_network_input(img, size=(w, h)).to(self.device)
            acts.append(self.backbone(x[None])[0])
        hw = (img.height, img.width)
        feats = extract_features(acts, self.config, hw, self.classifier, self.cam_whitening)
        q = QueryDescriptors(image_size=(img.width, img.height))
        q.fs_map = feature_saliency(acts[0].float()).cpu().numpy()
        per_pass = [feats]
        globals_raw = dict(feats.globals)
        if self.os is not None:
            q.os_map = self.os.saliency(acts[0].float())
            osf = self.os.features(acts[0], hw, saliency=q.os_map)
            per_pass.append(osf)
            globals_raw.update(osf.globals)
        if bbox is not None and self.query_egm == "box":  # the given box replaces the detected regions
            boxf = given_box_features(acts[0], hw)
            keep = [s not in ("fs_egm", "os_egm") for s in feats.region_source]
            per_pass = [_select_regions(f, [s not in ("fs_egm", "os_egm") for s in f.region_source])
                        for f in per_pass] + [boxf]
            globals_raw.update({k: v for k, v in boxf.globals.items() if k in globals_raw})
            feats = _select_regions(feats, keep)
        if self.rpn is not None:
            rpnf = rpn_features(*self.rpn, acts[0], hw, self.cfg.regions.proposals)
            per_pass.append(rpnf)
            feats = _with_regions(feats, rpnf)
        self._regions(q, per_pass)
        # final globals through the same code as the database's descriptors stage
        n_reg, names = len(feats.region_source), list(globals_raw)
        regions = DescriptorRows(np.array(["q"] * n_reg), np.asarray(feats.region_source, dtype=str),
                                 np.asarray(feats.region_desc, np.float32))
        width = max(len(v) for v in globals_raw.values())
        raw = DescriptorRows(np.array(["q"] * len(names)), np.asarray(names, dtype=str),
                             np.stack([pad_width(np.asarray(globals_raw[n], np.float32), width) for n in names]))
        final = final_descriptors(regions, raw, self.methods, self.whitenings)
        q.globals = {m: final.X[i] for i, m in enumerate(final.methods)}
        if patches is not None:
            maps = [q.fs_map] + ([q.os_map] if q.os_map is not None else [])
            q.patch_boxes, q.patch_desc, q.patch_feat = encode_patches(
                acts[0].float(), hw, self.whitenings["regions"], patches, image_rgb=np.asarray(img), saliency_maps=maps)
        if feats.local_desc is not None and self.local_pca is not None:
            q.local_xy = feats.local_xy
            q.local_desc = apply_pca(feats.local_desc, self.local_pca["mean"], self.local_pca["projection"])
        q.image = _reduced(img, self.config.keypoints.query_max_side)
        return self.add_keypoints(q) if keypoints else q


def _reduced(img: Image.Image, side: int) -> Image.Image:
    """``img`` with its longest side at most ``side`` (a copy when reduced), ``info["original_size"]`` its size."""
    out = img
    if max(img.size) > side:
        out = img.copy()
        out.thumbnail((side, side), Image.Resampling.LANCZOS)
    out.info["original_size"] = img.size
    return out


def _with_regions(f: ImageFeatures, extra: ImageFeatures) -> ImageFeatures:
    """A copy of ``f`` whose regions also include those of ``extra`` (the rpn proposals)."""
    g = _select_regions(f, [True] * len(f.region_source))
    g.region_source = list(f.region_source) + list(extra.region_source)
    for name in ("region_level", "region_boxes", "region_score", "region_saliency", "region_desc"):
        setattr(g, name, np.concatenate([getattr(f, name), getattr(extra, name)]))
    return g


def _select_regions(f: ImageFeatures, keep: list[bool]) -> ImageFeatures:
    """A copy of ``f`` with only the regions flagged in ``keep``."""
    m = np.asarray(keep, bool)
    g = ImageFeatures(f.feat_hw, f.proc_hw, f.sparsity, f.act_mean, f.act_max, dict(f.globals))
    g.region_source = [s for s, k in zip(f.region_source, keep) if k]
    g.region_level, g.region_boxes, g.region_score = f.region_level[m], f.region_boxes[m], f.region_score[m]
    g.region_saliency, g.region_desc = f.region_saliency[m], f.region_desc[m]
    g.local_xy, g.local_scale, g.local_strength, g.local_desc = f.local_xy, f.local_scale, f.local_strength, \
        f.local_desc
    return g


__all__ = ["QueryEncoder", "QueryDescriptors", "crop", "parse_bbox", "QUERY_EGM"]
