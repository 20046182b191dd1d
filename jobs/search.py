"""Search an index run with a query image.

    python -m jobs.search --index <run uri> --query <image path/URI> [--bbox x0,y0,x1,y1] [--method NAME]
                          [--top-k K] [--qe none|avg|alpha] [--diffusion] [--html results.html]

``--method`` is a global method (``gem``, ``rmac``, ``fs_egm``, ``os_egm``, ...: the ``global_<method>``
snapshot), ``regional:<source>`` (``regional:fs_egm``: regions of the database max-pooled per image) or an
ASMK kernel (``asmk_star``, ``r_asmk_star``, ``d2r_asmk_star``...: the ``asmk_<kernel>`` snapshot). The
query goes through the run's own extraction (and object saliency against the stored region graph for OS
methods). The Python API is :class:`SearchService`.
"""
from __future__ import annotations

import argparse
import html
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from actors.asmk import KERNEL_CONFIGS, LoadedASMK, open_asmk
from actors.indexes import LoadedIndex, open_index
from actors.query import QueryDescriptors, QueryEncoder
from pipeline.query_expansion import alpha_qe, average_qe, diffusion_rerank
from storage.images import decode_image
from storage.uri import read_bytes


@dataclass
class SearchResult:
    image_id: str
    score: float
    rank: int


class SearchService:
    """Loads an index run once and answers image queries (global or regional, with optional QE/diffusion)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.encoder = QueryEncoder(root)
        self._indexes: dict[str, LoadedIndex] = {}
        self._asmk: dict[str, LoadedASMK] = {}

    def index(self, method: str) -> LoadedIndex:
        name = f"regional_{method.split(':', 1)[1]}" if method.startswith("regional:") else f"global_{method}"
        if name not in self._indexes:
            self._indexes[name] = open_index(self.root, name)
        return self._indexes[name]

    def _vectors(self, idx: LoadedIndex, method: str, image_ids: list[str]) -> np.ndarray:
        """Database descriptors of ``image_ids`` for QE/diffusion (from the descriptors table)."""
        ids, X = self.encoder.database_globals(method, image_ids)
        pos = {i: k for k, i in enumerate(ids)}
        out = np.zeros((len(image_ids), idx.dim), np.float32)
        for r, i in enumerate(image_ids):
            if i in pos:
                out[r] = X[pos[i], : idx.dim]
        return out

    def _search_asmk(self, q: QueryDescriptors, kernel: str, top_k: int) -> list[SearchResult]:
        """ASMK-family search (snapshot ``asmk_<kernel>``) with the query's local descriptors."""
        if q.local_desc is None:
            raise KeyError("this run has no local features: ASMK methods need extract.local_features > 0")
        if kernel not in self._asmk:
            self._asmk[kernel] = open_asmk(self.root, kernel)
        scores, ids = self._asmk[kernel].search(q.local_desc, top_k)
        return [SearchResult(i, float(s), r) for r, (i, s) in enumerate(zip(ids, scores))]

    def query_vector(self, q: QueryDescriptors, method: str) -> np.ndarray:
        if method.startswith("regional:"):
            return q.globals.get("rmac", next(iter(q.globals.values())))
        if method not in q.globals:
            raise KeyError(f"method {method!r} not available; built: {sorted(q.globals)}")
        return q.globals[method]

    def search(self, image_bytes: bytes, bbox: Iterable[float] | None = None, method: str = "gem", top_k: int = 10,
               qe: str = "none", qe_n: int = 10, diffusion: bool = False) -> tuple[list[SearchResult], QueryDescriptors]:
        """Ranked database images for a query image (optionally cropped to ``bbox``)."""
        q = self.encoder.encode(decode_image(image_bytes), bbox)
        if method in KERNEL_CONFIGS:
            return self._search_asmk(q, method, top_k), q
        idx = self.index(method)
        vec = self.query_vector(q, method)
        k_first = max(top_k, qe_n, 100 if diffusion else 0)
        D, ids = idx.search(vec, k_first)
        ids0 = ids[0]
        if (qe != "none" or diffusion) and not method.startswith("regional:") and ids0:
            neigh = self._vectors(idx, method, ids0)[None]
            qv = np.asarray(vec[: idx.dim], np.float32)[None]
            if qe == "avg":
                qv = average_qe(qv, neigh, n=qe_n)
            elif qe == "alpha":
                qv = alpha_qe(qv, neigh, n=qe_n)
            if qe != "none":
                D, ids = idx.search(qv[0], k_first)
                ids0 = ids[0]
                neigh = self._vectors(idx, method, ids0)[None]
            if diffusion:
                f, order = diffusion_rerank(qv, neigh)  # order: positions in the first ranking
                keep = [j for j, i in enumerate(order[0]) if 0 <= i < len(ids0)]
                ids0 = [ids0[order[0][j]] for j in keep]
                D = f[:, keep]
        return [SearchResult(i, float(s), r) for r, (i, s) in enumerate(zip(ids0[:top_k], D[0][:top_k]))], q


def write_html(path: Path, query: str, results: list[SearchResult], images_root: dict[str, str]) -> None:
    """A small page with the query and its ranked results as thumbnails (paths from the run's images table)."""
    cells = "".join(
        f'<figure><img src="{html.escape(images_root.get(r.image_id, ""))}" height="140">'
        f'<figcaption>{r.rank + 1}. {html.escape(r.image_id)}<br>{r.score:.3f}</figcaption></figure>'
        for r in results)
    path.write_text(f"<!doctype html><meta charset=utf-8><title>search</title><style>figure{{display:inline-block;"
                    f"margin:4px;font:12px sans-serif}}</style><h3>query</h3><img src=\"{html.escape(query)}\" "
                    f"height=200><h3>results</h3>{cells}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="output root of an index run")
    p.add_argument("--query", required=True, help="query image path or URI")
    p.add_argument("--bbox", default=None, help="x0,y0,x1,y1 in query pixels")
    p.add_argument("--method", default="gem")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--qe", choices=("none", "avg", "alpha"), default="none")
    p.add_argument("--qe-n", type=int, default=10)
    p.add_argument("--diffusion", action="store_true")
    p.add_argument("--html", type=Path, default=None, help="also write the results as an HTML page")
    args = p.parse_args(argv)
    bbox = [float(v) for v in args.bbox.split(",")] if args.bbox else None
    service = SearchService(args.index)
    try:
        results, _ = service.search(read_bytes(args.query), bbox, args.method, args.top_k, args.qe, args.qe_n,
                                    args.diffusion)
    except (KeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'rank':>4}  {'score':>7}  image_id")
    for r in results:
        print(f"{r.rank + 1:>4}  {r.score:7.4f}  {r.image_id}")
    if args.html:
        uris = service.encoder.store.read("images", ["extract"], columns=["image_id", "uri"])
        write_html(args.html, args.query, results, dict(zip(uris.column("image_id").to_pylist(),
                                                            uris.column("uri").to_pylist())))
    return 0


__all__ = ["SearchService", "SearchResult"]

if __name__ == "__main__":
    sys.exit(main())
