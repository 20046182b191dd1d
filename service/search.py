"""The search service: one ranking path for ``jobs.search``, the results browser and the benchmark.

Method names (``--method``):

* a global method (``gem``, ``rmac``, ``os_egm`` ...): the ``global_<method>`` index;
* ``regional:<source>`` (``fs_egm``, ``os_egm``, ``grid``): D2R regional search (seed 002 eq. 3) over the
  ``regional_<source>`` index, whose items are every image's full view and its ``<source>`` regions; the
  query's items are its full view and its own ``<source>`` regions, an image scores the max over (query item,
  database item). ``regional:<source>@full`` uses the query's full view only (the paper's asymmetric case);
* an ASMK kernel (``asmk_star``, ``d2r_asmk_star``, ``r_asmk_star`` ...): the ``asmk_<kernel>`` inverted file;
* ``patches[:k]`` (seed 000): a trained region scorer picks ``k`` (default 5) diverse query patches, which vote
  with the full query image over the ``regional_<source>`` index (:mod:`service.patches`);
* followed by re-rankings, applied in order: ``+aqe[:n]`` (average QE over the top n, default 10, seed 003),
  ``+alphaqe[:n]`` (alpha-QE), ``+diffusion[:m]`` (local diffusion over the top m, default 100) for global
  methods, then any re-ranking of a ranked list registered with :func:`register_reranker` (e.g. spatial
  verification ``+sv[:n]``), for every family.

Rankings can be restricted to a subset of the database (``allowed``): the benchmark evaluates each track on
its own database this way, through the same code users run.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from pipeline.asmk import KERNEL_CONFIGS
from pipeline.descriptors import FINAL_METHODS
from pipeline.query_expansion import alpha_qe, gather
from pipeline.query_patches import PatchSearchConfig
from pipeline.ranking import AQE_N, DIFFUSION_M, diffusion_reorder, query_expand
from service.encoder import QueryDescriptors, QueryEncoder
from service.errors import UserError
from service.indexes import LoadedASMK, LoadedIndex, open_asmk, open_index, open_itq
from service.patches import PatchSearch
from storage.images import decode_image
from storage.readers import read_globals
from storage.layout import SnapshotFiles
from storage.query_scorer import resolve_location
from storage.snapshot import list_names
from storage.snapshot_pins import PinnedSnapshot, open_pinned_set
from storage.uri import StorageError, redact

log = logging.getLogger("indexer")

REGIONAL_SOURCES = ("fs_egm", "os_egm", "grid", "cam")
RERANKS = ("aqe", "alphaqe", "diffusion")   # re-rankings of global methods (they use the database's vectors)
PATCHES = "patches"

# re-rankings of any ranked list: name -> fn(service, queries, rankings, n or None, allowed ids or None) -> rankings
ListReranker = Callable[["SearchService", Sequence[QueryDescriptors], list["Ranking"], "int | None",
                         "np.ndarray | None"], list["Ranking"]]
LIST_RERANKERS: dict[str, ListReranker] = {}


def register_reranker(name: str, fn: ListReranker) -> None:
    """Make ``+<name>[:n]`` a re-ranking of every method family (e.g. spatial verification ``+sv``): ``fn``
    re-orders each query's ranked list; it runs after the family's own ranking and global re-rankings."""
    if name in RERANKS or not name.isidentifier():
        raise ValueError(f"bad re-ranking name {name!r}")
    LIST_RERANKERS[name] = fn


def known_reranks() -> list[str]:
    return [*RERANKS, *sorted(LIST_RERANKERS)]


def pin_release(root: str) -> dict[str, PinnedSnapshot]:
    """Pin one version of every published index (the last release's when there is one), so that a search
    service reads one consistent set while a reindex publishes the next one, and no version it reads is pruned.
    A store the service may not write to (read-only credentials) gets no pins: it reads ``LATEST`` unpinned."""
    names = list_names(root)
    if not names:
        return {}
    try:
        return open_pinned_set(root, names, keepalive=True, owner={"reader": "search"})
    except (StorageError, OSError) as exc:
        log.warning("could not pin the index versions of %s (%s): reading LATEST unpinned", redact(root), exc)
        return {}


@dataclass(frozen=True)
class MethodSpec:
    """A method parsed from its name (see the module docstring)."""

    name: str
    family: str                 # "global" | "regional" | "asmk" | "patches"
    base: str                   # global method, region source or ASMK kernel (patches: the regional source,
                                # filled in by SearchService.spec from the scorer's config)
    reranks: tuple[str, ...] = ()
    query_regions: bool = True  # regional: the query's regions are items too (False: "@full")
    k: int | None = None        # patches: how many (None: the config's k)

    @property
    def index_name(self) -> str:
        kind = {"global": "global", "regional": "regional", "patches": "regional", "asmk": "asmk"}[self.family]
        return f"{kind}_{self.base}"

    @property
    def vector_reranks(self) -> list[str]:
        return [r for r in self.reranks if rerank_name(r)[0] in RERANKS]

    @property
    def list_reranks(self) -> list[str]:
        return [r for r in self.reranks if rerank_name(r)[0] not in RERANKS]


def method_names_help() -> str:
    return (f"globals {list(FINAL_METHODS)}, 'regional:<{'|'.join(REGIONAL_SOURCES)}>[@full]', ASMK kernels "
            f"{sorted(KERNEL_CONFIGS)}, '{PATCHES}[:k]', each optionally followed by re-rankings "
            f"{['+' + r for r in known_reranks()]}")


def rerank_name(text: str) -> tuple[str, int | None]:
    """``"aqe:3"`` -> ``("aqe", 3)``; ``"aqe"`` -> ``("aqe", None)``."""
    name, _, arg = text.partition(":")
    if arg and not arg.isdigit():
        raise UserError(f"re-ranking {text!r}: the value after ':' must be a positive integer")
    return name, (int(arg) if arg else None)


def parse_method(name: str) -> MethodSpec:
    """Parse ``gem``, ``gem+aqe``, ``os_egm+diffusion``, ``regional:fs_egm@full``, ``asmk_star`` ...."""
    base, *reranks = [p.strip() for p in name.strip().split("+")]
    bad = [r for r in reranks if rerank_name(r)[0] not in known_reranks()]
    if bad:
        raise UserError(f"unknown re-ranking {'+'.join(bad)!r} in {name!r}; available: {known_reranks()}")
    if base == PATCHES or base.startswith(PATCHES + ":"):
        _, _, arg = base.partition(":")
        if arg and (not arg.isdigit() or int(arg) < 1):
            raise UserError(f"{name!r}: the number of patches after '{PATCHES}:' must be a positive integer")
        return MethodSpec(name.strip(), "patches", "", tuple(reranks), k=int(arg) if arg else None)
    if base in KERNEL_CONFIGS:
        return MethodSpec(name.strip(), "asmk", base, tuple(reranks))
    if base.startswith("regional:"):
        src, query_regions = base[len("regional:"):], True
        if src.endswith("@full"):
            src, query_regions = src[:-len("@full")], False
        if src not in REGIONAL_SOURCES:
            raise UserError(f"unknown region source in {name!r}; available: {list(REGIONAL_SOURCES)}")
        return MethodSpec(name.strip(), "regional", src, tuple(reranks), query_regions)
    if base not in FINAL_METHODS:
        raise UserError(f"unknown method {name!r}; available: {method_names_help()}")
    return MethodSpec(name.strip(), "global", base, tuple(reranks))


@dataclass
class Ranking:
    """One query's ranked database images (best first) and their scores."""

    image_ids: list[str]
    scores: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchResult:
    image_id: str
    score: float
    rank: int


class SearchService:
    """Loads an index run once and answers image queries with any method the run published."""

    def __init__(self, root: str, device: str | None = None, encoder: QueryEncoder | None = None,
                 indexes: dict[str, LoadedIndex] | None = None, scorer: str | None = None,
                 patches: PatchSearchConfig | None = None) -> None:
        """``scorer``: folder of a trained query-region scorer for ``patches`` (default: the run's own artefact);
        ``patches``: query-time patch parameters replacing those the scorer was trained with."""
        self.root = root
        self.encoder = encoder if encoder is not None else QueryEncoder(root, device=device)
        self._indexes: dict[str, LoadedIndex] = dict(indexes or {})
        self._asmk: dict[str, LoadedASMK] = {}
        self._scorer_uri, self._patch_cfg = scorer or root, patches
        self._patches: PatchSearch | None = None
        self._pins = pin_release(root)

    def close(self) -> None:
        """Drop the pins on the index versions this service reads (they may be pruned from then on)."""
        for p in self._pins.values():
            p.close()
        self._pins = {}

    def __enter__(self) -> "SearchService":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _snapshot(self, name: str) -> Any:
        pinned = self._pins.get(name)
        return pinned.snapshot if pinned is not None else None

    # ------------------------------------------------------------------ indexes
    def available_methods(self) -> list[str]:
        """Base method names with a published index in this run."""
        out = []
        for name in sorted(set(list_names(self.root)) | set(self._indexes)):
            kind, _, base = name.partition("_")
            if kind != "itq":  # a regional index's prefilter, not a method
                out.append({"global": base, "regional": f"regional:{base}", "asmk": base}.get(kind, name))
        if self._patches is not None or resolve_location(self._scorer_uri) is not None:
            out.append(PATCHES)
        return out

    def index(self, spec: MethodSpec) -> LoadedIndex:
        name = spec.index_name
        if name not in self._indexes:
            idx = self._indexes[name] = open_index(self.root, name, self._snapshot(name))
            if idx.kind == "regional":
                idx.itq = open_itq(self.root, idx, self._snapshot(SnapshotFiles.itq_name(name)))
        return self._indexes[name]

    def patch_search(self) -> PatchSearch:
        """The query-region scorer of ``patches`` (loaded once); :class:`UserError` when none was trained."""
        if self._patches is None:
            self._patches = PatchSearch.load(self._scorer_uri, self._patch_cfg)
        return self._patches

    def asmk(self, kernel: str) -> LoadedASMK:
        if kernel not in self._asmk:
            self._asmk[kernel] = open_asmk(self.root, kernel, self._snapshot(f"asmk_{kernel}"))
        return self._asmk[kernel]

    def spec(self, method: str | MethodSpec) -> MethodSpec:
        """Parse ``method`` and check that this run has its index (the error lists what it has)."""
        spec = parse_method(method) if isinstance(method, str) else method
        if spec.family == "patches" and not spec.base:
            spec = dataclasses.replace(spec, base=self.patch_search().cfg.source)
        have = self.available_methods()
        base = f"regional:{spec.base}" if spec.family in ("regional", "patches") else spec.base
        if base not in have:
            raise UserError(f"method {spec.name!r} is not available in this index; available: {sorted(have)}")
        return spec

    # ------------------------------------------------------------------ encoding
    def encode(self, image: bytes | Image.Image, bbox: Iterable[float] | None = None,
               patches: bool = False) -> QueryDescriptors:
        """Decode (with the pipeline's bomb/corrupt guards) and encode a query, cropped to ``bbox``; with
        ``patches``, also its patches as the scorer's config proposes them (for ``patches[:k]``)."""
        img = decode_image(image) if isinstance(image, (bytes, bytearray)) else image
        return self.encoder.encode(img, bbox, self.patch_search().cfg.proposals if patches else None)

    # ------------------------------------------------------------------ ranking
    def _global_vectors(self, idx: LoadedIndex, spec: MethodSpec) -> np.ndarray:
        """Database vectors by int id (for QE / diffusion)."""
        if idx.exact:
            return idx.vectors()
        ids, X = read_globals(self.root, spec.base)
        out = np.zeros((len(idx.image_ids), idx.dim), np.float32)
        rows = idx.rows(ids)
        out[rows[rows >= 0]] = X[rows >= 0, : idx.dim]
        return out

    def _rank_global(self, Q: np.ndarray, spec: MethodSpec, depth: int | None, allowed: np.ndarray | None,
                     idx: LoadedIndex) -> tuple[np.ndarray, np.ndarray]:
        Q = np.ascontiguousarray(Q[:, : idx.dim], np.float32)
        D, I = idx.search(Q, depth, allowed)
        if not spec.vector_reranks:
            return D, I
        X = self._global_vectors(idx, spec)
        for r in spec.vector_reranks:
            name, n = rerank_name(r)
            if name in ("aqe", "alphaqe"):
                n = n or AQE_N
                Qe = query_expand(Q, X, I, n) if name == "aqe" else alpha_qe(Q, gather(X, I[:, :n]), n=n)
                D, I = idx.search(Qe, depth, allowed)
            elif name == "diffusion":
                D, I = diffusion_reorder(Q, X, D, I, m=n or DIFFUSION_M)
        return D, I

    def _rank_regional(self, qs: Sequence[QueryDescriptors], spec: MethodSpec, depth: int | None,
                       allowed: np.ndarray | None, idx: LoadedIndex) -> tuple[np.ndarray, np.ndarray]:
        items = []
        for q in qs:
            parts = [q.regions["full"]] if "full" in q.regions else []
            if spec.query_regions and spec.base != "full" and spec.base in q.regions:
                parts.append(q.regions[spec.base])
            items.append(np.concatenate(parts) if parts else np.zeros((0, idx.dim), np.float32))
        return idx.search_regional(items, depth, allowed)

    def _rank_asmk(self, qs: Sequence[QueryDescriptors], spec: MethodSpec, depth: int | None,
                   allowed: np.ndarray | None) -> list[Ranking]:
        if any(q.local_desc is None for q in qs):
            raise UserError("this run has no local features: ASMK methods need extract.local_features > 0")
        a = self.asmk(spec.base)
        keep = None if allowed is None else set(str(i) for i in allowed)
        out = []
        for scores, ids in a.search([q.local_desc for q in qs], top_k=None):
            names = a.image_ids[ids].astype(str) if len(ids) else np.zeros(0, str)
            ok = np.ones(len(names), bool) if keep is None else np.array([n in keep for n in names], bool)
            n = int(ok.sum()) if depth is None else min(int(depth), int(ok.sum()))
            out.append(Ranking(list(names[ok][:n]), scores[ok][:n]))
        return out

    def rank(self, qs: Sequence[QueryDescriptors], method: str | MethodSpec, depth: int | None = None,
             allowed: Sequence[str] | np.ndarray | None = None, index: LoadedIndex | None = None) -> list[Ranking]:
        """Rankings of a batch of encoded queries (``depth=None``: every allowed image), best first.

        ``allowed`` restricts the database to those image ids; ``index`` replaces the published index of a
        global or regional method (e.g. one :meth:`LoadedIndex.extended` with synthetic distractors)."""
        spec = self.spec(method)
        if spec.vector_reranks and spec.family != "global":
            raise UserError(f"{spec.name}: re-rankings {spec.vector_reranks} apply to global methods only")
        allowed_arr = None if allowed is None else np.asarray(list(allowed), dtype=str)
        if spec.family == "asmk":
            return self._list_rerank(qs, spec, self._rank_asmk(qs, spec, depth, allowed_arr), allowed_arr)
        idx = index or self.index(spec)
        extras: list[dict[str, Any]] = [{} for _ in qs]
        if spec.family == "regional":
            D, I = self._rank_regional(qs, spec, depth, allowed_arr, idx)
        elif spec.family == "patches":
            D, I, extras = self.patch_search().rank(qs, idx, spec.k, depth, allowed_arr)
        else:
            Q = np.stack([self._query_vector(q, spec) for q in qs])
            D, I = self._rank_global(Q, spec, depth, allowed_arr, idx)
        ids = idx.image_ids
        out = []
        for d, i, extra in zip(D, I, extras):
            ok = i >= 0
            out.append(Ranking([str(x) for x in ids[i[ok]]], np.asarray(d[ok], np.float32), extra))
        return self._list_rerank(qs, spec, out, allowed_arr)

    def _list_rerank(self, qs: Sequence[QueryDescriptors], spec: MethodSpec, rankings: list[Ranking],
                     allowed: np.ndarray | None) -> list[Ranking]:
        """The registered re-rankings of ranked lists (``+sv`` ...), in the order the method names them."""
        for r in spec.list_reranks:
            name, n = rerank_name(r)
            rankings = LIST_RERANKERS[name](self, qs, rankings, n, allowed)
        return rankings

    @staticmethod
    def _query_vector(q: QueryDescriptors, spec: MethodSpec) -> np.ndarray:
        if spec.base not in q.globals:
            raise UserError(f"method {spec.base!r} not available for this query; built: {sorted(q.globals)}")
        return np.asarray(q.globals[spec.base], np.float32)

    def search(self, image: bytes | Image.Image, bbox: Iterable[float] | None = None, method: str = "gem",
               top_k: int = 10) -> tuple[list[SearchResult], QueryDescriptors]:
        """Ranked database images for one query image (optionally cropped to ``bbox``)."""
        spec = self.spec(method)
        q = self.encode(image, bbox, patches=spec.family == "patches")
        deeper = [rerank_name(r)[1] or (DIFFUSION_M if rerank_name(r)[0] == "diffusion" else 0) for r in spec.reranks]
        r = self.rank([q], spec, depth=max([top_k, *deeper]))[0]
        return [SearchResult(i, float(s), k) for k, (i, s) in enumerate(zip(r.image_ids[:top_k], r.scores[:top_k]))], q


__all__ = ["SearchService", "SearchResult", "Ranking", "MethodSpec", "parse_method", "REGIONAL_SOURCES", "RERANKS",
           "PATCHES", "LIST_RERANKERS", "register_reranker", "known_reranks"]
