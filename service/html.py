"""Result pages: a query and its ranked results as an HTML page (thumbnails from the run's image URIs), and the
pictures of verified point matches (``+sv``) drawn between a query and a result."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from service.search import SearchResult
from storage.images import ImageError, decode_image
from storage.uri import StorageError, read_bytes

MAX_DRAWN = 200   # match lines drawn per picture
MATCH_COLOURS = ((46, 204, 64), (255, 220, 0), (0, 200, 255), (255, 80, 200))


def match_picture(query: Image.Image, image: Image.Image, matches: np.ndarray, height: int = 240) -> Image.Image:
    """``query`` and ``image`` side by side at ``height`` px with the matches ``[xq, yq, xd, yd]`` (query /
    image pixels) drawn as lines; at most :data:`MAX_DRAWN` of them (evenly spaced)."""
    q, d = query.convert("RGB"), image.convert("RGB")
    sq, sd = height / q.height, height / d.height
    q = q.resize((max(1, round(q.width * sq)), height), Image.Resampling.BILINEAR)
    d = d.resize((max(1, round(d.width * sd)), height), Image.Resampling.BILINEAR)
    gap = 8
    out = Image.new("RGB", (q.width + gap + d.width, height), (255, 255, 255))
    out.paste(q, (0, 0))
    out.paste(d, (q.width + gap, 0))
    draw = ImageDraw.Draw(out)
    m = np.asarray(matches, np.float64).reshape(-1, 4)
    if len(m) > MAX_DRAWN:
        m = m[np.linspace(0, len(m) - 1, MAX_DRAWN).round().astype(int)]
    for k, (xq, yq, xd, yd) in enumerate(m):
        a = ((xq + 0.5) * sq, (yq + 0.5) * sq)
        b = (q.width + gap + (xd + 0.5) * sd, (yd + 0.5) * sd)
        c = MATCH_COLOURS[k % len(MATCH_COLOURS)]
        draw.line([a, b], fill=c, width=1)
        for x, y in (a, b):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=c)
    return out


def _read_image(uri: str) -> Image.Image | None:
    try:
        return decode_image(read_bytes(uri), max_side=1024)
    except (ImageError, StorageError, OSError):
        return None


def write_results_page(path: Path, query: str, results: Sequence[SearchResult], image_uris: dict[str, str],
                       query_image: Image.Image | None = None) -> None:
    """A small page with the query and its ranked results as thumbnails; with ``query_image`` (the encoded,
    cropped query, ``info["original_size"]`` its size when reduced), every verified result's inlier matches are
    drawn as a picture saved beside the page."""
    cells, pictures = [], []
    for r in results:
        uri = image_uris.get(r.image_id, "")
        cells.append(f'<figure><img src="{html.escape(uri)}" height="140"><figcaption>{r.rank + 1}. '
                     f'{html.escape(r.image_id)}<br>{r.score:.3f}</figcaption></figure>')
        if query_image is None or r.matches is None or not len(r.matches) or not uri:
            continue
        img = _read_image(uri)
        if img is None:
            continue
        w, h = img.info.get("original_size", img.size)
        sq = query_image.width / query_image.info.get("original_size", query_image.size)[0]
        scale = np.array([sq, sq, img.width / w, img.height / h])  # matches: crop / original image pixels
        folder = path.with_name(path.stem + "_matches")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{r.rank + 1:03d}.jpg"
        match_picture(query_image, img, np.asarray(r.matches) * scale).save(target, "JPEG", quality=88)
        pictures.append(f'<figure><img src="{html.escape(folder.name + "/" + target.name)}" height="240">'
                        f'<figcaption>{r.rank + 1}. {html.escape(r.image_id)}: {len(r.matches)} inlier matches'
                        f'</figcaption></figure>')
    matches = f"<h3>verified matches</h3>{''.join(pictures)}" if pictures else ""
    path.write_text(f"<!doctype html><meta charset=utf-8><title>search</title><style>figure{{display:inline-block;"
                    f"margin:4px;font:12px sans-serif}}</style><h3>query</h3><img src=\"{html.escape(query)}\" "
                    f"height=200><h3>results</h3>{''.join(cells)}{matches}")


__all__ = ["write_results_page", "match_picture"]
