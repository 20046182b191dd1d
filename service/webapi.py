"""The results browser's search logic, without HTTP: request parsing, the image catalogue, and the JSON answer.

:class:`BrowserSearch` answers one request (an uploaded query, or a database image by its id, a box, a method
with its re-rankings, ``top_k``) through :class:`service.search.SearchService` and explains every result:

* ``boxes``: the database image's region (``fs_egm`` / ``os_egm`` / ``grid``) that best matches the query's
  regions (D2R max over (query item, database region), seed 002 eq. 3): the matched region of a regional
  method, the likely object of a global one. Regions are re-read from the ``regions`` table and whitened with
  the run's own regional whitening, exactly as the faiss stage whitens its regional items;
* ``matches``: verified point pairs ``[xq, yq, xd, yd]`` when the ranking carries them
  (``Ranking.extra["matches"]``, written by spatial verification, a ``+sv`` re-ranking);
* the query's saliency maps (FS, seed 002; OS, seed 001) as small grids and its own regions, in the query
  image's pixels (the maps cover the box when one was given).

Images are addressed only by their id in the run's ``images`` table (:class:`ImageCatalog`); a client string is
never joined into a path: an id that does not match the id grammar is refused (400) before any lookup, an
unknown one is refused (404), and the bytes are read from the table's URI only.
"""
from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from service.encoder import QueryDescriptors, parse_bbox
from service.errors import NotFound, UserError
from service.search import MethodSpec, Ranking, SearchService
from storage.images import DEFAULT_MAX_PIXELS, decode_image
from storage.readers import available_sources, read_regions
from storage.tables import TableStore
from storage.uri import read_bytes

# an image id: "/"-separated segments of word characters and a few punctuation marks; no segment starts with
# a dot (so no "." / ".." / hidden names), no empty segment, no leading "/", no backslash, "%", ":" or "~"
_SEGMENT = r"[\w\-+=@,()\[\] ][\w\-+=@,.()\[\] ]*"
IMAGE_ID_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
MAX_IMAGE_ID = 512
MAX_TOP_K = 100
MAX_MATCHES = 500            # point pairs sent per result (the page draws lines; more is clutter)
BOX_SOURCES = ("os_egm", "fs_egm", "grid")  # shown for global methods, first available


def check_image_id(text: str) -> str:
    """``text`` if it is a well-formed image id, else :class:`UserError` (400)."""
    if not isinstance(text, str) or not text or len(text) > MAX_IMAGE_ID or not IMAGE_ID_RE.fullmatch(text):
        raise UserError(f"malformed image id {str(text)[:80]!r}")
    return text


class ImageCatalog:
    """The run's ``images`` table in memory: image id -> (URI, original width, height)."""

    def __init__(self, uris: Mapping[str, str], sizes: Mapping[str, tuple[int, int]]) -> None:
        self._uris = dict(uris)
        self._sizes = dict(sizes)
        self._sorted = sorted(self._uris)

    @classmethod
    def load(cls, root: str) -> "ImageCatalog":
        t = TableStore(root).read("images", ["extract"], columns=["image_id", "uri", "width", "height"])
        ids = [str(i) for i in t.column("image_id").to_pylist()]
        sizes = zip(t.column("width").to_pylist(), t.column("height").to_pylist())
        return cls(dict(zip(ids, t.column("uri").to_pylist())),
                   {i: (int(w or 0), int(h or 0)) for i, (w, h) in zip(ids, sizes)})

    def __len__(self) -> int:
        return len(self._uris)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._uris

    def uri(self, image_id: str) -> str:
        """The table's URI of a valid, known id (400 for a malformed id, 404 for an unknown one)."""
        check_image_id(image_id)
        uri = self._uris.get(image_id)
        if uri is None:
            raise NotFound(f"no image {image_id!r} in this index")
        return uri

    def size(self, image_id: str) -> tuple[int, int]:
        return self._sizes.get(image_id, (0, 0))

    def find(self, text: str = "", limit: int = 50) -> list[str]:
        """Ids containing ``text`` (case-insensitive), sorted, at most ``limit``."""
        t = text.lower()
        return [i for i in self._sorted if t in i.lower()][: max(0, limit)]


@dataclass(frozen=True)
class SearchRequest:
    """One search: the query (uploaded bytes or a database image id), its box, method and ranking depth."""

    method: str
    top_k: int = 10
    bbox: tuple[float, float, float, float] | None = None
    image_id: str | None = None
    data: bytes | None = None


