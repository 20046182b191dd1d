"""storage.snapshot_pins: a reader keeps its snapshot version while a writer publishes and prunes."""
from __future__ import annotations

import json
import threading
import time

import pytest
from pathlib import Path

from storage import snapshot as sn
from storage import snapshot_pins as sp
from storage.layout import RunLayout
from tests import s3_server
from tests.s3_server import s3_env

seaweedfs = s3_server.seaweedfs  # the session fixture


def build(root: str, name: str = "global_rmac", payload: bytes = b"v") -> str:
    with sn.SnapshotWriter(root, name, method="rmac") as w:
        w.write_bytes("index.npy", payload)
        w.write_bytes("image_ids.npy", payload[::-1])
    return w.version


def test_pinned_version_survives_publications_and_pruning(tmp_path):
    root = str(tmp_path)
    v1 = build(root, payload=b"first")
    reader = sp.open_pinned(root, "global_rmac", owner={"service": "search"})
    assert reader.version == v1 and sp.live_pins(root, "global_rmac")[v1][0]["owner"] == {"service": "search"}
    later = [build(root, payload=f"build {i}".encode()) for i in range(4)]
    deleted = sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1)
    assert deleted == later[:3]  # v1 pinned, the newest (LATEST) kept
    assert sn.list_versions(root, "global_rmac") == [v1, later[-1]]
    assert reader.read_bytes("index.npy") == b"first" and reader.read_bytes("image_ids.npy") == b"tsrif"
    reader.close()
    assert sp.live_pins(root, "global_rmac") == {}
    assert sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1) == [v1]
    assert sn.list_versions(root, "global_rmac") == [later[-1]]


def test_reading_a_pruned_version_is_a_clear_error(tmp_path):
    root = str(tmp_path)
    v1 = build(root)
    reader = sp.open_pinned(root, "global_rmac")
    build(root)
    assert sn.prune(root, "global_rmac", keep_days=0, keep_min=1) == [v1]  # the old prune ignores pins
    with pytest.raises(sn.SnapshotError, match=f"global_rmac/{v1}: index.npy is gone: the version was pruned"):
        reader.read_bytes("index.npy")
    reader.close()


def test_expired_pins_do_not_block_pruning(tmp_path):
    root = str(tmp_path)
    v1 = build(root)
    reader = sp.open_pinned(root, "global_rmac", ttl_s=0.2)
    v2 = build(root)
    assert sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1) == []  # still pinned
    time.sleep(0.3)
    assert sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1) == [v1]
    assert not Path(RunLayout(str(tmp_path)).index_pins("global_rmac")).exists() or \
        not list(Path(RunLayout(str(tmp_path)).index_pins("global_rmac")).iterdir())  # the expired pin was removed
    with pytest.raises(sn.SnapshotError, match="pruned"):
        reader.read_bytes("index.npy")
    assert sn.list_versions(root, "global_rmac") == [v2]


def test_keepalive_renews_the_pin(tmp_path):
    root = str(tmp_path)
    v1 = build(root)
    with sp.open_pinned(root, "global_rmac", ttl_s=1.5, keepalive=True) as reader:
        build(root)
        time.sleep(2.5)  # longer than the ttl: only renewals keep it
        assert sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1) == []
        assert reader.read_bytes("index.npy") == b"v"
    assert sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1) == [v1]


def test_pin_taken_while_pruning_restores_the_version(tmp_path, monkeypatch):
    """The pruner has deleted the manifest when a reader's pin appears: it restores the manifest and keeps
    the folder, and the reader opens the version."""
    root = str(tmp_path)
    v1 = build(root)
    build(root)
    manifest = (Path(RunLayout(str(tmp_path)).index_dir("global_rmac")) / v1 / "manifest.json").read_bytes()
    real = sp.live_pins
    calls = []

    def live_pins_with_a_reader_arriving(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the re-check after the manifest was removed: a reader pinned v1 meanwhile
            assert not (Path(RunLayout(str(tmp_path)).index_dir("global_rmac")) / v1 / "manifest.json").exists()
            fs, r = sn._fs(root)
            sp._write_pin(fs, f"{sp._pins_dir(r, 'global_rmac')}/{v1}--reader.json", v1, 60, {})
        return real(*a, **kw)

    monkeypatch.setattr(sp, "live_pins", live_pins_with_a_reader_arriving)
    assert sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1) == []
    assert (Path(RunLayout(str(tmp_path)).index_dir("global_rmac")) / v1 / "manifest.json").read_bytes() == manifest
    assert sn.open_version(root, "global_rmac", v1, verify=True).version == v1


