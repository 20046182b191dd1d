"""Seed 004's class-weighted descriptors in the paper's order: whiten each class vector, *then* aggregate.

Jimenez, Alvarez, Giro-i-Nieto (BMVC 2017), §3.2 "Descriptor aggregation": each class vector ``F_c`` is
L2-normalised, PCA-whitened and L2-normalised; the ``N_C`` vectors are then summed and the sum L2-normalised.
Whitening every class vector separately is what makes the sum a sum of comparable unit vectors; whitening the
*sum* once (what :func:`pipeline.cam.cam_ofa` with ``whiten=None`` followed by a global whitening does) is a
different descriptor. The PCA-whitening is learned on class vectors, not on sums: §4.3 "the number of classes
used to build the PCA matrix, N_pca ... The input matrix has dimensions N_Im N_pca x K", i.e. each image's
top-``N_pca`` class vectors; the reported results use ``N_pca = 1`` and ``N_C = 64`` (§4.4), and the PCA is
learned on another dataset than the one searched (Paris6k for Oxford5k and vice versa, §4.1).

Two class-selection modes (§3.2, §4.3):

* **OfA** (offline aggregation): each image's own top-``N_C`` classes (by the GAP + linear classifier's
  logits). Only the final descriptor is stored.
* **OnA** (online aggregation): the *query's* top-``N_C`` classes are used for every database image. The paper
  notes its cost: CAM class vectors for all classes of every database image (1000 x K floats per image, about
  1 MB in float16 for K = 512) and aggregation at query time. We bound it as the paper suggests in §4.3 for
  building datasets: a *predefined class list* ``L`` (in the config, e.g. the classes most frequent among the
  dataset's queries) restricts the candidate classes. The index stores, per image, the whitened class vectors of
  ``L`` only (``|L| x d``; :func:`whiten_class_vectors`); a query picks its top-``N_C`` classes *within* ``L``
  (:func:`ona_query_classes`) and each database descriptor is the L2-normalised sum of the stored vectors of
  those classes (:func:`ona_descriptors`). With ``N_C >= |L|`` OnA coincides with the "OfA with predefined
  classes" descriptor of §4.3 / Figure 5 (:func:`cam_predefined_whitened`), which stores one vector per image.

Re-ranking (§4.5): the top-R images of a first search are compared to the query through the descriptors of
CAM boxes (largest connected component of the top-2-averaged CAM thresholded at 1, 10, 20, 30, 40 % of its
max; :func:`pipeline.cam.cam_boxes`); each image scores its best box (cosine); ``N_C`` drops to 6 classes for
the box descriptors. The paper uses the *query's* classes for the boxes and the box descriptors, which needs
every database image's activations at query time; offline we use each image's own classes (or the predefined
list), so the box descriptors can be computed at indexing time and stored (``T x d`` per image). As in the
authors' released code, a box descriptor recomputes the CroW channel weights on the cropped activations and
uses the full-image CAMs cropped to the box.

Activations ``A`` are torch ``(C, H, W)`` (as everywhere in ``pipeline``); the outputs meant for storage and the
query-time functions are numpy float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from pipeline import cam as cam_mod
from pipeline.regions import to_cells
from pipeline.whitening import Whitening, learn_pca_whitening

EPS = 1e-12


@dataclass(frozen=True)
class CamConfig:
    """Seed 004 parameters (defaults from the paper, section in the comment)."""

    n_classes: int = 64                  # N_C aggregated per descriptor (§4.4, Table 2a: N_C = 64)
    n_pca: int = 1                       # N_pca class vectors per image to learn the PCA (§4.4: N_pca = 1)
    rerank_classes: int = 6              # N_C for the re-ranking box descriptors (§4.5: "the 6 more probable")
    box_classes: int = 2                 # CAMs averaged to find the boxes (§4.5: top-2 average)
    thresholds: tuple[float, ...] = cam_mod.CAM_THRESHOLDS  # 1, 10, 20, 30, 40 % of the CAM max (§4.5)
    rerank_top: int = 1000               # R (Table 2b: R = 1000 with QE 5; R = 100 with QE 10)
    rerank_qe: int = 5                   # average QE after re-ranking (Table 2b)
    predefined_classes: tuple[int, ...] = ()  # class list L for OnA / the predefined-list descriptor (§4.3)
    whiten_dim: int | None = None        # PCA output dim (None: full rank; the paper keeps K = 512 for VGG16)

    def __post_init__(self) -> None:
        if self.n_classes < 1 or self.n_pca < 1 or self.rerank_classes < 1 or self.box_classes < 1:
            raise ValueError("class counts must be at least 1")
        if self.rerank_top < 0 or self.rerank_qe < 0:
            raise ValueError("rerank_top and rerank_qe must be >= 0")
        if not self.thresholds or any(not 0 <= t < 1 for t in self.thresholds):
            raise ValueError("thresholds must be fractions in [0, 1)")
        if len(set(self.predefined_classes)) != len(self.predefined_classes):
            raise ValueError("predefined_classes has duplicates")


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


# ------------------------------------------------------------------------------------------ class vectors
def select_classes(A: torch.Tensor, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None,
                   classes: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """Class ids (int64): the image's top-``classes`` by logit, best first, when ``classes`` is an int (OfA);
    the given list otherwise (predefined list / the query's classes for OnA)."""
    if isinstance(classes, (int, np.integer)):
        return cam_mod.top_classes(A, weight, bias, int(classes)).cpu().numpy().astype(np.int64)
    return np.asarray(classes, dtype=np.int64).reshape(-1)


def cam_class_vectors(A: torch.Tensor, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None,
                      classes: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """Raw class vectors ``(N_C, C)`` float32: ``f^(c)_k = CW_k sum_ij A_kij CAM_c,ij`` (seed 004 eq. 4).

    ``classes``: an int N_C (the image's top-N_C classes, best first: OfA) or a list of class ids (predefined
    list, or the query's classes for OnA). Rows follow :func:`select_classes`. Not normalised or whitened.
    """
    ids = select_classes(A, weight, bias, classes)
    cams = cam_mod.class_activation_maps(A, weight, ids)
    return cam_mod.cam_class_vectors(A, cams).detach().cpu().numpy().astype(np.float32)


def whitening_sample(class_vectors: Sequence[np.ndarray] | np.ndarray, n_pca: int = 1, max_rows: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """Training rows for the class-vector PCA: the first ``n_pca`` class vectors of every image (their top
    classes when the rows are in :func:`cam_class_vectors`' OfA order), stacked ``(N_Im * n_pca, C)``.

    All-zero vectors (dead activations) are dropped. With ``max_rows`` a seeded random subset is kept (in the
    original order). ``class_vectors``: one ``(N_C_i, C)`` array per image, or an ``(N, N_C, C)`` array.
    """
    rows = [np.asarray(v, dtype=np.float32)[:n_pca] for v in class_vectors]
    if not rows:
        raise ValueError("no class vectors to sample")
    X = np.concatenate(rows, axis=0)
    X = X[np.linalg.norm(X, axis=1) > 0]
    if max_rows is not None and X.shape[0] > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(X.shape[0], max_rows, replace=False))
        X = X[keep]
    return X


def learn_cam_whitening(sample: np.ndarray, dim: int | None = None) -> Whitening:
    """PCA-whitening of class vectors (the rows of :func:`whitening_sample`); ``Whitening.apply`` is then the
    paper's per-class-vector "L2, PCA-whitening, L2"."""
    return learn_pca_whitening(sample, dim=dim)


def whiten_class_vectors(class_vectors: np.ndarray, whitening: Whitening) -> np.ndarray:
    """Per class vector: L2, PCA-whiten, L2 (``(..., N_C, C)`` -> ``(..., N_C, d)`` float32).

    All-zero class vectors (a class whose CAM meets only zero activations) stay zero instead of becoming the
    whitened image of ``-mean``: they carry no evidence, and the paper's formula would divide 0 by 0 there.
    """
    V = np.asarray(class_vectors, dtype=np.float32)
    flat = V.reshape(-1, V.shape[-1])
    Z = np.asarray(whitening.apply(flat), dtype=np.float32)
    Z[np.linalg.norm(flat, axis=1) == 0] = 0.0
    return Z.reshape(V.shape[:-1] + (Z.shape[-1],))


def cam_ofa_whitened(class_vectors: np.ndarray, whitening: Whitening) -> np.ndarray:
    """Seed 004 descriptor from raw class vectors: ``L2( sum_c L2(PCAw(L2(f^(c)))) )``.

    ``class_vectors`` ``(N_C, C)`` -> ``(d,)``, or ``(N, N_C, C)`` -> ``(N, d)``; float32.
    """
    return _l2n(whiten_class_vectors(class_vectors, whitening).sum(axis=-2)).astype(np.float32)


def cam_predefined_whitened(A: torch.Tensor, weight: torch.Tensor | np.ndarray, class_ids: Sequence[int] | np.ndarray,
                            whitening: Whitening) -> np.ndarray:
    """"OfA with predefined classes" (§4.3, Figure 5b): the same class list for every image, whitened per class
    then aggregated. The paper-order counterpart of :func:`pipeline.cam.cam_predefined`."""
    return cam_ofa_whitened(cam_class_vectors(A, weight, None, class_ids), whitening)


def cam_ofa_descriptor(A: torch.Tensor, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None,
                       whitening: Whitening, n_classes: int = 64) -> np.ndarray:
    """OfA in the paper's order for one image: its top-``n_classes`` class vectors, whitened each, summed, L2."""
    return cam_ofa_whitened(cam_class_vectors(A, weight, bias, n_classes), whitening)


# ------------------------------------------------------------------------------------------ OnA (query time)
def ona_query_classes(logits: np.ndarray | torch.Tensor, predefined: Sequence[int] | np.ndarray,
                      n_classes: int) -> np.ndarray:
    """Positions (into ``predefined``) of the query's top-``n_classes`` classes *within* the predefined list,
    ranked by the query's ``logits`` (K,) (:func:`pipeline.cam.class_logits`); ties by list order."""
    logits = logits.detach().cpu().numpy() if torch.is_tensor(logits) else np.asarray(logits)
    pre = np.asarray(predefined, dtype=np.int64)
    s = logits[pre]
    order = np.lexsort((np.arange(pre.size), -s))
    return order[:min(n_classes, pre.size)].astype(np.int64)


def ona_descriptors(Z: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """OnA descriptors ``(N, d)``: L2 of the sum of the stored whitened class vectors ``Z`` ``(N, |L|, d)`` at
    the query's class ``positions`` (from :func:`ona_query_classes`). The query's own descriptor is
    ``ona_descriptors(Zq[None], positions)[0]`` with ``Zq`` its whitened vectors of the same list."""
    Z = np.asarray(Z, dtype=np.float32)
    return _l2n(Z[:, np.asarray(positions, dtype=np.int64)].sum(axis=1)).astype(np.float32)


def ona_scores(query_desc: np.ndarray, Z: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Cosine scores ``(N,)`` of the OnA query descriptor against every database image's OnA descriptor."""
    return ona_descriptors(Z, positions) @ np.asarray(query_desc, dtype=np.float32)


# ------------------------------------------------------------------------------------------ CAM-box regions
def cam_box_descriptors(A: torch.Tensor, weight: torch.Tensor | np.ndarray, class_ids: Sequence[int] | np.ndarray,
                        boxes: np.ndarray, whitening: Whitening) -> np.ndarray:
    """Class-weighted descriptor ``(T, d)`` of each half-open cell box ``[x0, y0, x1, y1]``: the activations and
    the (full-image normalised) CAMs of ``class_ids`` cropped to the box, CroW channel weights of the crop,
    class vectors L2 / whiten / L2, summed, L2 — the authors' ``compute_scores_cams``."""
    ids = np.asarray(class_ids, dtype=np.int64)
    cams = cam_mod.class_activation_maps(A, weight, ids)
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
        a, c = A[:, y0:y1, x0:x1], cams[:, y0:y1, x0:x1]
        v = cam_mod.cam_class_vectors(a, c).detach().cpu().numpy().astype(np.float32)
        out.append(cam_ofa_whitened(v, whitening))
    if not out:
        return np.zeros((0, whitening.out_dim), np.float32)
    return np.stack(out)


def cam_rerank_regions(A: torch.Tensor, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None,
                       whitening: Whitening, cfg: CamConfig = CamConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``(T, 4)`` (half-open cells) and descriptors ``(T, d)`` an image stores for re-ranking.

    Boxes: :func:`pipeline.cam.cam_boxes` of the mean CAM of the image's top-``cfg.box_classes`` classes at
    ``cfg.thresholds``. Descriptor classes: the first ``cfg.rerank_classes`` of ``cfg.predefined_classes``
    when a list is configured, else the image's own top-``cfg.rerank_classes`` (offline stand-in for the
    query's classes, see module docstring).
    """
    C, H, W = A.shape
    box_ids = select_classes(A, weight, bias, cfg.box_classes)
    cam_map = cam_mod.class_activation_maps(A, weight, box_ids).mean(dim=0)
    cells = to_cells(cam_mod.cam_boxes(cam_map, cfg.thresholds), H, W)
    desc_classes = (np.asarray(cfg.predefined_classes[:cfg.rerank_classes], np.int64) if cfg.predefined_classes
                    else select_classes(A, weight, bias, cfg.rerank_classes))
    return cells, cam_box_descriptors(A, weight, desc_classes, cells, whitening)


def cam_rerank(query_desc: np.ndarray, first_stage_ids: np.ndarray,
               region_desc_per_image: Mapping[int, np.ndarray] | Sequence[np.ndarray], R: int = 1000,
               first_stage_scores: np.ndarray | None = None,
               return_best: bool = False) -> tuple[np.ndarray, ...]:
    """Re-rank the top-``R`` of a first search by each image's best-matching CAM box (seed 004 §4.5).

    ``query_desc`` (d,) L2-normalised; ``first_stage_ids`` (M,) ranked best first; ``region_desc_per_image``:
    a mapping image id -> ``(T_i, d)`` L2-normalised box descriptors, or a sequence aligned with
    ``first_stage_ids`` (at least its first ``R`` entries). Each of the top-``R`` scores ``max_t q . r_t``
    and they are sorted by it (stable: ties keep the first-stage order); results beyond ``R`` keep their
    first-stage order and score. An image with no box keeps its first-stage score when ``first_stage_scores``
    is given, else goes to the end of the re-ranked block (the authors' code scores it -10).

    Returns ``(ids, scores)`` (M,) in the new order (scores: box score for the re-ranked block, first-stage
    score or NaN beyond it), plus ``best`` (M,) — the winning box index, -1 where none — with
    ``return_best=True`` (the paper's QE after re-ranking uses the winning boxes' descriptors).
    """
    q = np.asarray(query_desc, dtype=np.float64).reshape(-1)
    ids = np.asarray(first_stage_ids, dtype=np.int64).reshape(-1)
    M = ids.size
    R = int(min(max(R, 0), M))
    base = (np.full(M, np.nan) if first_stage_scores is None
            else np.asarray(first_stage_scores, dtype=np.float64).reshape(-1).copy())
    if base.size != M:
        raise ValueError("first_stage_scores must match first_stage_ids")
    is_map = isinstance(region_desc_per_image, Mapping)
    regs = [region_desc_per_image.get(int(ids[p])) if is_map else region_desc_per_image[p] for p in range(R)]
    regs = [np.zeros((0, q.size)) if r is None else np.asarray(r, dtype=np.float64).reshape(-1, q.size) for r in regs]
    counts = np.array([r.shape[0] for r in regs], dtype=np.int64)
    has = counts > 0
    score = np.where(has, -np.inf, base[:R] if first_stage_scores is not None else -np.inf)
    best = np.full(M, -1, dtype=np.int64)
    if has.any():
        s = np.concatenate([r for r in regs if r.shape[0]]) @ q            # every box of the block at once
        owner = np.repeat(np.arange(R), counts)
        local = np.arange(s.size) - np.repeat(np.cumsum(counts) - counts, counts)
        first = np.lexsort((local, -s, owner))                              # per owner: best box first
        head = first[np.r_[True, owner[first][1:] != owner[first][:-1]]]
        score[owner[head]] = s[head]
        best[owner[head]] = local[head]
    order = np.lexsort((np.arange(R), -score))
    new = np.concatenate([order, np.arange(R, M)])
    scores = np.concatenate([score[order], base[R:]])
    out = (ids[new], scores.astype(np.float32))
    return out + (best[new],) if return_best else out


__all__ = ["CamConfig", "cam_box_descriptors", "cam_class_vectors", "cam_ofa_descriptor", "cam_ofa_whitened",
           "cam_predefined_whitened", "cam_rerank", "cam_rerank_regions", "learn_cam_whitening", "ona_descriptors",
           "ona_query_classes", "ona_scores", "select_classes", "whiten_class_vectors", "whitening_sample"]
