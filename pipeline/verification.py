"""Spatial verification re-ranking: match keypoints, fit a robust geometric model, count inliers, fuse.

For a query and each of the top-``K`` database images of a first-stage ranking (the shortlist), tentative
matches (:mod:`pipeline.matching`) are fitted with a homography by OpenCV's USAC MAGSAC++
(``cv2.findHomography(..., cv2.USAC_MAGSAC)``; Barath et al., CVPR 2020); when that fails or the model is
degenerate, an affine model (``cv2.estimateAffine2D``, also MAGSAC++) is tried. The number of inliers of an
accepted model is the verification score. Classic SV re-ranking (Philbin et al., "Object retrieval with large
vocabularies and fast spatial matching", CVPR 2007) fits affine models from single correspondences; with
few hundred learned matches per pair a full homography by MAGSAC is affordable and models planar objects
(paintings, facades) exactly.

Degenerate models do not count (:func:`is_degenerate`): a homography that folds the inliers' bounding box
(non-convex image or a reflection), sends part of it across the line at infinity, or scales areas by more
than ``max_scale**2`` (or less than its inverse), or whose local Jacobian is more anisotropic than
``max_anisotropy``; and any model whose inliers collapse onto a few pixels (bounding box smaller than
``min_extent`` px on a side in either image) -- MAGSAC can explain 10+ matches on a tiny repeated texture.

Fusion with the first-stage score (:func:`fuse_scores`; the rule and its parameters were chosen with
experiments/sv_eval.py on museum-landmarks, see its report):

* ``tiered`` (default): images with ``inliers >= min_inliers`` are *verified* and ranked above all unverified
  shortlist images, verified ones by decreasing inlier count (ties by first-stage score); unverified ones keep
  their first-stage order. ``fused = s + [verified] * C * (1 + inliers)`` with ``C = max(s) - min(s) + 1``
  over the shortlist, so integer inlier steps dominate any first-stage difference.
* ``additive``: ``fused = s + w * [verified] * min(inliers, cap) / cap``; needs ``w`` calibrated to the
  first-stage score's scale.

Both leave images outside the shortlist below every shortlist image only if their first-stage score is
lower, which holds for a ranking; :func:`rerank_shortlist` applies the fusion to a ranked id list.

Re-verification with a learned matcher (``rescore_matcher``, off by default): MNN verifies the whole shortlist
cheaply; then LighterGlue (XFeat) or LightGlue (ALIKED) re-verifies the images that decide the top of the
list, :func:`rescore_positions` (the first stage's top ``rescore_top`` and the MNN-fused top ``rescore_top``,
at most twice that many pairs per query), and their glue inlier counts replace MNN's before the same fusion.
Why: on museum photos MNN + MAGSAC verifies small distractor images (laptop screens, bank notes, boxes) with
30-130 inliers against a wall photo, because a painting's frame and a rectangular object are related by a
homography along their edges; the glue matchers, which match with the context of all keypoints, give those
pairs 0 inliers and the true paintings hundreds (experiments/sv_cascade.py). They cost ~0.25-0.33 s per pair
on two CPU cores with every keypoint, hence only on the top of the list (``rescore_keypoints`` /
``rescore_depth_confidence`` trade some of the cascade's gain for a 5-6x cheaper pair).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from pipeline.keypoints import Keypoints
from pipeline.matching import Matcher, MatcherConfig

FUSION_RULES: tuple[str, ...] = ("tiered", "additive")
RESCORE_MATCHERS: tuple[str, ...] = ("none", "lighterglue", "lightglue")


def _tuned_matcher() -> MatcherConfig:
    """MNN at cosine >= 0.75, no ratio test: the best of experiments/sv_eval.py's grid (``dev4``) with XFeat."""
    return MatcherConfig(name="mnn", min_similarity=0.75)


