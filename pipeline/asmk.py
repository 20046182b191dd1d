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

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

EPS = 1e-12
KERNELS = ("vlad", "asmk", "asmk_star")
REGIONAL = ("none", "d2r", "rvlad", "naive_rasmk", "rasmk")


# ----------------------------------------------------------------------------------------------- kernels

def selectivity(u: np.ndarray, alpha: float = 3.0, tau: float = 0.0) -> np.ndarray:
    """ASMK selectivity ``sigma(u) = sign(u)|u|^alpha`` where ``u > tau``, else 0 (seed 002 eq. 2)."""
    u = np.asarray(u, dtype=np.float64)
    return np.where(u > tau, np.sign(u) * np.abs(u) ** alpha, 0.0)


def binarize(V: np.ndarray) -> np.ndarray:
    """ASMK* codes: bit ``V > 0`` per dimension, packed big-endian along the last axis (uint8)."""
    return np.packbits(np.asarray(V) > 0, axis=-1)


def _popcount_rows(x: np.ndarray) -> np.ndarray:
    """Number of set bits over the last axis of a uint8 array (via uint64 words when the width allows)."""
    if x.shape[-1] % 8 == 0 and x.flags.c_contiguous:
        return np.bitwise_count(x.view(np.uint64)).sum(axis=-1, dtype=np.int64)
    return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)


