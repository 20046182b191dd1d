"""Per-image feature extraction: activations → global descriptors, region proposals, local features.

This is the pure part of the extraction stage (no I/O, no Ray): :func:`extract_features` takes the
backbone's activation map of one image and returns everything the tables store for it. Region sources and
global methods are selected by name, so users pick them in the config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import cam as cam_mod
from pipeline import cam_aggregation as cam_agg
from pipeline import crow as crow_mod
from pipeline import egm as egm_mod
from pipeline import local_features as lf
from pipeline import pooling
from pipeline import saliency as sal_mod
from pipeline.egm import FS_EGM, EGMParams
from pipeline.keypoints import IndexKeypointsConfig
from pipeline.regions import cells_to_pixels, to_cells
from pipeline.whitening import Whitening

GLOBAL_METHODS = ("mac", "gem", "spoc", "crow", "cam_ofa", "cam_ofa_sum", "cam_ona", "fs_egm_sum")
CAM_WHITENED = ("cam_ofa", "cam_ona")  # class vectors whitened one by one at extraction (seed 004's order)
REGION_SOURCES = ("full", "grid", "fs_egm", "cam")
MAX_LOCAL_SCALE = 2.0  # local-only scales may upscale (finer cells give more, more distinct locals), up to 2x


@dataclass(frozen=True)
class ExtractConfig:
    """What the extraction stage computes per image (the ``extract`` section of the index config).

    Defaults follow ALGORITHMS.md (R-MAC L=3, FS.EGM preset rho=5 tau=0.4 sigma=2.5, N_C=64). The backbone,
    batching and storage fields are how the stage runs; the rest is what :func:`extract_features` computes.
    """

    backbone: str = "mobilenet_v2"
    weights: str | None = None          # None: the backbone's offline weights (``builtin:<name>``) when it has some
    layer: str | None = None
    max_side: int = 1024                # longest side of the network input (images are never upscaled at scale 1)
    scales: tuple[float, ...] = (1.0,)  # multi-scale globals (each <= 1)
    regions: tuple[str, ...] = ("full", "grid", "fs_egm", "cam")
    globals: tuple[str, ...] = ("mac", "gem", "spoc", "crow", "cam_ofa", "cam_ofa_sum", "fs_egm_sum")
    gem_p: float = 3.0
    rmac_levels: int = 3
    fs: EGMParams = FS_EGM              # FS map sharpening + EGM (seed 001 §4.2)
    cam_classes: int = 64               # N_C of CAM-OfA (seed 004 §4.4)
    cam_ona_classes: tuple[int, ...] = ()  # predefined ImageNet class list of ``cam_ona`` (seed 004 §4.3)
    cam_pca_images: int = 1000          # images whose top class vector (N_pca = 1, §4.4) learns the per-class PCA
    cam_pca_dim: int = 256              # its output dimension (at most a quarter of the sample)
    cam_thresholds: tuple[float, ...] = (0.01, 0.1, 0.2, 0.3, 0.4)
    local_features: int | None = None   # top-N local descriptors per image (0: no locals table; None: 1000 when
                                        # the asmk stage runs, else 0 -- resolved by IndexConfig.validated)
    # scales the locals are taken from; one not in ``scales`` costs an extra forward pass used by the locals
    # only (values above 1 upscale beyond ``max_side``, as multi-scale local features usually do)
    local_scales: tuple[float, ...] = (1.0,)
    local_dim: int = 128                # PCA dimension of local descriptors
    local_pca_images: int = 200         # images sampled to learn the local PCA
    # learned keypoints of every image, computed in the same pass (the ``keypoints`` table; +sv re-ranks with them)
    keypoints: IndexKeypointsConfig = field(default_factory=IndexKeypointsConfig)
    descriptor_dtype: str = "float16"
    shard_size: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        bad = set(self.globals) - set(GLOBAL_METHODS)
        if bad:
            raise ValueError(f"globals: unknown methods {sorted(bad)}; known: {GLOBAL_METHODS}")
        bad = set(self.regions) - set(REGION_SOURCES)
        if bad:
            raise ValueError(f"regions: unknown sources {sorted(bad)}; known: {REGION_SOURCES}")
        if self.max_side < 32:
            raise ValueError("max_side must be at least 32 pixels")
        if not self.scales or any(s <= 0 or s > 1 for s in self.scales):
            raise ValueError("scales must be in (0, 1]")
        if not self.local_scales or any(s <= 0 or s > MAX_LOCAL_SCALE for s in self.local_scales):
            raise ValueError(f"local_scales must be in (0, {MAX_LOCAL_SCALE:g}]")
        if self.descriptor_dtype not in ("float16", "float32"):
            raise ValueError("descriptor_dtype: float16 or float32")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be >= 1")

    @property
    def n_locals(self) -> int:
        """Top-N locals per image (0 when the locals table is off)."""
        return int(self.local_features or 0)

    @property
    def weights_spec(self) -> str | None:
        """Where the backbone's weights come from: the configured file/URI, else the offline builtin ones."""
        if self.weights is None and self.backbone in ("mobilenet_v2", "efficientnet_lite0"):
            return f"builtin:{self.backbone}"
        return self.weights

    @property
    def cam_whitened(self) -> bool:
        """Whether a per-class CAM whitening must be learned before extraction (``cam_ofa`` / ``cam_ona``)."""
        return any(m in self.globals for m in CAM_WHITENED)

    @property
    def forward_scales(self) -> tuple[float, ...]:
        """Scales the backbone runs at, in this order: ``scales``, then the local-only scales (when locals are
        on). :func:`extract_features` expects one activation map per entry."""
        if self.n_locals <= 0:
            return tuple(self.scales)
        return tuple(self.scales) + tuple(s for s in dict.fromkeys(self.local_scales) if s not in self.scales)

    @property
    def decode_side(self) -> int:
        """Longest side an image must be decoded at for the largest forward scale."""
        return int(math.ceil(self.max_side * max(self.forward_scales)))

    @property
    def keypoint_side(self) -> int:
        """Longest side an image is decoded at for the learned keypoints (0 when none are computed apart)."""
        return self.keypoints.max_side if self.keypoints.learned else 0


