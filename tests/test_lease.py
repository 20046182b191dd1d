"""storage.lease: exclusive, heartbeated leases on a local root, on moto's S3 and on SeaweedFS.

Every scenario runs on the three stores (``store`` fixture): a second acquirer fails at once naming the
holder; a lease without heartbeats is taken over after its ttl (and the old holder finds it lost); heartbeats
keep a lease alive past several ttls; a holder process killed with SIGKILL is taken over after the ttl;
simultaneous take-overs of one stale lease leave exactly one winner (local and SeaweedFS only: moto applies
conditions by check-then-act, so it is not an atomicity test).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.layout import LOCK_FILE as LOCK_NAME
from storage.layout import RunLayout
from storage.lease import Lease, LeaseHeld, LeaseLost, read_lease
from storage.uri import exists, read_bytes, write_bytes_atomic
from tests import s3_server
from tests.s3_server import FaultProxy, s3_env

REPO = Path(__file__).resolve().parents[1]
seaweedfs, moto_s3 = s3_server.seaweedfs, s3_server.moto_s3  # the session fixtures
TTL, BEAT = 1.2, 0.2


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def store(request, tmp_path, monkeypatch):
    """(kind, root URI) of an empty root on each store; S3 environments set for this test only."""
    kind = request.param
    if kind == "local":
        return kind, str(tmp_path / "run")
    server = request.getfixturevalue("moto_s3" if kind == "moto" else "seaweedfs")
    s3_env(monkeypatch, server)
    return kind, server.uri(f"lease-{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}")


def lease(root: str, job: str, ttl: float = TTL, beat: float = BEAT, **kw) -> Lease:
    return Lease(root, {"job_id": job, "command": "index"}, ttl_s=ttl, heartbeat_s=beat, **kw)


def freeze(lease_: Lease) -> None:
    """Stop a holder's heartbeat without releasing: the job hangs (or died without cleaning up)."""
    lease_._stop.set()
    lease_._thread.join()


def test_second_acquirer_fails_fast_and_says_who_holds_it(store):
    _, root = store
    a = lease(root, "index-A", ttl=30, beat=5).acquire()
    try:
        record = json.loads(read_bytes(RunLayout(root).lock))
        assert record["job_id"] == "index-A" and record["host"] == socket.gethostname()
        assert record["pid"] == os.getpid() and record["ttl_s"] == 30
        assert record["started_at"].endswith("Z") and record["heartbeat_at"].endswith("Z")
        assert read_lease(root)["token"] == a.token
        t0 = time.time()
        with pytest.raises(LeaseHeld) as info:
            lease(root, "index-B", ttl=30, beat=5).acquire()
        assert time.time() - t0 < 2.0
        msg = str(info.value)
        for part in ("index-A", socket.gethostname(), f"pid {os.getpid()}", record["started_at"], "ago",
                     "ttl 30 s", LOCK_NAME):
            assert part in msg, (part, msg)
        assert info.value.holder["job_id"] == "index-A"
    finally:
        assert a.release()
    assert not exists(RunLayout(root).lock) and read_lease(root) is None
    with lease(root, "index-B", ttl=30, beat=5) as b:  # free again
        assert b.held and read_lease(root)["job_id"] == "index-B"
    assert read_lease(root) is None


def test_stale_lease_is_taken_over_after_its_ttl(store):
    _, root = store
    lost: list[str] = []
    a = lease(root, "index-A", on_lost=lost.append).acquire()
    freeze(a)
    t_frozen = time.time()
    with pytest.raises(LeaseHeld):
        lease(root, "index-B").acquire()
    while time.time() - t_frozen < TTL - 0.4:  # still live well within the ttl
        with pytest.raises(LeaseHeld):
            lease(root, "index-B").acquire()
        time.sleep(0.2)
    time.sleep(max(0.0, t_frozen + TTL + 0.3 - time.time()))
    b = lease(root, "index-B").acquire()
    try:
        assert b.took_over["job_id"] == "index-A" and read_lease(root)["job_id"] == "index-B"
        with pytest.raises(LeaseLost, match="index-B"):  # the old holder wakes up: its renewal fails
            a.renew()
        assert a.lost and not a.held and lost and "index-B" in lost[0]
        with pytest.raises(LeaseLost):
            a.check()
        assert a.release() is False and read_lease(root)["job_id"] == "index-B"  # not deleted by A
    finally:
        assert b.release()


def test_heartbeat_keeps_a_live_lease(store):
    _, root = store
    with lease(root, "index-A") as a:
        first = read_lease(root)
        time.sleep(2.5 * TTL)
        with pytest.raises(LeaseHeld, match="index-A"):
            lease(root, "index-B").acquire()
        now = read_lease(root)
        assert now["token"] == first["token"] and now["seq"] >= 5
        assert now["heartbeat_at"] > first["heartbeat_at"] and now["started_at"] == first["started_at"]
        a.check()