@dataclass(frozen=True)
class VerifyConfig:
    """Parameters of spatial verification and fusion (the ``verify`` section of the index config; defaults are
    the best setting of experiments/sv_eval.py on museum-landmarks' three tracks: XFeat keypoints (database 640 px,
    1,024; query 1,024 px at scales 1 and 0.5, 2,048), MNN at cosine >= 0.75, MAGSAC threshold 12 px, ``tiered``
    fusion with 30 inliers to count as verified -- best summed Hard mAP over the tracks of that grid).

    ``ransac_threshold``: MAGSAC++ maximum residual in ORIGINAL-image pixels of the database image.
    ``max_iters`` / ``confidence``: RANSAC loop limits (OpenCV's defaults for findHomography are 2000 / 0.995).
    ``min_inliers``: inliers for an image to count as verified. ``shortlist``: K database images verified.
    ``max_scale``, ``max_anisotropy``, ``min_extent``: the degenerate-model checks (module docstring).
    ``fusion`` / ``fusion_weight`` / ``inlier_cap``: see :func:`fuse_scores`. ``rescore_matcher``: ``none``, or
    the learned matcher that re-verifies :func:`rescore_positions` (``rescore_top`` each from the first stage and
    the MNN-fused list; module docstring); its inlier counts use the same ``min_inliers`` and fusion.
    ``rescore_keypoints``: keypoints of each image the learned matcher sees, strongest first (0 = all);
    ``rescore_depth_confidence``: its early stopping (None = the model's reference: off for LighterGlue). 512 and
    0.95 cost 57 instead of 330 ms per LighterGlue pair on 2 CPU cores (experiments/bench_sv.py, same run); with
    ``rescore_guided`` and ``matcher.max_keypoints`` 1,024 they make the README's "cheap cascade", which kept the
    full cascade's quality on museum-landmarks at under 1 s per query (median); the defaults keep the full model.
    ``rescore_guided``: with ``rescore_keypoints``, the learned matcher sees the keypoints of MNN's inlier matches
    first, then the strongest others (:meth:`pipeline.keypoints.Keypoints.top_with`; :func:`guided_inlier_matches`),
    instead of only the strongest: an object small in a database photo can have none of its keypoints among the
    photo's 512 strongest.
    """

    matcher: MatcherConfig = field(default_factory=_tuned_matcher)
    ransac_threshold: float = 12.0
    max_iters: int = 2000
    confidence: float = 0.999
    min_inliers: int = 30
    shortlist: int = 100
    affine_fallback: bool = True
    max_scale: float = 30.0
    max_anisotropy: float = 10.0
    min_extent: float = 12.0
    fusion: str = "tiered"
    fusion_weight: float = 1.0
    inlier_cap: int = 100
    rescore_matcher: str = "none"
    rescore_top: int = 10
    rescore_keypoints: int = 0
    rescore_depth_confidence: float | None = None
    rescore_guided: bool = True

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_RULES:
            raise ValueError(f"unknown fusion rule {self.fusion!r}; known: {FUSION_RULES}")
        if self.rescore_matcher not in RESCORE_MATCHERS:
            raise ValueError(f"unknown rescore_matcher {self.rescore_matcher!r}; known: {RESCORE_MATCHERS}")
        if self.rescore_top < 1:
            raise ValueError("rescore_top >= 1 required")
        if self.rescore_keypoints < 0:
            raise ValueError("rescore_keypoints >= 0 required (0 = all)")
        if self.ransac_threshold <= 0 or self.min_inliers < 1 or self.shortlist < 0 or self.inlier_cap < 1:
            raise ValueError("ransac_threshold > 0, min_inliers >= 1, shortlist >= 0, inlier_cap >= 1 required")

    def rescorer_config(self) -> MatcherConfig:
        """The learned re-verification matcher's configuration (``rescore_*`` keys); the one place it is built."""
        return MatcherConfig(name="mnn" if self.rescore_matcher == "none" else self.rescore_matcher,
                             max_keypoints=self.rescore_keypoints, depth_confidence=self.rescore_depth_confidence)