def test_readers_never_fail_while_a_writer_publishes_and_prunes(tmp_path):
    """Stress: readers pin LATEST and read every file while a writer publishes and prunes continuously."""
    root = str(tmp_path)
    with sn.SnapshotWriter(root, "global_rmac") as w:
        w.write_bytes("index.npy", b"0")
        w.write_json("meta.json", {"n": 0})
        w.counts["n"] = 0
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                with sp.open_pinned(root, "global_rmac", ttl_s=30) as snap:
                    n = snap.snapshot.manifest["counts"]["n"]
                    time.sleep(0.002)
                    assert snap.read_bytes("index.npy") == str(n).encode()
                    assert json.loads(snap.read_bytes("meta.json")) == {"n": n}
                    reads[0] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 2.0
    n = 0
    pruned = 0
    while time.time() < deadline:
        n += 1
        with sn.SnapshotWriter(root, "global_rmac") as w:
            w.write_bytes("index.npy", str(n).encode())
            w.write_json("meta.json", {"n": n})
            w.counts["n"] = n
        pruned += len(sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1))
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[:3]
    assert reads[0] > 20 and pruned > 5 and n > 5, (reads, pruned, n)


def test_release_pins_one_run_across_indexes(tmp_path):
    root = str(tmp_path)
    a1, b1 = build(root, "global_rmac", b"a1"), build(root, "asmk_star", b"b1")
    assert sp.open_pinned_set(root, ["global_rmac", "asmk_star"])["global_rmac"].version == a1  # no release
    assert sp.publish_release(root, ["global_rmac", "asmk_star"], info={"run": 1}) == {
        "global_rmac": a1, "asmk_star": b1}
    a2 = build(root, "global_rmac", b"a2")  # the next run has published one index of two so far
    pins = sp.open_pinned_set(root, ["global_rmac", "asmk_star"])
    assert {k: p.version for k, p in pins.items()} == {"global_rmac": a1, "asmk_star": b1}
    assert pins["global_rmac"].read_bytes("index.npy") == b"a1"
    for p in pins.values():
        p.close()
    b2 = build(root, "asmk_star", b"b2")
    sp.publish_release(root, ["global_rmac", "asmk_star"])
    pins = sp.open_pinned_set(root, ["global_rmac", "asmk_star"])
    assert {k: p.version for k, p in pins.items()} == {"global_rmac": a2, "asmk_star": b2}
    # an index the release does not cover: each name's LATEST
    c1 = build(root, "regional_fs_egm", b"c1")
    pins2 = sp.open_pinned_set(root, ["global_rmac", "regional_fs_egm"])
    assert {k: p.version for k, p in pins2.items()} == {"global_rmac": a2, "regional_fs_egm": c1}
    for p in [*pins.values(), *pins2.values()]:
        p.close()


def test_pins_on_s3(seaweedfs, monkeypatch):
    s3_env(monkeypatch, seaweedfs)
    root = seaweedfs.uri(f"pins-{time.time_ns()}")
    v1 = build(root, payload=b"first")
    reader = sp.open_pinned(root, "global_rmac")
    later = [build(root, payload=b"x"), build(root, payload=b"y")]
    assert sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1) == later[:1]
    assert reader.read_bytes("index.npy") == b"first"
    reader.close()
    assert sp.prune_unpinned(root, "global_rmac", keep_days=0, keep_min=1) == [v1]
    assert sn.list_versions(root, "global_rmac") == later[1:]