def test_lost_lease_is_noticed_by_the_heartbeat(store):
    _, root = store
    lost: list[str] = []
    a = lease(root, "index-A", on_lost=lost.append).acquire()
    foreign = {**read_lease(root), "job_id": "intruder", "token": "someone-else"}
    write_bytes_atomic(RunLayout(root).lock, json.dumps(foreign).encode())
    deadline = time.time() + 5
    while not a.lost and time.time() < deadline:
        time.sleep(0.05)
    assert a.lost and lost and "intruder" in lost[0]
    with pytest.raises(LeaseLost):
        a.check()
    assert a.release() is False and read_lease(root)["job_id"] == "intruder"


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from storage.lease import Lease
lease = Lease({root!r}, {{"job_id": "child-job"}}, ttl_s={ttl}, heartbeat_s={beat}).acquire()
print("READY", flush=True)
time.sleep(120)
"""


def test_killed_holder_is_taken_over_after_the_ttl(store):
    _, root = store
    ttl = 2.0
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), root=root, ttl=ttl, beat=0.3)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read() if proc.poll() is not None else line
        time.sleep(0.5)
        with pytest.raises(LeaseHeld) as info:
            lease(root, "index-B", ttl=ttl, beat=0.3).acquire()
        assert "child-job" in str(info.value) and f"pid {proc.pid}" in str(info.value)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t_kill = time.time()
        while True:
            try:
                b = lease(root, "index-B", ttl=ttl, beat=0.3).acquire()
                break
            except LeaseHeld:
                assert time.time() - t_kill < ttl + 3, "the dead holder's lease was never taken over"
                time.sleep(0.1)
        waited = time.time() - t_kill
        assert ttl - 0.3 - 0.2 <= waited <= ttl + 3, waited  # last heartbeat was at most 0.3 s before the kill
        assert b.took_over["job_id"] == "child-job" and b.took_over["pid"] == proc.pid
        assert b.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def write_stale_lease(root: str, kind: str) -> None:
    """A lease of a job that died long ago (local: also its mtime; S3 LastModified cannot be set, so the
    record's ttl is tiny instead)."""
    rec = {"job_id": "dead-job", "host": "elsewhere", "pid": 1, "started_at": "2020-01-01T00:00:00.000Z",
           "heartbeat_at": "2020-01-01T00:00:00.000Z", "ttl_s": 0.01, "heartbeat_s": 0.005,
           "token": "dead-token", "seq": 7, "owner": {}}
    uri = RunLayout(root).lock
    write_bytes_atomic(uri, json.dumps(rec).encode())
    if kind == "local":
        os.utime(uri, (time.time() - 3600, time.time() - 3600))
    time.sleep(0.05)


def test_simultaneous_take_overs_have_one_winner(store):
    kind, root = store
    if kind == "moto":
        pytest.skip("moto checks conditions and writes in two steps: not atomic under concurrency")
    n, rounds = 6, 12 if kind == "local" else 3
    for r in range(rounds):
        write_stale_lease(root, kind)
        barrier = threading.Barrier(n)
        results: dict[int, object] = {}

        def contend(i: int, barrier: threading.Barrier = barrier, results: dict = results) -> None:
            le = lease(root, f"taker-{i}", ttl=30, beat=10)
            barrier.wait()
            try:
                results[i] = le.acquire()
            except LeaseHeld as exc:
                results[i] = exc

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [i for i, v in results.items() if isinstance(v, Lease)]
        assert len(results) == n and len(winners) == 1, (r, results)
        holder = read_lease(root)
        assert holder["job_id"] == f"taker-{winners[0]}" and holder["token"] == results[winners[0]].token
        for i, v in results.items():
            if i != winners[0]:
                assert f"taker-{winners[0]}" in str(v) or "kept changing" in str(v), str(v)
        assert results[winners[0]].release()
    if kind == "local":  # no leftovers but the take-over markers
        left = sorted(p.name for p in Path(root).iterdir())
        assert all(n.startswith(LOCK_NAME + ".takeover-") for n in left), left


def test_half_written_local_lease_counts_as_live_until_ttl(tmp_path):
    root = str(tmp_path / "run")
    os.makedirs(root)
    path = RunLayout(root).lock
    open(path, "wb").close()  # an O_EXCL create whose writer has not written yet
    with pytest.raises(LeaseHeld, match="being written"):
        lease(root, "index-B", ttl=5, beat=1).acquire()
    os.utime(path, (time.time() - 60, time.time() - 60))  # ... and died
    with lease(root, "index-B", ttl=5, beat=1) as b:
        assert b.took_over == {} and read_lease(root)["job_id"] == "index-B"


def test_bad_parameters():
    with pytest.raises(ValueError):
        Lease("/tmp/x", ttl_s=10, heartbeat_s=10)
    with pytest.raises(ValueError):
        Lease("/tmp/x", ttl_s=0)


def test_lost_replies_to_conditional_writes_on_s3(seaweedfs, monkeypatch):
    """The create, a renewal and the release are applied by the server but their replies are lost: the
    retried conditional request then fails (412) and the lease recognises its own write by token and seq."""
    s3_env(monkeypatch, seaweedfs)
    root = seaweedfs.uri(f"lease-drops-{time.time_ns()}")
    with FaultProxy(seaweedfs.endpoint) as proxy:
        s3_env(monkeypatch, seaweedfs, retries=4, AWS_ENDPOINT_URL=proxy.endpoint, AWS_MAX_ATTEMPTS="1")
        lease(root, "probe", ttl=30, beat=10).acquire().release()  # the conditional-write probe ran already
        proxy.faults.append("drop:PUT")
        a = lease(root, "index-A", ttl=30, beat=10).acquire()
        assert proxy.faulted == 1 and a.held and read_lease(root)["token"] == a.token
        proxy.faults.append("drop:PUT")
        a.renew()
        assert proxy.faulted == 2 and read_lease(root)["seq"] == a.seq == 1 and not a.lost
        proxy.faults.append("drop:DELETE")
        assert a.release() and proxy.faulted == 3 and read_lease(root) is None
