"""Aggregated selective match kernels and Detect-to-Retrieve regional aggregation (seed 002 §4, ALGORITHMS.md §6).

Notation (seed 002 eq. 1): ``K(X, Y) = gamma(X) gamma(Y) sum_c sigma(Phi(X_c) . Phi(Y_c))`` with
``gamma(X) = (sum_c sigma(Phi(X_c) . Phi(X_c)))^-1/2`` and ``X_c`` the local descriptors of ``X`` assigned to
visual word ``c``.

* VLAD: ``Phi = V`` (sum of residuals ``x - q(x)``), ``sigma(u) = u``.
* ASMK: ``Phi = V / ||V||``, ``sigma(u) = sign(u)|u|^alpha`` if ``u > tau`` else 0 (``alpha = 3, tau = 0``).
* ASMK*: ``Phi`` binarised (bit = ``V > 0``, packed with ``np.packbits``); the inner product of two ``+-1``
  vectors of dimension ``D`` is ``(D - 2 * hamming) / D``, computed with a popcount.
* D2R regional search (eq. 3-4): every region ``Y^(n,r)`` of a database image (``r = 1`` the whole image)
  is an *item* of the inverted file; an image's score is the max or mean over its items.
* R-VLAD (eq. 6-8): ``V_R(Y_c) = (1/R_n) sum_r gamma_VLAD(Y^(n,r)) V(Y_c^(n,r))`` with
  ``gamma_VLAD = (sum_c ||V_c||^2)^-1/2`` (the per-region VLAD L2 normalisation); the similarity
  ``sum_c gamma(X) V(X_c) . V_R(Y_c)`` equals the average-pooled regional VLAD similarity.
* Naive-R-ASMK: the same with ``V_hat`` and the ASMK ``gamma`` of each region, selectivity applied at query time.
* R-ASMK (eq. 9): ``V_hat_R = V_R / ||V_R||`` per word (``V_R`` of eq. 8), then the ASMK kernel; R-ASMK* binarises
  ``V_hat_R``. Eq. 9 prints no ``gamma``; the authors' released implementation (DELF
  ``feature_aggregation_similarity.py``) divides by ``sqrt(#words(X) * #words(Y))``, i.e. applies the ASMK
  ``gamma`` to both images, and so do we (it matters for ranking: ``gamma(Y)`` varies across the database).
  Regional aggregation is on the database side only; queries use plain ASMK / ASMK* (asymmetric case, §4.3).

Storage: the inverted file is a CSR structure over visual words (``word_ptr`` (K+1,), ``item_ids`` (nnz,),
``vecs`` (nnz, D) float16/float32 or (nnz, ceil(D/8)) uint8), plus per-item arrays (``item_image``,
``item_self`` = ``sum_c sigma(Phi_c . Phi_c)``). Everything is built with sorts and segment reductions (no
per-descriptor Python loops), shards merge by a vectorised scatter, and ``to_arrays()/from_arrays()`` give
plain numpy arrays that can be saved as ``.npy`` and memory-mapped back.

IDF (optional, as in the ``asmk`` package): ``idf_c = log(N_items / df_c)^2`` multiplies each word's kernel
value, and ``gamma`` becomes ``(sum_c idf_c sigma(Phi_c . Phi_c))^-1/2`` on both sides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.asmk_aggregate import (EPS, KERNELS, REGIONAL, Aggregated, aggregate_images,  # noqa: F401 - API
                                     aggregate_regional, aggregate_regions, binarize, hamming_similarity,
                                     region_membership, residual_sums, segment_sum, selectivity)
from pipeline.inverted_file import InvertedFile, merge_inverted_files  # noqa: F401 - API


# ----------------------------------------------------------------------------------------------- one-call API

@dataclass(frozen=True)
class ASMKConfig:
    """What to build: ``kernel`` in KERNELS, ``regional`` in REGIONAL (``'rasmk'`` with ``'asmk_star'`` is
    R-ASMK*), selectivity ``alpha``/``tau``, idf, database-side ``multiple`` assignment, vector ``dtype``."""

    kernel: str = "asmk_star"
    regional: str = "none"
    alpha: float = 3.0
    tau: float = 0.0
    use_idf: bool = False
    multiple: int = 1
    dtype: str = "float16"
    include_full: bool = True

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}")
        if self.regional not in REGIONAL:
            raise ValueError(f"regional must be one of {REGIONAL}")
        if self.regional == "rvlad" and self.kernel != "vlad":
            raise ValueError("R-VLAD needs kernel='vlad'")
        if self.regional == "naive_rasmk" and self.kernel != "asmk":
            raise ValueError("Naive-R-ASMK needs kernel='asmk'")
        if self.regional == "rasmk" and self.kernel == "vlad":
            raise ValueError("R-ASMK needs kernel 'asmk' or 'asmk_star'")

    @property
    def linear(self) -> bool:
        return self.kernel == "vlad"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def aggregate_database(des: np.ndarray, words: np.ndarray, image_ids: np.ndarray, centroids: np.ndarray,
                       config: ASMKConfig, xy: np.ndarray | None = None, boxes: np.ndarray | None = None,
                       box_image: np.ndarray | None = None) -> Aggregated:
    """Aggregate database descriptors as ``config`` says (image-level, D2R items or regional aggregation)."""
    if config.regional == "none":
        return aggregate_images(des, words, image_ids, centroids, config.kernel)
    if xy is None:
        raise ValueError("regional variants need descriptor positions xy")
    if config.regional == "d2r":
        return aggregate_regions(des, words, image_ids, xy, boxes, box_image, centroids, config.kernel,
                                 config.include_full)
    return aggregate_regional(des, words, image_ids, xy, boxes, box_image, centroids, config.regional,
                              binary=config.kernel == "asmk_star", include_full=config.include_full)


def build_index(des: np.ndarray, words: np.ndarray, image_ids: np.ndarray, centroids: np.ndarray,
                config: ASMKConfig = ASMKConfig(), xy: np.ndarray | None = None, boxes: np.ndarray | None = None,
                box_image: np.ndarray | None = None) -> InvertedFile:
    """Aggregate + inverted file for one shard (``words`` from :func:`pipeline.codebook.assign`)."""
    agg = aggregate_database(des, words, image_ids, centroids, config, xy, boxes, box_image)
    return InvertedFile.build(agg, len(centroids), alpha=config.alpha, tau=config.tau, linear=config.linear,
                              use_idf=config.use_idf, dtype=config.dtype, kernel=config.kernel,
                              regional=config.regional)


def aggregate_queries(des: np.ndarray, words: np.ndarray, query_ids: np.ndarray, centroids: np.ndarray,
                      index: InvertedFile) -> Aggregated:
    """Aggregate query descriptors with the kernel matching ``index`` (items = sorted unique query ids)."""
    return aggregate_images(des, words, query_ids, centroids, index.query_kernel())


# ----------------------------------------------------------------------------------------------- named kernels
# Kernel names users select (``asmk.kernels`` in the index config, ``--method`` at query time) -> what to build.
KERNEL_CONFIGS: dict[str, dict[str, str]] = {
    "asmk": {"kernel": "asmk"},
    "asmk_star": {"kernel": "asmk_star"},
    "vlad": {"kernel": "vlad"},
    "d2r_asmk": {"kernel": "asmk", "regional": "d2r"},
    "d2r_asmk_star": {"kernel": "asmk_star", "regional": "d2r"},
    "d2r_vlad": {"kernel": "vlad", "regional": "d2r"},
    "r_vlad": {"kernel": "vlad", "regional": "rvlad"},
    "naive_r_asmk": {"kernel": "asmk", "regional": "naive_rasmk"},
    "r_asmk": {"kernel": "asmk", "regional": "rasmk"},
    "r_asmk_star": {"kernel": "asmk_star", "regional": "rasmk"},
}


def kernel_config(name: str, multiple: int = 1) -> ASMKConfig:
    """The :class:`ASMKConfig` of a kernel name (``asmk_star``, ``r_asmk_star``, ``d2r_asmk_star``, ...)."""
    if name not in KERNEL_CONFIGS:
        raise ValueError(f"unknown ASMK kernel {name!r}; known: {sorted(KERNEL_CONFIGS)}")
    return ASMKConfig(**KERNEL_CONFIGS[name], multiple=int(multiple))


ASMK_LOCALS = ("cnn", "xfeat", "aliked")


@dataclass(frozen=True)
class AsmkIndexConfig:
    """The ``asmk`` stage: codebook, which kernels get an inverted file, regions of the regional kernels."""

    codebook_size: int = 1024
    codebook_sample: int = 200_000
    kernels: tuple[str, ...] = ("asmk_star", "r_asmk_star")
    region_source: str = "fs_egm"
    multiple_assignment: int = 1        # database side: nearest words each local descriptor is added to
    query_multiple_assignment: int = 5  # query side (the asmk package's and the ASMK paper's default)
    # which local features feed the codebook and inverted files: "cnn" (the locals table, conv-map locals) or the
    # keypoints table's learned descriptors ("xfeat" / "aliked"; extract.keypoints.name must say the same)
    locals: str = "cnn"

    def __post_init__(self) -> None:
        if self.locals not in ASMK_LOCALS:
            raise ValueError(f"locals: unknown {self.locals!r}; known: {ASMK_LOCALS}")
        bad = [k for k in self.kernels if k not in KERNEL_CONFIGS]
        if bad:
            raise ValueError(f"kernels: unknown {bad}; known: {sorted(KERNEL_CONFIGS)}")
        if self.codebook_size < 2 or self.multiple_assignment < 1 or self.query_multiple_assignment < 1:
            raise ValueError("codebook_size >= 2 and multiple assignments >= 1")