@dataclass(frozen=True, eq=False)
class VerifyResult:
    """Outcome of verifying one pair.

    ``inliers``: inlier count of the accepted model (0 when none). ``model``: 3x3 float64 mapping query
    pixels to database pixels (affine models have last row (0, 0, 1)), or None. ``kind``: "homography",
    "affine" or None. ``matches``: (inliers, 2) int64 inlier index pairs (query keypoint, database keypoint),
    for drawing; ``n_matches``: tentative matches before fitting.
    """

    inliers: int
    model: np.ndarray | None
    kind: str | None
    matches: np.ndarray
    n_matches: int

    @property
    def verified(self) -> bool:
        return self.model is not None


def _to_h(model: np.ndarray) -> np.ndarray:
    m = np.asarray(model, dtype=np.float64)
    return np.vstack([m, [0.0, 0.0, 1.0]]) if m.shape == (2, 3) else m


def _box(pts: np.ndarray) -> np.ndarray:
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]], dtype=np.float64)


def is_degenerate(model: np.ndarray, pts_a: np.ndarray, pts_b: np.ndarray, cfg: VerifyConfig) -> bool:
    """Whether a fitted model (3x3, or 2x3 affine) should not count, given its inlier points.

    Checks, on the bounding box of the query inliers ``pts_a``: every corner maps in front of the line at
    infinity (``w > 0``); the mapped quadrilateral is convex with the same orientation (no fold, no mirror);
    its area ratio is within ``[max_scale**-2, max_scale**2]``; the Jacobian at the inliers' centroid has
    singular-value ratio ``<= max_anisotropy``; both inlier sets span at least ``min_extent`` px per side.
    """
    H = _to_h(model)
    if not np.all(np.isfinite(H)) or abs(H[2, 2]) < 1e-12:
        return True
    H = H / H[2, 2]
    pa, pb = np.asarray(pts_a, np.float64), np.asarray(pts_b, np.float64)
    if len(pa) < 3:
        return True
    ext_a, ext_b = np.ptp(pa, axis=0), np.ptp(pb, axis=0)
    if ext_a.min() < cfg.min_extent or ext_b.min() < cfg.min_extent:
        return True
    box = _box(pa)
    w = box @ H[2, :2] + H[2, 2]
    if np.any(w <= 1e-9):
        return True
    mapped = (box @ H[:2, :2].T + H[:2, 2]) / w[:, None]
    # convex and orientation-preserving: every turn has the same sign as in the source box (positive)
    edges = np.roll(mapped, -1, axis=0) - mapped
    cross = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if np.any(cross <= 0):
        return True
    area_src = float(np.prod(ext_a))
    x, y = mapped[:, 0], mapped[:, 1]
    area_dst = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    ratio = area_dst / max(area_src, 1e-12)
    if not (cfg.max_scale ** -2 <= ratio <= cfg.max_scale ** 2):
        return True
    c = pa.mean(axis=0)
    wc = float(H[2, :2] @ c + H[2, 2])
    u = (H[:2, :2] @ c + H[:2, 2]) / wc
    J = (H[:2, :2] - np.outer(u, H[2, :2])) / wc
    s = np.linalg.svd(J, compute_uv=False)
    return bool(s[1] <= 0 or s[0] / s[1] > cfg.max_anisotropy)


