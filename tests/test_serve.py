"""The results browser (jobs.serve / service.app): JSON API, security, a load test and a headless-Chromium check.

A small index (paintings 258 and 35, which hang side by side in the photo qsd2_w3_00006, ten more paintings and
distractors) is built once for the module. The API tests go through Starlette's TestClient in this process; the
load test and the browser test talk to ``python -m jobs.serve`` started on a free port.
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from jobs import index as index_job
from service.app import create_app
from service.search import Ranking, SearchService
from service.webapi import best_boxes, check_image_id, result_matches
from storage.readers import read_regions
from tests.helpers_jobs import job_env

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
QUERY = "qsd2_w3_00006"  # two paintings on a wall, one box each in the ground truth
OPENED: list[str] = []   # files opened while a security test records (see _record_opens)
RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def serve_run(museum, ray_local, tmp_path_factory):
    """(run root, query photo, [(box, painting id)] of both paintings in it)."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("serve_run")
    rc = index_job.main([
        "--images", str(museum / "jpg"), "--out", str(out), "--limit", "30", "--max-side", "320",
        "--shard-size", "16", "--stages", "extract,whiten,graph,object_saliency,descriptors,faiss,diffusion",
        "--set", "include=['painting_00258*','painting_00035*','painting_0010*','painting_0012*']",
        "--set", "exclude=['qsd*','lund_*','sceaux*','sacre*','monstree*']", "--set", "graph.k=10",
        "--set", "whiten.dim=64", "--set", "faiss.methods=[gem, os_egm]", "--set", "faiss.regional=[fs_egm]"])
    assert rc == 0
    gnd = json.loads((museum / "gnd.json").read_text())
    boxes = [(tuple(g["bbx"]), gnd["imlist"][(g["easy"] + g["hard"])[0]])
             for q, g in zip(gnd["qimlist"], gnd["gnd"]) if q == QUERY]
    assert {p for _, p in boxes} == {"painting_00258", "painting_00035"}, boxes
    return out, museum / "jpg" / f"{QUERY}.jpg", boxes


@pytest.fixture(scope="module")
def service(serve_run):
    with SearchService(str(serve_run[0])) as s:
        yield s


@pytest.fixture(scope="module")
def client(serve_run, service):
    return TestClient(create_app(str(serve_run[0]), service))


def _upload(client, path: Path, **fields):
    return client.post("/search", files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def _box(b) -> str:
    return ",".join(f"{v:.1f}" for v in b)


# ------------------------------------------------------------------------------------------ units (no index)
@pytest.mark.parametrize("image_id", ["painting_00035", "sub/dir/img 1", "a-b+c=d@e,(f)[g].jpg", "ü_1"])
def test_well_formed_ids_pass(image_id):
    assert check_image_id(image_id) == image_id


@pytest.mark.parametrize("image_id", ["", "..", "../x", "a/../b", "/etc/passwd", "a//b", ".hidden", "a/.b",
                                      "a\\b", "C:x", "%2e%2e", "~root", "a\x00b", "x" * 600, "s3://bucket/key"])
def test_malformed_ids_are_refused(image_id):
    with pytest.raises(ValueError) as e:
        check_image_id(image_id)
    assert e.value.status == 400


def test_best_boxes_pick_the_region_most_like_a_query_item():
    items = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 30], [1, 2, 3, 4]], np.float32)
    X = np.array([[0.6, 0.0, 0.8], [0.0, 0.9, 0.1], [0.7, 0.7, 0.0]], np.float32)  # best: 0.9 (row 1, item 1)
    out = best_boxes(items, {"a": (boxes, X), "b": (boxes[:1], X[:1])}, ["a", "b", "missing"])
    assert out["a"] == ([5.0, 5.0, 20.0, 30.0], pytest.approx(0.9))
    assert out["b"] == ([0.0, 0.0, 10.0, 10.0], pytest.approx(0.6)) and "missing" not in out


def test_matches_move_to_the_full_query_in_both_layouts():
    pairs = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    by_id = Ranking(["a", "b"], np.ones(2), {"matches": {"b": np.array(pairs)}})
    aligned = Ranking(["a", "b"], np.ones(2), {"matches": [None, pairs]})
    for r in (by_id, aligned):
        assert result_matches(r, (100, 10)) == {"b": [[101.0, 12.0, 3.0, 4.0], [105.0, 16.0, 7.0, 8.0]]}
    assert result_matches(Ranking(["a"], np.ones(1)), (0, 0)) == {}


