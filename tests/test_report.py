"""HTML report: files written, links valid, boxes / saliency drawn where expected, and a headless-browser load."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.report import QUERY_BOX_COLOUR, render_report

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def museum():
    if not (DATA / "gnd.json").exists():
        pytest.skip("museum-landmarks data not available")
    from storage.datasets import load_gnd_json

    return load_gnd_json(str(DATA / "gnd.json"))


def _fake_report(ds) -> dict:
    qi = ds.queries.index("qsd2_w3_00002")  # a painting on a wall, with a box; hard positive 280, junk 285
    g = ds.gnd[qi]
    hard, junk = int(g["hard"][0]), int(g["junk"][0])
    negs = [0, 1, 300]
    results = [
        {"path": ds.image_path(hard), "label": "pos", "score": 0.91, "boxes": [[10, 10, 120, 90]]},
        {"path": ds.image_path(junk), "label": "junk", "score": 0.80},
    ] + [{"path": ds.image_path(i), "label": "neg", "score": 0.5 - 0.1 * k} for k, i in enumerate(negs)]
    results.append({"path": str(DATA / "jpg" / "does_not_exist.jpg"), "label": "neg", "score": 0.01})
    sal_img = ds.image_path(hard)
    smap = np.zeros((6, 8), np.float32)
    smap[0, 0] = 1.0  # hot top-left corner, cold bottom-right
    return {
        "dataset": "museum-landmarks",
        "notes": ["unit-test report <b>escaped</b>"],
        "tracks": {
            "standard": {
                "methods": {
                    "mac": {"easy": {"map": 0.81, "mp@1": 0.97, "mp@5": 0.9, "mp@10": 0.85},
                            "medium": {"map": 0.6, "mp@1": 0.9, "mp@5": 0.8, "mp@10": 0.7},
                            "hard": {"map": 0.3, "mp@1": 0.5, "mp@5": 0.4, "mp@10": 0.35},
                            "index_bytes": 3 * 1024 * 1024, "seconds": 12.5},
                    "os_egm": {"easy": {"map": 0.85, "mp@1": 1.0, "mp@5": 0.92, "mp@10": 0.88},
                               "medium": {"map": 0.65}, "hard": {"map": float("nan")},
                               "index_bytes": 2048, "seconds": 300.0},
                },
                "pr": {"mac": {"precision": [1, 0.8, 0.5], "recall": [0.1, 0.5, 1.0]},
                       "os_egm": {"precision": [1, 0.9, 0.6], "recall": [0.2, 0.6, 1.0]}},
                "examples": [{"query": ds.query_path(qi), "bbox": list(ds.query_bbox(qi)), "method": "mac",
                              "results": results}],
                "saliency": [{"path": sal_img, "map": smap.tolist(), "boxes": [[0, 0, 50, 40]], "caption": "OS"}],
            },
            "no-box & <odd> name": {"methods": {"mac": {"easy": {"map": 0.5}}}},
        },
    }


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\bsrc="([^"]+)"', page)


def test_render_report_files_links_and_content(tmp_path, museum):
    rep = _fake_report(museum)
    path = render_report(rep, tmp_path / "out", thumb_size=128)
    out = tmp_path / "out"
    assert path == out / "report.html" and path.is_file()
    page = path.read_text(encoding="utf-8")
    srcs = _img_srcs(page)
    # 1 query + 6 results + 1 PR plot + 1 saliency overlay
    assert len(srcs) == 9
    for s in srcs:
        assert not s.startswith(("/", "http:", "https:", "file:")), s  # relative links only
        assert (out / s).is_file(), s
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "plots/pr_standard.png" in srcs
    # table: fractions shown x100, best of a column highlighted, NaN / missing shown as a dash
    assert "81.00" in page and '<td class="best">85.00</td>' in page and "3.0 MiB" in page and "5.0 min" in page
    assert "–" in page
    # user text is escaped
    assert "&lt;b&gt;escaped&lt;/b&gt;" in page and "no-box &amp; &lt;odd&gt; name" in page
    # borders by label: one figure per class
    assert page.count('<figure class="pos">') == 1 and page.count('<figure class="junk">') == 1
    assert page.count('<figure class="neg">') == 4
    # the missing image is reported, not fatal
    assert "does_not_exist.jpg" in page.split("<h2>Warnings</h2>")[1]
    # thumbnails are small JPEGs
    qthumb = out / re.search(r'<figure class="query"><img src="([^"]+)"', page).group(1)
    with Image.open(qthumb) as im:
        assert im.format == "JPEG" and max(im.size) <= 128
        qarr = np.asarray(im.convert("RGB"), dtype=np.float64)
    # the query box is drawn where the box lies, scaled to the thumbnail
    with Image.open(museum.query_path(museum.queries.index("qsd2_w3_00002"))) as orig:
        scale = 128 / max(orig.size)
    x0, y0, x1, y1 = (np.array(rep["tracks"]["standard"]["examples"][0]["bbox"]) * scale).round().astype(int)
    # middle of the left edge (a 2-px line; JPEG blurs colours, so take the best pixel of a 5-px window)
    edge = qarr[(y0 + y1) // 2, x0 - 2: x0 + 3]
    assert np.abs(edge - np.array(QUERY_BOX_COLOUR)).max(axis=1).min() < 50, edge
    centre = qarr[(y0 + y1) // 2, (x0 + x1) // 2]
    assert np.abs(centre - np.array(QUERY_BOX_COLOUR)).max() > 60  # inside the box: the photo, not the outline


def test_verified_results_show_their_matches(tmp_path, museum):
    """An example result with +sv matches is drawn as the query crop and the result side by side with lines."""
    rep = _fake_report(museum)
    ex = rep["tracks"]["standard"]["examples"][0]
    crop = tmp_path / "crop.jpg"
    Image.open(ex["query"]).convert("RGB").crop((0, 0, 200, 150)).save(crop)
    ex["query_crop"], ex["method"] = str(crop), "mac+sv"
    ex["results"][0]["matches"] = [[10.0, 10.0, 50.0, 40.0], [150.0, 100.0, 300.0, 200.0]]
    ex["results"][0]["inliers"] = 42
    page = render_report(rep, tmp_path / "out", thumb_size=128).read_text(encoding="utf-8")
    assert "(42 inliers)" in page
    src = re.search(r'<figure class="pos"><img src="([^"]+)"', page).group(1)
    with Image.open(tmp_path / "out" / src) as im:
        assert im.height == 128 and im.width > 128  # two images side by side


def test_saliency_overlay_is_hot_where_the_map_is(tmp_path, museum):
    rep = _fake_report(museum)
    rep["tracks"]["standard"]["examples"] = []
    render_report(rep, tmp_path, thumb_size=160)
    pngs = list((tmp_path / "thumbs").glob("*.png"))
    assert len(pngs) == 1
    arr = np.asarray(Image.open(pngs[0]).convert("RGB"), dtype=np.float64)
    h, w, _ = arr.shape
    tl = arr[h // 12 + 3, w // 16 + 3]  # inside the hot cell (away from the drawn box edge)
    br = arr[h - 3, w - 3]
    assert tl[0] - tl[2] > br[0] - br[2] + 60  # red-dominant where hot, blue-dominant where cold
    assert max(h, w) == 160


def test_report_cli_roundtrip(tmp_path, museum):
    import json
    import sys

    rep = _fake_report(museum)
    rep["tracks"]["standard"]["examples"] = rep["tracks"]["standard"]["examples"][:0]  # keep the subprocess quick
    (tmp_path / "r.json").write_text(json.dumps(rep))
    proc = subprocess.run([sys.executable, "-m", "jobs.benchmark", "--render", str(tmp_path / "r.json"),
                           "--out", str(tmp_path / "o")], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "o" / "report.html"
    page = (tmp_path / "o" / "report.html").read_text(encoding="utf-8")
    assert "81.00" in page and all((tmp_path / "o" / s).is_file() for s in _img_srcs(page))


CHECK_SCRIPT = """<script>
window.onerror = function (m) { document.documentElement.setAttribute('data-js-error', String(m)); };
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', imgs.length + ':' + ok);
});
</script>"""


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path, museum):
    out = tmp_path / "out"
    path = render_report(_fake_report(museum), out, thumb_size=128)
    page = path.read_text(encoding="utf-8")
    n_imgs = len(_img_srcs(page))
    # a copy with a checker script next to the report (same folder, so relative links resolve the same way)
    check = out / "check.html"
    check.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    shot = tmp_path / "shot.png"
    proc = _chromium(["--window-size=1200,900", f"--screenshot={shot}", "--dump-dom", check.as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'data-js-error="' not in dom
    m = re.search(r'data-images="(\d+):(\d+)"', dom)
    assert m, dom[:500]
    assert int(m.group(1)) == n_imgs and int(m.group(2)) == n_imgs  # every thumbnail / plot decoded
    # the screenshot is not blank (the checker only adds an attribute, so it looks like the report)
    assert shot.is_file()
    arr = np.asarray(Image.open(shot).convert("RGB"))
    assert arr.shape[:2] == (900, 1200)
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 200 and arr.std() > 10