def fit_geometry(pts_a: np.ndarray, pts_b: np.ndarray, cfg: VerifyConfig
                 ) -> tuple[np.ndarray | None, str | None, np.ndarray]:
    """Robust model ``pts_a -> pts_b`` (both (M, 2) pixels): ``(model 3x3 | None, kind, inlier mask (M,))``.

    A MAGSAC++ homography first (M >= 4); if none is found or it is degenerate, a MAGSAC++ affine model when
    ``affine_fallback`` (a homography with fewer than ``min_inliers`` inliers ends the search: an affine map
    is a special homography, so its consensus cannot be larger). A model is returned only if it is non-degenerate
    with at
    least ``min_inliers`` inliers; otherwise ``(None, None, all-False mask)``.
    """
    a = np.ascontiguousarray(pts_a, dtype=np.float32).reshape(-1, 2)
    b = np.ascontiguousarray(pts_b, dtype=np.float32).reshape(-1, 2)
    m = len(a)
    none = (None, None, np.zeros(m, dtype=bool))
    if m < max(cfg.min_inliers, 3):
        return none
    if m >= 4:
        H, mask = cv2.findHomography(a, b, cv2.USAC_MAGSAC, cfg.ransac_threshold, maxIters=cfg.max_iters,
                                     confidence=cfg.confidence)
        if H is not None and mask is not None:
            inl = mask.ravel().astype(bool)
            if inl.sum() < cfg.min_inliers:
                # an affine map is a special homography: its consensus cannot be larger, so a well-posed
                # homography with too few inliers ends verification (saves a second MAGSAC on most pairs)
                return none
            if not is_degenerate(H, a[inl], b[inl], cfg):
                return H / H[2, 2], "homography", inl
    if cfg.affine_fallback:
        A, mask = cv2.estimateAffine2D(a, b, method=cv2.USAC_MAGSAC, ransacReprojThreshold=cfg.ransac_threshold,
                                       maxIters=cfg.max_iters, confidence=cfg.confidence)
        if A is not None and mask is not None:
            inl = mask.ravel().astype(bool)
            if inl.sum() >= cfg.min_inliers and not is_degenerate(A, a[inl], b[inl], cfg):
                return _to_h(A), "affine", inl
    return none


def verify_matches(query_kp: Keypoints, db_kp: Keypoints, pairs: np.ndarray, cfg: VerifyConfig) -> VerifyResult:
    """The geometric half of :func:`verify_pair`: fit the model to given tentative matches ``pairs`` ((M, 2) query /
    database keypoint indices, e.g. from a matcher's ``match_many``) and keep the inliers."""
    if len(pairs) == 0:
        return VerifyResult(0, None, None, np.zeros((0, 2), np.int64), 0)
    model, kind, inl = fit_geometry(query_kp.xy[pairs[:, 0]], db_kp.xy[pairs[:, 1]], cfg)
    if model is None:
        return VerifyResult(0, None, None, np.zeros((0, 2), np.int64), len(pairs))
    return VerifyResult(int(inl.sum()), model, kind, pairs[inl], len(pairs))


def verify_pair(query_kp: Keypoints, db_kp: Keypoints, cfg: VerifyConfig, matcher: Matcher) -> VerifyResult:
    """Match ``query_kp`` to ``db_kp`` with ``matcher`` and fit the geometry (:func:`fit_geometry`)."""
    pairs, _ = matcher.match(query_kp, db_kp)
    return verify_matches(query_kp, db_kp, pairs, cfg)


def verify_shortlist(query_kp: Keypoints, db_kps: Sequence[Keypoints], cfg: VerifyConfig,
                     matcher: Matcher) -> list[VerifyResult]:
    """:func:`verify_pair` for every database image of a shortlist (matching batched by the matcher)."""
    matches = matcher.match_many(query_kp, db_kps)
    return [verify_matches(query_kp, d, pairs, cfg) for d, (pairs, _) in zip(db_kps, matches)]


def inlier_matches(query_kp: Keypoints, db_kps: Sequence[Keypoints], cfg: VerifyConfig, matcher: Matcher
                   ) -> list[tuple[int, np.ndarray]]:
    """Per database image of a shortlist: (inlier count, (n, 4) float32 inlier matches ``[xq, yq, xd, yd]`` in
    query / database pixels) -- what a re-ranking keeps of :func:`verify_shortlist` (0 and no rows when the
    image is not verified)."""
    return [(int(res.inliers), match_positions(query_kp, d, res.matches))
            for d, res in zip(db_kps, verify_shortlist(query_kp, db_kps, cfg, matcher))]