def parse_request(fields: Mapping[str, Any], data: bytes | None = None, max_top_k: int = MAX_TOP_K
                  ) -> SearchRequest:
    """A :class:`SearchRequest` from form or JSON fields: ``method`` (default ``gem``), ``rerank`` (a list, or
    names joined by ``+`` / ``,``), ``bbox`` (``"x0,y0,x1,y1"`` or four numbers), ``top_k``, ``image_id``."""
    method = str(fields.get("method") or "gem").strip()
    reranks = fields.get("rerank") or []
    if isinstance(reranks, str):
        reranks = [reranks]
    if not isinstance(reranks, (list, tuple)):
        raise UserError("rerank must be a name or a list of names")
    extra = [p.strip() for r in reranks for p in re.split(r"[+,]", str(r)) if p.strip()]
    try:
        top_k = int(fields["top_k"]) if fields.get("top_k") not in (None, "") else 10
    except (TypeError, ValueError):
        raise UserError(f"top_k must be an integer, got {fields.get('top_k')!r}") from None
    if not 1 <= top_k <= max_top_k:
        raise UserError(f"top_k must be between 1 and {max_top_k}")
    bbox = fields.get("bbox")
    bbox = parse_bbox(bbox) if bbox not in (None, "", []) else None
    image_id = fields.get("image_id") or None
    if image_id is not None:
        image_id = check_image_id(str(image_id))
    if (image_id is None) == (data is None):
        raise UserError("give exactly one query: an uploaded file or an image_id")
    return SearchRequest("+".join([method, *extra]), top_k, bbox, image_id, data)


def crop_extent(size: tuple[int, int], bbox: Iterable[float] | None) -> tuple[int, int, int, int]:
    """The pixel rectangle :func:`service.encoder.crop` keeps of an image of ``size`` (the whole image without
    a box); :class:`UserError` when the box lies outside the image."""
    w, h = size
    if bbox is None:
        return 0, 0, w, h
    x0, y0, x1, y1 = (float(v) for v in bbox)
    x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    x1, y1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"the box {tuple(bbox)} lies outside the {w}x{h} query image")
    return x0, y0, x1, y1


def box_source(spec: MethodSpec, available: Iterable[str]) -> str | None:
    """Which stored regions explain a result: the regional method's own source, an EGM method's source, else the
    first of :data:`BOX_SOURCES` the run has."""
    have = set(available)
    if spec.family == "regional" and spec.base in have:
        return spec.base
    if spec.base in have and spec.base in BOX_SOURCES:
        return spec.base
    return next((s for s in BOX_SOURCES if s in have), None)


def query_items(q: QueryDescriptors, source: str) -> np.ndarray | None:
    """The query's regional items for matching ``source`` regions: its full view and its own ``source`` regions."""
    parts = [q.regions[k] for k in dict.fromkeys(("full", source)) if k in q.regions and len(q.regions[k])]
    return np.concatenate(parts).astype(np.float32) if parts else None


def best_boxes(items: np.ndarray, regions: Mapping[str, tuple[np.ndarray, np.ndarray]], image_ids: Sequence[str]
               ) -> dict[str, tuple[list[float], float]]:
    """Per image: the box of its region with the highest inner product with any query item, and that score."""
    out = {}
    for i in image_ids:
        boxes, X = regions.get(i, (np.zeros((0, 4)), np.zeros((0, 0))))
        if not len(boxes):
            continue
        d = min(items.shape[1], X.shape[1])
        s = (X[:, :d] @ items[:, :d].T).max(axis=1)
        j = int(np.argmax(s))
        out[i] = ([round(float(v), 1) for v in boxes[j]], float(s[j]))
    return out


def result_matches(r: Ranking, origin: tuple[int, int]) -> dict[str, list[list[float]]]:
    """``Ranking.extra["matches"]`` (a dict by image id, or a list aligned with ``image_ids``) as lists of
    ``[xq, yq, xd, yd]``, the query's points moved from the encoded (cropped) query to the full query image."""
    m = (r.extra or {}).get("matches")
    if m is None:
        return {}
    pairs = m.items() if isinstance(m, Mapping) else zip(r.image_ids, m)
    out = {}
    for image_id, v in pairs:
        if v is None:
            continue
        a = np.asarray(v, np.float64).reshape(-1, 4)[:MAX_MATCHES] + [origin[0], origin[1], 0, 0]
        out[str(image_id)] = np.round(a, 1).tolist()
    return out


def _grid(m: np.ndarray | None) -> list[list[float]] | None:
    if m is None:
        return None
    a = np.nan_to_num(np.asarray(m, np.float32))
    return np.round(a.astype(np.float64) / max(float(a.max()), 1e-12), 3).tolist()


