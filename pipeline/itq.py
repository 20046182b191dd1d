"""Iterative Quantization (ITQ) binary codes for regional descriptors, and a Hamming prefilter + exact re-rank
(seed 000 §4.2 "Scalability"; ALGORITHMS.md §9).

ITQ (Gong & Lazebnik, "Iterative quantization: a Procrustean approach to learning binary codes", CVPR 2011):
centre the data, project onto its ``c`` leading principal axes (``V = (X - mean) W``), then alternate

* ``B = sign(V R)`` (fix ``R``, the best binary codes), and
* ``R = U S^T`` from the SVD ``V^T B = U Sigma S^T`` (fix ``B``, the orthogonal Procrustes solution),

which monotonically lowers the quantisation loss ``||B - V R||_F^2``; ``R`` starts as a random orthogonal
matrix, 50 iterations as in the paper. A descriptor's code is the sign pattern of ``(x - mean) W R``, packed 8
bits per byte (``np.packbits``; FAISS binary indexes compare packed bytes, so the Hamming distance is the
popcount of the XOR whatever the bit order inside a byte).

Seed 000 hashes patch features to 256 bits, keeps the 1000 patches of least Hamming distance and matches
the real features only for those. :func:`prefilter_rerank` does that on a FAISS binary index
(``IndexBinaryFlat`` = exhaustive Hamming scan, or ``IndexBinaryIVF`` for large collections).

Dimension: PCA gives at most ``D`` axes, so ``bits <= D`` is required. With ``D < bits`` (e.g. 128-d
descriptors and 256 bits) :func:`learn_itq` raises instead of padding: extra bits would have to come from
directions the data does not have (duplicated or random bits), which add code length without information;
ask for ``bits <= D`` (a multiple of 8) instead. The regional descriptors of this project are 256-512-d.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

_CHUNK = 65536


@dataclass(frozen=True)
class ITQConfig:
    """ITQ settings. 256 bits as in seed 000 §4.2; 50 iterations as in Gong & Lazebnik (they report convergence
    well before); ``max_train`` rows are sampled to learn it (the rotation is a bits x bits problem: 100k rows pin
    it down, and 50 iterations on them take under a minute on one core).

    ``prefilter = 2000``, not the paper's 1000: on 1M synthetic clustered 256-d regions
    (``experiments/bench_itq.py``) a 1000-candidate Hamming prefilter keeps recall@100 = 0.92 of the exact
    regional search, 2000 keeps 0.965-0.969 (IVF: x6.2 faster than exact search for 500 queries, x141 for one query
    image) and 4000 0.99 (128 bits: 0.74 / 0.86 / 0.94). The paper searched 3M patches but reports no recall; 2000
    is the smallest depth we measured that keeps >= 0.95 at 1M. The depth needed
    grows with the collection, so re-check it with the bench at other scales.
    """

    bits: int = 256
    iterations: int = 50
    max_train: int = 100_000
    prefilter: int = 2000
    seed: int = 0


def default_nlist(n: int) -> int:
    """Binary IVF lists for ``n`` codes: 0 (flat, exhaustive Hamming scan) below 100k codes, where a scan of
    3 MB of codes is already fast, else ``sqrt(n)`` rounded to a power of two (1024 at 1M)."""
    return 0 if n < 100_000 else 2 ** int(round(np.log2(np.sqrt(n))))


@dataclass(eq=False)
class ITQ:
    """A learned ITQ hash: ``mean`` (D,), PCA ``projection`` (D, bits), orthogonal ``rotation`` (bits, bits)."""

    mean: np.ndarray
    projection: np.ndarray
    rotation: np.ndarray
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))  # quantisation loss per iteration (mean per row)

    def __post_init__(self) -> None:
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float32).ravel()
        self.projection = np.ascontiguousarray(self.projection, dtype=np.float32)
        self.rotation = np.ascontiguousarray(self.rotation, dtype=np.float32)
        D, c = self.projection.shape
        if self.mean.shape != (D,) or self.rotation.shape != (c, c):
            raise ValueError("ITQ arrays do not agree: mean (D,), projection (D, bits), rotation (bits, bits)")
        if c % 8:
            raise ValueError("bits must be a multiple of 8 (codes are packed bytes)")
        self._W = self.projection @ self.rotation  # (D, bits): one product per encode

    @property
    def bits(self) -> int:
        return int(self.rotation.shape[0])

    @property
    def code_bytes(self) -> int:
        return self.bits // 8

    def project(self, X: np.ndarray) -> np.ndarray:
        """Real-valued rotated PCA coordinates ``(X - mean) W R`` (N, bits) float32: the codes are their signs."""
        return (np.asarray(X, dtype=np.float32) - self.mean) @ self._W

    def encode(self, X: np.ndarray) -> np.ndarray:
        """Packed codes (N, bits/8) uint8 of rows of ``X`` (N, D); bit = 1 where the coordinate is >= 0.

        Works in row chunks, so ``X`` may be a memory-mapped array larger than RAM.
        """
        if X.ndim == 1:
            X = X[None, :]
        out = np.empty((X.shape[0], self.code_bytes), np.uint8)
        for s in range(0, X.shape[0], _CHUNK):
            out[s:s + _CHUNK] = np.packbits(self.project(X[s:s + _CHUNK]) >= 0, axis=1)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickle): ``mean``, ``projection``, ``rotation``, ``loss``."""
        return {"mean": self.mean, "projection": self.projection, "rotation": self.rotation,
                "loss": np.asarray(self.loss, np.float64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "ITQ":
        """Inverse of :meth:`to_arrays`."""
        return cls(mean=arrays["mean"], projection=arrays["projection"], rotation=arrays["rotation"],
                   loss=np.asarray(arrays.get("loss", np.zeros(0))))


def _pca(X: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the ``c`` leading eigenvectors (D, c) of the covariance of ``X``, float64 accumulation by chunks."""
    n, D = X.shape
    s = np.zeros(D)
    ss = np.zeros((D, D))
    for i in range(0, n, _CHUNK):
        b = np.asarray(X[i:i + _CHUNK], dtype=np.float64)
        s += b.sum(0)
        ss += b.T @ b
    mean = s / n
    C = ss / n - np.outer(mean, mean)
    lam, U = np.linalg.eigh((C + C.T) / 2)
    return mean, U[:, np.argsort(lam)[::-1][:c]]


def learn_itq(X: np.ndarray, bits: int = 256, iterations: int = 50, seed: int = 0,
              max_train: int | None = ITQConfig.max_train) -> ITQ:
    """Learn ITQ on rows of ``X`` (N, D) (a random subset of ``max_train`` rows when N is larger; None = all).

    Requires ``bits <= D``, ``bits <= N`` and ``bits % 8 == 0`` (see the module docstring for why ``D < bits``
    is refused). The returned ``loss`` holds ``||B - V R||_F^2 / N`` after each iteration's code update; it is
    non-increasing (each half-step minimises the loss over one block of variables).
    """
    N, D = X.shape
    if bits % 8 or bits <= 0:
        raise ValueError("bits must be a positive multiple of 8")
    if bits > D:
        raise ValueError(f"ITQ to {bits} bits needs descriptors of dimension >= {bits} (got {D}); PCA gives at "
                         f"most {D} axes -- use bits <= {D - D % 8}")
    rng = np.random.default_rng(seed)
    if max_train is not None and N > max_train:
        X = X[np.sort(rng.choice(N, max_train, replace=False))]
        N = X.shape[0]
    if N < bits:
        raise ValueError(f"ITQ to {bits} bits needs at least {bits} training rows (got {N})")
    mean, W = _pca(X, bits)
    V = ((np.asarray(X, dtype=np.float64) - mean) @ W).astype(np.float32)  # (N, bits)
    R, _ = np.linalg.qr(rng.standard_normal((bits, bits)))  # random orthogonal start
    losses = []
    v_sq = float(np.einsum("ij,ij->", V, V, dtype=np.float64))
    for _ in range(iterations):
        Z = V @ R.astype(np.float32)
        B = np.where(Z >= 0, np.float32(1.0), np.float32(-1.0))
        # ||B - Z||^2 = ||B||^2 + ||Z||^2 - 2 <B, Z> = N bits + ||V||^2 - 2 sum |Z|   (R orthogonal, B = sign Z)
        losses.append((N * bits + v_sq - 2.0 * float(np.abs(Z).sum(dtype=np.float64))) / N)
        M = (V.T @ B).astype(np.float64)  # (bits, bits) = V^T B = U Sigma S^T
        U, _, St = np.linalg.svd(M)
        R = U @ St  # argmin_R ||B - V R||_F over orthogonal R (Procrustes)
    return ITQ(mean=mean, projection=W, rotation=R, loss=np.asarray(losses))


# ----------------------------------------------------------------------------------------------------------
# FAISS binary indexes
# ----------------------------------------------------------------------------------------------------------
def build_binary_index(codes: np.ndarray, nlist: int = 0, train_codes: np.ndarray | None = None,
                       nprobe: int = 16) -> faiss.IndexBinary:
    """A FAISS binary index over packed ``codes`` (N, bits/8) uint8, ids = row numbers.

    ``nlist = 0``: ``IndexBinaryFlat`` (exhaustive Hamming scan, exact). ``nlist > 0``: ``IndexBinaryIVF`` with
    a flat binary coarse quantizer of ``nlist`` centroids trained on ``train_codes`` (default: ``codes``),
    searched with ``nprobe`` lists; faster, and approximate even in Hamming space.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    bits = codes.shape[1] * 8
    if nlist <= 0:
        index = faiss.IndexBinaryFlat(bits)
    else:
        quantizer = faiss.IndexBinaryFlat(bits)
        index = faiss.IndexBinaryIVF(quantizer, bits, int(nlist))
        index.own_fields = True
        quantizer.this.disown()
        index.train(np.ascontiguousarray(codes if train_codes is None else train_codes, dtype=np.uint8))
        index.nprobe = int(nprobe)
    for s in range(0, codes.shape[0], 1 << 20):
        index.add(codes[s:s + (1 << 20)])
    return index


# Above this many neighbours FAISS's counting scanner (a histogram over the bits + 1 possible distances) beats its
# k-heap: at 1M 256-bit codes, one thread, k = 2000: 0.20 against 0.44 ms per query (IVF1024, nprobe 16) and 1.9
# against 2.4 ms (flat); equal distances (tests/test_itq.py checks it). Below it the two are within 10 %.
COUNTING_MIN_K = 1000


def hamming_search(index: faiss.IndexBinary, q_codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Hamming distances (nq, k) int32, ids (nq, k) int64; -1 where fewer than k) of packed query codes.

    Deep searches (``k >= COUNTING_MIN_K``, the prefilter's case) use FAISS's counting scanner instead of its heap:
    the same distances (ids may differ among ties at the k-th distance), about twice as fast at k = 2000.
    """
    q = np.ascontiguousarray(np.atleast_2d(q_codes), dtype=np.uint8)
    k = int(k)
    if hasattr(index, "use_heap"):
        index.use_heap = k < COUNTING_MIN_K
        if isinstance(index, faiss.IndexBinaryIVF):
            # faiss <= 1.15: the IVF counting scanner reads max_codes = 0 (FAISS's "no limit") as a budget of zero
            # codes and returns nothing (facebookresearch/faiss#5555); an explicit budget of every code is the same
            # search as the heap's.
            index.max_codes = max(int(index.ntotal), 1)
    return index.search(q, k)


def hamming_distances(a_codes: np.ndarray, b_codes: np.ndarray) -> np.ndarray:
    """All-pairs Hamming distance of packed codes in numpy: popcount of the XOR, (Na, Nb) int64 (small inputs)."""
    a = np.atleast_2d(np.asarray(a_codes, np.uint8))
    b = np.atleast_2d(np.asarray(b_codes, np.uint8))
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=2, dtype=np.int64)


def prefilter_rerank(codes_index: faiss.IndexBinary, X_db: np.ndarray, q: np.ndarray, q_codes: np.ndarray,
                     prefilter: int = ITQConfig.prefilter, k: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Hamming prefilter then exact inner-product re-rank (seed 000 §4.2).

    The ``prefilter`` nearest codes of each query (``codes_index`` built over the rows of ``X_db``, ids = row
    numbers) are re-scored with the exact descriptors ``X_db`` (N, d) against ``q`` (nq, d); returns the best
    ``k`` as (scores (nq, k) float32 descending, ids (nq, k) int64), padded with ``-inf`` / ``-1`` when fewer
    candidates exist. ``X_db`` must be a C-contiguous float32 array (a ``np.load(..., mmap_mode="r")`` memmap
    works: only the candidate rows are read). The re-rank is FAISS's ``knn_inner_products_by_idx`` (one heap per
    query over its candidate ids, OpenMP over queries), ~2.5x faster than a numpy gather + einsum.
    """
    if not (isinstance(X_db, np.ndarray) and X_db.dtype == np.float32 and X_db.flags.c_contiguous and X_db.ndim == 2):
        raise TypeError("X_db must be a C-contiguous float32 (N, d) array or memmap")
    q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
    nq, d = q.shape
    if d != X_db.shape[1]:
        raise ValueError(f"queries have dimension {d}, the database {X_db.shape[1]}")
    _, cand = hamming_search(codes_index, q_codes, prefilter)
    # FAISS stops a query's scan at its first -1: move padding to the end (it already is for FAISS results)
    cand = np.ascontiguousarray(np.take_along_axis(cand, np.argsort(cand < 0, axis=1, kind="stable"), 1))
    kk = int(k)
    scores = np.empty((nq, kk), np.float32)
    ids = np.empty((nq, kk), np.int64)
    faiss.knn_inner_products_by_idx(faiss.swig_ptr(q), faiss.swig_ptr(X_db), faiss.swig_ptr(cand), d, nq,
                                    X_db.shape[0], cand.shape[1], kk, faiss.swig_ptr(scores), faiss.swig_ptr(ids),
                                    cand.shape[1])
    scores[ids < 0] = -np.inf
    return scores, ids


def pool_by_image(query_row: np.ndarray, image: np.ndarray, score: np.ndarray, nq: int, k: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Max-pool scored (query, image) pairs per image and keep each query's best ``k`` images.

    Returns (scores (nq, k) float32 descending, image ids (nq, k) int64), ties by ascending image id, padded with
    ``-inf`` / ``-1``. The pairs may repeat an image (several regions of it were retrieved)."""
    q = np.asarray(query_row, np.int64).ravel()
    img = np.asarray(image, np.int64).ravel()
    s = np.asarray(score, np.float64).ravel()
    o = np.lexsort((-s, img, q))  # group (query, image), best first
    q, img, s = q[o], img[o], s[o]
    first = np.ones(q.shape, bool)
    first[1:] = (q[1:] != q[:-1]) | (img[1:] != img[:-1])
    q, img, s = q[first], img[first], s[first]
    o = np.lexsort((img, -s, q))  # rank images per query: score desc, id asc
    q, img, s = q[o], img[o], s[o]
    rank = np.arange(q.size) - np.searchsorted(q, q, side="left")
    sel = rank < k
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    out_s[q[sel], rank[sel]] = s[sel]
    out_i[q[sel], rank[sel]] = img[sel]
    return out_s, out_i


def prefilter_regional_search(codes_index: faiss.IndexBinary, X_db: np.ndarray, itq: ITQ, region_image: np.ndarray,
                              items: Sequence[np.ndarray], k: int, prefilter: int = ITQConfig.prefilter,
                              allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Regional (D2R) image search through the Hamming prefilter: each query's items (m_q, d) keep their
    ``prefilter`` nearest region codes, those are re-ranked with the exact rows of ``X_db`` (seed 000 §4.2), and an
    image scores the max over (item, retrieved region of the image). Regions outside an item's prefilter do not
    contribute, so images none of them reach are not ranked.

    ``region_image`` (R,) maps a region row to its image id; ``allowed`` (n_images,) bool drops other images after
    the re-rank. Returns (scores (nq, k), image ids (nq, k)) as :func:`pool_by_image`.
    """
    sizes = np.array([len(x) for x in items], np.int64)
    nq = len(items)
    if sizes.sum() == 0:
        return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
    Q = np.ascontiguousarray(np.concatenate([np.atleast_2d(np.asarray(x, np.float32)) for x in items if len(x)]))
    depth = int(min(prefilter, X_db.shape[0]))
    S, rows = prefilter_rerank(codes_index, X_db, Q, itq.encode(Q), prefilter=depth, k=depth)
    qrow = np.repeat(np.repeat(np.arange(nq), sizes), depth).reshape(S.shape)
    ok = rows >= 0
    img = np.where(ok, np.asarray(region_image, np.int64)[np.clip(rows, 0, None)], -1)
    if allowed is not None:
        ok &= np.asarray(allowed, bool)[np.clip(img, 0, None)]
    return pool_by_image(qrow[ok], img[ok], S[ok], nq, int(k))
