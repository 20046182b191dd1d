"""Static HTML report of a benchmark run: results table, precision-recall curves, ranked examples, saliency.

    python -m jobs.benchmark --render report.json --out DIR   (writes DIR/report.html, DIR/thumbs, DIR/plots)

The page is self-contained: inline CSS, no JavaScript, no network; images are small JPEG / PNG files next to
it, linked relatively, so the folder can be copied or served as is.

Input schema (``report``; every key except ``tracks`` optional; scores are fractions in [0, 1] and are shown
multiplied by 100, as the revisitop reference prints them)::

    {
      "dataset": "roxford5k",                        # shown in the title
      "title": "...",                                # optional page title
      "notes": ["free text", ...],                   # optional paragraphs under the title
      "tracks": {
        "<track>": {                                 # e.g. "standard", "in-photos", "no-box", "+R1M"
          "methods": {
            "<method>": {
              "easy":   {"map": 0.81, "mp@1": 0.97, "mp@5": 0.9, "mp@10": 0.85},   # any "mp@<k>" keys
              "medium": {...}, "hard": {...},        # a protocol may be missing
              "index_bytes": 123456,                 # size of the index on disk
              "seconds": 12.5                        # indexing / search time
            }
          },
          "examples": [                              # ranked lists to show, one row each
            {"query": "<image path or URI>", "bbox": [x0, y0, x1, y1] | null,   # query box, pixels
             "method": "<method>", "title": "optional caption",
             "results": [{"path": "...", "label": "pos" | "neg" | "junk", "score": 0.83,
                          "boxes": [[x0, y0, x1, y1], ...]}]}                    # boxes optional (pixels)
          ],
          "pr": {"<method>": {"precision": [...], "recall": [...]}},           # one curve per method
          "saliency": [                              # optional overlays, one PNG each
            {"path": "<image>", "map": (H, W) array or nested list (any grid, stretched over the image),
             "boxes": [[x0, y0, x1, y1], ...] in image pixels, "caption": "..."}
          ]
        }
      }
    }

Labels map to thumbnail borders: green = positive, red = negative, grey = junk (ignored by the protocol).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import html
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from service.html import match_picture
from storage.images import ImageError, decode_image
from storage.uri import StorageError, read_bytes

log = logging.getLogger("service.report")

PROTOCOL_ORDER = ("easy", "medium", "hard")
LABEL_CLASS = {"pos": "pos", "neg": "neg", "junk": "junk"}
QUERY_BOX_COLOUR = (255, 200, 0)
RESULT_BOX_COLOUR = (0, 160, 255)

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px} p.meta{color:#666;margin:0 0 12px;font-size:13px}
table.results{border-collapse:collapse;font-size:13px;margin:8px 0}
table.results th,table.results td{border:1px solid #ccc;padding:3px 7px;text-align:right}
table.results th{background:#f3f3f3} table.results td.method{text-align:left;font-weight:600}
table.results td.best{font-weight:700;background:#e8f5e9}
.row{display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px;margin:6px 0 14px}
figure{margin:0;text-align:center;font-size:11px;color:#444}
figure img{display:block;border:4px solid transparent;box-sizing:content-box}
figure.query img{border-color:#1565c0} figure.pos img{border-color:#2e7d32}
figure.neg img{border-color:#c62828} figure.junk img{border-color:#9e9e9e}
.sep{width:2px;align-self:stretch;background:#bbb;margin:0 6px}
.legend span{display:inline-block;padding:1px 6px;margin-right:6px;border:3px solid;font-size:12px}
.warn{color:#b71c1c;font-size:12px} img.plot{max-width:560px;border:1px solid #ddd}
"""


# ------------------------------------------------------------------------------------------------ images
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _load(path: str) -> Image.Image:
    return decode_image(read_bytes(path))


def _scaled_boxes(boxes: Any, scale: float) -> list[tuple[float, float, float, float]]:
    if boxes is None:
        return []
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
    return [tuple(b) for b in arr]


def _draw_boxes(img: Image.Image, boxes: list[tuple[float, ...]], colour: tuple[int, int, int]) -> None:
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 80))
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)


def _placeholder(size: int, text: str) -> Image.Image:
    img = Image.new("RGB", (size, int(size * 0.75)), (230, 230, 230))
    ImageDraw.Draw(img).text((6, 6), text[:24], fill=(120, 0, 0))
    return img


