"""jobs.download against a local HTTP server: fake archives + ground truth, resume, checksums, unsafe archives."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from storage.download import (
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    VerificationError,
    download_dataset,
    extract_tar,
    fetch,
)
from storage.datasets import load_revisitop, load_revisitop1m

REPO = Path(__file__).resolve().parents[1]


class _Server:
    """Serves ``files`` (name -> bytes); supports Range; can cut the first response short or ignore Range."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.cut_first: set[str] = set()
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=", 1)[1].split("-", 1)[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut_first:
                    server.cut_first.discard(name)
                    self.wfile.write(body[: len(body) // 2])  # connection drops mid-file
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8 + seed, 6), (seed * 20 % 256, 10, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _tgz(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _gnd_pickle(imlist, qimlist, numpy_arrays: bool) -> bytes:
    arr = (lambda x: np.asarray(x, dtype=np.int64)) if numpy_arrays else list
    gnd = [
        {"easy": arr([0]), "hard": arr([1]), "junk": arr([]), "bbx": [1.0, 2.0, 5.0, 6.0]}
        for _ in qimlist
    ]
    return pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, protocol=4)


@pytest.fixture()
def oxford_server():
    images = {f"oxbuild/{n}.jpg": _jpeg(i) for i, n in enumerate(["all_souls_1", "ashmolean_2", "query_a"])}
    images["oxbuild/readme.txt"] = b"not an image"
    files = {
        "oxbuild_images-v1.tgz": _tgz(images, symlinks={"oxbuild/link.jpg": "/etc/passwd"}),
        "gnd_roxford5k.pkl": _gnd_pickle(["all_souls_1", "ashmolean_2"], ["query_a"], numpy_arrays=True),
    }
    srv = _Server(files)
    yield srv
    srv.close()


def test_download_extract_verify_and_rerun(tmp_path, oxford_server):
    srv = oxford_server
    rec = download_dataset("roxford5k", tmp_path, base_url=srv.url)
    folder = tmp_path / "roxford5k"
    assert rec["complete"] is True
    assert sorted(p.name for p in (folder / "jpg").iterdir()) == ["all_souls_1.jpg", "ashmolean_2.jpg", "query_a.jpg"]
    assert not (folder / "jpg.partial").exists() and not (folder / "archives").exists()
    lock = json.loads((folder / "download.lock.json").read_text())
    for name in ("oxbuild_images-v1.tgz", "gnd_roxford5k.pkl"):
        assert lock["files"][name]["sha256"] == hashlib.sha256(srv.files[name]).hexdigest()
        assert lock["files"][name]["bytes"] == len(srv.files[name])
    assert lock["files"]["oxbuild_images-v1.tgz"]["extracted"] is True
    assert lock["verified"] == {"images_expected": 3, "images_found": 3}
    ds = load_revisitop("roxford5k", str(tmp_path))
    assert ds.images == ["all_souls_1", "ashmolean_2"] and Path(ds.query_path(0)).is_file()
    assert ds.query_bbox(0) == (1.0, 2.0, 5.0, 6.0)
    # a second run needs no network at all
    n_requests = len(srv.requests)
    srv.close()
    assert download_dataset("roxford5k", tmp_path, base_url=srv.url)["complete"] is True
    assert len(srv.requests) == n_requests


def test_resume_after_dropped_connection(tmp_path, oxford_server, monkeypatch):
    monkeypatch.setattr("storage.download.RETRY_BACKOFF_S", 0.0)
    srv = oxford_server
    srv.cut_first.add("oxbuild_images-v1.tgz")
    download_dataset("roxford5k", tmp_path, base_url=srv.url, keep_archives=True)
    archive = tmp_path / "roxford5k" / "archives" / "oxbuild_images-v1.tgz"
    assert archive.read_bytes() == srv.files["oxbuild_images-v1.tgz"]
    ranges = [r for n, r in srv.requests if n == "oxbuild_images-v1.tgz"]
    half = (len(srv.files["oxbuild_images-v1.tgz"])) // 2
    assert ranges == [None, f"bytes={half}-"]


def test_interrupted_multi_archive_run_resumes_per_archive(tmp_path, monkeypatch):
    monkeypatch.setattr("storage.download.RETRY_BACKOFF_S", 0.0)
    files = {
        "paris_1-v1.tgz": _tgz({"paris/defense/paris_defense_1.jpg": _jpeg(1)}),
        "gnd_rparis6k.pkl": _gnd_pickle(["paris_defense_1", "paris_eiffel_2"], ["paris_eiffel_2"], numpy_arrays=False),
    }
    srv = _Server(files)
    try:
        with pytest.raises(DownloadError):  # paris_2 not served yet: the run stops after archive 1
            download_dataset("rparis6k", tmp_path, base_url=srv.url)
        folder = tmp_path / "rparis6k"
        assert (folder / "jpg.partial" / "paris_defense_1.jpg").is_file() and not (folder / "jpg").exists()
        srv.files["paris_2-v1.tgz"] = _tgz({"paris/eiffel/paris_eiffel_2.jpg": _jpeg(2)})
        srv.requests.clear()
        rec = download_dataset("rparis6k", tmp_path, base_url=srv.url)
        assert rec["complete"] and sorted(p.name for p in (folder / "jpg").iterdir()) == [
            "paris_defense_1.jpg", "paris_eiffel_2.jpg"]
        fetched = [n for n, _ in srv.requests]
        assert "paris_1-v1.tgz" not in fetched and "paris_2-v1.tgz" in fetched
    finally:
        srv.close()


def test_resume_from_part_file_and_server_without_range(tmp_path, oxford_server):
    srv = oxford_server
    data = srv.files["gnd_roxford5k.pkl"]
    dest = tmp_path / "g.pkl"
    (tmp_path / "g.pkl.part").write_bytes(data[:10])
    digest, size = fetch(f"{srv.url}/gnd_roxford5k.pkl", dest)
    assert dest.read_bytes() == data and size == len(data) and digest == hashlib.sha256(data).hexdigest()
    assert srv.requests[-1] == ("gnd_roxford5k.pkl", "bytes=10-")
    assert not (tmp_path / "g.pkl.part").exists()
    # a server that ignores Range answers 200: the part file is restarted, not appended to
    srv.ignore_range = True
    dest2 = tmp_path / "h.pkl"
    (tmp_path / "h.pkl.part").write_bytes(b"garbage!")
    fetch(f"{srv.url}/gnd_roxford5k.pkl", dest2)
    assert dest2.read_bytes() == data


def test_checksum_mismatch_and_missing_file(tmp_path, oxford_server):
    srv = oxford_server
    with pytest.raises(ChecksumError):
        fetch(f"{srv.url}/gnd_roxford5k.pkl", tmp_path / "g.pkl", expected_sha256="0" * 64)
    assert not (tmp_path / "g.pkl").exists() and not (tmp_path / "g.pkl.part").exists()
    with pytest.raises(DownloadError):
        fetch(f"{srv.url}/nope.bin", tmp_path / "n.bin", retries=0)
    # the lock pins what was seen first: a changed server file is refused on a later download
    download_dataset("roxford5k", tmp_path / "a", base_url=srv.url, keep_archives=True)
    lock_path = tmp_path / "a" / "roxford5k" / "download.lock.json"
    lock = json.loads(lock_path.read_text())
    lock["complete"] = False
    lock["files"]["oxbuild_images-v1.tgz"]["extracted"] = False
    lock_path.write_text(json.dumps(lock))
    (tmp_path / "a" / "roxford5k" / "archives" / "oxbuild_images-v1.tgz").unlink()
    srv.files["oxbuild_images-v1.tgz"] = _tgz({"x/all_souls_1.jpg": b"tampered"})
    import shutil

    shutil.rmtree(tmp_path / "a" / "roxford5k" / "jpg")
    with pytest.raises(ChecksumError):
        download_dataset("roxford5k", tmp_path / "a", base_url=srv.url)


def test_verification_fails_when_gnd_lists_missing_images(tmp_path):
    files = {
        "oxbuild_images-v1.tgz": _tgz({"all_souls_1.jpg": _jpeg(1)}),
        "gnd_roxford5k.pkl": _gnd_pickle(["all_souls_1", "missing_9"], ["all_souls_1"], numpy_arrays=False),
    }
    srv = _Server(files)
    try:
        with pytest.raises(VerificationError, match="missing"):
            download_dataset("roxford5k", tmp_path, base_url=srv.url)
        assert not (tmp_path / "roxford5k" / "jpg").exists()  # never promoted
        with pytest.raises(VerificationError, match="expected"):
            download_dataset("roxford5k", tmp_path / "b", base_url=srv.url, expected_counts=(4993, 70))
    finally:
        srv.close()


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))  # not print: Ray, when initialised, replaces builtins.print

    files = {"gnd_roxford5k.pkl": pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Evil()]})}
    srv = _Server(files)
    try:
        with pytest.raises(VerificationError, match=r"refused global (posix|os)\.system"):
            download_dataset("roxford5k", tmp_path, base_url=srv.url)
    finally:
        srv.close()