# ------------------------------------------------------------------------------------------ API
def _photo(image_id: str) -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks" / "jpg" / f"{image_id}.jpg"


def test_methods_and_image_listing(client):
    m = client.get("/methods").json()
    assert m["methods"] == ["gem", "os_egm", "regional:fs_egm"] and m["images"] == 30
    assert {"aqe", "diffusion"} <= set(m["reranks"])
    found = client.get("/images", params={"q": "painting_00035"}).json()
    with Image.open(_photo("painting_00035")) as im:
        assert found["images"] == [{"id": "painting_00035", "width": im.width, "height": im.height}]
    assert found["total"] == 30


def test_the_drawn_box_decides_which_painting_comes_first(client, service, serve_run):
    _, photo, boxes = serve_run
    for box, painting in boxes:
        r = client.post("/search", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                        data={"bbox": _box(box), "method": "gem", "top_k": "5"})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["results"][0]["image_id"] == painting, (painting, [x["image_id"] for x in j["results"]])
        # the same numbers as the Python API (one ranking path)
        ref, q = service.search(photo.read_bytes(), box, "gem", top_k=5)
        assert [x["image_id"] for x in j["results"]] == [x.image_id for x in ref]
        assert np.allclose([x["score"] for x in j["results"]], [x.score for x in ref], atol=1e-4)
        with Image.open(photo) as im:
            assert (j["query"]["width"], j["query"]["height"]) == im.size
        x0, y0, x1, y1 = j["query"]["extent"]
        assert (x0, y0) == (int(box[0]), int(box[1])) and (x1, y1) == (int(np.ceil(box[2])), int(np.ceil(box[3])))
        # saliency grids on the feature grid of the cropped query, normalised to max 1
        fs = np.array(j["query"]["saliency"]["fs"])
        assert fs.shape == q.fs_map.shape and fs.max() == pytest.approx(1.0)
        assert np.array(j["query"]["saliency"]["os"]).shape == q.os_map.shape
        for src, regs in j["query"]["regions"].items():  # the query's regions sit inside the box
            a = np.array(regs).reshape(-1, 4)
            assert (a[:, :2] >= [x0 - 0.5, y0 - 0.5]).all() and (a[:, 2:] <= [x1 + 0.5, y1 + 0.5]).all(), src
        for res in j["results"]:  # result boxes lie in their image (original pixels)
            for b in res["boxes"]:
                assert 0 <= b[0] < b[2] <= res["width"] + 0.5 and 0 <= b[1] < b[3] <= res["height"] + 0.5


def test_database_image_as_query_scores_like_a_numpy_d2r(client, service, serve_run):
    """Regional search with a database image as the query: image scores and matched boxes equal a brute-force
    max over (query item, database region) inner products of the stored, whitened regions."""
    r = client.post("/search", json={"image_id": "painting_00035", "method": "regional:fs_egm", "top_k": 3})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["results"][0]["image_id"] == "painting_00035" and j["box_source"] == "fs_egm"
    q = service.encode(_photo("painting_00035").read_bytes())
    items = np.concatenate([q.regions["full"], q.regions["fs_egm"]])
    white = service.encoder.whitenings["regions"]
    for res in j["results"]:
        per_source = {}
        for src in ("full", "fs_egm"):
            _, boxes, X = read_regions(str(serve_run[0]), src, [res["image_id"]])
            per_source[src] = (boxes, np.asarray(white.apply(X), np.float32) @ items.T)
        score = max(float(s.max()) for _, s in per_source.values())
        assert res["score"] == pytest.approx(score, abs=1e-4), res["image_id"]
        boxes, s = per_source["fs_egm"]
        k = int(np.argmax(s.max(axis=1)))
        assert res["boxes"] == [pytest.approx(list(boxes[k]), abs=0.06)]
        assert res["box_score"] == pytest.approx(float(s.max()), abs=1e-4)