class _Thumbs:
    """Writes each distinct (image, boxes, kind) once under ``out_dir/thumbs``; returns relative links."""

    def __init__(self, out_dir: Path, size: int) -> None:
        self.out_dir = out_dir
        self.dir = out_dir / "thumbs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.warnings: list[str] = []

    def _name(self, *key: Any, ext: str) -> Path:
        digest = hashlib.sha1(json.dumps(key, default=str).encode()).hexdigest()[:16]
        return self.dir / f"{digest}.{ext}"

    def _open_scaled(self, path: str) -> tuple[Image.Image, float]:
        try:
            img = _load(path)
        except (ImageError, OSError, StorageError) as exc:
            self.warnings.append(f"{path}: {exc}")
            return _placeholder(self.size, "unreadable image"), 0.0
        scale = min(1.0, self.size / max(img.size))
        if scale < 1.0:
            new_size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(new_size, Image.Resampling.BILINEAR)
        return img, scale

    def thumb(self, path: str, boxes: Any = None, colour: tuple[int, int, int] = QUERY_BOX_COLOUR) -> str:
        """JPEG thumbnail (longest side ``size``) with ``boxes`` (original pixels) drawn; relative link."""
        target = self._name("thumb", path, boxes, self.size, ext="jpg")
        if not target.exists():
            img, scale = self._open_scaled(path)
            if scale > 0:
                _draw_boxes(img, _scaled_boxes(boxes, scale), colour)
            _save(img, target, "JPEG", quality=85, subsampling=0)  # 4:4:4 keeps box colours crisp
        return target.relative_to(self.out_dir).as_posix()

    def matches(self, query_path: str, path: str, matches: Any) -> str:
        """JPEG of the (cropped) query and a result side by side with their verified matches ``[xq, yq, xd, yd]``
        (query / original-image pixels) drawn (:func:`service.html.match_picture`); relative link."""
        m = np.asarray(matches, np.float64).reshape(-1, 4)
        target = self._name("matches", query_path, path, hashlib.sha1(m.tobytes()).hexdigest(), ext="jpg")
        if not target.exists():
            try:
                q, img = _load(query_path), _load(path)
            except (ImageError, OSError, StorageError) as exc:
                self.warnings.append(f"{path}: {exc}")
                return self.thumb(path)
            w, h = img.info.get("original_size", img.size)
            pic = match_picture(q, img, m * [1, 1, img.width / w, img.height / h], height=self.size)
            _save(pic, target, "JPEG", quality=85)
        return target.relative_to(self.out_dir).as_posix()

    def saliency(self, path: str, smap: Any, boxes: Any = None, alpha: float = 0.5) -> str:
        """PNG of the image with a jet-coloured saliency map blended over it and ``boxes`` drawn."""
        from matplotlib import colormaps

        m = np.asarray(smap, dtype=np.float32)
        if m.ndim != 2 or m.size == 0:
            raise ValueError(f"saliency map must be 2-D, got shape {m.shape}")
        target = self._name("sal", path, hashlib.sha1(m.tobytes()).hexdigest(), m.shape, boxes, ext="png")
        if not target.exists():
            img, scale = self._open_scaled(path)
            m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
            m = m - min(float(m.min()), 0.0)
            m = m / max(float(m.max()), 1e-12)
            up = np.asarray(Image.fromarray(m).resize(img.size, Image.Resampling.BILINEAR), dtype=np.float32)
            heat = (colormaps["jet"](np.clip(up, 0, 1))[..., :3] * 255).astype(np.uint8)
            blended = Image.blend(img, Image.fromarray(heat, "RGB"), alpha)
            if scale > 0:
                _draw_boxes(blended, _scaled_boxes(boxes, scale), (255, 255, 255))
            _save(blended, target, "PNG")
        return target.relative_to(self.out_dir).as_posix()


def _save(img: Image.Image, target: Path, fmt: str, **kw: Any) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    img.save(tmp, fmt, **kw)
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------------------ pieces
def _fmt_pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100.0 * float(v):.2f}"


def _fmt_bytes(v: Any) -> str:
    if v is None:
        return "–"
    v = float(v)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "–"


def _fmt_seconds(v: Any) -> str:
    if v is None:
        return "–"
    v = float(v)
    return f"{v:.2f} s" if v < 120 else f"{v / 60:.1f} min"


def _kappa_keys(methods: dict[str, Any]) -> list[str]:
    keys = set()
    for m in methods.values():
        for proto in PROTOCOL_ORDER:
            keys.update(k for k in (m.get(proto) or {}) if k.startswith("mp@"))
    return sorted(keys, key=lambda k: int(k[3:]) if k[3:].isdigit() else 10**9)


