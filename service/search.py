"""The search service: one ranking path for ``jobs.search``, the results browser and the benchmark.

Method names (``--method``):

* a global method (``gem``, ``rmac``, ``os_egm`` ...): the ``global_<method>`` index;
* ``regional:<source>`` (``fs_egm``, ``os_egm``, ``grid``, ``rpn``): D2R regional search (seed 002 eq. 3) over the
  ``regional_<source>`` index, whose items are every image's full view and its ``<source>`` regions; the
  query's items are its full view and its own ``<source>`` regions, an image scores the max over (query item,
  database item). ``regional:<source>@full`` uses the query's full view only (the paper's asymmetric case);
* an ASMK kernel (``asmk_star``, ``d2r_asmk_star``, ``r_asmk_star`` ...): the ``asmk_<kernel>`` inverted file;
* ``patches[:k]`` (seed 000): a trained region scorer picks ``k`` (default 5) diverse query patches, which vote
  with the full query image over the ``regional_<source>`` index (:mod:`service.patches`);
* followed by re-rankings, applied in order: ``+aqe[:n]`` (average QE over the top n, default 10, seed 003),
  ``+alphaqe[:n]`` (alpha-QE), ``+diffusion`` (seed 001's diffusion as published: the query's k nearest
  neighbours seed CG on the offline graph ``diffusion_<method>`` of the whole database), ``+local_diffusion[:m]``
  (a diffusion re-ranking of the top m results only, default 100, on a graph built among them at query time),
  ``+cam[:R]`` (seed 004's CAM-box re-ranking: the top R, default 1000, re-ordered by each image's best-matching
  CAM box, from the ``regional_cam`` index) for global methods, then any re-ranking of a ranked list
  registered with :func:`register_reranker` (e.g. spatial verification ``+sv[:n]``), for every family.

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
from pipeline.cam_aggregation import cam_rerank
from pipeline.descriptors import FINAL_METHODS
from pipeline.diffusion import diffuse_query
from pipeline.query_expansion import alpha_qe, gather
from pipeline.query_patches import PatchSearchConfig
from pipeline.verification import VerifyConfig
from pipeline.ranking import AQE_N, DIFFUSION_M, diffusion_reorder, query_expand
from service.encoder import QueryDescriptors, QueryEncoder
from service.errors import UserError
from service.indexes import LoadedASMK, LoadedDiffusion, LoadedIndex, open_asmk, open_diffusion, open_index, \
    open_itq
from service.patches import PatchSearch
from service.verify import SpatialVerifier, sv_rerank
from storage.images import decode_image
from storage.readers import read_globals
from storage.layout import SnapshotFiles
from storage.query_scorer import resolve_location
from storage.snapshot import list_names
from storage.snapshot_pins import PinnedSnapshot, open_pinned_set
from storage.uri import StorageError, redact

log = logging.getLogger("indexer")

REGIONAL_SOURCES = ("fs_egm", "os_egm", "grid", "cam", "rpn")   # rpn: regions.source: rpn (issue 17)
RERANKS = ("aqe", "alphaqe", "diffusion", "local_diffusion", "cam")   # re-rankings of global methods
CAM_RERANK_TOP = 1000   # seed 004 Table 2b: R = 1000
PATCHES = "patches"

# re-rankings of any ranked list: name -> fn(service, queries, rankings, n or None, allowed ids or None) -> rankings
ListReranker = Callable[["SearchService", Sequence[QueryDescriptors], list["Ranking"], "int | None",
                         "np.ndarray | None"], list["Ranking"]]
LIST_RERANKERS: dict[str, ListReranker] = {}
LIST_RERANK_DEPTH: dict[str, int] = {}   # how many results a list re-ranking reads by default (sv: its shortlist)


def register_reranker(name: str, fn: ListReranker, default_depth: int = 0) -> None:
    """Make ``+<name>[:n]`` a re-ranking of every method family (e.g. spatial verification ``+sv``): ``fn``
    re-orders each query's ranked list; it runs after the family's own ranking and global re-rankings, and reads
    the top ``n`` (default ``default_depth``) results."""
    if name in RERANKS or not name.isidentifier():
        raise ValueError(f"bad re-ranking name {name!r}")
    LIST_RERANKERS[name] = fn
    LIST_RERANK_DEPTH[name] = int(default_depth)


register_reranker("sv", sv_rerank, VerifyConfig().shortlist)   # spatial verification (service.verify)


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


def is_sv(name: str) -> bool:
    """Whether a method name ends with the spatial verification re-ranking (``...+sv`` / ``...+sv:K``)."""
    return rerank_name(name.rsplit("+", 1)[-1])[0] == "sv" if "+" in name else False


def sv_base(name: str) -> str:
    """The method a ``+sv`` method verifies the shortlist of (``gem+aqe+sv:50`` -> ``gem+aqe``)."""
    return name.rsplit("+", 1)[0] if is_sv(name) else name


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
    matches: np.ndarray | None = None   # (n, 4) verified matches [xq, yq, xd, yd] (query crop / database pixels)


class SearchService:
    """Loads an index run once and answers image queries with any method the run published."""

    def __init__(self, root: str, device: str | None = None, encoder: QueryEncoder | None = None,
                 indexes: dict[str, LoadedIndex] | None = None, query_egm: str = "box",
                 diffusion: dict[str, LoadedDiffusion] | None = None, scorer: str | None = None,
                 patches: PatchSearchConfig | None = None) -> None:
        """``scorer``: folder of a trained query-region scorer for ``patches`` (default: the run's own artefact);
        ``patches``: query-time patch parameters replacing those the scorer was trained with; ``query_egm``: the
        FS/OS.EGM regions of a query given with a box (:class:`service.encoder.QueryEncoder`)."""
        self.root = root
        self.encoder = encoder if encoder is not None else QueryEncoder(root, device=device, query_egm=query_egm)
        self._indexes: dict[str, LoadedIndex] = dict(indexes or {})
        self._asmk: dict[str, LoadedASMK] = {}
        self._diffusion: dict[str, LoadedDiffusion] = dict(diffusion or {})
        self._scorer_uri, self._patch_cfg = scorer or root, patches
        self._patches: PatchSearch | None = None
        self._verifier: SpatialVerifier | None = None
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
            if kind not in ("itq", "diffusion"):  # a regional index's prefilter / a method's +diffusion graph
                out.append({"global": base, "regional": f"regional:{base}", "asmk": base}.get(kind, name))
        if self._patches is not None or resolve_location(self._scorer_uri) is not None:
            out.append(PATCHES)
        return out

    def diffusion_methods(self) -> list[str]:
        """Global methods whose offline diffusion graph (``diffusion_<method>``, for ``+diffusion``) is published."""
        return sorted(n.partition("_")[2] for n in list_names(self.root) if n.startswith("diffusion_"))

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

    def verifier(self) -> SpatialVerifier:
        """Spatial verification of this run (``+sv``; its keypoints table and ``verify`` config), made once."""
        if self._verifier is None:
            self._verifier = SpatialVerifier(self.root, self.encoder)
        return self._verifier

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
               patches: bool = False, keypoints: bool = False) -> QueryDescriptors:
        """Decode (with the pipeline's bomb/corrupt guards) and encode a query, cropped to ``bbox``; with
        ``patches``, also its patches as the scorer's config proposes them (for ``patches[:k]``); with
        ``keypoints``, also its keypoints (``+sv`` otherwise extracts them when it first needs them)."""
        img = decode_image(image) if isinstance(image, (bytes, bytearray)) else image
        return self.encoder.encode(img, bbox, self.patch_search().cfg.proposals if patches else None, keypoints)

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

    def _rank_global(self, qs: Sequence[QueryDescriptors], Q: np.ndarray, spec: MethodSpec, depth: int | None,
                     allowed: np.ndarray | None, idx: LoadedIndex) -> tuple[np.ndarray, np.ndarray]:
        Q = np.ascontiguousarray(Q[:, : idx.dim], np.float32)
        D, I = idx.search(Q, depth, allowed)
        if not spec.vector_reranks:
            return D, I
        X = self._global_vectors(idx, spec)
        for r in spec.vector_reranks:
            name, n = rerank_name(r)
            if name in ("aqe", "alphaqe"):
                n = n or AQE_N
                Q = query_expand(Q, X, I, n) if name == "aqe" else alpha_qe(Q, gather(X, I[:, :n]), n=n)
                D, I = idx.search(Q, depth, allowed)
            elif name == "diffusion":
                D, I = self._diffuse(Q, spec, idx, depth, allowed)
            elif name == "local_diffusion":
                D, I = diffusion_reorder(Q, X, D, I, m=n or DIFFUSION_M)
            elif name == "cam":
                D, I = self._cam_rerank(qs, idx, D, I, n or CAM_RERANK_TOP)
        return D, I

    def _cam_rerank(self, qs: Sequence[QueryDescriptors], idx: LoadedIndex, D: np.ndarray, I: np.ndarray,
                    top: int) -> tuple[np.ndarray, np.ndarray]:
        """Seed 004 §4.5: the top ``top`` results re-ordered by their best CAM box (boxes at 1/10/20/30/40 % of the
        top-2 CAM). Boxes are described like every stored region (whitened regional MAC, the ``regional_cam``
        index) and compared with the query's full view in that space -- the paper describes them with
        class-weighted vectors instead; we reuse the stored regions rather than recomputing CAMs at query time."""
        cam = self.index(parse_method("regional:cam"))
        X, img = cam.vectors(), np.asarray(cam.region_image)
        rows_of = {int(i): np.flatnonzero(img == i) for i in np.unique(img)}
        out_d, out_i = D.copy(), I.copy()
        for r, q in enumerate(qs):
            if "full" not in q.regions:
                raise UserError("+cam needs the run's full-image regions (extract.regions must include 'full')")
            ids = I[r][I[r] >= 0]
            cam_ids = cam.rows([str(x) for x in idx.image_ids[ids[:top]]])
            boxes = {int(i): X[rows_of.get(int(c), np.zeros(0, np.int64))] for i, c in zip(ids[:top], cam_ids)}
            new_ids, new_scores = cam_rerank(q.regions["full"][0, : cam.dim], ids, boxes, top, D[r][: len(ids)])
            out_i[r, : len(ids)], out_d[r, : len(ids)] = new_ids, new_scores
        return out_d, out_i

    def diffusion_graph(self, method: str) -> LoadedDiffusion:
        """The published offline diffusion graph of a global method (``diffusion_<method>``)."""
        if method not in self._diffusion:
            self._diffusion[method] = open_diffusion(self.root, method, self._snapshot(f"diffusion_{method}"))
        return self._diffusion[method]

    def _diffuse(self, Q: np.ndarray, spec: MethodSpec, idx: LoadedIndex, depth: int | None,
                 allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Seed 001's diffusion: y from each query's kq nearest database images, CG on (I - alpha S) f = y over the
        whole database's graph, then the images ranked by f (restricted to ``allowed``)."""
        g = self.diffusion_graph(spec.base)
        to_vertex = g.vertices_of(idx.image_ids)               # index int id -> graph vertex
        to_index = idx.rows(g.image_ids)                        # graph vertex -> index int id
        sims, ids = idx.search(Q, g.params.kq)
        mask = idx.allowed_mask(allowed)
        n_ok = len(idx.image_ids) if mask is None else int(mask.sum())
        k = n_ok if depth is None else min(int(depth), n_ok)
        out_d = np.full((len(Q), k), -np.inf, np.float32)
        out_i = np.full((len(Q), k), -1, np.int64)
        for r in range(len(Q)):
            vids = np.where(ids[r] >= 0, to_vertex[np.clip(ids[r], 0, None)], -1)
            f, _ = diffuse_query(g.graph, sims[r][None], vids[None], g.params)
            score = np.full(len(idx.image_ids), -np.inf)
            ok = to_index >= 0
            score[to_index[ok]] = f[ok]
            if mask is not None:
                score[~mask] = -np.inf
            top = np.lexsort((np.arange(len(score)), -score))[:k]
            top = top[np.isfinite(score[top])]
            out_d[r, :len(top)], out_i[r, :len(top)] = score[top], top
        return out_d, out_i

    def _rank_regional(self, qs: Sequence[QueryDescriptors], spec: MethodSpec, depth: int | None,
                       allowed: np.ndarray | None, idx: LoadedIndex) -> tuple[np.ndarray, np.ndarray]:
        items = []
        for q in qs:
            parts = [q.regions["full"]] if "full" in q.regions else []
            if spec.query_regions and spec.base != "full" and spec.base in q.regions:
                parts.append(q.regions[spec.base])
            items.append(np.concatenate(parts) if parts else np.zeros((0, idx.dim), np.float32))
        return idx.search_regional(items, depth, allowed)

    def _asmk_locals(self, q: QueryDescriptors) -> np.ndarray:
        """The query's local descriptors in the space the run's ASMK was built from (``asmk.locals``): its CNN
        locals, or its learned keypoints' descriptors (extracted as the run's query-side keypoint settings say)."""
        if self.encoder.cfg.asmk.locals != "cnn":
            return np.asarray(self.encoder.add_keypoints(q).kp_desc, np.float32)
        if q.local_desc is None:
            raise UserError("this run has no local features: ASMK methods need extract.local_features > 0")
        return q.local_desc

    def _rank_asmk(self, qs: Sequence[QueryDescriptors], spec: MethodSpec, depth: int | None,
                   allowed: np.ndarray | None) -> list[Ranking]:
        descs = [self._asmk_locals(q) for q in qs]
        a = self.asmk(spec.base)
        keep = None if allowed is None else set(str(i) for i in allowed)
        out = []
        for scores, ids in a.search(descs, top_k=None):
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
            D, I = self._rank_global(qs, Q, spec, depth, allowed_arr, idx)
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

    @staticmethod
    def depth_for(spec: MethodSpec, top_k: int) -> int:
        """How deep to rank for ``top_k`` results: re-rankings that reorder the top m need m results."""
        deep = []
        for r in spec.reranks:
            name, n = rerank_name(r)
            if name == "local_diffusion":
                deep.append(n or DIFFUSION_M)
            elif name in LIST_RERANKERS:
                deep.append(n or LIST_RERANK_DEPTH.get(name, 0))
        return max([top_k, *deep])

    def search_ranking(self, q: QueryDescriptors, method: str | MethodSpec, top_k: int = 10) -> Ranking:
        """The top ``top_k`` of one encoded query, with whatever the method attaches (boxes, matches)."""
        spec = self.spec(method)
        r = self.rank([q], spec, depth=self.depth_for(spec, top_k))[0]
        return Ranking(r.image_ids[:top_k], r.scores[:top_k], r.extra)

    def search(self, image: bytes | Image.Image, bbox: Iterable[float] | None = None, method: str = "gem",
               top_k: int = 10) -> tuple[list[SearchResult], QueryDescriptors]:
        """Ranked database images for one query image (optionally cropped to ``bbox``)."""
        spec = self.spec(method)
        q = self.encode(image, bbox, patches=spec.family == PATCHES)
        r = self.search_ranking(q, spec, top_k)
        matches = r.extra.get("matches") or {}
        return [SearchResult(i, float(s), k, matches.get(i)) for k, (i, s) in enumerate(zip(r.image_ids, r.scores))], q


__all__ = ["is_sv", "sv_base",
           "SearchService", "SearchResult", "Ranking", "MethodSpec", "parse_method", "REGIONAL_SOURCES", "RERANKS",
           "PATCHES", "LIST_RERANKERS", "register_reranker", "known_reranks"]
