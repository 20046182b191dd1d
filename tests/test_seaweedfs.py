"""storage.uri against a real S3 server (SeaweedFS, tests/s3_server.py): round trips, clear errors for wrong
keys, a missing bucket and an unreachable endpoint, and retries of injected 503s / resets through a proxy."""
from __future__ import annotations

import logging
import time

import pyarrow as pa
import pytest

from storage.schemas import _meta
from storage.tables import StageManifest, TableStore
from storage.uri import (StorageError, check_access, exists, listdir, read_bytes, remove, write_bytes_atomic)
from tests import s3_server
from tests.s3_server import FaultProxy, free_port_pairs, s3_env

seaweedfs = s3_server.seaweedfs  # the session fixture


def test_round_trip_through_storage_uri(seaweedfs, monkeypatch):
    s3_env(monkeypatch, seaweedfs)
    base = seaweedfs.uri(f"roundtrip-{time.time_ns()}")
    check_access(base)
    payload = bytes(range(256)) * 1000
    write_bytes_atomic(f"{base}/a/one.bin", payload)
    write_bytes_atomic(f"{base}/a/two.json", b'{"x": 1}')
    write_bytes_atomic(f"{base}/b.txt", b"b")
    assert read_bytes(f"{base}/a/one.bin") == payload
    assert exists(f"{base}/a/two.json") and exists(f"{base}/a") and not exists(f"{base}/nothing")
    assert listdir(base) == [f"{base}/a", f"{base}/b.txt"]
    assert listdir(f"{base}/a") == [f"{base}/a/one.bin", f"{base}/a/two.json"]
    assert listdir(f"{base}/missing") == []
    write_bytes_atomic(f"{base}/a/two.json", b'{"x": 2}')  # overwrite
    assert read_bytes(f"{base}/a/two.json") == b'{"x": 2}'
    remove(f"{base}/a/one.bin")
    remove(f"{base}/a/one.bin")  # missing is fine
    assert listdir(f"{base}/a") == [f"{base}/a/two.json"]
    remove(base, recursive=True)
    assert not exists(f"{base}/b.txt") and not exists(f"{base}/a/two.json")
    with pytest.raises(FileNotFoundError):
        read_bytes(f"{base}/a/two.json")
    # SeaweedFS 4.48 keeps an emptied folder as a 0-byte "a/" object (AWS keeps nothing), which storage.uri's
    # listdir reports as a phantom entry (see the report); no file objects remain
    client = seaweedfs.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=seaweedfs.bucket,
                                                      Prefix=base.split("/", 3)[3] + "/").get("Contents", [])]
    assert all(k.endswith("/") for k in keys), keys


def test_tables_commit_and_read_back(seaweedfs, monkeypatch):
    s3_env(monkeypatch, seaweedfs)
    root = seaweedfs.uri(f"tables-{time.time_ns()}")
    store = TableStore(root)
    schema = pa.schema([("image_id", pa.string()), ("v", pa.int64())], metadata=_meta("images"))
    for shard in (0, 1):
        t = pa.table({"image_id": [f"img{shard}{i}" for i in range(3)], "v": [shard * 10 + i for i in range(3)]},
                     schema=schema)
        StageManifest(root, "extract").commit(shard, {"images": store.write("images", "extract", shard, t)})
    store.write("images", "extract", 2, pa.table({"image_id": ["uncommitted"], "v": [99]}, schema=schema))
    got = store.read("images").to_pydict()
    assert sorted(got["v"]) == [0, 1, 2, 10, 11, 12] and "uncommitted" not in got["image_id"]