def _results_table(methods: dict[str, Any]) -> str:
    """Methods x protocols (mAP, mP@k) + index size + time; the best value of each score column in bold."""
    protos = [p for p in PROTOCOL_ORDER if any(p in m for m in methods.values())]
    metrics = ["map", *_kappa_keys(methods)]
    cols = [(p, k) for p in protos for k in metrics]
    best = {}
    for c in cols:
        vals = [(m.get(c[0]) or {}).get(c[1]) for m in methods.values()]
        vals = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        best[c] = max(vals) if vals else None
    esc = html.escape
    head1 = "".join(f'<th colspan="{len(metrics)}">{esc(p.capitalize())}</th>' for p in protos)
    head2 = "".join(f"<th>{'mAP' if k == 'map' else 'mP@' + esc(k[3:])}</th>" for _, k in cols)
    rows = []
    for name, m in methods.items():
        cells = []
        for c in cols:
            v = (m.get(c[0]) or {}).get(c[1])
            cls = ' class="best"' if v is not None and best[c] is not None and float(v) == best[c] else ""
            cells.append(f"<td{cls}>{_fmt_pct(v)}</td>")
        rows.append(
            f'<tr><td class="method">{esc(name)}</td>{"".join(cells)}'
            f"<td>{_fmt_bytes(m.get('index_bytes'))}</td><td>{_fmt_seconds(m.get('seconds'))}</td></tr>"
        )
    return (
        '<table class="results"><thead>'
        f'<tr><th rowspan="2">method</th>{head1}<th rowspan="2">index size</th><th rowspan="2">time</th></tr>'
        f"<tr>{head2}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _pr_plot(curves: dict[str, Any], target: Path, title: str) -> None:
    """Precision-recall curves of every method in one PNG (matplotlib Agg, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, c in curves.items():
        r = np.asarray(c.get("recall", []), dtype=np.float64)
        p = np.asarray(c.get("precision", []), dtype=np.float64)
        if r.size and r.size == p.size:
            ax.plot(r, p, label=str(name), linewidth=1.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    tmp = target.with_name(f".{target.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, target)


def _figure(src: str, caption: str, cls: str, alt: str) -> str:
    esc = html.escape
    return (
        f'<figure class="{esc(cls)}"><img src="{esc(src)}" alt="{esc(alt)}" loading="eager">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _example_row(ex: dict[str, Any], thumbs: _Thumbs, max_results: int) -> str:
    esc = html.escape
    q = str(ex["query"])
    parts = [_figure(thumbs.thumb(q, ex.get("bbox")), "query", "query", os.path.basename(q)), '<div class="sep"></div>']
    for rank, res in enumerate(ex.get("results", [])[:max_results], start=1):
        label = str(res.get("label", "neg"))
        cls = LABEL_CLASS.get(label, "neg")
        score = res.get("score")
        cap = f"#{rank} {label}" + (f" {float(score):.3f}" if score is not None else "")
        if res.get("matches") and ex.get("query_crop"):  # a verified +sv result: the inlier matches drawn
            link = thumbs.matches(str(ex["query_crop"]), str(res["path"]), res["matches"])
            cap += f" ({res.get('inliers', len(res['matches']))} inliers)"
        else:
            link = thumbs.thumb(str(res["path"]), res.get("boxes"), RESULT_BOX_COLOUR)
        parts.append(_figure(link, cap, cls, os.path.basename(str(res["path"]))))
    title = ex.get("title") or os.path.basename(q)
    method = ex.get("method")
    heading = esc(str(title)) + (f" — {esc(str(method))}" if method else "")
    return f"<h3>{heading}</h3><div class=\"row\">{''.join(parts)}</div>"


def render_report(
    report: dict[str, Any],
    out_dir: str | Path,
    *,
    thumb_size: int = 160,
    max_results: int = 10,
    title: str | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (+ ``thumbs/``, ``plots/``) for ``report`` (schema in the module doc)."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    thumbs = _Thumbs(out, thumb_size)
    esc = html.escape
    dataset = str(report.get("dataset", ""))
    page_title = title or report.get("title") or f"Retrieval report{': ' + dataset if dataset else ''}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{esc(str(page_title))}</h1>", f'<p class="meta">generated {now}</p>']
    body += [f"<p>{esc(str(n))}</p>" for n in report.get("notes", [])]
    body.append(
        '<p class="legend"><span style="border-color:#2e7d32">positive</span>'
        '<span style="border-color:#c62828">negative</span><span style="border-color:#9e9e9e">junk (ignored)</span>'
        '<span style="border-color:#1565c0">query</span> scores ×100</p>'
    )
    for track, tr in (report.get("tracks") or {}).items():
        tslug = _slug(str(track))
        body.append(f'<h2 id="track-{esc(tslug)}">Track: {esc(str(track))}</h2>')
        methods = tr.get("methods") or {}
        if methods:
            body.append(_results_table(methods))
        if tr.get("pr"):
            plot = out / "plots" / f"pr_{tslug}.png"
            _pr_plot(tr["pr"], plot, f"{dataset} {track}".strip())
            body.append(f'<img class="plot" src="plots/{esc(plot.name)}" alt="precision-recall {esc(str(track))}">')
        for ex in tr.get("examples") or []:
            body.append(_example_row(ex, thumbs, max_results))
        sal = tr.get("saliency") or []
        if sal:
            figs = [
                _figure(thumbs.saliency(str(s["path"]), s["map"], s.get("boxes")), str(s.get("caption", "")),
                        "saliency", os.path.basename(str(s["path"])))
                for s in sal
            ]
            body.append(f"<h3>Saliency</h3><div class=\"row\">{''.join(figs)}</div>")
    if thumbs.warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in thumbs.warnings)
        body.append(f'<h2>Warnings</h2><ul class="warn">{items}</ul>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(str(page_title))}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    target = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target


__all__ = ["render_report", "QUERY_BOX_COLOUR", "RESULT_BOX_COLOUR"]