def test_reranks_are_appended_in_order(client, serve_run):
    _, photo, boxes = serve_run
    r = client.post("/search", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                    data={"bbox": _box(boxes[0][0]), "method": "gem", "rerank": ["aqe", "diffusion"]})
    assert r.status_code == 200, r.text
    assert r.json()["method"] == "gem+aqe+diffusion" and r.json()["timing"]["cached_query"] is True


@pytest.mark.parametrize("body, fragment", [
    ({"method": "nope"}, "unknown method"),
    ({"method": "regional:fs_egm", "rerank": ["aqe"]}, "global methods only"),
    ({"top_k": 0}, "top_k"),
    ({"bbox": "1,2,3"}, "malformed box"),
    ({"bbox": [5000, 5000, 6000, 6000]}, "outside"),
    ({"image_id": None}, "exactly one query"),
    ({"image_id": "no_such_image"}, "no image"),
])
def test_bad_requests_get_one_line_4xx(client, body, fragment):
    r = client.post("/search", json={"image_id": "painting_00035", **body})
    assert 400 <= r.status_code < 500 and fragment in r.json()["error"], r.text
    assert "\n" not in r.json()["error"] and "Traceback" not in r.text


def test_wrong_content_type_and_both_queries(client, serve_run):
    assert client.post("/search", content=b"x", headers={"content-type": "text/plain"}).status_code == 400
    r = client.post("/search", files={"file": ("q.jpg", serve_run[1].read_bytes(), "image/jpeg")},
                    data={"image_id": "painting_00035"})
    assert r.status_code == 400 and "exactly one" in r.json()["error"]


def test_thumbnail_is_the_image_resized(client):
    r = client.get("/images/painting_00035", params={"size": 64})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), np.float64)
    with Image.open(_photo("painting_00035")) as im:
        ref = np.asarray(im.convert("RGB").resize(thumb.shape[1::-1], Image.Resampling.BOX), np.float64)
        assert max(thumb.shape[:2]) == 64 and abs(thumb.shape[1] / thumb.shape[0] - im.width / im.height) < 0.05
    other = np.asarray(Image.open(_photo("painting_00258")).convert("RGB").resize(thumb.shape[1::-1]), np.float64)
    assert np.abs(thumb - ref).mean() < 8 < np.abs(thumb - other).mean()
    for bad in ("0", "99999", "abc"):
        assert client.get("/images/painting_00035", params={"size": bad}).status_code == 400


class _Verifying:
    """A search service whose rankings carry verified matches, as spatial verification (``+sv``) will."""

    def __init__(self, inner: SearchService, pairs: list[list[float]]) -> None:
        self.inner, self.pairs = inner, pairs

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def search_ranking(self, q, method, top_k=10):
        r = self.inner.search_ranking(q, method, top_k)
        r.extra["matches"] = {r.image_ids[0]: np.array(self.pairs)}
        return r


def test_verified_matches_reach_the_json(serve_run, service):
    _, photo, boxes = serve_run
    pairs = [[10.0, 20.0, 30.0, 40.0], [50.0, 60.0, 70.0, 80.0]]
    c = TestClient(create_app(str(serve_run[0]), _Verifying(service, pairs), preload=False))
    box = boxes[0][0]
    j = _upload(c, photo, bbox=_box(box), method="gem", top_k=3).json()
    x0, y0 = int(box[0]), int(box[1])
    assert j["results"][0]["matches"] == [[10 + x0, 20 + y0, 30, 40], [50 + x0, 60 + y0, 70, 80]]
    assert all("matches" not in r for r in j["results"][1:])


