"""Resume after a crash: ``python -m jobs.index`` SIGKILLed (driver and its local Ray) half way through extraction,
then started again, must finish without redoing committed shards and give the outputs of an uninterrupted run.

Slow (two job subprocesses with their own local Ray, and an uninterrupted run on the session's Ray); skipped
without the shared photos. The killed job's Ray runs under a private ``RAY_TMPDIR`` so that everything it started
can be found and killed by pid afterwards.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage.layout import RunLayout
from tests import helpers_jobs as J

pytestmark = pytest.mark.slow
psutil = pytest.importorskip("psutil")

N_SHARDS = 5      # 20 images, 4 per shard
GLOBAL_METHODS = ["gem", "rmac", "fs_egm", "os_egm"]


def _ids() -> list[str]:
    return sorted(J.photo_ids("painting_", 7, start=40) + J.photo_ids("lund_", 7, start=12)
                  + J.photo_ids("distractor_kangaroo_", 6))


LEASE_TTL_S = 4


def _argv(listing: Path, out: Path) -> list[str]:
    # the crash is in extraction, which ASMK's local features would only slow down: the small config's stages
    # a short lease: the killed driver's lease is taken over by the rerun once LEASE_TTL_S has passed
    return [str(a) for a in ("--config", J.SMALL_CONFIG, "--images", listing, "--out", out,
                             "--set", "extract.shard_size=4", "--set", f"lease.ttl_s={LEASE_TTL_S}",
                             "--set", "lease.heartbeat_s=1")]


def _files_state(out: Path, labels: set[str]) -> dict[str, tuple[int, bytes]]:
    """(mtime_ns, bytes) of the markers of ``labels`` and of every table file they list."""
    from storage.tables import StageManifest

    state = {}
    m = StageManifest(str(out), "extract")
    for label in labels:
        marker = Path(m.marker_uri(label))
        paths = [marker] + [Path(m.resolve(u)) for u in json.loads(marker.read_text())["files"].values()]
        for p in paths:
            state[str(p)] = (p.stat().st_mtime_ns, p.read_bytes())
    return state


def _stage_summary(stdout: str, stage: str) -> dict[str, str]:
    m = re.search(rf"^\s*{stage}: (.*)$", stdout, flags=re.M)
    assert m, f"no summary line for {stage} in:\n{stdout[-3000:]}"
    return dict(re.findall(r"(\w+)=(\{[^}]*\}|[^,\s]+)", m.group(1)))


def _close(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(a, list) and a and isinstance(a[0], float):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return a.shape == b.shape and np.allclose(a, b, rtol=1e-3, atol=2e-3)
    if isinstance(a, float):
        return bool(np.isclose(a, b, rtol=1e-4, atol=1e-5))
    return a == b


def _compare(out: Path, ref: Path, table: str, stage: str, key: tuple[str, ...]) -> int:
    got = J.rows_by_key(J.read_table(out, table, stage), key)
    want = J.rows_by_key(J.read_table(ref, table, stage), key)
    assert sorted(got) == sorted(want), f"{table}/{stage}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for k, row in want.items():
        bad = [c for c, v in row.items() if not _close(v, got[k][c])]
        assert not bad, f"{table}/{stage} {k}: columns {bad} differ from the uninterrupted run"
    return len(want)


def test_killed_driver_resumes(tmp_path, request, museum, ray_local):
    from storage.tables import StageManifest

    ids = _ids()
    assert len(ids) == 20
    listing = J.write_list(tmp_path / "list.txt", ids)
    out, ref = tmp_path / "out", tmp_path / "ref"
    markers = Path(RunLayout(str(out)).shard_markers_dir("extract"))
    cmd = [sys.executable, "-m", "jobs.index", *_argv(listing, out)]

    # -- 1. start the job; SIGKILL it (process group, descendants, its Ray) once a shard is committed
    tmpdir = J.ray_tmpdir(request)
    log1 = tmp_path / "killed.log"
    t0 = time.time()
    with open(log1, "w") as log:
        job = subprocess.Popen(cmd, cwd=J.PROJECT_ROOT, env=J.job_env(RAY_TMPDIR=tmpdir), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 420
            while time.time() < deadline and job.poll() is None and not list(markers.glob("*.json")):
                time.sleep(0.05)
            assert job.poll() is None, "the job ended before a shard was committed:\n" + log1.read_text()[-3000:]
            assert list(markers.glob("*.json")), "no shard committed in time:\n" + log1.read_text()[-3000:]
            ray_procs = J.descendants(job.pid)
            names = " ".join(J.name(p) for p in ray_procs)
            assert "raylet" in names and "gcs_server" in names, f"the job's local Ray not found: {names}"
        finally:
            survivors = J.kill_tree(job.pid, tmpdir)
            job.wait(timeout=60)
    assert job.returncode == -9
    assert not survivors, f"processes of the killed job still alive: {survivors}"
    assert not [p for p in J.processes_under(tmpdir) if J._running(p)]
    assert not [p for p in ray_procs if J._running(p)]
    t_killed = time.time() - t0
    committed = set(StageManifest(str(out), "extract").committed())
    print(f"{len(committed)} of {N_SHARDS} shards committed when the job was killed")
    assert 1 <= len(committed) < N_SHARDS, f"{len(committed)} of {N_SHARDS} shards committed at the kill"
    run_json = Path(RunLayout(str(out)).run_manifest)
    assert not run_json.exists() or "extract" not in json.loads(run_json.read_text())["stages"]
    done_images = sum(m["images"] for m in StageManifest(str(out), "extract").committed().values())
    before = _files_state(out, committed)

    # -- 2. the same command again (once the dead driver's lease has expired): finishes, committed shards
    # skipped and left as they were
    time.sleep(LEASE_TTL_S + 1)
    tmpdir2 = J.ray_tmpdir(request)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=J.PROJECT_ROOT, env=J.job_env(RAY_TMPDIR=tmpdir2), capture_output=True,
                              text=True, timeout=480, start_new_session=True)
    finally:
        leftovers = J.reap_ray(tmpdir2)  # a driver that exits shuts its local Ray down
    t_resumed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "taken over" in proc.stderr  # the killed driver's lease
    assert not leftovers, f"Ray processes of the resumed job left running: {leftovers}"
    ex = _stage_summary(proc.stdout, "extract")
    assert int(ex["skipped_shards"]) == len(committed) and int(ex["shards"]) == N_SHARDS, ex
    assert int(ex["images"]) == len(ids) - done_images and int(ex["errors"]) == 0, ex
    assert _files_state(out, committed) == before  # same markers, same table files, same mtimes
    final = StageManifest(str(out), "extract").committed()
    assert len(final) == N_SHARDS and sum(m["images"] for m in final.values()) == len(ids)
    stages = json.loads(run_json.read_text())["stages"]
    assert {s: stages.get(s, {}).get("status") for s in J.PIPELINE_STAGES} == dict.fromkeys(J.PIPELINE_STAGES, "done")

    # -- 3. an uninterrupted run of the same corpus and config gives the same outputs
    t0 = time.time()
    assert J.run_in_process("jobs.index", _argv(listing, ref)) == 0
    t_ref = time.time() - t0
    print(f"killed after {t_killed:.1f} s, resumed in {t_resumed:.1f} s, reference {t_ref:.1f} s")
    assert _compare(out, ref, "images", "extract", ("image_id",)) == len(ids)
    _compare(out, ref, "errors", "extract", ("image_id",))
    _compare(out, ref, "regions", "extract", ("image_id", "region_id"))
    assert _compare(out, ref, "globals", "extract", ("image_id", "method")) >= len(ids)
    _compare(out, ref, "regions", "object_saliency", ("image_id", "region_id"))
    _compare(out, ref, "globals", "object_saliency", ("image_id", "method"))
    assert _compare(out, ref, "globals", "descriptors", ("image_id", "method")) >= 5 * len(ids)
    for name in [f"global_{m}" for m in GLOBAL_METHODS] + ["regional_fs_egm"]:
        assert sorted(J.snapshot_ids(out, name)[1]) == sorted(J.snapshot_ids(ref, name)[1]) == ids, name
