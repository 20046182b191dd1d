"""End to end: `python -m jobs.index` over real photos mixed with broken files, reruns, and a SIGKILLed worker.

Slow (starts Ray three times). Real photos come from the shared museum-landmarks folder (skipped if absent).
"""
from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from storage.layout import RunLayout
from storage.schemas import descriptors_to_numpy
from storage.tables import StageManifest, TableStore
from tests import helpers_images as H

pytestmark = pytest.mark.slow

if not H.DATA_DIR.is_dir():
    pytest.skip(f"real test images not found at {H.DATA_DIR}", allow_module_level=True)

psutil = pytest.importorskip("psutil")

ROOT = H.PROJECT_ROOT


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=H.job_env(), capture_output=True, text=True, timeout=timeout)


def _snapshot(out: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha1) of every file the extraction published: tables, shard markers, corpus manifest."""
    snap = {}
    layout = RunLayout(str(out))
    for folder in (Path(layout.table_file("x", "extract", 0)).parents[1], Path(layout.shard_markers_dir("extract")),
                   Path(layout.corpus_manifest).parent):
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                snap[p.relative_to(out).as_posix()] = (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return snap


def _stage_summary(stdout: str, stage: str = "extract") -> dict[str, str]:
    """``key=value`` pairs of the job's printed summary line for ``stage``."""
    m = re.search(rf"^\s*{stage}: (.*)$", stdout, flags=re.M)
    assert m, f"no summary line for {stage} in:\n{stdout}"
    return dict(re.findall(r"(\w+)=(\{[^}]*\}|[^,\s]+)", m.group(1)))


