"""FAISS indexes over global and regional descriptors, built in shards (ALGORITHMS.md §8 search side).

Build flow for a million-image corpus (R1M scale):

1. ``factory = choose_factory(n, d, budget)`` picks the index family from the corpus size and memory budget.
2. ``trained = train_index(factory, sample, d)`` trains once (coarse k-means / OPQ / PQ) on a sample;
   ``serialize(trained)`` ships the empty trained index to shard workers.
3. Each worker calls ``add_shard(trained_bytes, X_shard, ids_shard)`` (int64 ids, e.g. image ids or region
   row ids) and serialises its shard.
4. Shards are either searched together with :class:`ShardedSearcher` (no merge needed) or merged with
   :func:`merge_indexes`. Because IVF shards share the coarse quantizer trained in step 2, searching the
   shards and merging the per-shard top-k gives exactly the result of the single merged index.

Scores are similarities for ``METRIC_INNER_PRODUCT`` (higher is better) and squared distances for
``METRIC_L2`` (lower is better). Descriptors are float32 rows; L2-normalise them first for cosine search.
Nothing here does I/O: persistence is ``serialize``/``deserialize`` (uint8 arrays) plus ``storage.snapshot``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import faiss
import numpy as np

from pipeline.faiss_factory import (DEFAULT_EF_SEARCH, DEFAULT_HNSW_M, choose_factory, estimate_bytes,  # noqa: F401
                                    ivf_nlist)
from pipeline.itq import ITQConfig

log = logging.getLogger(__name__)

METRIC_IP = faiss.METRIC_INNER_PRODUCT
METRIC_L2 = faiss.METRIC_L2

@dataclass(frozen=True)
class FaissConfig:
    """The ``faiss`` stage: which global methods and region sources get an index, and how it is chosen."""

    methods: tuple[str, ...] = ("gem", "rmac", "fs_egm", "os_egm")
    regional: tuple[str, ...] = ("fs_egm",)   # region sources indexed for regional search
    factory: str | None = None          # None: chosen from corpus size and memory budget (choose_factory)
    memory_budget_gb: float = 16.0
    train_sample: int = 200_000
    flat_max_vectors: int = 50_000      # exact (IDMap2,Flat) indexes up to this many vectors (choose_factory)
    # ITQ Hamming prefilter of each regional index (seed 000 §4.2; pipeline.itq): 0 = off; 256 bits as in the
    # paper (at most the descriptor width). Departure: the paper re-ranks the top 1000 codes exactly; we re-rank
    # 2000 (pipeline.itq.ITQConfig.prefilter, the same default), because experiments/bench_itq.py measured
    # recall@100 0.92 at 1000 and 0.965-0.969 at 2000 on 1M synthetic regions, still x141 faster than exact search for
    # a query image (the depth needed grows with N).
    itq_bits: int = 0
    itq_prefilter: int = ITQConfig.prefilter
    itq_train: int = 100_000            # rows ITQ is learned on (a seeded sample)

    def __post_init__(self) -> None:
        if self.memory_budget_gb <= 0 or self.train_sample < 1 or self.flat_max_vectors < 0:
            raise ValueError("memory_budget_gb must be > 0, train_sample >= 1, flat_max_vectors >= 0")
        if self.itq_bits < 0 or self.itq_bits % 8 or self.itq_prefilter < 1 or self.itq_train < 1:
            raise ValueError("itq_bits must be 0 (off) or a positive multiple of 8, itq_prefilter and itq_train >= 1")


ITQ_FIELDS = ("itq_bits", "itq_prefilter", "itq_train")


def stage_parameters(cfg: FaissConfig) -> dict[str, Any]:
    """The faiss stage's parameters for its hash: with ITQ off, the ITQ fields are left out, so runs indexed
    before they existed keep their hash and are not rebuilt."""
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if cfg.itq_bits == 0:
        for name in ITQ_FIELDS:
            d.pop(name)
    return d


class Searchable(Protocol):
    """Anything with FAISS's ``search(Q, k) -> (D, I)``: a faiss.Index or a :class:`ShardedSearcher`."""

    d: int
    ntotal: int
    metric_type: int

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