def match_positions(query_kp: Keypoints, db_kp: Keypoints, matches: np.ndarray) -> np.ndarray:
    """(n, 4) float32 ``[xq, yq, xd, yd]`` pixels of (n, 2) keypoint index pairs (e.g. a :class:`VerifyResult`'s
    inlier ``matches``): what re-rankings keep, draw, and hand :func:`guided_inlier_matches` as anchors."""
    m = np.asarray(matches, np.int64).reshape(-1, 2)
    return np.concatenate([query_kp.xy[m[:, 0]], db_kp.xy[m[:, 1]]], axis=1).astype(np.float32)


def guided_inlier_matches(query_kp: Keypoints, db_kps: Sequence[Keypoints], anchors: Sequence[np.ndarray | None],
                          n: int, cfg: VerifyConfig, matcher: Matcher) -> list[tuple[int, np.ndarray]]:
    """:func:`inlier_matches` pair by pair, where the matcher sees at most ``n`` keypoints of each image: those of
    the pair's ``anchors`` (an earlier verification's (m, 4) inlier matches ``[xq, yq, xd, yd]``, None or empty for
    none) first, then the strongest (:meth:`Keypoints.top_with`). ``n`` = 0: every keypoint, as
    :func:`inlier_matches`."""
    if n <= 0 or not any(a is not None and len(a) for a in anchors):
        return inlier_matches(query_kp, db_kps, cfg, matcher)   # the matcher's own strongest-n, batched
    out = []
    for d, a in zip(db_kps, anchors):
        a = np.zeros((0, 4), np.float32) if a is None else np.asarray(a, np.float32).reshape(-1, 4)
        out.extend(inlier_matches(query_kp.top_with(a[:, :2], n), [d.top_with(a[:, 2:], n)], cfg, matcher))
    return out


def fuse_scores(first_stage: np.ndarray, inliers: np.ndarray, cfg: VerifyConfig) -> np.ndarray:
    """Fused shortlist scores (higher = better) from first-stage scores and inlier counts (module docstring).

    ``first_stage`` may be any score where higher is better; when only a ranking is known, pass ``-rank``.
    """
    s = np.asarray(first_stage, dtype=np.float64).ravel()
    n = np.asarray(inliers, dtype=np.float64).ravel()
    if s.shape != n.shape:
        raise ValueError(f"first_stage {s.shape} and inliers {n.shape} differ")
    if s.size == 0:
        return s
    verified = n >= cfg.min_inliers
    if cfg.fusion == "tiered":
        c = float(s.max() - s.min()) + 1.0
        return s + verified * c * (1.0 + n)
    return s + cfg.fusion_weight * verified * np.minimum(n, cfg.inlier_cap) / cfg.inlier_cap


def rerank_shortlist(ranked_ids: np.ndarray, first_stage: np.ndarray | None, inliers: np.ndarray,
                     cfg: VerifyConfig) -> np.ndarray:
    """Re-order the first ``len(inliers)`` ids of a ranking by :func:`fuse_scores`; the rest keep their order.

    ``first_stage``: scores of those ids (None = use ``-rank``). Stable: equal fused scores keep rank order.
    """
    ids = np.asarray(ranked_ids)
    k = len(inliers)
    s = -np.arange(k, dtype=np.float64) if first_stage is None else np.asarray(first_stage, np.float64)[:k]
    order = np.argsort(-fuse_scores(s, inliers, cfg), kind="stable")
    return np.concatenate([ids[:k][order], ids[k:]])


def rescore_positions(first_stage: np.ndarray, inliers: np.ndarray, cfg: VerifyConfig) -> np.ndarray:
    """Shortlist positions (first-stage order, 0-based) that the learned matcher re-verifies: the first stage's
    top ``cfg.rescore_top`` and the top ``cfg.rescore_top`` after fusing ``first_stage`` scores with the MNN
    ``inliers`` (:func:`fuse_scores`), sorted. The one place that choice is made (search, benchmark, bench_sv)."""
    top = int(cfg.rescore_top)
    order = np.argsort(-fuse_scores(first_stage, inliers, cfg), kind="stable")
    return np.union1d(np.arange(min(top, order.size), dtype=np.int64), order[:top].astype(np.int64))
