"""The whole DAG on a two-node Ray cluster with S3 storage, one node lost during extraction.

A head (``ray start --head``, custom resource ``node_a``) and a second node (``ray start --address``, its own raylet,
object store, temp dir and custom resource ``node_b``) run on this machine with one CPU each, both with the
moto S3 server's endpoint and keys in their environment; the index job joins them (``--ray-address``) and writes
its run to S3. Extraction runs two actors of 0.75 CPU, so there is one on each node. Once Ray's state API shows
an extraction call finished on the second node, that node's raylet is killed (by pid); its actor is restarted on
the head and its shard redone. The job must finish on the remaining node, every image must be in the tables
exactly once, and the outputs must equal those of an undisturbed run of the same corpus and config (tables row
by row, keyed; snapshots by their image ids). Every process the test starts is ended by pid (``ray stop`` would
stop every Ray on the machine). Slow; skipped without the ``ray`` CLI, moto or the shared photos.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from storage.layout import RunLayout
from storage.tables import StageManifest
from storage.uri import read_bytes
from tests import helpers_jobs as J
from tests.s3_server import moto_s3, s3_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
psutil = pytest.importorskip("psutil")

RAY_CLI = Path(sys.executable).parent / "ray"
N_IMAGES, SHARD_SIZE = 20, 2
EXTRACT_CALL = "ShardWorker.process"


def _ids() -> list[str]:
    return sorted(J.photo_ids("painting_", 8, start=60) + J.photo_ids("lund_", 8, start=20)
                  + J.photo_ids("distractor_ketch_", 4, start=4))


def _argv(listing: Path, out: str) -> list[str]:
    return [str(a) for a in ("--config", J.SMALL_CONFIG, "--images", listing, "--out", out,
                             "--set", f"extract.shard_size={SHARD_SIZE}", "--set", "ray.workers=2", *J.stage_args())]


def _start_node(args: list[str], tmpdir: str, env: dict[str, str], log: Path) -> None:
    """``ray start`` (returns once the node is up; its processes live under ``tmpdir``)."""
    cmd = [str(RAY_CLI), "start", *args, "--num-cpus=1", "--object-store-memory=200000000", f"--temp-dir={tmpdir}",
           "--disable-usage-stats"]
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=420).returncode
    assert rc == 0, f"ray start {args[0]} failed:\n" + log.read_text()[-4000:]


def _stop_node(tmpdir: str) -> list[int]:
    """End every process of the Ray node started under ``tmpdir`` (SIGTERM, then SIGKILL); returns survivors."""
    procs = [p for p in J.processes_under(tmpdir) if J._running(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=15)
        # workers the raylet was still starting meanwhile
        procs = [p for p in {q.pid: q for q in procs + J.processes_under(tmpdir)}.values() if J._running(p)]
    return [p.pid for p in procs]


def _node_ids(url: str) -> dict[str, str]:
    """node_a / node_b -> node id, from the custom resources the nodes were started with."""
    from ray.util.state import list_nodes

    out = {}
    for n in list_nodes(address=url, raise_on_missing_output=False):
        for name in ("node_a", "node_b"):
            if name in (n.resources_total or {}):
                out[name] = n.node_id
    return out


def _extract_calls(url: str) -> list[tuple[str, str]]:
    """(state, node id) of every extraction call the state API knows."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=url, filters=[("name", "=", EXTRACT_CALL)], limit=10_000, raise_on_missing_output=False)
    return [(str(t.state), t.node_id or "") for t in tasks]


def _compare(out: str, ref: Path, table: str, stage: str, key: tuple[str, ...]) -> int:
    got = J.rows_by_key(J.read_table(out, table, stage), key)
    want = J.rows_by_key(J.read_table(ref, table, stage), key)
    assert sorted(got) == sorted(want), f"{table}/{stage}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for k, row in want.items():
        for c, v in row.items():
            a = got[k][c]
            if isinstance(v, np.ndarray) or isinstance(v, float):
                assert np.allclose(np.asarray(a, np.float64), np.asarray(v, np.float64), rtol=1e-3, atol=2e-3), \
                    f"{table}/{stage} {k}: column {c} differs from the undisturbed run"
            else:
                assert a == v, f"{table}/{stage} {k}: column {c}: {a!r} != {v!r}"
    return len(want)


