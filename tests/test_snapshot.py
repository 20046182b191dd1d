"""Tests for storage.snapshot: atomic publication, readers during builds, failed builds, pruning, S3."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading

import pytest
from pathlib import Path

from storage.layout import RunLayout
from storage import snapshot as sn


def _build(root, name="glob", payload=b"abc", **kw):
    with sn.SnapshotWriter(root, name, method="rmac", factory="IVF16,Flat", **kw) as w:
        w.write_bytes("index.faiss", payload)
        w.write_json("meta/params.json", {"nprobe": 8})
        w.counts["vectors"] = 3
    return w


def test_publish_manifest_and_checksums(tmp_path):
    w = _build(str(tmp_path), payload=b"hello index")
    base = Path(RunLayout(str(tmp_path)).index_dir("glob"))
    assert Path(RunLayout(str(tmp_path)).index_latest("glob")).read_text().strip() == w.version
    man = json.loads((base / w.version / "manifest.json").read_text())
    assert man["method"] == "rmac" and man["factory"] == "IVF16,Flat" and man["counts"] == {"vectors": 3}
    assert set(man["files"]) == {"index.faiss", "meta/params.json"}
    assert man["files"]["index.faiss"] == {"sha256": hashlib.sha256(b"hello index").hexdigest(), "bytes": 11}
    params = (base / w.version / "meta" / "params.json").read_bytes()
    assert man["files"]["meta/params.json"]["sha256"] == hashlib.sha256(params).hexdigest()
    assert man["bytes"] == 11 + len(params)
    snap = sn.open_latest(str(tmp_path), "glob", verify=True)
    assert snap.version == w.version and snap.read_bytes("index.faiss") == b"hello index"
    assert snap.read_json("meta/params.json") == {"nprobe": 8}
    # tampering is detected
    (base / w.version / "index.faiss").write_bytes(b"hellO index")
    with pytest.raises(sn.SnapshotError):
        sn.open_latest(str(tmp_path), "glob", verify=True)


def test_files_written_outside_the_helpers_are_checksummed(tmp_path):
    with sn.SnapshotWriter(f"file://{tmp_path}", "x") as w:
        with w.fs.open(w.path("raw.bin"), "wb") as f:  # e.g. a library writing through fsspec itself
            f.write(b"\x00\x01\x02")
        with open(w.uri("via_uri.bin").removeprefix("file://"), "wb") as f:  # or through its URI
            f.write(b"uri")
    snap = sn.open_latest(str(tmp_path), "x", verify=True)
    man = snap.manifest
    assert man["files"]["raw.bin"]["sha256"] == hashlib.sha256(b"\x00\x01\x02").hexdigest()
    assert man["files"]["via_uri.bin"]["sha256"] == hashlib.sha256(b"uri").hexdigest()
    assert snap.uri("raw.bin").startswith("file://")


def test_reader_during_build_sees_previous_version(tmp_path):
    root = str(tmp_path)
    first = _build(root, payload=b"v1")
    started, release = threading.Event(), threading.Event()
    result = {}

    def builder():
        with sn.SnapshotWriter(root, "glob") as w:
            w.write_bytes("index.faiss", b"v2-partial")
            result["version"] = w.version
            started.set()
            assert release.wait(10)
            w.write_bytes("more.bin", b"rest")

    t = threading.Thread(target=builder)
    t.start()
    assert started.wait(10)
    snap = sn.open_latest(root, "glob", verify=True)  # mid-build
    assert snap.version == first.version and snap.read_bytes("index.faiss") == b"v1"
    assert sn.list_versions(root, "glob") == [first.version]
    assert result["version"] in sn.list_versions(root, "glob", include_incomplete=True)
    assert sn.prune(root, "glob", keep_days=1, keep_min=0) == []  # young in-progress build is not pruned
    release.set()
    t.join(10)
    snap = sn.open_latest(root, "glob", verify=True)
    assert snap.version == result["version"] and snap.files == ["index.faiss", "more.bin"]
    assert sn.list_versions(root, "glob") == sorted([first.version, result["version"]])


def test_failed_build_publishes_nothing(tmp_path):
    root = str(tmp_path)
    with pytest.raises(RuntimeError):
        with sn.SnapshotWriter(root, "glob") as w:
            w.write_bytes("index.faiss", b"x")
            raise RuntimeError("boom")
    assert sn.read_latest(root, "glob") is None
    with pytest.raises(FileNotFoundError):
        sn.open_latest(root, "glob")
    assert not os.path.exists(Path(RunLayout(str(tmp_path)).index_dir("glob")) / w.version)
    good = _build(root)
    with pytest.raises(ValueError):
        with sn.SnapshotWriter(root, "glob") as w2:
            w2.write_bytes("index.faiss", b"y")
            raise ValueError("bad")
    assert sn.read_latest(root, "glob") == good.version
    assert sn.list_versions(root, "glob", include_incomplete=True) == [good.version]


def test_prune_keeps_latest_and_recent(tmp_path):
    root = str(tmp_path)
    vs = [_build(root, payload=str(i).encode()).version for i in range(5)]
    # roll LATEST back to the oldest version (an operator rollback)
    Path(RunLayout(str(tmp_path)).index_latest("glob")).write_text(vs[0] + "\n")
    # an incomplete (crashed) build directory
    stale = "v20000101T000000000000Z-deadbeef"
    os.makedirs(Path(RunLayout(str(tmp_path)).index_dir("glob")) / stale)
    # complete versions are all young: only the old crashed build goes
    assert sn.prune(root, "glob", keep_days=7, keep_min=0) == [stale]
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    deleted = sn.prune(root, "glob", keep_days=7, keep_min=2, now=future)
    assert deleted == [vs[1], vs[2]]
    assert sn.list_versions(root, "glob", include_incomplete=True) == [vs[0], vs[3], vs[4]]
    assert sn.prune(root, "glob", keep_days=7, keep_min=0, now=future) == [vs[3], vs[4]]
    assert sn.open_latest(root, "glob", verify=True).version == vs[0]


def test_bad_names_rejected(tmp_path):
    with pytest.raises(ValueError):
        sn.SnapshotWriter(str(tmp_path), "../etc")
    with sn.SnapshotWriter(str(tmp_path), "ok") as w:
        for bad in ("../x", "/abs", "manifest.json", ""):
            with pytest.raises(ValueError):
                w.write_bytes(bad, b"")
    Path(RunLayout(str(tmp_path)).index_latest("ok")).write_text("../../elsewhere")
    with pytest.raises(sn.SnapshotError):
        sn.open_latest(str(tmp_path), "ok")


@pytest.fixture(scope="module")
def s3_env():
    server_mod = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("snapbucket")
    yield "s3://snapbucket/out"
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def test_s3_roundtrip_and_prune(s3_env):
    first = _build(s3_env, payload=b"one")
    with pytest.raises(RuntimeError):
        with sn.SnapshotWriter(s3_env, "glob") as w:
            w.write_bytes("index.faiss", b"partial")
            raise RuntimeError("boom")
    second = _build(s3_env, payload=b"two")
    snap = sn.open_latest(s3_env, "glob", verify=True)
    assert snap.version == second.version and snap.read_bytes("index.faiss") == b"two"
    assert sn.list_versions(s3_env, "glob", include_incomplete=True) == [first.version, second.version]
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    assert sn.prune(s3_env, "glob", keep_days=1, keep_min=0, now=future) == [first.version]
    assert sn.list_versions(s3_env, "glob") == [second.version]
