"""Which FAISS index for a corpus: the decision (size and memory budget -> factory string), apart from the
mechanics of building and searching (:mod:`pipeline.faiss_index`), as autofaiss separates them."""
from __future__ import annotations

import math
import re

import faiss

METRIC_IP = faiss.METRIC_INNER_PRODUCT
METRIC_L2 = faiss.METRIC_L2

# --- memory model (bytes per database vector, documented for choose_factory) -----------------------------
IDMAP2_BYTES = 8 + 48      # id_map (int64) + reverse hash map entry (std::unordered_map node, ~48 B)
IVF_ID_BYTES = 8           # IVF inverted lists store one int64 id per vector
HNSW_LINK_BYTES_PER_M = 8  # level 0 keeps 2*M int32 links; upper levels add ~4 B; levels/offsets ~12 B
DEFAULT_HNSW_M = 32
DEFAULT_EF_SEARCH = 128



# ----------------------------------------------------------------------------------------------------------
# factory choice
# ----------------------------------------------------------------------------------------------------------
def ivf_nlist(n: int) -> int:
    """Number of IVF lists: the power of two nearest to ``4 sqrt(n)`` (FAISS guideline 4..16 sqrt(n)), >= 16."""
    return int(max(16, 2 ** round(math.log2(4.0 * math.sqrt(max(n, 1))))))


def _ivf_prefix(nlist: int) -> str:
    # A flat coarse quantizer costs nlist*d per query; past 64k lists an HNSW quantizer is the usual choice.
    return f"IVF{nlist}_HNSW32" if nlist >= 65536 else f"IVF{nlist}"


def estimate_bytes(factory: str, n: int, d: int) -> float:
    """Approximate resident bytes of ``factory`` holding ``n`` vectors of dimension ``d``.

    Bytes per vector of each family (``n`` large), as used by :func:`choose_factory`:

    - ``IDMap2,Flat``: ``4d + 56`` (raw float32 + id map + reverse map).
    - ``IDMap2,HNSW{M}``: ``4d + 8M + 16 + 56`` (raw vectors, 2M level-0 int32 links, upper levels,
      level/offset tables, id maps).
    - ``IVF{nlist},Flat``: ``4d + 8``; ``IVF{nlist},SQ8``: ``d + 8``; ``OPQ{M},IVF{nlist},PQ{M}``: ``M + 8``;
      plus the coarse quantizer ``4 d nlist`` (and ``4 d^2`` for the OPQ rotation) once.
    """
    m = re.search(r"HNSW(\d+)", factory)
    if factory.startswith("IDMap2,HNSW") and m:
        M = int(m.group(1))
        return n * (4 * d + HNSW_LINK_BYTES_PER_M * M + 16 + IDMAP2_BYTES)
    if factory.startswith("IDMap2,Flat") or factory == "Flat":
        return n * (4 * d + (IDMAP2_BYTES if factory.startswith("IDMap2") else 0))
    mi = re.search(r"IVF(\d+)", factory)
    if mi is None:
        raise ValueError(f"no memory model for factory {factory!r}")
    nlist = int(mi.group(1))
    fixed = 4.0 * d * nlist
    if "_HNSW" in factory:
        fixed += nlist * (HNSW_LINK_BYTES_PER_M * 32 + 16)
    if factory.endswith(",Flat"):
        per = 4 * d
    elif factory.endswith(",SQ8"):
        per = d
    else:
        mp = re.search(r"PQ(\d+)(x(\d+))?", factory.split("IVF", 1)[1])
        if mp is None:
            raise ValueError(f"no memory model for factory {factory!r}")
        M, nbits = int(mp.group(1)), int(mp.group(3) or 8)
        per = math.ceil(M * nbits / 8)
        fixed += 4.0 * M * (2 ** nbits) * (d // M)  # PQ centroids
    if factory.startswith("OPQ"):
        fixed += 4.0 * d * d
    return fixed + n * (per + IVF_ID_BYTES)


def choose_factory(
    n: int,
    d: int,
    memory_budget_bytes: float,
    metric: int = METRIC_IP,
    *,
    flat_max_n: int = 50_000,
    prefer_hnsw: bool = False,
    hnsw_max_n: int = 2_000_000,
    hnsw_m: int = DEFAULT_HNSW_M,
    headroom: float = 0.8,
) -> str:
    """Pick a FAISS index-factory string for ``n`` vectors of dimension ``d`` within a memory budget.

    Rule (first that fits ``headroom * memory_budget_bytes``; byte models in :func:`estimate_bytes`):

    1. ``n <= flat_max_n``: ``IDMap2,Flat`` - exact; brute force over <= 50k vectors is a few ms per query.
    2. only with ``prefer_hnsw`` and ``n <= hnsw_max_n``: ``IDMap2,HNSW{M}`` - lowest single-query latency
       for small k when memory is plentiful. Not the default: its graph build is slow (no batching),
       shards cannot be merged cheaply (merging re-inserts every vector), and for recall@100 >= 0.95 it
       lost to IVF-Flat in ``experiments.bench_faiss --quick`` (clustered 100k x 512: efSearch 768 at 9.1 ms/query
       and a 5x longer build, versus nprobe 64/1024 at 2.1 ms/query).
    3. ``IVF{nlist},Flat`` - exact vectors, recall set by ``nprobe``; shards share the trained quantizer and
       merge in O(n). ``nlist`` = power of two near ``4 sqrt(n)`` (:func:`ivf_nlist`), HNSW quantizer
       beyond 64k lists.
    4. ``IVF{nlist},SQ8`` - 8-bit scalar quantisation, 4x smaller, recall loss ~1%.
    5. ``OPQ{M},IVF{nlist},PQ{M}`` with the largest ``M`` (dividing ``d``, ``M <= d/4``) that fits;
       ``M + 8`` bytes/vector (re-rank with exact vectors kept elsewhere if recall matters).

    ``metric`` does not change the string (FAISS takes it separately in ``index_factory``); it is checked.
    Raises ``ValueError`` when even ``OPQ4,...,PQ4`` does not fit.
    """
    if metric not in (METRIC_IP, METRIC_L2):
        raise ValueError(f"unsupported metric {metric}")
    if n <= 0 or d <= 0:
        raise ValueError("n and d must be positive")
    usable = headroom * float(memory_budget_bytes)
    if n <= flat_max_n and estimate_bytes("IDMap2,Flat", n, d) <= usable:
        return "IDMap2,Flat"
    hnsw = f"IDMap2,HNSW{hnsw_m}"
    if prefer_hnsw and n <= hnsw_max_n and estimate_bytes(hnsw, n, d) <= usable:
        return hnsw
    prefix = _ivf_prefix(ivf_nlist(n))
    candidates = [f"{prefix},Flat", f"{prefix},SQ8"]
    candidates += [f"OPQ{M},{prefix},PQ{M}" for M in (256, 128, 96, 64, 48, 32, 24, 16, 8, 4)
                   if d % M == 0 and M <= d // 4]
    for f in candidates:
        if estimate_bytes(f, n, d) <= usable:
            return f
    raise ValueError(f"{n} x {d} vectors do not fit in {memory_budget_bytes:.3g} bytes even with PQ")


