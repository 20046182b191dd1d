"""Helpers for the end-to-end job tests (test_reindex, test_resume, test_ray_submit).

The jobs run on ``tests/configs/small.yaml`` (tiny images, small shards, a 2-CPU Ray) over real photos of the
shared museum-landmarks folder, listed or symlinked in ``tmp_path`` (never copied). Processes the tests start
are ended by pid (their process tree and the Ray processes under their own Ray temp dir), never by name:
``ray stop`` would also stop every other Ray on the machine.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from storage.snapshot import list_names

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SMALL_CONFIG = PROJECT_ROOT / "tests" / "configs" / "small.yaml"
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks" / "jpg"
PIPELINE_STAGES = ["extract", "whiten", "graph", "object_saliency", "descriptors", "faiss"]


def asmk_available() -> bool:
    """Whether the ASMK stage imports (``actors.asmk.run_asmk_stage``)."""
    try:
        from actors.asmk import run_asmk_stage  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, half-written or failing to import: leave the stage out
        return False
    return True


def stage_args() -> list[str]:
    """``--set`` overrides for the stage list: the small config's stages, plus ``asmk`` when it exists."""
    if not asmk_available():
        return []
    stages = ",".join(PIPELINE_STAGES + ["asmk"])
    return ["--set", f"stages=[{stages}]", "--set", "extract.local_features=48",
            "--set", "extract.local_pca_images=8", "--set", "asmk.codebook_size=32",
            "--set", "asmk.codebook_sample=4000"]


def expected_stages() -> list[str]:
    return PIPELINE_STAGES + (["asmk"] if asmk_available() else [])


def photo_ids(prefix: str, n: int, start: int = 0) -> list[str]:
    """The ``n`` ids after the first ``start`` of the sorted museum-landmarks photos starting with ``prefix``."""
    ids = sorted(p.stem for p in PHOTOS.glob(f"{prefix}*.jpg"))
    assert len(ids) >= start + n, f"only {len(ids)} photos match {prefix}*"
    return ids[start:start + n]


def photo(image_id: str) -> Path:
    return PHOTOS / f"{image_id}.jpg"


def link_photos(folder: Path, ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (folder / f"{i}.jpg").symlink_to(photo(i))


def write_list(path: Path, ids: list[str], extra: list[str] = ()) -> Path:
    path.write_text("\n".join([str(photo(i)) for i in ids] + list(extra)) + "\n")
    return path


def job_env(**extra: str) -> dict[str, str]:
    """Environment of a job subprocess: this venv first on PATH, no inherited Ray address, no token auth."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env.update({"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(PROJECT_ROOT), "RAY_DEDUP_LOGS": "0",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra)
    return env


def ray_tmpdir(request: Any) -> str:
    """A short private Ray temp dir (socket paths must stay under ~107 characters), removed after the test."""
    import shutil

    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_process(module: str, argv: list[str]) -> int:
    """``python -m <module> <argv>`` in this process (the session's Ray is reused: jobs skip init when up)."""
    import importlib

    return importlib.import_module(module).main([str(a) for a in argv])


# ------------------------------------------------------------------------------------------ processes
def descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def processes_under(tmpdir: str) -> list[Any]:
    """Processes whose command line names ``tmpdir`` (the Ray processes of a Ray started there)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(tmpdir in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_tree(root_pid: int, tmpdir: str | None = None, sig: int = signal.SIGKILL, timeout: float = 30) -> list[int]:
    """Kill ``root_pid``'s process group, every descendant, and the processes under ``tmpdir``; wait for them.

    ``root_pid`` itself is signalled but not waited for (the caller reaps its own child, e.g. ``Popen.wait``,
    and so gets its exit status). Returns the pids still alive afterwards (zombies count as gone).
    """
    import psutil

    procs = {p.pid: p for p in descendants(root_pid)}
    if tmpdir:
        procs.update({p.pid: p for p in processes_under(tmpdir)})
    procs.pop(root_pid, None)
    try:
        os.killpg(os.getpgid(root_pid), sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(root_pid, sig)
    except ProcessLookupError:
        pass
    for p in procs.values():
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    deadline = time.time() + timeout
    alive = list(procs.values())
    while alive and time.time() < deadline:
        # processes started by the victims while we were killing them (e.g. Ray workers being spawned)
        if tmpdir:
            for p in processes_under(tmpdir):
                if p.pid not in procs and p.pid != root_pid:
                    procs[p.pid] = p
                    alive.append(p)
                    try:
                        p.send_signal(sig)
                    except psutil.NoSuchProcess:
                        pass
        _, alive = psutil.wait_procs(alive, timeout=0.5)
        alive = [p for p in alive if _running(p)]
    return [p.pid for p in alive]


def reap_ray(tmpdir: str, grace: float = 20) -> list[int]:
    """Wait up to ``grace`` s for the Ray processes under ``tmpdir`` to exit; kill (by pid) and return any left."""
    import psutil

    deadline = time.time() + grace
    left = [p for p in processes_under(tmpdir) if _running(p)]
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = [p for p in left if _running(p)]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
    return [p.pid for p in left]


def name(p: Any) -> str:
    try:
        return p.name()
    except Exception:  # noqa: BLE001 - gone meanwhile
        return ""


def _running(p: Any) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------------------------------------------ tables
def read_table(out: Path | str, table: str, stage: str) -> pa.Table:
    from storage.tables import TableStore

    return TableStore(str(out)).read(table, [stage])


def rows_by_key(t: pa.Table, key: tuple[str, ...]) -> dict[tuple, dict[str, Any]]:
    """Rows keyed by ``key`` columns (descriptor as float32 array); asserts the key is unique."""
    from storage.schemas import descriptors_to_numpy

    cols = [c for c in t.column_names if c != "descriptor"]
    d = t.select(cols).to_pydict()
    desc = descriptors_to_numpy(t.column("descriptor")) if "descriptor" in t.column_names else None
    out: dict[tuple, dict[str, Any]] = {}
    for r in range(t.num_rows):
        k = tuple(d[c][r] for c in key)
        assert k not in out, f"duplicate row {k}"
        row = {c: d[c][r] for c in cols}
        if desc is not None:
            row["descriptor"] = desc[r]
        out[k] = row
    return out


def index_names(out: Path | str, global_methods: list[str], regional: list[str]) -> list[str]:
    """Snapshot names a run of the small config publishes (``asmk_*`` ones when the ASMK stage ran)."""
    names = [f"global_{m}" for m in global_methods] + [f"regional_{s}" for s in regional]
    if asmk_available():
        asmk = [n for n in list_names(str(out)) if n.startswith("asmk_")]
        assert asmk, "the asmk stage published no snapshot"
        names += asmk
    return names


def snapshot_ids(out: Path | str, name: str) -> tuple[str, list[str]]:
    """(version, image ids) of the published snapshot ``name``."""
    import io

    from storage.snapshot import open_latest

    snap = open_latest(str(out), name)
    ids = np.load(io.BytesIO(snap.read_bytes("image_ids.npy")), allow_pickle=False)
    return snap.version, [str(i) for i in ids]