def hamming_similarity(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """Inner product of the ``+-1`` vectors behind packed codes ``a``, ``b`` (broadcast): ``(D - 2h) / D``."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint8), np.asarray(b, dtype=np.uint8))
    return (dim - 2.0 * _popcount_rows(np.ascontiguousarray(x))) / dim


def _faiss_hammings():
    """FAISS's all-pairs Hamming kernel as ``f(a (na, B) uint8, b (nb, B) uint8, out (na, nb) int32)``, or None."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a project dependency
        return None
    fn = getattr(faiss, "hammings", None)
    if fn is None:
        return None

    def run(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        fn(faiss.swig_ptr(a), faiss.swig_ptr(b), len(a), len(b), a.shape[1], faiss.swig_ptr(out))

    return run


# ----------------------------------------------------------------------------------------------- aggregation

@dataclass
class Aggregated:
    """Per-(item, word) aggregated vectors of a set of items (images, or regions for regional search).

    ``items``/``words`` (P,) int64 sorted by item then word; ``vecs`` (P, D) float32, or (P, ceil(D/8)) uint8
    when ``binary``; ``self_sim`` (P,) ``sigma(Phi . Phi)`` of each pair (for ``gamma``); ``item_image``
    (n_items,) image id of each item; ``scale_items``: whether ``gamma`` of the item enters the kernel
    (False for R-VLAD / Naive-R-ASMK, whose regional ``gamma`` is already inside ``Phi``); ``unit``: every
    ``Phi`` has ``sigma(Phi . Phi) = 1`` (ASMK, ASMK*, R-ASMK), so idf-weighted ``gamma`` needs no vectors.
    """

    items: np.ndarray
    words: np.ndarray
    vecs: np.ndarray
    self_sim: np.ndarray
    item_image: np.ndarray
    dim: int
    binary: bool
    scale_items: bool = True
    unit: bool = False

    @property
    def n_items(self) -> int:
        return int(len(self.item_image))


def segment_sum(R: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of consecutive row segments of ``R`` (n, D) beginning at ``starts`` (increasing, first 0).

    Same result as ``np.add.reduceat(R, starts, axis=0)``, computed as a sparse (segments x rows) 0/1 CSR
    matrix times ``R``: numpy's 2-D reduceat walks columns with a row stride and is ~30x slower here.
    """
    n = len(R)
    if len(starts) == 0:
        return np.zeros((0,) + R.shape[1:], dtype=R.dtype)
    indptr = np.r_[np.asarray(starts, dtype=np.int64), n]
    S = sp.csr_matrix((np.ones(n, dtype=R.dtype), np.arange(n), indptr), shape=(len(starts), n))
    return np.asarray(S @ R)


def _gamma(n: np.ndarray) -> np.ndarray:
    """Higham's ``gamma_n = n u / (1 - n u)`` for float32 (``u = 2**-24``): the relative error bound of a sum
    of ``n`` terms added one by one."""
    nu = np.asarray(n, dtype=np.float64) * 2.0 ** -24
    return nu / (1.0 - nu)


def _residual_chunks(des: np.ndarray, words: np.ndarray, centroids: np.ndarray, groups: np.ndarray,
                     rows: np.ndarray | None = None, weights: np.ndarray | None = None, chunk: int = 1 << 13):
    """Yield ``(keys, V)`` blocks of residual sums per (group, word) pair, in increasing ``key = group*K + word``.

    One argsort of the pair keys, then blocks of about ``chunk`` entries (small enough to stay in cache):

    * fast path: ``V = sum_x w_x x - (sum_x w_x) c``, the descriptor sums from a sparse (pairs x descriptors)
      0/1 (or weight) matrix times ``des`` (rows read in place: no gathered copy, no residual matrix) and
      the centroid subtracted in float64;
    * exact signs: a component whose magnitude is within the float32 rounding bounds of that sum and of the
      ``asmk`` package's way (float32 residuals ``x - c`` added one by one in row order) could get another
      sign than the package's; the pairs with such a component (a small share) are recomputed the package's
      way, so ASMK* codes agree with it bit for bit and the fast path costs no accuracy.

    See :func:`residual_sums` for the arguments.
    """
    des = np.ascontiguousarray(des, dtype=np.float32)
    cents = np.ascontiguousarray(centroids, dtype=np.float32)
    K = len(cents)
    words = np.asarray(words, dtype=np.int64).reshape(len(des), -1)
    m = words.shape[1]
    rows = np.arange(len(des), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if len(groups) != len(rows):
        raise ValueError("groups must give one item per entry")
    ent_rows = np.repeat(rows, m)
    ent_words = words[rows].ravel()
    ent_w = None if weights is None else np.repeat(np.asarray(weights, dtype=np.float32), m)
    key = np.repeat(groups, m) * K + ent_words
    order = np.argsort(key, kind="stable")
    key_s = key[order]
    if len(key_s) == 0:
        return
    starts = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
    seg_cut = np.unique(np.r_[np.searchsorted(starts, np.arange(0, len(key_s), chunk), side="right") - 1,
                              len(starts)])
    cmax = np.abs(cents).max(axis=1).astype(np.float64)  # per word
    for i0, i1 in zip(seg_cut[:-1], seg_cut[1:]):
        r0 = starts[i0]
        r1 = starts[i1] if i1 < len(starts) else len(key_s)
        idx = order[r0:r1]
        er = ent_rows[idx]
        indptr = np.r_[starts[i0:i1] - r0, r1 - r0]
        w = np.ones(r1 - r0, dtype=np.float32) if ent_w is None else ent_w[idx]
        pw = ent_words[idx[indptr[:-1]]]  # word of each pair
        V = np.asarray(sp.csr_matrix((w, er, indptr), shape=(i1 - i0, len(des))) @ des)  # sum of w x, float32
        mass = np.add.reduceat(w, indptr[:-1], dtype=np.float64)
        amass = mass if ent_w is None else np.add.reduceat(np.abs(w), indptr[:-1], dtype=np.float64)
        C = cents[pw]
        C *= mass.astype(np.float32)[:, None]
        V -= C
        # rounding bounds per pair: our float32 sum of w x, the product and the subtraction, and the package's
        # float32 sum of (x - c) (|x| <= xmax over the block's rows, |c| <= cmax of the word), with margin 2
        lo, hi = int(er.min()), int(er.max()) + 1
        X = des[lo:hi] if hi - lo <= 4 * len(er) + 4096 else des[np.unique(er)]  # in cache after the product
        xmax = max(float(X.max()), -float(X.min()))
        cw = cmax[pw]
        bound = 2.0 * (_gamma(np.diff(indptr) + 3) * amass * (2.0 * xmax + cw))
        fragile = np.flatnonzero(np.abs(V).min(axis=1) <= bound)
        if len(fragile):
            fs, fe = indptr[fragile], indptr[fragile + 1]
            fl = fe - fs
            pos = np.repeat(fs - np.cumsum(fl) + fl, fl) + np.arange(int(fl.sum()))  # entries of those pairs
            R = des[er[pos]] - cents[ent_words[idx[pos]]]
            if ent_w is not None:
                R *= w[pos][:, None]
            V[fragile] = segment_sum(R, np.r_[0, np.cumsum(fl)[:-1]])
        yield key_s[starts[i0:i1]], V


def residual_sums(des: np.ndarray, words: np.ndarray, centroids: np.ndarray, groups: np.ndarray,
                  rows: np.ndarray | None = None, weights: np.ndarray | None = None, chunk: int = 1 << 13
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``V`` = sum of residuals ``x - c_w`` per (group, word) pair: the unnormalised VLAD block of each word.

    ``des`` (n, D); ``words`` (n, m) assignments (``m > 1``: multiple assignment, a descriptor adds its
    residual to each of its ``m`` words); ``groups`` gives the item of each entry. Without ``rows`` entry
    ``i`` is descriptor ``i``; with ``rows`` (T,) entry ``i`` is descriptor ``rows[i]`` and ``groups`` is (T,)
    (how regions reuse an image's descriptors without copying them). ``weights`` (per entry) scale the
    residuals. Returns ``(groups, words, V)`` of the non-empty pairs sorted by (group, word).
    """
    K = len(centroids)
    blocks = list(_residual_chunks(des, words, centroids, groups, rows, weights, chunk))
    if not blocks:
        e = np.empty(0, dtype=np.int64)
        return e, e, np.empty((0, np.asarray(des).shape[1]), dtype=np.float32)
    keys = np.concatenate([k for k, _ in blocks])
    V = np.concatenate([v for _, v in blocks])
    return keys // K, keys % K, V


def _aggregate_phi(des, words, centroids, groups, rows, kernel, chunk=1 << 13):
    """Residual sums turned into ``Phi`` block by block (so ASMK* never holds all float residuals)."""
    K = len(centroids)
    keys, vecs, selfs = [], [], []
    for k, V in _residual_chunks(des, words, centroids, groups, rows, None, chunk):
        v, s = _phi(V, kernel)
        keys.append(k)
        vecs.append(v)
        selfs.append(s)
    D = np.asarray(des).shape[1]
    if not keys:
        e = np.empty(0, dtype=np.int64)
        width = (D + 7) // 8 if kernel == "asmk_star" else D
        return e, e, np.empty((0, width), np.uint8 if kernel == "asmk_star" else np.float32), np.empty(0)
    keys = np.concatenate(keys)
    return keys // K, keys % K, np.concatenate(vecs), np.concatenate(selfs)


def _phi(V: np.ndarray, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-word representation and its self-similarity ``sigma(Phi . Phi)`` for ``kernel``."""
    if kernel == "vlad":
        return V, np.einsum("ij,ij->i", V, V, dtype=np.float64)
    if kernel == "asmk_star":  # the signs need no normalisation; every non-empty word counts 1 in gamma
        return binarize(V), np.ones(len(V))
    if kernel == "asmk":
        norms = np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64))
        return (V / np.maximum(norms, EPS)[:, None]).astype(np.float32), (norms > 0).astype(np.float64)
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


def _compact_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and the index of each element in them."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if len(ids) and np.all(ids[1:] >= ids[:-1]):  # already sorted (the usual layout): no sort needed
        new = np.r_[True, ids[1:] != ids[:-1]]
        return ids[new], np.cumsum(new) - 1
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, inv.ravel()


def aggregate_images(des: np.ndarray, words: np.ndarray, image_ids: np.ndarray, centroids: np.ndarray,
                     kernel: str = "asmk_star") -> Aggregated:
    """Per-image VLAD / ASMK / ASMK* aggregation (items = sorted unique ``image_ids``)."""
    images, item = _compact_ids(image_ids)
    it, w, vecs, self_sim = _aggregate_phi(des, words, centroids, item, None, kernel)
    return Aggregated(it, w, vecs, self_sim, images, np.asarray(des).shape[1], kernel == "asmk_star",
                      scale_items=True, unit=kernel != "vlad")


def region_membership(xy: np.ndarray, desc_image: np.ndarray, boxes: np.ndarray, box_image: np.ndarray,
                      chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Which descriptors fall in which box: pairs ``(box index, descriptor index)``.

    A descriptor at pixel ``(x, y)`` of image ``i`` is in box ``[x0, y0, x1, y1]`` of image ``i`` when
    ``x0 <= x < x1`` and ``y0 <= y < y1``. Vectorised: descriptors are grouped by image and each box is
    tested against its image's descriptors only (chunks of about ``chunk`` tests). Pairs come sorted by box.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    bim = np.asarray(box_image, dtype=np.int64)
    dim_ = np.asarray(desc_image, dtype=np.int64)
    d_order = np.argsort(dim_, kind="stable")
    d_sorted = dim_[d_order]
    lo = np.searchsorted(d_sorted, bim, side="left")
    cnt = np.searchsorted(d_sorted, bim, side="right") - lo
    out_b, out_d = [], []
    cum = np.cumsum(cnt)
    cuts = np.unique(np.r_[0, np.searchsorted(cum, np.arange(chunk, cum[-1] if len(cum) else 0, chunk)),
                           len(b)])
    for b0, b1 in zip(cuts[:-1], cuts[1:]):
        c = cnt[b0:b1]
        tot = int(c.sum())
        if tot == 0:
            continue
        rep = np.repeat(np.arange(b0, b1), c)
        offs = np.arange(tot) - np.repeat(np.cumsum(c) - c, c)
        d = d_order[lo[rep] + offs]
        x, y = xy[d, 0], xy[d, 1]
        bb = b[rep]
        inside = (x >= bb[:, 0]) & (x < bb[:, 2]) & (y >= bb[:, 1]) & (y < bb[:, 3])
        out_b.append(rep[inside])
        out_d.append(d[inside])
    if not out_b:
        e = np.empty(0, dtype=np.int64)
        return e, e
    return np.concatenate(out_b), np.concatenate(out_d)


def _regions(xy: np.ndarray, image_ids: np.ndarray, boxes: np.ndarray | None, box_image: np.ndarray | None,
             include_full: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Regions of every image (whole image first when ``include_full``, then its boxes in input order).

    Returns ``images`` (sorted unique ids), ``region_image_idx`` (R,) index into ``images``, and the
    membership pairs ``(region index, descriptor index)``.
    """
    images, d_img = _compact_ids(image_ids)
    if boxes is None or len(np.asarray(boxes).reshape(-1, 4)) == 0:
        b = np.empty((0, 4))
        bimg = np.empty(0, dtype=np.int64)
    else:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        bi = np.asarray(box_image, dtype=np.int64).ravel()
        pos = np.searchsorted(images, bi)
        ok = np.zeros(len(bi), dtype=bool)
        if len(images):
            ok = (pos < len(images)) & (images[np.minimum(pos, len(images) - 1)] == bi)
        b, bimg = b[ok], pos[ok]  # boxes of images without descriptors have nothing to aggregate
    if include_full:
        inf = np.inf
        full = np.tile([-inf, -inf, inf, inf], (len(images), 1))
        b = np.concatenate([full, b])
        bimg = np.concatenate([np.arange(len(images)), bimg])
        rank = np.r_[np.zeros(len(images)), np.ones(len(bimg) - len(images))]
    else:
        rank = np.zeros(len(bimg))
    order = np.lexsort((np.arange(len(bimg)), rank, bimg))  # by image, whole image first, then input order
    b, bimg = b[order], bimg[order]
    reg, d = region_membership(xy, d_img, b, bimg)
    return images, bimg, reg, d


def aggregate_regions(des: np.ndarray, words: np.ndarray, image_ids: np.ndarray, xy: np.ndarray,
                      boxes: np.ndarray | None, box_image: np.ndarray | None, centroids: np.ndarray,
                      kernel: str = "asmk_star", include_full: bool = True) -> Aggregated:
    """D2R regional search items: each region (whole image + boxes) aggregated on its own descriptors.

    Items are ordered by image id, the whole image first, then that image's boxes in input order; an empty
    region is an item without postings (it counts in ``R_n`` for average pooling, eq. 4).
    """
    images, reg_img, reg, d = _regions(xy, image_ids, boxes, box_image, include_full)
    it, w, vecs, self_sim = _aggregate_phi(des, words, centroids, reg, d, kernel)
    return Aggregated(it, w, vecs, self_sim, images[reg_img], np.asarray(des).shape[1], kernel == "asmk_star",
                      scale_items=True, unit=kernel != "vlad")


def aggregate_regional(des: np.ndarray, words: np.ndarray, image_ids: np.ndarray, xy: np.ndarray,
                       boxes: np.ndarray | None, box_image: np.ndarray | None, centroids: np.ndarray,
                       method: str = "rasmk", binary: bool = False, include_full: bool = True,
                       chunk: int = 1 << 13) -> Aggregated:
    """Regionally aggregated image representations (one vector per (image, word), seed 002 §4.3).

    ``method``: ``'rvlad'`` (eq. 8, ``V_R``), ``'naive_rasmk'`` (eq. 8 with ``V_hat`` and the regions' ASMK
    ``gamma``), ``'rasmk'`` (eq. 9, ``V_R / ||V_R||``; ``binary=True`` gives R-ASMK*). Items are images.

    For R-VLAD / R-ASMK eq. 8 is linear in the residuals, so ``V_R(Y_c) = sum_{x in Y_c} w_x (x - c)`` with
    per-descriptor weight ``w_x = (1/R_n) sum_{r : x in r} gamma_VLAD(Y^(n,r))``: one pass computes each
    region's ``gamma_VLAD`` (block-wise, keeping only norms), a second aggregates the weighted residuals per
    image -- no per-region vectors are stored. Naive-R-ASMK normalises per (region, word) before pooling, so
    its region blocks are pooled into the image rows block by block.
    """
    if method not in ("rvlad", "naive_rasmk", "rasmk"):
        raise ValueError(f"unknown regional method {method!r}")
    if binary and method != "rasmk":
        raise ValueError("only R-ASMK has a binarised variant (R-ASMK*)")
    images, reg_img, reg, d = _regions(xy, image_ids, boxes, box_image, include_full)
    K, D = len(centroids), np.asarray(des).shape[1]
    n_reg = len(reg_img)
    r_n = np.bincount(reg_img, minlength=len(images)).astype(np.float64)  # R_n, empty regions included
    if method == "naive_rasmk":
        words2 = np.asarray(words, dtype=np.int64).reshape(len(des), -1)
        rk = np.unique(np.repeat(reg, words2.shape[1]) * K + words2[d].ravel())
        g = 1.0 / np.sqrt(np.maximum(np.bincount(rk // K, minlength=n_reg), 1))  # ASMK gamma of each region
        out_keys = np.unique(reg_img[rk // K] * K + rk % K)
        VR = np.zeros((len(out_keys), D), dtype=np.float64)
        for k, V in _residual_chunks(des, words, centroids, reg, d, None, chunk):
            r = k // K
            vh, _ = _phi(V, "asmk")
            contrib = vh.astype(np.float64) * (g[r] / r_n[reg_img[r]])[:, None]
            ok = reg_img[r] * K + k % K
            o = np.argsort(ok, kind="stable")
            oks = ok[o]
            st = np.flatnonzero(np.r_[True, oks[1:] != oks[:-1]])
            VR[np.searchsorted(out_keys, oks[st])] += segment_sum(contrib[o], st)
        VR = VR.astype(np.float32)
        return Aggregated(out_keys // K, out_keys % K, VR, np.einsum("ij,ij->i", VR, VR, dtype=np.float64),
                          images, D, False, scale_items=False, unit=False)
    norm2 = np.zeros(n_reg)
    for k, V in _residual_chunks(des, words, centroids, reg, d, None, chunk):
        norm2 += np.bincount(k // K, weights=np.einsum("ij,ij->i", V, V, dtype=np.float64), minlength=n_reg)
    g = np.where(norm2 > 0, 1.0 / np.sqrt(np.maximum(norm2, EPS)), 0.0)  # gamma_VLAD of each region
    w_desc = np.bincount(d, weights=g[reg] / r_n[reg_img[reg]], minlength=len(des))
    _, d_img = _compact_ids(image_ids)
    items, words_out, VR = residual_sums(des, words, centroids, d_img, weights=w_desc, chunk=chunk)
    if method == "rvlad":
        return Aggregated(items, words_out, VR, np.einsum("ij,ij->i", VR, VR, dtype=np.float64), images, D,
                          False, scale_items=False, unit=False)
    norms = np.linalg.norm(VR, axis=1)
    keep = norms > 0
    items, words_out, VR, norms = items[keep], words_out[keep], VR[keep], norms[keep]
    Vh = (VR / norms[:, None]).astype(np.float32)
    return Aggregated(items, words_out, binarize(Vh) if binary else Vh, np.ones(len(items)), images, D, binary,
                      scale_items=True, unit=True)


# ----------------------------------------------------------------------------------------------- inverted file

_META_KEYS = ("dim", "binary", "alpha", "tau", "linear", "scale_items", "unit", "use_idf", "kernel", "regional")


@dataclass
class InvertedFile:
    """Inverted file over ``K`` visual words in CSR form (see module docstring for the arrays).

    ``linear``: kernel with ``sigma(u) = u`` (VLAD, R-VLAD) instead of the ASMK selectivity; ``kernel`` /
    ``regional`` record how the database side was aggregated, so queries can be aggregated to match
    (:meth:`query_kernel`).
    """

    word_ptr: np.ndarray
    item_ids: np.ndarray
    vecs: np.ndarray
    item_self: np.ndarray
    item_image: np.ndarray
    dim: int
    binary: bool
    alpha: float = 3.0
    tau: float = 0.0
    linear: bool = False
    scale_items: bool = True
    unit: bool = True
    use_idf: bool = False
    kernel: str = "asmk_star"
    regional: str = "none"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, agg: Aggregated, n_words: int, *, alpha: float = 3.0, tau: float = 0.0,
              linear: bool = False, use_idf: bool = False, dtype: str | np.dtype = "float16",
              kernel: str = "asmk_star", regional: str = "none") -> "InvertedFile":
        """Inverted file from aggregated pairs: a stable sort by word, then ``word_ptr`` from a bincount."""
        words = np.asarray(agg.words, dtype=np.int64)
        if len(words) and (words.min() < 0 or words.max() >= n_words):
            raise ValueError("word id out of range")
        order = np.argsort(words, kind="stable")
        ptr = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(np.bincount(words, minlength=n_words), out=ptr[1:])
        n_items = agg.n_items
        id_dtype = np.int32 if n_items < 2**31 else np.int64
        vecs = agg.vecs[order]
        vecs = vecs.astype(np.uint8) if agg.binary else vecs.astype(dtype)
        item_self = np.bincount(agg.items, weights=agg.self_sim, minlength=n_items)
        return cls(ptr, agg.items[order].astype(id_dtype), np.ascontiguousarray(vecs), item_self,
                   np.asarray(agg.item_image, dtype=np.int64), int(agg.dim), bool(agg.binary), float(alpha),
                   float(tau), bool(linear), bool(agg.scale_items), bool(agg.unit), bool(use_idf), kernel,
                   regional)

    @property
    def n_words(self) -> int:
        return len(self.word_ptr) - 1

    @property
    def n_items(self) -> int:
        return len(self.item_image)

    @property
    def nnz(self) -> int:
        return int(self.word_ptr[-1])

    def nbytes(self) -> int:
        """Bytes of the arrays that make up the index (what is stored / memory-mapped)."""
        return int(sum(a.nbytes for a in (self.word_ptr, self.item_ids, self.vecs, self.item_self,
                                          self.item_image)))

    def query_kernel(self) -> str:
        """Kernel to aggregate queries with (regional aggregation is database-side only)."""
        if self.regional == "rvlad":
            return "vlad"
        if self.regional == "naive_rasmk":
            return "asmk"
        return self.kernel

    # -- persistence ----------------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (no objects): save each as ``.npy`` (or all in one ``.npz``)."""
        out = {"word_ptr": self.word_ptr, "item_ids": self.item_ids, "vecs": self.vecs,
               "item_self": self.item_self, "item_image": self.item_image}
        for k in _META_KEYS:
            out[k] = np.asarray(getattr(self, k))
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "InvertedFile":
        """Inverse of :meth:`to_arrays`; arrays may be memory-mapped (they are not copied)."""
        meta = {k: arrays[k][()] for k in _META_KEYS}
        conv = {"dim": int, "binary": bool, "alpha": float, "tau": float, "linear": bool, "scale_items": bool,
                "unit": bool, "use_idf": bool, "kernel": str, "regional": str}
        meta = {k: conv[k](v) for k, v in meta.items()}
        return cls(arrays["word_ptr"], arrays["item_ids"], arrays["vecs"], arrays["item_self"],
                   arrays["item_image"], **meta)

    # -- derived per-word / per-item quantities ---------------------------------------------------------------
    def idf(self) -> np.ndarray:
        """(K,) word weights: ``log(N_items / df_c)^2`` (0 for empty words) with idf, else ones."""
        if "idf" not in self._cache:
            df = np.diff(self.word_ptr).astype(np.float64)
            if self.use_idf:
                idf = np.where(df > 0, np.log(self.n_items / np.maximum(df, 1.0)) ** 2, 0.0)
            else:
                idf = np.ones(self.n_words)
            self._cache["idf"] = idf
        return self._cache["idf"]

    def item_scale(self) -> np.ndarray:
        """(n_items,) ``gamma`` of each item (1 where the kernel has none; 0 for items without postings)."""
        if "scale" not in self._cache:
            if not self.scale_items:
                scale = np.ones(self.n_items)
            else:
                norm = np.asarray(self.item_self, dtype=np.float64)
                if self.use_idf:
                    wid = np.repeat(self.idf(), np.diff(self.word_ptr))
                    if self.unit:
                        s = np.ones(self.nnz)
                    else:
                        v = np.asarray(self.vecs, dtype=np.float32)
                        s = self._sigma(np.einsum("ij,ij->i", v, v, dtype=np.float64))
                    norm = np.bincount(self.item_ids, weights=wid * s, minlength=self.n_items)
                scale = np.where(norm > 0, 1.0 / np.sqrt(np.maximum(norm, EPS)), 0.0)
            self._cache["scale"] = scale
        return self._cache["scale"]

    def images(self) -> np.ndarray:
        """Sorted unique image ids of the index (columns of :meth:`image_scores`)."""
        return self._pooling()[0]

    def _pooling(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if "pool" not in self._cache:
            order = np.argsort(self.item_image, kind="stable")
            ids = self.item_image[order]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.empty(0, np.int64)
            counts = np.diff(np.r_[starts, len(ids)])
            self._cache["pool"] = (ids[starts], order, starts, counts)
        return self._cache["pool"]

    def _sigma(self, u: np.ndarray) -> np.ndarray:
        return np.asarray(u, dtype=np.float64) if self.linear else selectivity(u, self.alpha, self.tau)

    # -- search ---------------------------------------------------------------------------------------------
    def query_scale(self, query: Aggregated) -> np.ndarray:
        """(n_queries,) ``gamma(X)`` of each query item, with the index's idf (``self_sim`` is already
        ``sigma(Phi . Phi)``)."""
        idf = self.idf()
        s = np.asarray(query.self_sim, dtype=np.float64)
        norm = np.bincount(query.items, weights=idf[query.words] * s, minlength=query.n_items)
        return np.where(norm > 0, 1.0 / np.sqrt(np.maximum(norm, EPS)), 0.0)

    def _binary_table(self, idf_w: float = 1.0) -> np.ndarray:
        """``idf_w * sigma((D - 2h) / D)`` for every Hamming distance ``h = 0..D`` (ASMK* lookup table; the
        ``idf_w = 1`` table is computed once per index)."""
        if "binary_table" not in self._cache:
            u = (self.dim - 2.0 * np.arange(self.dim + 1)) / self.dim
            self._cache["binary_table"] = self._sigma(u)
        table = self._cache["binary_table"]
        return table if idf_w == 1.0 else idf_w * table

    def _sigma_block(self, u: np.ndarray) -> np.ndarray:
        """Selectivity on a float32 block with few passes (fast path for ``tau >= 0``, integer ``alpha``)."""
        if self.linear:
            return u
        if self.tau >= 0:
            v = np.where(u > self.tau, u, np.float32(0))
            if self.alpha == 3.0:
                return v * v * v
            return v if self.alpha == 1.0 else v ** np.float32(self.alpha)
        return self._sigma(u)

    def item_scores(self, query: Aggregated, budget: int = 1 << 21) -> np.ndarray:
        """Dense (n_queries, n_items) kernel values ``K(X, item)`` for every query item of ``query``.

        Word-major: the query pairs of a chunk of queries are grouped by word; for each word its postings
        slice is scored against all chunk queries having that word at once -- one matmul (ASMK / VLAD) or
        one FAISS Hamming cross-distance plus a lookup table of the selective kernel (ASMK*) -- and the values
        are added into the chunk's score matrix (each (query, item) pair occurs once per word, so the
        scatter is exact). Item ``gamma``, query ``gamma`` and idf are applied outside the pair loop.
        ``budget`` (elements) bounds the chunk's dense score matrix so that it stays cache-friendly.
        """
        if query.binary != self.binary or query.dim != self.dim:
            raise ValueError("query aggregation does not match the index (binary / dim)")
        nq, ni = query.n_items, self.n_items
        out = np.zeros((nq, ni), dtype=np.float64)
        if nq == 0 or ni == 0:
            return out
        idf = self.idf()
        step = max(1, budget // max(ni, 1))
        q_items = np.asarray(query.items, dtype=np.int64)
        q_words = np.asarray(query.words, dtype=np.int64)
        bounds = np.searchsorted(q_items, np.arange(0, nq + step, step))  # query pairs sorted by item
        ptr, ids, vecs = self.word_ptr, self.item_ids, self.vecs
        hammings = _faiss_hammings() if self.binary else None
        for c, (p0, p1) in enumerate(zip(bounds[:-1], bounds[1:])):
            if p0 == p1:
                continue
            q0 = c * step
            flat = out[q0:q0 + step].reshape(-1)
            w = q_words[p0:p1]
            order = np.argsort(w, kind="stable")
            ws = w[order]
            qoff = (q_items[p0:p1][order] - q0) * ni
            qv = np.ascontiguousarray(query.vecs[p0:p1][order])
            if not self.binary:
                qv = qv.astype(np.float32, copy=False)
            cuts = np.flatnonzero(np.r_[True, ws[1:] != ws[:-1], True])
            cw = ws[cuts[:-1]]  # the chunk's words; loop bounds as Python ints (no per-word numpy scalars)
            wa, wb, widf = ptr[cw], ptr[cw + 1], idf[cw]
            live = np.flatnonzero((wb > wa) & (widf != 0))
            for s, e, a, b, iw in zip(cuts[:-1][live].tolist(), cuts[1:][live].tolist(), wa[live].tolist(),
                                      wb[live].tolist(), widf[live].tolist()):
                P = vecs[a:b]
                if self.binary:
                    if hammings is not None:
                        h = np.empty((b - a, e - s), dtype=np.int32)
                        hammings(np.ascontiguousarray(P), qv[s:e], h)
                    else:
                        h = np.bitwise_count(P[:, None, :] ^ qv[None, s:e, :]).sum(axis=-1, dtype=np.int32)
                    val = self._binary_table(iw).take(h)
                else:
                    val = self._sigma_block(np.asarray(P, dtype=np.float32) @ qv[s:e].T)
                    if iw != 1.0:
                        val = val * iw
                # item ids (int32 or int64) + int64 row offsets: int64 flat indices
                np.add.at(flat, (ids[a:b][:, None] + qoff[None, s:e]).ravel(), val.ravel())
        out *= self.item_scale()[None, :]
        out *= self.query_scale(query)[:, None]
        return out

    def image_scores(self, query: Aggregated, pooling: str = "max", budget: int = 1 << 21) -> np.ndarray:
        """(n_queries, n_images) image similarities; items of one image pooled by ``'max'`` (eq. 3),
        ``'avg'`` (eq. 4) or ``'sum'``. Columns follow :meth:`images`."""
        S = self.item_scores(query, budget)
        ids, order, starts, counts = self._pooling()
        if len(ids) == self.n_items and np.array_equal(order, np.arange(self.n_items)):
            return S  # one item per image, already in image order
        S = S[:, order]
        if pooling == "max":
            return np.maximum.reduceat(S, starts, axis=1)
        total = np.add.reduceat(S, starts, axis=1)
        if pooling == "sum":
            return total
        if pooling == "avg":
            return total / counts[None, :]
        raise ValueError(f"unknown pooling {pooling!r}")

    def search(self, query: Aggregated, topk: int | None = 100, pooling: str = "max",
               max_scores: int = 1 << 25) -> tuple[np.ndarray, np.ndarray]:
        """Top-``topk`` image ids and scores per query item (``topk=None``: full ranking), best first.

        Queries are scored in groups so that a group's dense score matrix holds at most ``max_scores``
        values; ties are broken by image order (deterministic, equal to a stable full sort cut at ``k``).
        """
        images = self.images()
        k = len(images) if topk is None else min(int(topk), len(images))
        ids = np.empty((query.n_items, k), dtype=np.int64)
        vals = np.empty((query.n_items, k), dtype=np.float64)
        step = max(1, max_scores // max(self.n_items, 1))
        for q0 in range(0, query.n_items, step):
            S = self.image_scores(_slice_queries(query, q0, q0 + step), pooling)
            if k < S.shape[1]:
                kth = -np.partition(-S, k - 1, axis=1)[:, k - 1]
                idx = np.empty((len(S), k), dtype=np.int64)
                for r in range(len(S)):
                    cand = np.flatnonzero(S[r] >= kth[r])  # ties at the k-th value included
                    idx[r] = cand[np.argsort(-S[r, cand], kind="stable")[:k]]
            else:
                idx = np.argsort(-S, axis=1, kind="stable")
            ids[q0:q0 + len(S)] = images[idx]
            vals[q0:q0 + len(S)] = np.take_along_axis(S, idx, axis=1)
        return ids, vals


def _slice_queries(query: Aggregated, q0: int, q1: int) -> Aggregated:
    """Query items ``q0 <= item < q1`` of ``query`` (items are sorted), renumbered from 0."""
    a, b = np.searchsorted(query.items, [q0, q1])
    return Aggregated(query.items[a:b] - q0, query.words[a:b], query.vecs[a:b], query.self_sim[a:b],
                      query.item_image[q0:q1], query.dim, query.binary, query.scale_items, query.unit)


def merge_inverted_files(parts: Sequence[InvertedFile]) -> InvertedFile:
    """Concatenate shard indexes: items of later shards follow earlier ones; per word, postings keep shard
    order. Equal to building once from the concatenated aggregates. Vectorised scatter to destinations."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for p in parts[1:]:
        for k in ("dim", "binary", "alpha", "tau", "linear", "scale_items", "unit", "use_idf", "kernel",
                  "regional"):
            if getattr(p, k) != getattr(first, k):
                raise ValueError(f"cannot merge indexes with different {k}")
        if p.n_words != first.n_words or p.vecs.shape[1:] != first.vecs.shape[1:]:
            raise ValueError("cannot merge indexes with different codebook size or vector width")
    K = first.n_words
    counts = np.stack([np.diff(p.word_ptr) for p in parts])  # (S, K)
    ptr = np.zeros(K + 1, dtype=np.int64)
    np.cumsum(counts.sum(axis=0), out=ptr[1:])
    before = np.cumsum(counts, axis=0) - counts  # postings of earlier shards per word
    n_items = sum(p.n_items for p in parts)
    id_dtype = np.int32 if n_items < 2**31 else np.int64
    item_ids = np.empty(ptr[-1], dtype=id_dtype)
    vecs = np.empty((ptr[-1],) + first.vecs.shape[1:], dtype=np.result_type(*[p.vecs.dtype for p in parts]))
    offset = 0
    for s, p in enumerate(parts):
        w = np.repeat(np.arange(K), counts[s])
        dest = ptr[w] + before[s, w] + (np.arange(p.nnz) - p.word_ptr[w])
        item_ids[dest] = np.asarray(p.item_ids, dtype=np.int64) + offset
        vecs[dest] = p.vecs
        offset += p.n_items
    return InvertedFile(ptr, item_ids, vecs, np.concatenate([p.item_self for p in parts]),
                        np.concatenate([p.item_image for p in parts]), first.dim, first.binary, first.alpha,
                        first.tau, first.linear, first.scale_items, first.unit, first.use_idf, first.kernel,
                        first.regional)


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


@dataclass(frozen=True)
class AsmkIndexConfig:
    """The ``asmk`` stage: codebook, which kernels get an inverted file, regions of the regional kernels."""

    codebook_size: int = 1024
    codebook_sample: int = 200_000
    kernels: tuple[str, ...] = ("asmk_star", "r_asmk_star")
    region_source: str = "fs_egm"
    multiple_assignment: int = 1        # database side: nearest words each local descriptor is added to
    query_multiple_assignment: int = 5  # query side (the asmk package's and the ASMK paper's default)

    def __post_init__(self) -> None:
        bad = [k for k in self.kernels if k not in KERNEL_CONFIGS]
        if bad:
            raise ValueError(f"kernels: unknown {bad}; known: {sorted(KERNEL_CONFIGS)}")
        if self.codebook_size < 2 or self.multiple_assignment < 1 or self.query_multiple_assignment < 1:
            raise ValueError("codebook_size >= 2 and multiple assignments >= 1")