def test_wrong_secret_is_a_clear_error_without_retries(seaweedfs, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="storage.uri")
    s3_env(monkeypatch, seaweedfs)
    key = seaweedfs.uri(f"creds-{time.time_ns()}.bin")
    write_bytes_atomic(key, b"x")
    wrong = "Wr0ngSeaweedSecretDoNotPrint/0123456789ab"
    s3_env(monkeypatch, seaweedfs, AWS_SECRET_ACCESS_KEY=wrong)
    # (not listdir of the bucket root: s3fs's exists() on a bare bucket swallows errors, so it returns [])
    for call in (lambda: check_access(key), lambda: read_bytes(key), lambda: write_bytes_atomic(key, b"y"),
                 lambda: listdir(key.rsplit("/", 1)[0] + "/sub"), lambda: exists(key)):
        t0 = time.time()
        with pytest.raises(StorageError) as info:
            call()
        msg = str(info.value)
        assert "credentials were rejected" in msg and "AWS_SECRET_ACCESS_KEY" in msg, msg
        assert wrong not in msg and "gave up" not in msg
        assert time.time() - t0 < 3
    assert not [r for r in caplog.records if "retrying in" in r.getMessage()]
    s3_env(monkeypatch, seaweedfs, AWS_ACCESS_KEY_ID="AKIAUNKNOWNKEY000000")
    with pytest.raises(StorageError, match="credentials were rejected"):
        read_bytes(key)


def test_missing_bucket_says_so(seaweedfs, monkeypatch):
    s3_env(monkeypatch, seaweedfs)
    with pytest.raises(StorageError, match="bucket does not exist"):
        check_access("s3://no-such-bucket-here/run")
    with pytest.raises(StorageError, match="bucket does not exist"):
        write_bytes_atomic("s3://no-such-bucket-here/run/x.json", b"{}")
    with pytest.raises(FileNotFoundError, match="bucket does not exist"):
        read_bytes("s3://no-such-bucket-here/run/x.json")


def test_unreachable_endpoint_fails_quickly_and_clearly(seaweedfs, monkeypatch):
    port = free_port_pairs(1)[0][0]  # nothing listens there
    s3_env(monkeypatch, seaweedfs, retries=2, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_MAX_ATTEMPTS="1")
    for call in (lambda: check_access("s3://b/run"), lambda: read_bytes("s3://b/run/x"),
                 lambda: write_bytes_atomic("s3://b/run/x", b"1")):
        t0 = time.time()
        with pytest.raises(StorageError, match="check AWS_ENDPOINT_URL") as info:
            call()
        assert time.time() - t0 < 5, time.time() - t0
        assert seaweedfs.secret_key not in str(info.value)
    assert "gave up after 2 attempts" in str(info.value)


def retries_logged(caplog) -> int:
    return sum("retrying in" in r.getMessage() for r in caplog.records if r.name == "storage.uri")


def test_injected_503s_and_resets_are_retried(seaweedfs, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="storage.uri")
    s3_env(monkeypatch, seaweedfs)
    key = f"faults-{time.time_ns()}/data.bin"
    payload = b"0123456789" * 5000
    write_bytes_atomic(seaweedfs.uri(key), payload)
    with FaultProxy(seaweedfs.endpoint) as proxy:
        # botocore's own retries off: every injected 503 reaches our layer (s3fs does not retry 503
        # ServiceUnavailable, only texts with "SlowDown")
        s3_env(monkeypatch, seaweedfs, retries=5, AWS_ENDPOINT_URL=proxy.endpoint, AWS_MAX_ATTEMPTS="1")
        proxy.faults.extend(["503", "500", "503"])
        assert read_bytes(seaweedfs.uri(key)) == payload
        assert proxy.faulted == 3 and retries_logged(caplog) == 3

        caplog.clear()
        proxy.faults.extend(["503", "503"])
        write_bytes_atomic(seaweedfs.uri(key + ".copy"), payload)
        assert proxy.faulted == 5 and retries_logged(caplog) == 2
        assert seaweedfs.client().get_object(Bucket=seaweedfs.bucket, Key=key + ".copy")["Body"].read() == payload

        caplog.clear()  # resets (before an answer or in the middle of a body): s3fs retries them itself first
        proxy.faults.extend(["reset", "cut:GET", "slowdown"])
        assert read_bytes(seaweedfs.uri(key)) == payload
        assert proxy.faulted == 8 and not proxy.faults

        caplog.clear()  # more failures than attempts: a clear error naming the budget
        s3_env(monkeypatch, seaweedfs, retries=2, AWS_ENDPOINT_URL=proxy.endpoint, AWS_MAX_ATTEMPTS="1")
        proxy.faults.extend(["503"] * 3)
        with pytest.raises(StorageError, match="gave up after 2 attempts") as info:
            read_bytes(seaweedfs.uri(key))
        assert "Service Unavailable" in str(info.value) or "ServiceUnavailable" in str(info.value)
        proxy.faults.clear()
