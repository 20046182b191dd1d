"""Expected failures of every entry point: one clear line on stderr, a non-zero exit status, no traceback;
``-v`` adds the traceback. (Cases that need a built index are in tests/test_search.py.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers_images as H

REPO = Path(__file__).resolve().parents[1]


def run(module: str, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str, status: int | None = None) -> str:
    """Non-zero exit, no traceback, and a final stderr line naming the problem."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    if status is not None:
        assert proc.returncode == status, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1]
    for n in needles:
        assert n.lower() in last.lower(), last
    return last


def test_search_missing_index(tmp_path):
    query = H.real_photos(["painting_00003"])[0]
    last = assert_one_line(run("jobs.search", "--index", tmp_path / "nowhere", "--query", query), "not an index",
                           status=2)
    assert str(tmp_path / "nowhere") in last


def test_search_folder_that_is_not_an_index(tmp_path):
    (tmp_path / "some.txt").write_text("x")
    query = H.real_photos(["painting_00003"])[0]
    assert_one_line(run("jobs.search", "--index", tmp_path, "--query", query), "not an index", status=2)


@pytest.mark.parametrize("bbox", ["1,2,3", "a,b,c,d", "10,10,5,20", "nan,0,1,1"])
def test_search_malformed_bbox(tmp_path, bbox):
    query = H.real_photos(["painting_00003"])[0]
    assert_one_line(run("jobs.search", "--index", tmp_path, "--query", query, "--bbox", bbox), "box", status=2)


def test_verbose_shows_the_traceback(tmp_path):
    query = H.real_photos(["painting_00003"])[0]
    proc = run("jobs.search", "--index", tmp_path / "nowhere", "--query", query, "-v")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "not an index" in proc.stderr


def test_index_config_with_unknown_key_or_wrong_type(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"images: {tmp_path}\nout: {tmp_path / 'out'}\ngraph:\n  kk: 3\n")
    assert_one_line(run("jobs.index", "--config", cfg), "graph", "unknown keys", "kk", status=2)
    assert_one_line(run("jobs.index", "--images", tmp_path, "--out", tmp_path / "o", "--set", "graph.k=many"),
                    "graph.k", "expected an integer", status=2)
    assert_one_line(run("jobs.reindex", "--config", cfg), "unknown keys", status=2)


def test_index_missing_corpus(tmp_path):
    assert_one_line(run("jobs.index", "--images", tmp_path / "no_such_folder", "--out", tmp_path / "o"),
                    "no_such_folder")


def test_reindex_without_a_previous_run(tmp_path):
    (tmp_path / "imgs").mkdir()
    os.symlink(H.real_photos(["painting_00003"])[0], tmp_path / "imgs" / "a.jpg")
    assert_one_line(run("jobs.reindex", "--images", tmp_path / "imgs", "--out", tmp_path / "o"),
                    "jobs.index", status=2)


def test_benchmark_unknown_dataset_and_track(tmp_path):
    assert_one_line(run("jobs.benchmark", "--dataset", tmp_path / "nothing", "--out", tmp_path / "b"), "gnd.json")


def test_train_query_scorer_without_ground_truth_or_index(tmp_path):
    assert_one_line(run("jobs.train_query_scorer", "--dataset", tmp_path / "nothing", "--index", tmp_path),
                    "gnd.json", status=2)
    gnd = '{"imlist": ["a"], "qimlist": ["q", "r"], "gnd": [{"easy": [0]}, {"easy": [0]}]}'
    (tmp_path / "gnd.json").write_text(gnd)
    assert_one_line(run("jobs.train_query_scorer", "--dataset", tmp_path, "--index", tmp_path / "nowhere"),
                    "not an index", status=2)


def test_download_unreachable_mirror(tmp_path):
    proc = run("jobs.download", "--dataset", "roxford5k", "--root", tmp_path, "--base-url", "http://127.0.0.1:9")
    assert_one_line(proc)


def test_unreachable_s3_endpoint_is_one_line(tmp_path):
    """An unreachable endpoint: the message names the output and says to check the endpoint, without secrets.
    (Wrong credentials and a missing bucket against a real server: tests/test_s3.py, tests/test_seaweedfs.py.)"""
    env = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-printed",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "INDEXER_S3_RETRIES": "1"}
    proc = run("jobs.index", "--images", tmp_path, "--out", "s3://bucket/run", env=env, timeout=180)
    last = assert_one_line(proc, "AWS_ENDPOINT_URL")
    assert "s3cr3t-never-printed" not in proc.stderr + proc.stdout
    assert "bucket/run" in last


def test_second_job_on_the_same_output_fails_fast_naming_the_holder(tmp_path):
    from storage.lease import Lease

    (tmp_path / "imgs").mkdir()
    os.symlink(H.real_photos(["painting_00003"])[0], tmp_path / "imgs" / "a.jpg")
    out = str(tmp_path / "out")
    with Lease(out, {"job_id": "nightly-7", "command": "index"}, ttl_s=60, heartbeat_s=10):
        proc = run("jobs.index", "--images", tmp_path / "imgs", "--out", out, "--stages", "extract", timeout=60)
        last = assert_one_line(proc, "nightly-7", "since", status=3)
        assert re.search(r"since \d{4}-\d\d-\d\dT\d\d:\d\d", last), last  # the holder's start time
        proc = run("jobs.reindex", "--images", tmp_path / "imgs", "--out", out, timeout=60)
        assert_one_line(proc, "nightly-7", status=3)


@pytest.mark.slow
def test_a_dead_drivers_lease_is_taken_over_after_its_ttl(tmp_path):
    """A driver killed while holding the lease: the next job waits for nothing once the lease is older than its
    ttl, takes it over and runs."""
    import signal
    import time

    (tmp_path / "imgs").mkdir()
    for i in ("painting_00003", "painting_00010"):
        os.symlink(H.real_photos([i])[0], tmp_path / "imgs" / f"{i}.jpg")
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from storage.lease import Lease; "
        f"Lease({out!r}, {{'job_id': 'crashed-driver'}}, ttl_s=2, heartbeat_s=1).acquire(); print('held', "
        "flush=True); time.sleep(600)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    time.sleep(3)  # longer than the dead holder's ttl (a live holder: test above)
    proc = run("jobs.index", "--images", tmp_path / "imgs", "--out", out, "--stages", "extract",
               "--max-side", "128", "--num-cpus", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taken over" in proc.stderr and "crashed-driver" in proc.stderr