# ----------------------------------------------------------------------------------------------------------
# GPU / CPU placement
# ----------------------------------------------------------------------------------------------------------
def num_gpus() -> int:
    """GPUs visible to FAISS (0 on faiss-cpu builds)."""
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # pragma: no cover - very old builds
        return 0


def _is_gpu_index(index: Any) -> bool:
    name = type(index).__name__
    return name.startswith("Gpu") or name in ("IndexReplicas", "IndexShards")


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Copy ``index`` onto all GPUs (``faiss.index_cpu_to_all_gpus``); the CPU index when none or unsupported."""
    if num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as e:  # e.g. HNSW has no GPU twin
        log.warning("GPU copy of %s failed (%s); searching on CPU", type(index).__name__, e)
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """CPU copy of a GPU index (identity for CPU indexes)."""
    if _is_gpu_index(index) and hasattr(faiss, "index_gpu_to_cpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


# ----------------------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------------------
def _as_f32(X: np.ndarray, d: int | None = None) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or (d is not None and X.shape[1] != d):
        raise ValueError(f"expected (n, {d}) float32 rows, got {X.shape}")
    return X


def _find_ivf(index: faiss.Index) -> Any | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _find_hnsw(index: faiss.Index) -> Any | None:
    idx = faiss.downcast_index(index)
    for _ in range(4):
        if hasattr(idx, "hnsw"):
            return idx
        inner = getattr(idx, "index", None)
        if inner is None:
            return None
        idx = faiss.downcast_index(inner)
    return None


def default_search_params(index: faiss.Index) -> dict[str, int]:
    """Defaults applied after training: IVF ``nprobe = max(8, nlist/16)``, HNSW ``efSearch = 128``.

    ``nlist/16`` reaches recall@100 >= 0.95 on the clustered data of ``experiments.bench_faiss`` (500 held-out
    queries, exact brute-force ground truth): 1M x 512 ``IVF4096,Flat`` nprobe 256 -> 0.978 (128 -> 0.964,
    64 -> 0.934); 5M x 128 ``IVF8192,Flat`` nprobe 512 -> 0.956 (256 -> 0.933: the margin is thin here, so
    do not lower this default). :func:`tune` then picks the cheapest value meeting a target on held-out
    queries.
    """
    ivf = _find_ivf(index)
    if ivf is not None:
        return {"nprobe": int(min(ivf.nlist, max(8, ivf.nlist // 16)))}
    if _find_hnsw(index) is not None:
        return {"efSearch": DEFAULT_EF_SEARCH}
    return {}


def train_index(
    factory: str,
    sample: np.ndarray,
    d: int,
    metric: int = METRIC_IP,
    *,
    seed: int = 1234,
    use_gpu: bool | None = None,
) -> faiss.Index:
    """Create ``faiss.index_factory(d, factory, metric)`` and train it on ``sample`` (n_train, d).

    The result is empty and trained: serialise it and hand it to shard workers (:func:`add_shard`).
    IVF k-means is seeded (deterministic) and runs on the GPUs when FAISS sees any (``use_gpu=None``).
    Default search parameters (:func:`default_search_params`) are set.
    """
    index = faiss.index_factory(d, factory, metric)
    if not index.is_trained:
        sample = _as_f32(sample, d)
        ivf = _find_ivf(index)
        if ivf is not None:
            ivf.cp.seed = seed
            if sample.shape[0] < 39 * ivf.nlist:
                log.warning("training %s on %d < 39*nlist points", factory, sample.shape[0])
            if (use_gpu if use_gpu is not None else num_gpus() > 0) and num_gpus() > 0:
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(d, metric))
        index.train(sample)
        if ivf is not None:
            ivf.clustering_index = None
    set_search_params(index, **default_search_params(index))
    return index


def serialize(index: faiss.Index) -> np.ndarray:
    """Serialise (a CPU copy of) ``index`` to a uint8 array (FAISS's own format, no pickle)."""
    return faiss.serialize_index(to_cpu(index))


def deserialize(data: np.ndarray | bytes | bytearray | memoryview) -> faiss.Index:
    """Inverse of :func:`serialize`; accepts a uint8 array or raw bytes."""
    arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError("expected a 1-d uint8 array")
    return faiss.deserialize_index(np.ascontiguousarray(arr))


def add_shard(
    index_bytes_or_index: faiss.Index | np.ndarray | bytes,
    X: np.ndarray,
    ids: np.ndarray,
    *,
    chunk: int = 65536,
) -> faiss.Index:
    """Add rows ``X`` (n, d) with int64 ``ids`` (n,) to a trained index and return it.

    Given serialised bytes, a fresh index is deserialised (the usual shard-worker path); given an index,
    it is extended in place. Ids must be unique across all shards (they identify images or regions).
    Rows are added in chunks to bound temporary memory (IVF assignment, HNSW insertion).
    """
    if isinstance(index_bytes_or_index, (np.ndarray, bytes, bytearray, memoryview)):
        index = deserialize(index_bytes_or_index)
    else:
        index = index_bytes_or_index
    if not index.is_trained:
        raise ValueError("index must be trained before adding vectors")
    X = _as_f32(X, index.d)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.shape != (X.shape[0],):
        raise ValueError(f"ids shape {ids.shape} does not match {X.shape[0]} rows")
    for s in range(0, X.shape[0], chunk):
        index.add_with_ids(X[s:s + chunk], ids[s:s + chunk])
    return index


def _reconstruct_all(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, ids) of an IDMap/IDMap2-wrapped index whose storage can reconstruct (Flat, HNSW)."""
    idx = faiss.downcast_index(index)
    if not hasattr(idx, "id_map"):
        raise ValueError(f"cannot enumerate vectors of {type(idx).__name__}")
    ids = faiss.vector_to_array(idx.id_map).astype(np.int64)
    X = idx.index.reconstruct_n(0, idx.ntotal) if idx.ntotal else np.zeros((0, idx.d), np.float32)
    return X, ids


def merge_indexes(indexes: Sequence[faiss.Index], *, consume: bool = False) -> faiss.Index:
    """Merge shard indexes built from the same trained index into one.

    IVF / Flat / IDMap shards use FAISS ``merge_from`` (moves inverted lists or codes, O(n)). HNSW shards
    cannot be merged in FAISS, so their vectors are reconstructed and re-inserted into one graph.
    With ``consume=True`` the inputs are emptied instead of copied (saves one copy of the data).
    """
    if not indexes:
        raise ValueError("nothing to merge")
    first = indexes[0]
    for other in indexes[1:]:
        if other.d != first.d or other.metric_type != first.metric_type:
            raise ValueError("shards differ in dimension or metric")
    cpu = [to_cpu(i) for i in indexes]
    if _find_hnsw(cpu[0]) is not None:
        out = faiss.clone_index(cpu[0])
        out.reset()
        for idx in cpu:
            X, ids = _reconstruct_all(idx)
            add_shard(out, X, ids)
            if consume:
                idx.reset()
        return out
    out = cpu[0] if consume else faiss.clone_index(cpu[0])
    for idx in cpu[1:]:
        src = idx if consume else faiss.clone_index(idx)
        out.merge_from(src, 0)
    return out


# ----------------------------------------------------------------------------------------------------------
# search
# ----------------------------------------------------------------------------------------------------------
def _ensure_quantizer_ef(index: faiss.Index, nprobe: int, ps: Any) -> None:
    ivf = _find_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf.quantizer), "hnsw"):
        ps.set_index_parameter(index, "quantizer_efSearch", int(max(64, 2 * nprobe)))


def set_search_params(index: Any, **params: int | None) -> Any:
    """Set search-time parameters (``nprobe=``, ``efSearch=``, ``quantizer_efSearch=``, ...) and return ``index``.

    Works through wrappers (IDMap2, OPQ pre-transform, GPU copies) via FAISS's ParameterSpace; applies to
    every shard of a :class:`ShardedSearcher`. ``None`` values are skipped; an inapplicable name raises.
    """
    if isinstance(index, ShardedSearcher):
        for shard in index.shards:
            set_search_params(shard, **params)
        return index
    ps = faiss.GpuParameterSpace() if _is_gpu_index(index) and hasattr(faiss, "GpuParameterSpace") \
        else faiss.ParameterSpace()
    for name, value in params.items():
        if value is None:
            continue
        try:
            ps.set_index_parameter(index, name, float(value) if name == "k_factor" else int(value))
        except RuntimeError as e:
            raise ValueError(f"parameter {name} does not apply to {type(index).__name__}") from e
        if name == "nprobe" and "quantizer_efSearch" not in params:
            _ensure_quantizer_ef(index, int(value), ps)
    return index


def merge_topk(D: np.ndarray, I: np.ndarray, k: int, metric: int = METRIC_IP) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of candidate lists ``D, I`` (nq, m): by score, ties by ascending id, missing ids (-1) last.

    Deterministic, independent of the order in which shards were concatenated.
    """
    D = np.asarray(D)
    I = np.asarray(I, dtype=np.int64)
    key = -D.astype(np.float64) if metric == METRIC_IP else D.astype(np.float64)
    key = np.where(I < 0, np.inf, key)
    order = np.lexsort((I, key), axis=-1)[:, :k]
    Dk = np.take_along_axis(D, order, axis=1)
    Ik = np.take_along_axis(I, order, axis=1)
    if Dk.shape[1] < k:  # fewer candidates than k overall: pad like FAISS does
        pad = k - Dk.shape[1]
        fill = -np.finfo(np.float32).max if metric == METRIC_IP else np.finfo(np.float32).max
        Dk = np.concatenate([Dk, np.full((Dk.shape[0], pad), fill, Dk.dtype)], axis=1)
        Ik = np.concatenate([Ik, np.full((Ik.shape[0], pad), -1, np.int64)], axis=1)
    return Dk, Ik


class ShardedSearcher:
    """Search several shard indexes as one: query every shard for top-k, then merge by score (ties by id).

    With IVF shards that share one trained quantizer (the :func:`add_shard` flow) and equal ``nprobe``, the
    result equals that of the merged index. Shards are moved to the GPUs when FAISS sees any
    (``use_gpu=None``), else searched on CPU (FAISS parallelises each search with OpenMP).
    """

    def __init__(self, indexes: Sequence[faiss.Index], use_gpu: bool | None = None) -> None:
        if not indexes:
            raise ValueError("need at least one shard")
        d, metric = indexes[0].d, indexes[0].metric_type
        if any(i.d != d or i.metric_type != metric for i in indexes):
            raise ValueError("shards differ in dimension or metric")
        gpu = num_gpus() > 0 if use_gpu is None else (use_gpu and num_gpus() > 0)
        self.shards: list[faiss.Index] = [to_gpu(i) if gpu else i for i in indexes]
        self.d = int(d)
        self.metric_type = int(metric)

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    def set_search_params(self, **params: int | None) -> ShardedSearcher:
        return set_search_params(self, **params)

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) of shape (nq, k): scores and int64 ids; -1 ids where fewer than k results exist."""
        Q = _as_f32(Q, self.d)
        parts = [s.search(Q, k) for s in self.shards]
        if len(parts) == 1:
            D, I = parts[0]
        else:
            D = np.concatenate([p[0] for p in parts], axis=1)
            I = np.concatenate([p[1] for p in parts], axis=1)
        return merge_topk(D, I, k, self.metric_type)


def brute_force_knn(
    X: np.ndarray, Q: np.ndarray, k: int, metric: int = METRIC_IP, *, block: int = 65536,
    ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``Q`` against ``X`` in numpy, scanning ``X`` in row blocks (bounded memory).

    Used as ground truth for recall (benchmarks, :func:`tune`). Ties by ascending id.
    """
    Q = _as_f32(Q)
    nq = Q.shape[0]
    kk = min(k, X.shape[0])
    bestD = np.empty((nq, 0), np.float32)
    bestI = np.empty((nq, 0), np.int64)
    qn = (Q * Q).sum(1)[:, None]
    for s in range(0, X.shape[0], block):
        B = np.asarray(X[s:s + block], dtype=np.float32)
        S = Q @ B.T
        if metric == METRIC_L2:
            S = qn - 2 * S + (B * B).sum(1)[None, :]
            part = np.argpartition(S, min(kk, S.shape[1]) - 1, axis=1)[:, :kk]
        else:
            part = np.argpartition(-S, min(kk, S.shape[1]) - 1, axis=1)[:, :kk]
        bid = (np.arange(s, s + B.shape[0]) if ids is None else np.asarray(ids[s:s + block]))[part]
        bestD, bestI = merge_topk(np.concatenate([bestD, np.take_along_axis(S, part, 1)], 1),
                                  np.concatenate([bestI, bid.astype(np.int64)], 1), kk, metric)
    return bestD, bestI


