"""The search service: one ranking path for ``jobs.search``, the results browser and the benchmark.

Method names (``--method``):

* a global method (``gem``, ``rmac``, ``os_egm`` ...): the ``global_<method>`` index;
* ``regional:<source>`` (``fs_egm``, ``os_egm``, ``grid``): D2R regional search (seed 002 eq. 3) over the
  ``regional_<source>`` index, whose items are every image's full view and its ``<source>`` regions; the
  query's items are its full view and its own ``<source>`` regions, an image scores the max over (query item,
  database item). ``regional:<source>@full`` uses the query's full view only (the paper's asymmetric case);
* an ASMK kernel (``asmk_star``, ``d2r_asmk_star``, ``r_asmk_star`` ...): the ``asmk_<kernel>`` inverted file;
* followed by re-rankings, applied in order: ``+aqe[:n]`` (average QE over the top n, default 10, seed 003),
  ``+alphaqe[:n]`` (alpha-QE), ``+diffusion`` (seed 001's diffusion as published: the query's k nearest
  neighbours seed CG on the offline graph ``diffusion_<method>`` of the whole database), ``+local_diffusion[:m]``
  (a diffusion re-ranking of the top m results only, default 100, on a graph built among them at query time),
  ``+cam[:R]`` (seed 004's CAM-box re-ranking: the top R, default 1000, re-ordered by each image's best-matching
  CAM box, from the ``regional_cam`` index).

Rankings can be restricted to a subset of the database (``allowed``): the benchmark evaluates each track on
its own database this way, through the same code users run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from pipeline.asmk import KERNEL_CONFIGS
from pipeline.cam_aggregation import cam_rerank
from pipeline.descriptors import FINAL_METHODS
from pipeline.diffusion import diffuse_query
from pipeline.query_expansion import alpha_qe, gather
from pipeline.ranking import AQE_N, DIFFUSION_M, diffusion_reorder, query_expand
from service.encoder import QueryDescriptors, QueryEncoder
from service.errors import UserError
from service.indexes import LoadedASMK, LoadedDiffusion, LoadedIndex, open_asmk, open_diffusion, open_index
from storage.images import decode_image
from storage.readers import read_globals
from storage.snapshot import list_names
from storage.snapshot_pins import PinnedSnapshot, open_pinned_set
from storage.uri import StorageError, redact

log = logging.getLogger("indexer")

REGIONAL_SOURCES = ("fs_egm", "os_egm", "grid", "cam")
RERANKS = ("aqe", "alphaqe", "diffusion", "local_diffusion", "cam")
CAM_RERANK_TOP = 1000   # seed 004 Table 2b: R = 1000


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
    family: str                 # "global" | "regional" | "asmk"
    base: str                   # global method, region source or ASMK kernel
    reranks: tuple[str, ...] = ()
    query_regions: bool = True  # regional: the query's regions are items too (False: "@full")

    @property
    def index_name(self) -> str:
        return {"global": f"global_{self.base}", "regional": f"regional_{self.base}",
                "asmk": f"asmk_{self.base}"}[self.family]


def method_names_help() -> str:
    return (f"globals {list(FINAL_METHODS)}, 'regional:<{'|'.join(REGIONAL_SOURCES)}>[@full]', ASMK kernels "
            f"{sorted(KERNEL_CONFIGS)}, each optionally followed by re-rankings {['+' + r for r in RERANKS]}")


def rerank_name(text: str) -> tuple[str, int | None]:
    """``"aqe:3"`` -> ``("aqe", 3)``; ``"aqe"`` -> ``("aqe", None)``."""
    name, _, arg = text.partition(":")
    if arg and not arg.isdigit():
        raise UserError(f"re-ranking {text!r}: the value after ':' must be a positive integer")
    return name, (int(arg) if arg else None)


def parse_method(name: str) -> MethodSpec:
    """Parse ``gem``, ``gem+aqe``, ``os_egm+diffusion``, ``regional:fs_egm@full``, ``asmk_star`` ...."""
    base, *reranks = [p.strip() for p in name.strip().split("+")]
    bad = [r for r in reranks if rerank_name(r)[0] not in RERANKS]
    if bad:
        raise UserError(f"unknown re-ranking {'+'.join(bad)!r} in {name!r}; available: {list(RERANKS)}")
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
                 indexes: dict[str, LoadedIndex] | None = None, query_egm: str = "box",
                 diffusion: dict[str, LoadedDiffusion] | None = None) -> None:
        self.root = root
        self.encoder = encoder if encoder is not None else QueryEncoder(root, device=device, query_egm=query_egm)
        self._indexes: dict[str, LoadedIndex] = dict(indexes or {})
        self._asmk: dict[str, LoadedASMK] = {}
        self._diffusion: dict[str, LoadedDiffusion] = dict(diffusion or {})
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
            out.append({"global": base, "regional": f"regional:{base}", "asmk": base}.get(kind, name))
        return out

    def index(self, spec: MethodSpec) -> LoadedIndex:
        if spec.index_name not in self._indexes:
            self._indexes[spec.index_name] = open_index(self.root, spec.index_name, self._snapshot(spec.index_name))
        return self._indexes[spec.index_name]

    def asmk(self, kernel: str) -> LoadedASMK:
        if kernel not in self._asmk:
            self._asmk[kernel] = open_asmk(self.root, kernel, self._snapshot(f"asmk_{kernel}"))
        return self._asmk[kernel]

    def spec(self, method: str | MethodSpec) -> MethodSpec:
        """Parse ``method`` and check that this run has its index (the error lists what it has)."""
        spec = parse_method(method) if isinstance(method, str) else method
        have = self.available_methods()
        base = spec.base if spec.family != "regional" else f"regional:{spec.base}"
        if base not in have:
            raise UserError(f"method {spec.name!r} is not available in this index; available: {sorted(have)}")
        return spec

    # ------------------------------------------------------------------ encoding
    def encode(self, image: bytes | Image.Image, bbox: Iterable[float] | None = None) -> QueryDescriptors:
        """Decode (with the pipeline's bomb/corrupt guards) and encode a query, cropped to ``bbox``."""
        img = decode_image(image) if isinstance(image, (bytes, bytearray)) else image
        return self.encoder.encode(img, bbox)

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
        if not spec.reranks:
            return D, I
        X = self._global_vectors(idx, spec)
        for r in spec.reranks:
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
        if spec.reranks:
            raise UserError(f"{spec.name}: re-rankings {list(spec.reranks)} apply to global methods only")
        items = []
        for q in qs:
            parts = [q.regions["full"]] if "full" in q.regions else []
            if spec.query_regions and spec.base != "full" and spec.base in q.regions:
                parts.append(q.regions[spec.base])
            items.append(np.concatenate(parts) if parts else np.zeros((0, idx.dim), np.float32))
        return idx.search_regional(items, depth, allowed)

    def _rank_asmk(self, qs: Sequence[QueryDescriptors], spec: MethodSpec, depth: int | None,
                   allowed: np.ndarray | None) -> list[Ranking]:
        if spec.reranks:
            raise UserError(f"{spec.name}: re-rankings {list(spec.reranks)} apply to global methods only")
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
        allowed_arr = None if allowed is None else np.asarray(list(allowed), dtype=str)
        if spec.family == "asmk":
            return self._rank_asmk(qs, spec, depth, allowed_arr)
        idx = index or self.index(spec)
        if spec.family == "regional":
            D, I = self._rank_regional(qs, spec, depth, allowed_arr, idx)
        else:
            Q = np.stack([self._query_vector(q, spec) for q in qs])
            D, I = self._rank_global(qs, Q, spec, depth, allowed_arr, idx)
        ids = idx.image_ids
        out = []
        for d, i in zip(D, I):
            ok = i >= 0
            out.append(Ranking([str(x) for x in ids[i[ok]]], np.asarray(d[ok], np.float32)))
        return out

    @staticmethod
    def _query_vector(q: QueryDescriptors, spec: MethodSpec) -> np.ndarray:
        if spec.base not in q.globals:
            raise UserError(f"method {spec.base!r} not available for this query; built: {sorted(q.globals)}")
        return np.asarray(q.globals[spec.base], np.float32)

    @staticmethod
    def depth_for(spec: MethodSpec, top_k: int) -> int:
        """How deep to rank for ``top_k`` results: re-rankings that reorder the top m need m results."""
        deep = [rerank_name(r)[1] or DIFFUSION_M for r in spec.reranks if rerank_name(r)[0] == "local_diffusion"]
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
        q = self.encode(image, bbox)
        r = self.search_ranking(q, spec, top_k)
        return [SearchResult(i, float(s), k) for k, (i, s) in enumerate(zip(r.image_ids, r.scores))], q


__all__ = ["SearchService", "SearchResult", "Ranking", "MethodSpec", "parse_method", "REGIONAL_SOURCES", "RERANKS"]
