"""Result pages: a query and its ranked results as an HTML page (thumbnails from the run's image URIs)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from service.search import SearchResult


def write_results_page(path: Path, query: str, results: Sequence[SearchResult], image_uris: dict[str, str]) -> None:
    """A small page with the query and its ranked results as thumbnails."""
    cells = "".join(
        f'<figure><img src="{html.escape(image_uris.get(r.image_id, ""))}" height="140">'
        f'<figcaption>{r.rank + 1}. {html.escape(r.image_id)}<br>{r.score:.3f}</figcaption></figure>'
        for r in results)
    path.write_text(f"<!doctype html><meta charset=utf-8><title>search</title><style>figure{{display:inline-block;"
                    f"margin:4px;font:12px sans-serif}}</style><h3>query</h3><img src=\"{html.escape(query)}\" "
                    f"height=200><h3>results</h3>{cells}")


__all__ = ["write_results_page"]