# ------------------------------------------------------------------------------------------ security
def _bomb_png(width: int = 12_000, height: int = 10_000) -> bytes:
    """A 1-bit PNG of 120 MP (over the 100 MP guard) that compresses to a few tens of kB."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_path_traversal_ids_are_refused_and_nothing_outside_is_read(client, serve_run, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    rel = os.path.relpath(secret, serve_run[0])
    attempts = ["/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd", f"/images/{rel}",
                f"/images/{secret}".replace("//", "/"), "/images/painting_00035%00.jpg", "/images/%2e%2e/secret.txt",
                "/images/file:%2F%2F%2Fetc%2Fpasswd", "/images/~", "/images/secret.txt"]
    OPENED.clear()
    RECORDING[0] = True
    try:
        codes = {a: client.get(a).status_code for a in attempts}
        for image_id in (f"../{rel}", str(secret), "../../../../etc/passwd", "secret.txt"):
            r = client.post("/search", json={"image_id": image_id})
            codes[f"search:{image_id}"] = r.status_code
            assert "do not serve" not in r.text and "root:" not in r.text
    finally:
        RECORDING[0] = False
    assert all(c in (400, 404) for c in codes.values()), codes
    assert codes["/images/secret.txt"] == 404 and codes["/images/..%2F..%2Fetc%2Fpasswd"] == 400
    assert str(secret) not in OPENED and "/etc/passwd" not in OPENED
    allowed = (str(serve_run[0]), str(_photo("x").parent), sys.prefix, sys.base_prefix, "/usr/", "/proc/", "/dev/",
               "/sys/", "/etc/localtime")
    outside = [p for p in OPENED if not os.path.abspath(p).startswith(allowed)]
    assert not outside, outside


def test_oversized_uploads_get_413(serve_run, service):
    c = TestClient(create_app(str(serve_run[0]), service, max_upload_bytes=200_000, preload=False))
    big = serve_run[1].read_bytes() + b"\0" * 300_000
    r = c.post("/search", files={"file": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(40):
            yield b"\0" * 10_000

    r = c.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_bombs_non_images_and_corrupt_files_get_4xx(client, serve_run):
    bomb = _bomb_png()
    assert len(bomb) < 1_000_000  # under the upload limit: the decoder's pixel guard refuses it
    cases = {"bomb.png": (bomb, 413, "too_large"), "notes.txt": (b"just text\n" * 50, 415, "not_image"),
             "empty.jpg": (b"", 400, "empty"), "cut.jpg": (serve_run[1].read_bytes()[:3000], 400, "truncated")}
    for name, (data, status, reason) in cases.items():
        r = client.post("/search", files={"file": (name, data, "application/octet-stream")}, data={"method": "gem"})
        assert r.status_code == status and reason in r.json()["error"], (name, r.text)


# ------------------------------------------------------------------------------------------ the real server
@pytest.fixture(scope="module")
def live(serve_run):
    """``python -m jobs.serve`` on a free port (default host): its URL; stopped by pid afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--index", str(serve_run[0]), "--port", "0",
                             "--threads", "2"], cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline, seen = None, time.time() + 240, []
        while url is None and time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            seen.append(line)
            m = re.search(r"open (http://\S+/)", line)
            url = m.group(1) if m else None
        assert url, "".join(seen)
        assert url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _raw_get(url: str, path: str) -> bytes:
    host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_raw_dot_segments_are_refused_by_the_server(live):
    for path in ("/images/../../../../etc/passwd", "/images/..%2f..%2f..%2fetc%2fpasswd", "/images//etc/passwd",
                 "/images/painting_00035/../../../etc/passwd"):
        data = _raw_get(live, path)
        status = int(data.split(b" ", 2)[1])
        assert status in (400, 404) and b"root:" not in data, (path, data[:200])
    assert _raw_get(live, "/images/painting_00035?size=32").split(b" ", 2)[1] == b"200"


@pytest.mark.slow  # 5-20 s: a fresh interpreter importing torch
def test_cli_refuses_a_missing_index_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.serve", "--index", str(tmp_path / "none"), "--port", "0"],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and proc.stderr.startswith("jobs.serve: error:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_fifty_concurrent_searches(live, serve_run, capsys):
    """50 concurrent uploads (distinct boxes, so every one is encoded): no error, the boxed painting first."""
    _, photo, boxes = serve_run
    data = photo.read_bytes()

    def one(k: int) -> tuple[int, float, str, str]:
        box, painting = boxes[k % 2]
        jitter = k // 2  # 0..24 pixels: 50 distinct queries
        b = (box[0] + jitter % 5, box[1] + jitter // 5, box[2] - jitter % 5, box[3] - jitter // 5)
        t = time.perf_counter()
        r = httpx.post(live + "search", files={"file": (photo.name, data, "image/jpeg")},
                       data={"bbox": _box(b), "method": "gem", "top_k": "5"}, timeout=600)
        dt = time.perf_counter() - t
        return r.status_code, dt, (r.json()["results"][0]["image_id"] if r.status_code == 200 else r.text), painting

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=50) as ex:
        out = list(ex.map(one, range(50)))
    wall = time.perf_counter() - t0
    assert [o[0] for o in out] == [200] * 50, [o for o in out if o[0] != 200][:3]
    assert all(o[2] == o[3] for o in out), [o for o in out if o[2] != o[3]][:3]
    lat = np.array([o[1] for o in out])
    p50, p99 = np.percentile(lat, [50, 99])
    with capsys.disabled():
        print(f"\n[load] 50 concurrent POST /search (upload + box, gem, top 5): p50 {p50:.2f} s, p99 {p99:.2f} s, "
              f"max {lat.max():.2f} s, wall {wall:.1f} s, {50 / wall:.2f} searches/s")


