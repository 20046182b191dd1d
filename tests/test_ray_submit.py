"""The README's cluster path on one machine: a Ray head started with ``ray start`` (dashboard on), the index job
submitted with ``ray job submit --working-dir .``, joining that cluster through ``RAY_ADDRESS``.

The head runs under a private ``--temp-dir`` and private ports, so it neither disturbs nor is found by any other
Ray on the machine; it is stopped by pid (``ray stop`` would stop every Ray here). Slow; skipped without the
``ray`` CLI or the shared photos.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage.layout import RunLayout
from tests import helpers_jobs as J

pytestmark = pytest.mark.slow

RAY_CLI = Path(sys.executable).parent / "ray"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _wait_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited:\n" + log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError("the dashboard did not come up:\n" + log.read_text()[-4000:])


def test_index_job_via_ray_job_submit(tmp_path, request, museum):
    if not RAY_CLI.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    from ray.job_submission import JobSubmissionClient

    from storage.tables import StageManifest, TableStore

    ids = sorted(J.photo_ids("painting_", 6, start=100) + J.photo_ids("lund_", 6, start=20)
                 + J.photo_ids("distractor_ketch_", 4))
    broken = tmp_path / "notes.jpg"
    broken.write_bytes(b"not an image\n")
    listing = J.write_list(tmp_path / "list.txt", ids, extra=[str(broken)])
    out = tmp_path / "out"

    tmpdir = J.ray_tmpdir(request)
    gcs, dash, agent, client_port = (J.free_port() for _ in range(4))
    url = f"http://127.0.0.1:{dash}"
    env = J.job_env()  # this venv first on PATH: the head, its workers and the job's `python` are this venv's
    head_log = tmp_path / "head.log"
    t0 = time.time()
    with open(head_log, "w") as hl:
        head = subprocess.Popen(
            [str(RAY_CLI), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client_port}",
             f"--temp-dir={tmpdir}", "--disable-usage-stats"],
            cwd=tmp_path, env=env, stdout=hl, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_dashboard(url, head, head_log)
        # as in the README; `python` is the first on the head's PATH (this venv): no other python here has the
        # project's dependencies, so a wrong interpreter fails the job
        entry = ["python", "-m", "jobs.index", "--config", "tests/configs/small.yaml", "--images", str(listing),
                 "--out", str(out), *J.stage_args()]
        sub = subprocess.run(
            [str(RAY_CLI), "job", "submit", "--address", url, "--working-dir", str(J.PROJECT_ROOT), "--no-wait",
             "--runtime-env-json", json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}}), "--", *entry],
            cwd=J.PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        m = re.search(r"Job '([^']+)' submitted successfully", sub.stdout + sub.stderr)
        assert m, sub.stdout[-3000:] + sub.stderr[-3000:]
        job_id = m.group(1)

        client = JobSubmissionClient(url)
        deadline = time.time() + 480
        status = str(client.get_job_status(job_id))
        while time.time() < deadline and status.rsplit(".", 1)[-1] not in TERMINAL:
            time.sleep(2)
            status = str(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        status = status.rsplit(".", 1)[-1]
        if status not in TERMINAL:
            client.stop_job(job_id)
        print(f"ray job {job_id}: {status} after {time.time() - t0:.1f} s (head start included)")
        assert status == "SUCCEEDED", logs[-6000:]
    finally:
        survivors = J.kill_tree(head.pid, tmpdir, sig=signal.SIGTERM, timeout=20)
        if survivors:
            survivors = J.kill_tree(head.pid, tmpdir)
        head.wait(timeout=30)
    assert not survivors, f"processes of the test's Ray head still alive: {survivors}"

    # the job joined the head instead of starting a Ray of its own
    assert "Connecting to existing Ray cluster" in logs and "Started a local Ray instance" not in logs, logs[-4000:]
    # outputs: one images row per good photo, the broken file in errors, every stage done, snapshots published
    store = TableStore(str(out))
    image_ids = store.read("images", ["extract"], columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(image_ids) == ids
    errors = store.read("errors", ["extract"]).to_pydict()
    assert errors["image_id"] == ["notes"] and errors["reason"] == ["not_image"]
    assert sum(m["images"] for m in StageManifest(str(out), "extract").committed().values()) == len(ids)
    stages = json.loads(Path(RunLayout(str(out)).run_manifest).read_text())["stages"]
    assert {s: stages.get(s, {}).get("status") for s in J.expected_stages()} == {s: "done" for s in J.expected_stages()}
    for name in J.index_names(out, ["gem", "rmac", "fs_egm", "os_egm"], ["fs_egm"]):
        assert sorted(J.snapshot_ids(out, name)[1]) == ids, name