def test_dag_finishes_after_losing_a_node(tmp_path, request, museum, moto_s3, monkeypatch):  # noqa: F811
    if not RAY_CLI.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    ids = _ids()
    assert len(ids) == N_IMAGES
    listing = J.write_list(tmp_path / "list.txt", ids)
    out = moto_s3.uri(f"multinode-{uuid.uuid4().hex[:8]}")
    env = J.job_env(**moto_s3.env, AWS_MAX_ATTEMPTS="2")
    head_dir, node_dir = J.ray_tmpdir(request), J.ray_tmpdir(request)
    gcs, dash, agent_a, agent_b, client = (J.free_port() for _ in range(5))
    url = f"http://127.0.0.1:{dash}"
    t0 = time.time()
    killed_at = None
    try:
        _start_node(["--head", f"--port={gcs}", "--resources={\"node_a\": 1}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                     f"--dashboard-agent-listen-port={agent_a}", f"--ray-client-server-port={client}"],
                    head_dir, env, tmp_path / "head.log")
        _start_node([f"--address=127.0.0.1:{gcs}", "--resources={\"node_b\": 1}",
                     f"--dashboard-agent-listen-port={agent_b}"], node_dir, env, tmp_path / "node.log")
        nodes = _node_ids(url)
        assert set(nodes) == {"node_a", "node_b"}, nodes
        t_cluster = time.time() - t0

        # -- the job joins the cluster; once an extraction call has finished on node_b, node_b's raylet dies
        job_log = tmp_path / "job.log"
        cmd = [sys.executable, "-m", "jobs.index", *_argv(listing, out), "--ray-address", f"127.0.0.1:{gcs}"]
        with open(job_log, "wb") as log:
            job = subprocess.Popen(cmd, cwd=J.PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.time() + 900
            while time.time() < deadline and job.poll() is None:
                if any(s == "FINISHED" and n == nodes["node_b"] for s, n in _extract_calls(url)):
                    break
                time.sleep(1)
            assert job.poll() is None, "the job ended before node_b was lost:\n" + job_log.read_text()[-4000:]
            raylets = [p for p in J.processes_under(node_dir) if J.name(p) == "raylet"]
            assert len(raylets) == 1, f"node_b's raylet not found: {[J.name(p) for p in J.processes_under(node_dir)]}"
            s3_env(monkeypatch, moto_s3)
            done_before = len(StageManifest(out, "extract").committed())
            raylets[0].kill()
            killed_at = time.time() - t0
            assert done_before < N_IMAGES // SHARD_SIZE, "extraction was over before node_b was lost"
            job.wait(timeout=1500)
        finally:
            if job.poll() is None:
                J.kill_tree(job.pid)
                job.wait(timeout=60)
        assert job.returncode == 0, job_log.read_text()[-6000:]
        calls = _extract_calls(url)
    finally:
        survivors = _stop_node(node_dir) + _stop_node(head_dir)
    assert not survivors, f"processes of the test's Ray nodes still alive: {survivors}"
    t_job = time.time() - t0 - t_cluster
    print(f"cluster up in {t_cluster:.0f} s, node_b killed at {killed_at:.0f} s, job {t_job:.0f} s; "
          f"{done_before} of {N_IMAGES // SHARD_SIZE} shards committed at the kill")

    # -- extraction calls ran on both nodes; node_b's last call was retried on node_a
    ran_on = {n for s, n in calls if s == "FINISHED"}
    assert {nodes["node_a"], nodes["node_b"]} <= ran_on, calls
    # -- every image exactly once, every stage done
    committed = StageManifest(out, "extract").committed()
    assert len(committed) == N_IMAGES // SHARD_SIZE and sum(m["images"] for m in committed.values()) == N_IMAGES
    images = J.read_table(out, "images", "extract").column("image_id").to_pylist()
    assert sorted(images) == ids  # rows_by_key below also refuses duplicates
    stages = json.loads(read_bytes(RunLayout(out).run_manifest))["stages"]
    assert {s: stages.get(s, {}).get("status") for s in J.expected_stages()} == dict.fromkeys(J.expected_stages(),
                                                                                            "done")

    # -- the outputs equal an undisturbed run (the session's local Ray, local storage)
    ref = tmp_path / "ref"
    request.getfixturevalue("ray_local")  # started only now: the two nodes are gone
    assert J.run_in_process("jobs.index", _argv(listing, str(ref))) == 0
    assert _compare(out, ref, "images", "extract", ("image_id",)) == N_IMAGES
    _compare(out, ref, "regions", "extract", ("image_id", "region_id"))
    _compare(out, ref, "globals", "extract", ("image_id", "method"))
    _compare(out, ref, "regions", "object_saliency", ("image_id", "region_id"))
    _compare(out, ref, "globals", "object_saliency", ("image_id", "method"))
    _compare(out, ref, "globals", "descriptors", ("image_id", "method"))
    for name in J.index_names(ref, ["gem", "rmac", "fs_egm", "os_egm"], ["fs_egm"]):
        assert sorted(J.snapshot_ids(out, name)[1]) == sorted(J.snapshot_ids(ref, name)[1]) == ids, name