def _green_pixels(png: bytes) -> int:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((a[..., 1] > 180) & (a[..., 0] < 90) & (a[..., 2] < 90)).sum())


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed")
def test_browser_upload_draw_box_and_find_the_painting(live, serve_run, tmp_path):
    """Headless Chromium (Playwright): upload the photo, draw each painting's box with the mouse, search; the boxed
    painting comes first. Then a result is used as the query, and verified matches (injected into the /search
    answer, as a ``+sv`` ranking will send them) are drawn as lines."""
    sync_api = pytest.importorskip("playwright.sync_api")
    _, photo, boxes = serve_run
    with Image.open(photo) as im:
        width = im.width
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(live)
            page.wait_for_selector("body[data-ready='1']")
            assert page.eval_on_selector_all("#method option", "os => os.map(o => o.value)") == [
                "gem", "os_egm", "regional:fs_egm"]
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#search:not([disabled])")
            for box, painting in reversed(boxes):
                frame = page.locator("#query").bounding_box()
                k = frame["width"] / width
                page.mouse.move(frame["x"] + box[0] * k, frame["y"] + box[1] * k)
                page.mouse.down()
                page.mouse.move(frame["x"] + box[2] * k, frame["y"] + box[3] * k, steps=5)
                page.mouse.up()
                drawn = [float(v) for v in page.inner_text("#boxtext").split()[1].split(",")]
                assert np.allclose(drawn, box, atol=2 / k + 1), (drawn, box)
                page.click("#search")
                page.wait_for_selector("body[data-state='done']", timeout=120_000)
                page.wait_for_selector("#results figure:not([data-loaded])", state="detached", timeout=60_000)
                ids = page.eval_on_selector_all("#results figure", "fs => fs.map(f => f.dataset.imageId)")
                assert ids[0] == painting, (painting, ids)
                assert page.eval_on_selector_all("#results figure", "fs => fs.map(f => f.dataset.loaded)") == [
                    "1"] * len(ids)  # every thumbnail decoded and drawn
                assert page.get_attribute("#saliency", "data-drawn") == "os"
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB"))
            assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000  # photos drawn, not a blank page

            def with_matches(route):  # what a "+sv" ranking would add: 3 point pairs on the first result
                response = route.fetch()
                body = response.json()
                x0, y0, x1, y1 = body["query"]["extent"]
                body["results"][0]["matches"] = [[x0 + 5, y0 + 5, 10, 10], [(x0 + x1) / 2, (y0 + y1) / 2, 300, 400],
                                                 [x1 - 5, y1 - 5, 700, 900]]
                route.fulfill(response=response, json=body)

            # Playwright drops an intercepted request's file part, so this search queries a database image: click the
            # first result (the page's "use as query"), then search with the answer augmented
            page.click("#results figure >> nth=0")
            page.wait_for_selector(f"#status:has-text('database image {ids[0]}')")
            page.route("**/search", with_matches)
            page.click("#search")
            page.wait_for_selector("#results canvas.matches[data-matches='3']", timeout=120_000)
            lines = page.locator("#results canvas.matches").screenshot()
            assert _green_pixels(lines) > 150, _green_pixels(lines)  # three lines, ~200+ px each
            assert page.locator("#results canvas.matches").count() == 1
            assert _green_pixels(page.locator("#results figure").nth(1).screenshot()) < 20
        finally:
            browser.close()
    assert not errors, errors