class LRU(OrderedDict):
    """A small least-recently-used cache (not thread-safe: callers hold a lock)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_(self, key: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        if self.size <= 0:
            return
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class BrowserSearch:
    """Answers :class:`SearchRequest` s with one shared :class:`SearchService` (thread-safe: the caches take a
    lock; encoding and ranking only read the loaded model and indexes)."""

    def __init__(self, service: SearchService, catalog: ImageCatalog, max_pixels: int = DEFAULT_MAX_PIXELS,
                 query_cache: int = 16, region_cache: int = 4096) -> None:
        self.service = service
        self.catalog = catalog
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._queries = LRU(query_cache)    # (sha1 of the bytes, bbox) -> (QueryDescriptors, image size)
        self._regions = LRU(region_cache)   # (source, image id) -> (pixel boxes, whitened descriptors)
        self.sources = self._sources()

    def _sources(self) -> set[str]:
        try:
            return available_sources(self.service.root)
        except (OSError, ValueError, KeyError):
            return set()

    def preload(self) -> None:
        """Open every published index now (the first searches then pay no loading, and no two threads load one)."""
        for m in self.service.available_methods():
            spec = self.service.spec(m)
            if spec.family == "asmk":
                self.service.asmk(spec.base)
                continue
            idx = self.service.index(spec)
            if idx.exact:  # the vectors QE / diffusion / regional scoring read, gathered once
                idx.vectors()

    # ------------------------------------------------------------------ the query
    def query_bytes(self, req: SearchRequest) -> bytes:
        if req.image_id is not None:
            return read_bytes(self.catalog.uri(req.image_id))
        return req.data or b""

    def encode(self, data: bytes, bbox: tuple[float, ...] | None) -> tuple[QueryDescriptors, tuple[int, int], bool]:
        """(descriptors, query image size, from the cache) of the query bytes cropped to ``bbox``."""
        key = (hashlib.sha1(data).hexdigest(), bbox)
        with self._lock:
            hit = self._queries.get_(key)
        if hit is not None:
            return hit[0], hit[1], True
        img = decode_image(data, max_pixels=self.max_pixels)
        crop_extent(img.size, bbox)  # a box outside the image fails before the network runs
        q = self.service.encode(img, bbox)
        with self._lock:
            self._queries.put(key, (q, img.size))
        return q, img.size, False

    # ------------------------------------------------------------------ explaining results
    def _region_rows(self, source: str, image_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        with self._lock:
            have = {i: self._regions.get_((source, i)) for i in image_ids}
        missing = [i for i, v in have.items() if v is None]
        if missing:
            rid, boxes, X = read_regions(self.service.root, source, missing)
            Xw = np.asarray(self.service.encoder.whitenings["regions"].apply(X), np.float32) if len(rid) else X
            rid = np.asarray(rid, dtype=object)
            for i in missing:
                m = rid == i
                have[i] = (boxes[m], Xw[m])
            with self._lock:
                for i in missing:
                    self._regions.put((source, i), have[i])
        return have

    def explain(self, q: QueryDescriptors, spec: MethodSpec, image_ids: Sequence[str]
                ) -> tuple[str | None, dict[str, tuple[list[float], float]]]:
        source = box_source(spec, self.sources)
        items = query_items(q, source) if source else None
        if source is None or items is None or not image_ids:
            return source, {}
        return source, best_boxes(items, self._region_rows(source, image_ids), image_ids)

    # ------------------------------------------------------------------ the answer
    def run(self, req: SearchRequest) -> dict[str, Any]:
        """The JSON answer of one search (see the module docstring)."""
        t0 = time.perf_counter()
        spec = self.service.spec(req.method)  # an unknown method fails before the image is read
        q, size, cached = self.encode(self.query_bytes(req), req.bbox)
        t1 = time.perf_counter()
        ranking = self.service.search_ranking(q, spec, req.top_k)
        ids = ranking.image_ids[: req.top_k]
        t2 = time.perf_counter()
        x0, y0, x1, y1 = crop_extent(size, req.bbox)
        source, boxes = self.explain(q, spec, ids)
        matches = result_matches(ranking, (x0, y0))
        results = []
        for k, (i, s) in enumerate(zip(ids, ranking.scores[: req.top_k])):
            w, h = self.catalog.size(i)
            res = {"rank": k + 1, "image_id": i, "score": round(float(s), 5) if np.isfinite(s) else None,
                   "width": w, "height": h, "boxes": [boxes[i][0]] if i in boxes else [],
                   "box_score": round(boxes[i][1], 4) if i in boxes else None}
            if i in matches:
                res["matches"] = matches[i]
            results.append(res)
        offset = np.array([x0, y0, x0, y0], np.float64)
        regions = {s: np.round(np.asarray(b, np.float64).reshape(-1, 4) + offset, 1).tolist()
                   for s, b in q.boxes.items() if s != "full"}
        t3 = time.perf_counter()
        return {
            "method": spec.name, "top_k": req.top_k, "box_source": source,
            "query": {"image_id": req.image_id, "width": size[0], "height": size[1],
                      "bbox": list(req.bbox) if req.bbox else None, "extent": [x0, y0, x1, y1],
                      "saliency": {"fs": _grid(q.fs_map), "os": _grid(q.os_map)}, "regions": regions},
            "results": results,
            "timing": {"encode_s": round(t1 - t0, 4), "rank_s": round(t2 - t1, 4), "explain_s": round(t3 - t2, 4),
                       "cached_query": cached},
        }


def thumbnail_jpeg(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A JPEG of the image with its longest side at most ``size`` (decoded with the pipeline's guards)."""
    img = decode_image(data, max_pixels=max_pixels, max_side=size)
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


__all__ = ["BrowserSearch", "LRU", "ImageCatalog", "SearchRequest", "parse_request", "check_image_id", "crop_extent",
           "box_source", "best_boxes", "result_matches", "thumbnail_jpeg", "IMAGE_ID_RE", "MAX_TOP_K"]
