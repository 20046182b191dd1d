"""The whole DAG, search and a nightly reindex against a real S3 server (SeaweedFS), plus the output's lease.

Images are uploaded to the bucket, ``jobs.index`` builds every stage from ``s3://`` to ``s3://``, ``jobs.search``
answers a museum-landmarks query from the S3 index, a second job on the same output fails at once naming the
holder of the lease, and ``jobs.reindex`` after adding and deleting images publishes snapshots that hold
exactly the new corpus.
"""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from storage.layout import SnapshotFiles
from storage.lease import Lease
from storage.snapshot import open_latest
from tests import helpers_jobs as J
from tests import s3_server

seaweedfs = s3_server.seaweedfs  # the session fixture
pytestmark = pytest.mark.slow

PAINTINGS = J.photo_ids("painting_", 14)
DISTRACTORS = J.photo_ids("distractor_", 8)
ADDED = J.photo_ids("painting_", 4, start=14)


def _job(module: str, server: s3_server.S3Server, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=J.PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=J.job_env(**server.env, INDEXER_S3_RETRIES="3"))


def _index_args(server: s3_server.S3Server, out: str) -> list[str]:
    return ["--config", J.SMALL_CONFIG, "--images", server.uri("images/"), "--out", out, *J.stage_args()]


def _upload(server: s3_server.S3Server, ids: list[str]) -> None:
    client = server.client()
    for i in ids:
        client.put_object(Bucket=server.bucket, Key=f"images/{i}.jpg", Body=J.photo(i).read_bytes())


def test_dag_search_lease_and_reindex_on_seaweedfs(seaweedfs, monkeypatch):
    _upload(seaweedfs, PAINTINGS + DISTRACTORS)
    out = seaweedfs.uri("runs/dag")
    proc = _job("jobs.index", seaweedfs, *_index_args(seaweedfs, out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    # search the S3 index with a photo of one of its paintings (its own file: the top hit is itself)
    query = J.photo(PAINTINGS[3])
    proc = _job("jobs.search", seaweedfs, "--index", out, "--query", query, "--method", "gem", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PAINTINGS[3] in proc.stdout.splitlines()[1]

    # a second job on the same output fails at once and says who holds it
    s3_server.s3_env(monkeypatch, seaweedfs)
    with Lease(out, {"job_id": "nightly-42", "command": "index"}, ttl_s=60, heartbeat_s=10):
        proc = _job("jobs.reindex", seaweedfs, *_index_args(seaweedfs, out), timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "nightly-42" in last and "since" in last and "Traceback" not in proc.stderr

    # nightly: 4 paintings added, 3 distractors deleted
    _upload(seaweedfs, ADDED)
    client = seaweedfs.client()
    for i in DISTRACTORS[:3]:
        client.delete_object(Bucket=seaweedfs.bucket, Key=f"images/{i}.jpg")
    proc = _job("jobs.reindex", seaweedfs, *_index_args(seaweedfs, out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    current = sorted(PAINTINGS + DISTRACTORS[3:] + ADDED)
    for name in J.index_names(out, ["gem", "rmac", "fs_egm", "os_egm"], ["fs_egm"]):
        snap = open_latest(out, name)
        ids = np.load(io.BytesIO(snap.read_bytes(SnapshotFiles.IMAGE_IDS)), allow_pickle=False).tolist()
        assert sorted(ids) == current, name
