"""The ASMK inverted file (seed 002 §4): a CSR structure over visual words of aggregated item vectors, scored
with the kernel's selectivity, merged shard by shard; plain arrays in and out (``to_arrays`` / ``from_arrays``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from pipeline.asmk_aggregate import EPS, Aggregated, _faiss_hammings, selectivity

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




def merged_postings(parts: Sequence[InvertedFile], max_postings: int = 8_000_000
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The postings of ``merge_inverted_files(parts)``, i.e. its ``item_ids`` and ``vecs`` rows in order, yielded a
    range of visual words at a time with about ``max_postings`` rows per range (a single word may exceed it).

    Memory is one range's postings plus the (K,) per-word totals, whatever the size of the merged index, and
    ``parts`` may be memory-mapped: this is how a corpus-wide inverted file is written without ever existing in
    memory. ``merged_word_ptr`` gives the matching CSR offsets; item ids are offset by the items of earlier parts.
    """
    parts = list(parts)
    K = parts[0].n_words
    totals = np.diff(merged_word_ptr(parts))
    n_items = sum(p.n_items for p in parts)
    id_dtype = np.int32 if n_items < 2**31 else np.int64
    vec_dtype = np.result_type(*[p.vecs.dtype for p in parts])
    offsets = np.cumsum([0] + [p.n_items for p in parts])
    # word ranges [w0, w1) of about max_postings postings each
    cuts = np.searchsorted(np.cumsum(totals), np.arange(max_postings, int(totals.sum()), max_postings), side="left")
    bounds = np.unique(np.concatenate([[0], np.minimum(cuts + 1, K), [K]]))
    for w0, w1 in zip(bounds[:-1], bounds[1:]):
        ptrs = [np.asarray(p.word_ptr[w0:w1 + 1], dtype=np.int64) for p in parts]
        counts = np.stack([np.diff(q) for q in ptrs])                       # (S, w1 - w0)
        ptr = np.zeros(w1 - w0 + 1, dtype=np.int64)
        np.cumsum(counts.sum(axis=0), out=ptr[1:])
        before = np.cumsum(counts, axis=0) - counts
        ids = np.empty(ptr[-1], dtype=id_dtype)
        vecs = np.empty((ptr[-1],) + parts[0].vecs.shape[1:], dtype=vec_dtype)
        for s, (p, q) in enumerate(zip(parts, ptrs)):
            a, b = int(q[0]), int(q[-1])
            if b == a:
                continue
            w = np.repeat(np.arange(w1 - w0), counts[s])
            dest = ptr[w] + before[s, w] + (np.arange(b - a) - (q[w] - a))
            ids[dest] = np.asarray(p.item_ids[a:b], dtype=np.int64) + offsets[s]
            vecs[dest] = p.vecs[a:b]
        yield ids, vecs


def merged_word_ptr(parts: Sequence[InvertedFile]) -> np.ndarray:
    """CSR offsets (K + 1,) of ``merge_inverted_files(parts)``: the sum of the parts' offsets."""
    ptr = np.zeros(parts[0].n_words + 1, dtype=np.int64)
    for p in parts:
        ptr += np.asarray(p.word_ptr, dtype=np.int64)
    return ptr