@dataclass
class ImageFeatures:
    """Everything extracted from one image (numpy, float32, boxes in original-image pixels)."""

    feat_hw: tuple[int, int]
    proc_hw: tuple[int, int]
    sparsity: np.ndarray
    act_mean: float
    act_max: float
    globals: dict[str, np.ndarray] = field(default_factory=dict)
    region_source: list[str] = field(default_factory=list)
    region_level: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    region_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    region_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    region_saliency: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    region_desc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    local_xy: np.ndarray | None = None
    local_scale: np.ndarray | None = None
    local_strength: np.ndarray | None = None
    local_desc: np.ndarray | None = None


def _grid_levels(height: int, width: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """R-MAC grid boxes (without the full image) and the level (1..L) of each."""
    boxes, lv = [], []
    for level in range(1, levels + 1):
        b = pooling.rmac_grid(height, width, levels=level, include_full=False)
        prev = pooling.rmac_grid(height, width, levels=level - 1, include_full=False) if level > 1 else np.zeros((0, 4))
        boxes.append(b[len(prev):])
        lv.append(np.full(len(b) - len(prev), level, np.int16))
    return np.concatenate(boxes), np.concatenate(lv)


def extract_features(activations: list[torch.Tensor], config: ExtractConfig, image_hw: tuple[int, int],
                     classifier: tuple[torch.Tensor, torch.Tensor] | None = None,
                     cam_whitening: Whitening | None = None) -> ImageFeatures:
    """Compute one image's descriptors from its activation maps at each scale of ``config.forward_scales``.

    ``activations[0]`` (scale 1) drives regions and saliency; global descriptors sum the L2-normalised
    descriptor of every scale of ``config.scales`` (multi-scale, ALGORITHMS.md §1) and L2-normalise; locals
    are pooled over the maps of ``config.local_scales`` (strongest first).
    ``image_hw`` is the original (oriented) image size, used for pixel boxes.
    """
    A = activations[0].float()
    C, H, W = A.shape
    nonzero = (A > 0).float().mean(dim=(1, 2))
    out = ImageFeatures(feat_hw=(H, W), proc_hw=(0, 0), sparsity=nonzero.cpu().numpy(),
                        act_mean=float(A.mean()), act_max=float(A.max()))
    fhat = sal_mod.feature_saliency(A)

    # ---- global descriptors (multi-scale where more than one activation map is given)
    if len(activations) != len(config.forward_scales):
        raise ValueError(f"expected {len(config.forward_scales)} activation maps (scales "
                         f"{config.forward_scales}), got {len(activations)}")
    global_acts = activations[:len(config.scales)]

    def multi(fn) -> np.ndarray:
        acc = sum(pooling.l2n(fn(a.float())) for a in global_acts)
        return pooling.l2n(acc).cpu().numpy().astype(np.float32)

    gm = config.globals
    if "mac" in gm:
        out.globals["mac"] = multi(pooling.mac)
    if "gem" in gm:
        out.globals["gem"] = multi(lambda a: pooling.gem(a, config.gem_p))
    if "spoc" in gm:
        out.globals["spoc"] = multi(pooling.spoc)
    if "crow" in gm:
        out.globals["crow"] = multi(crow_mod.crow)
    if classifier is not None:
        weight, bias = classifier
        if "cam_ofa_sum" in gm:  # class vectors L2-normalised and summed; the descriptors stage whitens the sum
            out.globals["cam_ofa_sum"] = multi(lambda a: cam_mod.cam_ofa(a, weight, bias, n_classes=config.cam_classes))
        if cam_whitening is not None and "cam_ofa" in gm:  # seed 004: each class vector L2, whitened, L2; sum; L2
            out.globals["cam_ofa"] = multi(lambda a: torch.from_numpy(
                cam_agg.cam_ofa_descriptor(a, weight, bias, cam_whitening, config.cam_classes)))
        if cam_whitening is not None and "cam_ona" in gm and config.cam_ona_classes:
            out.globals["cam_ona"] = multi(lambda a: torch.from_numpy(
                cam_agg.cam_predefined_whitened(a, weight, config.cam_ona_classes, cam_whitening)))

    # ---- region proposals on the scale-1 map: (source, level, cell boxes, scores)
    proposals: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    if "full" in config.regions:
        proposals.append(("full", np.array([[0, 0, W, H]], np.int64), np.zeros(1, np.int16), np.ones(1, np.float32)))
    if "grid" in config.regions:
        g, lv = _grid_levels(H, W, config.rmac_levels)
        proposals.append(("grid", g, lv, np.ones(len(g), np.float32)))
    need_fs = "fs_egm" in config.regions or "fs_egm_sum" in gm
    if need_fs:
        boxes, scores = egm_mod.detect_regions_with(fhat.cpu().numpy(), config.fs)
        cells = to_cells(boxes, H, W) if len(boxes) else np.zeros((0, 4), np.int64)
        fs_cells = cells
        if "fs_egm" in config.regions:
            proposals.append(("fs_egm", cells, np.zeros(len(cells), np.int16), np.asarray(scores, np.float32)))
    if "cam" in config.regions and classifier is not None:
        weight, bias = classifier
        top = cam_mod.top_classes(A, weight, bias, 2)
        cams = cam_mod.class_activation_maps(A, weight, top).mean(dim=0)
        cboxes = cam_mod.cam_boxes(cams.cpu().numpy(), thresholds=config.cam_thresholds)
        ccells = to_cells(cboxes, H, W)
        proposals.append(("cam", ccells, np.arange(len(ccells), dtype=np.int16),
                          np.asarray(config.cam_thresholds[:len(ccells)], np.float32)))

    if proposals:
        all_cells = np.concatenate([p[1] for p in proposals]).astype(np.int64)
        desc = pooling.regional_mac(A, all_cells)
        out.region_desc = desc.cpu().numpy().astype(np.float32)
        out.region_source = [p[0] for p in proposals for _ in range(len(p[1]))]
        out.region_level = np.concatenate([p[2] for p in proposals]).astype(np.int16)
        out.region_score = np.concatenate([p[3] for p in proposals]).astype(np.float32)
        out.region_saliency = sal_mod.box_saliency(fhat, all_cells).cpu().numpy().astype(np.float32)
        out.region_boxes = cells_to_pixels(all_cells, (H, W), image_hw)
    else:
        out.region_desc = np.zeros((0, C), np.float32)

    if "fs_egm_sum" in gm:
        # seed 001's FS.EGM before whitening: sum_R L2(m_A(R)); w(.) is applied by the descriptors stage
        if len(fs_cells):
            reg = pooling.l2n(pooling.regional_mac(A, fs_cells))
            out.globals["fs_egm_sum"] = reg.sum(dim=0).cpu().numpy().astype(np.float32)
        else:
            out.globals["fs_egm_sum"] = pooling.mac(A).cpu().numpy().astype(np.float32)

    if config.n_locals > 0:
        maps = [(a.float(), s) for s, a in zip(config.forward_scales, activations) if s in config.local_scales]
        xy, scale, strength, desc = lf.select_local_features_multiscale(maps, n=config.n_locals,
                                                                        image_hw=image_hw)
        out.local_xy = xy.astype(np.float32)
        out.local_strength = strength.astype(np.float32)
        out.local_scale = scale.astype(np.float32)
        out.local_desc = desc.astype(np.float32)
    return out


def cam_whitening_sample(A: torch.Tensor, classifier: tuple[torch.Tensor, torch.Tensor] | None) -> np.ndarray:
    """The image's top class vector (seed 004 §4.4: N_pca = 1 per image), raw; the sample the per-class CAM
    whitening is learned on. Empty without a classifier."""
    if classifier is None:
        return np.zeros((0, A.shape[0]), np.float32)
    return cam_agg.cam_class_vectors(A.float(), classifier[0], classifier[1], 1)


def scaled_sizes(width: int, height: int, config: ExtractConfig) -> list[tuple[int, int]]:
    """Network input sizes (w, h) for each of ``config.forward_scales`` (longest side = scale * max_side, or
    scale * the image's own side when it is smaller than ``max_side``)."""
    base = min(1.0, config.max_side / max(width, height))
    return [(max(1, round(width * base * s)), max(1, round(height * base * s))) for s in config.forward_scales]


__all__ = ["ExtractConfig", "ImageFeatures", "extract_features", "scaled_sizes", "GLOBAL_METHODS",
           "REGION_SOURCES"]