@pytest.mark.parametrize("bad", ["../evil.jpg", "/tmp/abs_evil.jpg", "a/../../evil.jpg"])
def test_extract_refuses_path_traversal(tmp_path, bad):
    archive = tmp_path / "bad.tgz"
    archive.write_bytes(_tgz({"ok.jpg": b"1", bad: b"2"}))
    dest = tmp_path / "out" / "jpg"
    with pytest.raises(UnsafeArchiveError):
        extract_tar(archive, dest, flatten=False)
    assert not (tmp_path / "out" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    assert not Path("/tmp/abs_evil.jpg").exists()


def test_extract_skips_links_and_keeps_paths(tmp_path):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(_tgz({"d1/x.jpg": b"1", "d2/y.JPG": b"2", "d2/z.txt": b"3"}, symlinks={"d1/l.jpg": "../x"}))
    n = extract_tar(archive, tmp_path / "keep", flatten=False)
    assert n == 2 and (tmp_path / "keep" / "d1" / "x.jpg").read_bytes() == b"1"
    assert not (tmp_path / "keep" / "d1" / "l.jpg").exists() and not (tmp_path / "keep" / "d2" / "z.txt").exists()
    n = extract_tar(archive, tmp_path / "flat", flatten=True)
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["x.jpg", "y.JPG"]
    dup = tmp_path / "dup.tgz"
    dup.write_bytes(_tgz({"a/x.jpg": b"1", "b/x.jpg": b"2"}))
    with pytest.raises(UnsafeArchiveError, match="two members"):
        extract_tar(dup, tmp_path / "dupout", flatten=True)


def test_revisitop1m_layout_via_cli(tmp_path):
    names = ["00/a.jpg", "00/b.jpg", "01/c.jpg"]
    files = {
        "revisitop1m.txt": ("\n".join(names) + "\n").encode(),
        "jpg/revisitop1m.1.tar.gz": _tgz({"00/a.jpg": _jpeg(1), "00/b.jpg": _jpeg(2)}),
        "jpg/revisitop1m.2.tar.gz": _tgz({"01/c.jpg": _jpeg(3)}),
    }
    srv = _Server(files)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.download", "--dataset", "revisitop1m", "--root", str(tmp_path),
             "--base-url", srv.url, "--num-archives", "2"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
    finally:
        srv.close()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["complete"] is True
    got, root = load_revisitop1m(str(tmp_path))
    assert got == names
    assert all((Path(root) / n).is_file() for n in names)


# ------------------------------------------------------------------------ storage.datasets loaders
MUSEUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_rebuilds_numpy_but_refuses_globals(protocol):
    from storage.datasets import UnsafePickleError, restricted_loads

    obj = {"a": np.arange(5, dtype=np.int64), "f": np.float32(1.5), "e": np.empty(0), "l": [1, "x", 2.5],
           "m": np.array([[1.0, 2.0]], dtype=np.float64)}
    back = restricted_loads(pickle.dumps(obj, protocol=protocol))
    assert back.keys() == obj.keys()
    np.testing.assert_array_equal(back["a"], obj["a"])
    np.testing.assert_array_equal(back["m"], obj["m"])
    assert back["f"] == np.float32(1.5) and back["l"] == [1, "x", 2.5] and back["e"].size == 0

    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    for bad in (Evil(), np.array([1, 2], dtype=object)):
        with pytest.raises(UnsafePickleError):
            restricted_loads(pickle.dumps({"gnd": bad}, protocol=protocol))


def test_load_revisitop_pkl_validates(tmp_path):
    from storage.datasets import DatasetError, load_revisitop_pkl

    good = _gnd_pickle(["a", "b"], ["q"], numpy_arrays=True)
    (tmp_path / "gnd_rparis6k.pkl").write_bytes(good)
    ds = load_revisitop_pkl(str(tmp_path / "gnd_rparis6k.pkl"))
    assert ds.name == "rparis6k" and ds.root == str(tmp_path) and ds.image_path(1) == f"{tmp_path}/jpg/b.jpg"
    assert ds.gnd[0]["easy"].dtype == np.int64 and ds.gnd[0]["junk"].size == 0
    bad_cases = [
        {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]},  # index out of range
        {"imlist": ["a"], "qimlist": ["q"], "gnd": []},  # gnd / qimlist length mismatch
        {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "bbx": [5, 5, 1, 1]}]},  # inverted box
        {"imlist": ["../../etc/passwd"], "qimlist": [], "gnd": []},  # unsafe id
        {"qimlist": [], "gnd": []},
    ]
    for i, raw in enumerate(bad_cases):
        (tmp_path / f"gnd_bad{i}.pkl").write_bytes(pickle.dumps(raw))
        with pytest.raises(DatasetError):
            load_revisitop_pkl(str(tmp_path / f"gnd_bad{i}.pkl"))