def _pil_size(path: Path) -> tuple[int, int]:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).size


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One job over 16 real photos + 6 odd-but-valid + 7 broken files, shard size 4."""
    base = tmp_path_factory.mktemp("mixed")
    folder, out = base / "images", base / "out"
    H.link_real_photos(folder)
    odd = H.odd_files()
    bad = H.bad_files()
    H.write_files(folder, {k: v[0] for k, v in odd.items()})
    H.write_files(folder, {k: v[0] for k, v in bad.items()})
    (folder / ".hidden_thumbs.db").write_bytes(b"ignored: hidden files are not inputs")
    sizes = {p.stem: _pil_size(p) for p in H.real_photos()}
    sizes.update({H.stem(k): v[1] for k, v in odd.items()})
    expected_errors = {H.stem(k): v[1] for k, v in bad.items()}
    t0 = time.time()
    proc = _run(H.index_command(str(folder), str(out), "--shard-size", "4", "--max-side", "320", "--num-cpus", "2"))
    return {"folder": folder, "out": out, "proc": proc, "sizes": sizes, "errors": expected_errors,
            "seconds": time.time() - t0}


def test_mixed_folder_tables(mixed_run):
    proc, out = mixed_run["proc"], mixed_run["out"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = TableStore(str(out))
    good = mixed_run["sizes"]
    n_files = len(good) + len(mixed_run["errors"])
    assert n_files == 29

    images = store.read("images").to_pydict()
    assert Counter(images["image_id"]) == Counter(good.keys())  # one row per good image, no duplicates
    for iid, w, h in zip(images["image_id"], images["width"], images["height"]):
        assert (w, h) == good[iid], f"{iid}: stored {w}x{h}, original oriented size {good[iid]}"
    assert all(mx > 0 for mx in images["act_max"])

    errors = store.read("errors").to_pydict()
    assert Counter(errors["image_id"]) == Counter(mixed_run["errors"].keys())  # one row per broken file
    got_reasons = dict(zip(errors["image_id"], errors["reason"]))
    assert got_reasons == mixed_run["errors"]
    assert set(errors["stage"]) == {"extract"}
    assert all(d for d in errors["detail"])

    regions = store.read("regions")
    r = regions.select(["image_id", "region_id", "source", "x0", "y0", "x1", "y1"]).to_pydict()
    assert set(r["image_id"]) == set(good)
    pairs = list(zip(r["image_id"], r["region_id"]))
    assert len(pairs) == len(set(pairs))
    x0, y0, x1, y1 = (np.asarray(r[k]) for k in ("x0", "y0", "x1", "y1"))
    w = np.array([good[i][0] for i in r["image_id"]])
    h = np.array([good[i][1] for i in r["image_id"]])
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= w + 1e-3).all() and (y1 <= h + 1e-3).all()
    assert (x1 > x0).all() and (y1 > y0).all()
    full = np.asarray(r["source"]) == "full"
    assert full.sum() == len(good)  # exactly one whole-image region per image, in original pixels
    np.testing.assert_allclose(x1[full], w[full], rtol=1e-6)
    np.testing.assert_allclose(y1[full], h[full], rtol=1e-6)
    rdesc = descriptors_to_numpy(regions.column("descriptor"))
    assert np.isfinite(rdesc).all()

    g = store.read("globals")
    gd = g.select(["image_id", "method"]).to_pydict()
    assert set(gd["image_id"]) == set(good)
    methods = {iid: set() for iid in good}
    for iid, m in zip(gd["image_id"], gd["method"]):
        assert m not in methods[iid]
        methods[iid].add(m)
    first = next(iter(methods.values()))
    assert first and all(ms == first for ms in methods.values())
    gdesc = descriptors_to_numpy(g.column("descriptor"))
    assert np.isfinite(gdesc).all() and (np.linalg.norm(gdesc, axis=1) > 0).all()

    summary = _stage_summary(proc.stdout)
    assert int(summary["images"]) == len(good) and int(summary["errors"]) == len(mixed_run["errors"])
    assert int(summary["shards"]) == 8 and int(summary["skipped_shards"]) == 0
    markers = StageManifest(str(out), "extract").committed()
    assert sorted(markers) == [f"{i:05d}" for i in range(8)]
    assert sum(m["images"] for m in markers.values()) == len(good)
    assert sum(m["errors"] for m in markers.values()) == len(mixed_run["errors"])


def test_rerun_is_a_noop(mixed_run):
    out = mixed_run["out"]
    assert mixed_run["proc"].returncode == 0
    markers_before = StageManifest(str(out), "extract").committed()
    before = _snapshot(out)
    listed = {f for m in markers_before.values() for f in m["files"].values()}
    assert {(out / k).as_posix() for k in before if k.startswith("tables/")} == listed
    assert len(listed) == 5 * 8  # images, regions, globals, keypoints, errors for each of the 8 shards
    proc = _run(H.index_command(str(mixed_run["folder"]), str(out), "--shard-size", "4", "--max-side", "320",
                                "--num-cpus", "2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _snapshot(out) == before  # nothing rewritten: same files, same bytes, same mtimes
    assert StageManifest(str(out), "extract").committed() == markers_before
    summary = _stage_summary(proc.stdout)
    # either the whole stage is reported up to date, or every shard was found committed and skipped
    assert summary.get("skipped") == "True" or (
        summary.get("images") == "0" and summary.get("skipped_shards") == summary.get("shards") == "8"), summary


def test_shard_level_skip_without_ray(mixed_run):
    """The extraction stage itself skips committed shards (no actor is started: Ray is never initialised)."""
    import ray

    from actors.common import ActorResources
    from actors.extract import run_extract_stage
    from pipeline.config import config_from_dict
    from storage.run import load_run_config, read_corpus_manifest

    out = mixed_run["out"]
    assert mixed_run["proc"].returncode == 0
    before = _snapshot(out)
    manifest = read_corpus_manifest(str(out))
    assert manifest.num_rows == 29
    ray_was_up = ray.is_initialized()
    extract_cfg = config_from_dict(load_run_config(str(out))).extract  # the run's own extraction parameters
    res = run_extract_stage(str(out), extract_cfg, manifest, ActorResources(1.0, 0.0, 1, 1))
    assert ray.is_initialized() == ray_was_up  # no actor pool was needed: learned artefacts and shards reused
    assert res["skipped_shards"] == res["shards"] == 8 and res["images"] == 0 and res["errors"] == 0
    assert _snapshot(out) == before


def _job_descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _find_extract_worker(pid: int) -> psutil.Process | None:
    for p in _job_descendants(pid):
        try:
            if "ray::ShardWorker" in " ".join(p.cmdline()):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def test_killed_worker_is_replaced_without_duplicates(tmp_path):
    ids = sorted(p.stem for p in H.DATA_DIR.glob("*.jpg") if p.stem.startswith(("painting_", "lund_")))[:40]
    assert len(ids) == 40
    missing = tmp_path / "gone" / "deleted_photo.jpg"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(p) for p in H.real_photos(ids)] + [str(missing)]) + "\n")
    out = tmp_path / "out"
    n_shards = 21  # 41 inputs, 2 per shard
    markers = Path(RunLayout(str(out)).shard_markers_dir("extract"))
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen(H.index_command(str(listing), str(out), "--shard-size", "2", "--max-side", "320",
                                               "--num-cpus", "2"),
                               cwd=ROOT, env=H.job_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and job.poll() is None and not list(markers.glob("*.json")):
                time.sleep(0.1)
            assert job.poll() is None, ("job ended before the first shard was committed:\n"
                                        + log_path.read_text()[-3000:])
            assert list(markers.glob("*.json")), "no shard committed in time"
            worker = None
            while time.time() < deadline and worker is None and job.poll() is None:
                worker = _find_extract_worker(job.pid)
                time.sleep(0.05)
            assert worker is not None, "no ray::ExtractWorker process under the job"
            committed_at_kill = len(list(markers.glob("*.json")))
            worker.send_signal(signal.SIGKILL)
            killed_pid = worker.pid
            worker.wait(timeout=30)
            assert committed_at_kill < n_shards, "the worker was killed after the last shard: nothing to recover"
            rc = job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    text = log_path.read_text()
    assert rc == 0, text[-4000:]
    assert not psutil.pid_exists(killed_pid) or psutil.Process(killed_pid).status() == psutil.STATUS_ZOMBIE

    store = TableStore(str(out))
    assert len(StageManifest(str(out), "extract").committed()) == n_shards
    image_ids = store.read("images", columns=["image_id"]).column("image_id").to_pylist()
    assert len(image_ids) == len(set(image_ids))  # no duplicate image rows from the redone shard
    assert sorted(image_ids) == ids  # every image present
    err = store.read("errors").to_pydict()
    assert err["image_id"] == ["deleted_photo"] and err["reason"] == ["missing"]
    r = store.read("regions", columns=["image_id", "region_id"]).to_pydict()
    pairs = list(zip(r["image_id"], r["region_id"]))
    assert len(pairs) == len(set(pairs)) and set(r["image_id"]) == set(ids)
    g = store.read("globals", columns=["image_id", "method"]).to_pydict()
    gpairs = list(zip(g["image_id"], g["method"]))
    assert len(gpairs) == len(set(gpairs)) and set(g["image_id"]) == set(ids)


def test_progress_logs_each_state_once(caplog):
    """The last batch's line already says 100 %: the closing forced update must not print it a second time, but
    a forced update after a change (an error counted) does."""
    from actors.common import Progress

    prog = Progress("labels", total=4, unit="queries", every=3600.0)
    with caplog.at_level("INFO", logger="indexer"):
        prog.update(1)              # first line (nothing logged yet)
        prog.update(2)              # throttled
        prog.update(1)              # done == total: logged
        prog.update(0, force=True)  # same state: not repeated
        prog.update(0, errors=1, force=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[labels]")]
    assert [line.split(" (")[0] for line in lines] == ["[labels] 1/4 queries", "[labels] 4/4 queries",
                                                       "[labels] 4/4 queries"]
    assert lines[-1].endswith("errors=1") and lines[1].endswith("errors=0")