def regional_search(
    searcher: Searchable,
    Q: np.ndarray,
    k: int,
    region_to_image: np.ndarray,
    *,
    k_regions: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image search over a region index: image score = max over its retrieved regions (D2R regional search).

    The index holds region descriptors with ids = region row numbers; ``region_to_image`` (R,) maps a row
    to its image id. The top ``k_regions`` regions (default ``10 k``) are retrieved, max-pooled per image
    and the best ``k`` images returned as (scores (nq, k) float32, image ids (nq, k) int64), padded with
    ``-inf`` / ``-1``. For L2 indexes "max" means the smallest distance (padding ``+inf``).
    Regions outside the top ``k_regions`` do not contribute (the usual approximation).
    """
    region_to_image = np.asarray(region_to_image, dtype=np.int64)
    K = k_regions or 10 * k
    K = int(min(K, max(getattr(searcher, "ntotal", K), 1)))
    D, I = searcher.search(_as_f32(Q), K)
    nq = D.shape[0]
    sign = 1.0 if searcher.metric_type == METRIC_IP else -1.0
    S = sign * D.astype(np.float64)
    img = np.where(I >= 0, region_to_image[np.clip(I, 0, None)], -1)
    row = np.repeat(np.arange(nq), K)
    img, S = img.ravel(), S.ravel()
    keep = img >= 0
    row, img, S = row[keep], img[keep], S[keep]
    # group (query, image), best score first -> the first of each group is the max-pooled score
    o = np.lexsort((-S, img, row))
    row, img, S = row[o], img[o], S[o]
    first = np.ones(row.shape, bool)
    first[1:] = (row[1:] != row[:-1]) | (img[1:] != img[:-1])
    row, img, S = row[first], img[first], S[first]
    # rank images within each query by score desc, ties by image id
    o = np.lexsort((img, -S, row))
    row, img, S = row[o], img[o], S[o]
    rank = np.arange(row.size) - np.searchsorted(row, row, side="left")
    sel = rank < k
    out_s = np.full((nq, k), -np.inf if sign > 0 else np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    out_s[row[sel], rank[sel]] = (sign * S[sel]).astype(np.float32)
    out_i[row[sel], rank[sel]] = img[sel]
    return out_s, out_i