def test_load_gnd_json_museum_landmarks_tracks():
    if not (MUSEUM / "gnd.json").exists():
        pytest.skip("museum-landmarks data not available")
    from storage.datasets import load_dataset, load_gnd_json

    ds = load_gnd_json(str(MUSEUM / "gnd.json"))
    assert (ds.n_images, ds.n_queries) == (3410, 202)  # README: 3410 database images, 202 queries
    assert ds.images[0] == "painting_00000" and ds.queries[0] == "qsd1_w1_00000"
    assert ds.query_bbox(0) is None and ds.gnd[0]["easy"].tolist() == [120]
    boxed = [i for i in range(ds.n_queries) if ds.query_bbox(i) is not None]
    assert boxed and all(len(ds.query_bbox(i)) == 4 for i in boxed)
    assert "groups" in ds.meta and len(ds.meta["groups"]) == ds.n_images
    assert Path(ds.image_path(0)).is_file() and Path(ds.query_path(ds.n_queries - 1)).is_file()
    for track, nq in (("in-photos", 83), ("no-box", 60)):
        t = load_dataset(str(MUSEUM / track / "gnd.json"))
        assert t.name == track and t.n_queries == nq
        # ``<track>/jpg`` is a link to ``../jpg`` (possibly stored as a text file): images resolve to the shared folder
        assert Path(t.image_path(0)).is_file() and Path(t.query_path(0)).is_file()
        assert Path(str(t.image_root)).resolve() == (MUSEUM / "jpg").resolve()


def test_distractor_list_and_dataset_with_distractors(tmp_path):
    from storage.datasets import Dataset, DatasetError, load_distractor_list

    (tmp_path / "list.txt").write_text("a/1.jpg\n\n b/2.jpg \n")
    names = load_distractor_list(str(tmp_path / "list.txt"))
    assert names == ["a/1.jpg", "b/2.jpg"]
    ds = Dataset("x", "/data/x", ["i0", "i1"], ["q0"], [{"easy": [0], "hard": [], "junk": [], "bbx": None}])
    big = ds.with_distractors(names, "/data/r1m/jpg")
    assert big.n_images == 4 and ds.n_images == 2
    assert big.image_path(1) == "/data/x/jpg/i1.jpg" and big.image_path(3) == "/data/r1m/jpg/b/2.jpg"
    with pytest.raises(IndexError):
        big.image_path(4)
    (tmp_path / "bad.txt").write_text("ok.jpg\n../../etc/passwd\n")
    with pytest.raises(DatasetError):
        load_distractor_list(str(tmp_path / "bad.txt"))
