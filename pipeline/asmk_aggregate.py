"""ASMK kernels and aggregation (seed 002 §4): selectivity, binarisation, residual sums per (item, visual word),
image-level items, D2R regional items and R-VLAD / R-ASMK regional aggregation. See :mod:`pipeline.asmk` for the
notation; :mod:`pipeline.inverted_file` stores and scores what is aggregated here."""
from __future__ import annotations

from dataclasses import dataclass

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


