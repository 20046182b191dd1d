"""Download Revisited Oxford / Paris and the R1M distractors: resumable, atomic, verified, safely extracted.

The entry point is ``python -m jobs.download --dataset roxford5k|rparis6k|revisitop1m --root DIR [--base-url URL]``.

Sources are the ones of filipradenovic/revisitop ``python/download.py``: image archives from the Oxford VGG
pages, the revisited ground truth ``gnd_<name>.pkl`` from cmp.felk.cvut.cz, R1M archives and list from
ptak.felk.cvut.cz. ``--base-url`` replaces every source folder by one URL (a mirror or a test server): files are
then fetched as ``<base-url>/<file>``, with R1M archives under ``<base-url>/jpg/``.

Layout written (the same as revisitop's ``configdataset(name, DIR)``, read by ``storage.datasets``)::

    DIR/<name>/jpg/<id>.jpg            images (Oxford / Paris archives are flattened, as the reference does)
    DIR/<name>/gnd_<name>.pkl          ground truth (roxford5k, rparis6k)
    DIR/revisitop1m/revisitop1m.txt    R1M list; DIR/revisitop1m/jpg/<listed path>
    DIR/<name>/download.lock.json      SHA-256 and size of every file fetched, extraction progress, verification

Robustness:
* each file is streamed to ``<file>.part``, resumed with an HTTP Range request after an interruption (restarted
  when the server ignores Range), fsync'ed, hashed and only then renamed into place;
* archives are extracted into ``jpg.partial/`` which becomes ``jpg/`` only after verification, so an
  interrupted run never leaves a half-filled ``jpg/``; finished archives are recorded and not fetched again;
* extraction refuses absolute paths and ``..`` components, and skips links and device files;
* verification: the ground truth must load (restricted unpickler, no arbitrary code), every database and query
  id it lists must be an extracted image, and for the official sources the counts must be the published ones
  (ROxford 4,993 + 70 queries, RParis 6,322 + 70, R1M 1,001,001);
* checksums: the revisitop project publishes none, so the SHA-256 of every downloaded file is recorded in the
  lock file the first time (trust on first use) and later downloads must match it; ``--sha256 FILE=HEX`` pins
  a known value up front.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from storage.datasets import DatasetError, load_distractor_list, load_revisitop_pkl

log = logging.getLogger("storage.download")

USER_AGENT = "region-retrieval-downloader/1.0 (python urllib)"
CHUNK = 1 << 20
IMAGE_SUFFIXES = (".jpg", ".jpeg")
RETRY_BACKOFF_S = 1.0  # wait backoff * attempt seconds between retries


class DownloadError(RuntimeError):
    """A file could not be fetched."""


class ChecksumError(DownloadError):
    """A file's SHA-256 differs from the pinned or previously recorded one."""


class UnsafeArchiveError(RuntimeError):
    """An archive member would be written outside the destination folder."""


class VerificationError(RuntimeError):
    """The downloaded data does not match its ground truth / expected counts."""


@dataclass(frozen=True)
class Source:
    """One file to fetch: official folder URL and file name (relative, may contain a sub-folder)."""

    base: str
    name: str

    def url(self, base_url: str | None) -> str:
        return f"{(base_url or self.base).rstrip('/')}/{self.name}"


_OX = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
_PA = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
_GND = "https://cmp.felk.cvut.cz/revisitop/data/datasets"
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"

ARCHIVES: dict[str, list[Source]] = {
    "roxford5k": [Source(_OX, "oxbuild_images-v1.tgz")],
    "rparis6k": [Source(_PA, "paris_1-v1.tgz"), Source(_PA, "paris_2-v1.tgz")],
}
GROUND_TRUTH: dict[str, Source] = {
    "roxford5k": Source(f"{_GND}/roxford5k", "gnd_roxford5k.pkl"),
    "rparis6k": Source(f"{_GND}/rparis6k", "gnd_rparis6k.pkl"),
    "revisitop1m": Source(_R1M, "revisitop1m.txt"),
}
R1M_ARCHIVES = 100
# published sizes (Radenović et al., CVPR 2018): database images, queries
EXPECTED_COUNTS: dict[str, tuple[int, int]] = {
    "roxford5k": (4993, 70),
    "rparis6k": (6322, 70),
    "revisitop1m": (1_001_001, 0),
}
# The revisitop project publishes no checksums; pins go here (file name -> SHA-256) once known.
OFFICIAL_SHA256: dict[str, str] = {}


def r1m_archives(n: int = R1M_ARCHIVES) -> list[Source]:
    """The R1M archive sources ``jpg/revisitop1m.<i>.tar.gz``, i = 1..n."""
    return [Source(_R1M, f"jpg/revisitop1m.{i}.tar.gz") for i in range(1, n + 1)]


# ------------------------------------------------------------------------------------------ file helpers
def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _http_get(url: str, offset: int, timeout: float) -> Any:
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def fetch(
    url: str,
    dest: str | Path,
    *,
    expected_sha256: str | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float | None = None,
) -> tuple[str, int]:
    """Download ``url`` to ``dest`` atomically and resumably; returns ``(sha256, size)``.

    An existing ``dest`` is kept when it matches ``expected_sha256`` (or when none is given). Partial data in
    ``dest.part`` is resumed with a Range request; a server answering 200 instead of 206 restarts the file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        digest = sha256_file(dest)
        if expected_sha256 is None or digest == expected_sha256.lower():
            return digest, dest.stat().st_size
        log.warning("%s: checksum mismatch on the existing file, downloading again", dest.name)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            _fetch_once(url, part, offset, timeout)
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # our partial file is not a prefix the server can continue
                part.unlink()
            elif exc.code < 500 and exc.code != 429:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            err: Exception = exc
        except (urllib.error.URLError, OSError, DownloadError) as exc:
            err = exc
        attempt += 1
        if attempt > retries:
            raise DownloadError(f"{url}: giving up after {retries} retries ({err})") from None
        log.warning("%s: %s; retrying (%d/%d)", dest.name, err, attempt, retries)
        time.sleep((RETRY_BACKOFF_S if backoff is None else backoff) * attempt)
    digest = sha256_file(part)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        part.unlink()
        raise ChecksumError(f"{dest.name}: SHA-256 {digest} differs from the expected {expected_sha256}")
    size = part.stat().st_size
    os.replace(part, dest)
    return digest, size


def _fetch_once(url: str, part: Path, offset: int, timeout: float) -> None:
    """One HTTP attempt appending to ``part`` from ``offset``; raises on short reads."""
    with _http_get(url, offset, timeout) as resp:
        status = getattr(resp, "status", 200)
        if offset and status == 206:
            content_range = resp.headers.get("Content-Range", "")
            start = content_range.split(" ", 1)[-1].split("-", 1)[0]
            if not start.isdigit() or int(start) != offset:
                raise DownloadError(f"unexpected Content-Range {content_range!r} for offset {offset}")
            mode = "ab"
        else:
            if offset:
                log.info("%s: server ignored the Range request, restarting", part.name)
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        expected_end = offset + int(length) if length is not None and length.isdigit() else None
        with open(part, mode) as f:
            shutil.copyfileobj(resp, f, CHUNK)
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if expected_end is not None and size != expected_end:
        raise DownloadError(f"short read: {size} of {expected_end} bytes")


# ------------------------------------------------------------------------------------------- extraction
def _safe_relpath(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or any(part == ".." for part in p.parts) or (p.parts and ":" in p.parts[0]):
        raise UnsafeArchiveError(f"archive member {name!r} escapes the destination folder")
    parts = [q for q in p.parts if q not in ("", ".")]
    if not parts:
        raise UnsafeArchiveError(f"archive member {name!r} has no file name")
    return PurePosixPath(*parts)


def extract_tar(
    archive: str | Path, dest_dir: str | Path, *, flatten: bool, suffixes: tuple[str, ...] | None = IMAGE_SUFFIXES
) -> int:
    """Extract regular files of ``archive`` into ``dest_dir``; returns the number written.

    ``flatten`` keeps only base names (the reference moves every file of the Oxford / Paris archives into
    ``jpg/``); otherwise relative paths are kept (R1M). Absolute / ``..`` members raise
    :class:`UnsafeArchiveError`; links, devices and folders are skipped; each file is written to a temp name
    and renamed. ``suffixes`` filters by file extension (None: everything).
    """
    dest = Path(dest_dir).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    written, skipped, seen = 0, 0, set()
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if not member.isfile():  # folders are implied; links and devices are never written
                skipped += int(not member.isdir())
                continue
            rel = _safe_relpath(member.name)
            if suffixes is not None and not rel.name.lower().endswith(suffixes):
                continue
            rel = PurePosixPath(rel.name) if flatten else rel
            if rel in seen:
                raise UnsafeArchiveError(f"{archive}: two members extract to {rel}")
            seen.add(rel)
            target = dest.joinpath(*rel.parts)
            if not target.parent.resolve().is_relative_to(dest):  # e.g. through a symlink already in dest
                raise UnsafeArchiveError(f"archive member {member.name!r} resolves outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            tmp = target.with_name(f".{target.name}.tmp")
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            os.replace(tmp, target)
            written += 1
    if skipped:
        log.warning("%s: skipped %d links / special files", Path(archive).name, skipped)
    return written


# --------------------------------------------------------------------------------------------- the job
@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One download per dataset folder at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".download.flock", "w") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"another download is running in {folder}") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class _Lock:
    """The ``download.lock.json`` record (atomic rewrites)."""

    def __init__(self, path: Path, dataset: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"dataset": dataset, "files": {}, "complete": False}
        if path.exists():
            self.data = json.loads(path.read_text(encoding="utf-8"))
            if self.data.get("dataset") != dataset:
                raise VerificationError(f"{path} belongs to dataset {self.data.get('dataset')!r}")

    def file(self, name: str) -> dict[str, Any]:
        return self.data["files"].setdefault(name, {})

    def save(self) -> None:
        _write_json_atomic(self.path, self.data)


def _pinned(name: str, lock: _Lock, pins: dict[str, str]) -> str | None:
    base = PurePosixPath(name).name
    return pins.get(name) or pins.get(base) or OFFICIAL_SHA256.get(base) or lock.file(name).get("sha256")


def _fetch_recorded(src: Source, folder: Path, lock: _Lock, base_url: str | None, pins: dict[str, str]) -> Path:
    """Fetch one source into ``folder`` (keeping its sub-folder), checking / recording its SHA-256."""
    dest = folder.joinpath(*PurePosixPath(src.name).parts)
    url = src.url(base_url)
    log.info("fetching %s", url)
    digest, size = fetch(url, dest, expected_sha256=_pinned(src.name, lock, pins))
    entry = lock.file(src.name)
    entry.update({"url": url, "sha256": digest, "bytes": size})
    lock.save()
    return dest


def download_dataset(
    dataset: str,
    root: str | Path,
    *,
    base_url: str | None = None,
    keep_archives: bool = False,
    num_archives: int = R1M_ARCHIVES,
    expected_counts: tuple[int, int] | None | str = "auto",
    pins: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Download, extract and verify ``dataset`` under ``root``; returns the lock record.

    ``expected_counts`` (database images, queries): ``"auto"`` checks the published sizes when the official
    sources are used in full, and nothing with ``base_url`` or a partial R1M; None disables the check.
    A completed dataset (lock says complete, ``jpg/`` present) is left alone.
    """
    dataset = dataset.lower()
    if dataset not in GROUND_TRUTH:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(GROUND_TRUTH)}")
    if expected_counts == "auto":
        official = base_url is None and (dataset != "revisitop1m" or num_archives == R1M_ARCHIVES)
        expected_counts = EXPECTED_COUNTS[dataset] if official else None
    counts = None if expected_counts is None else (int(expected_counts[0]), int(expected_counts[1]))
    pins = dict(pins or {})
    folder = Path(root).resolve() / dataset
    with _exclusive(folder):
        lock = _Lock(folder / "download.lock.json", dataset)
        if lock.data.get("complete") and (folder / "jpg").is_dir():
            log.info("%s already complete in %s", dataset, folder)
            return lock.data
        gnd_path = _fetch_recorded(GROUND_TRUTH[dataset], folder, lock, base_url, pins)
        wanted = _wanted_files(dataset, gnd_path, counts)
        archives = r1m_archives(num_archives) if dataset == "revisitop1m" else ARCHIVES[dataset]
        staging = folder / "jpg.partial"
        if (folder / "jpg").exists() and staging.exists():
            raise DownloadError(f"both {folder / 'jpg'} and {staging} exist; remove the stale one and rerun")
        if (folder / "jpg").is_dir():
            staging = folder / "jpg"  # re-verifying an existing extraction (e.g. lock lost): no re-download
        else:
            for src in archives:
                entry = lock.file(src.name)
                if entry.get("extracted"):
                    continue
                archive = _fetch_recorded(src, folder / "archives", lock, base_url, pins)
                n = extract_tar(archive, staging, flatten=dataset != "revisitop1m")
                entry.update({"extracted": True, "files": n})
                lock.save()
                if not keep_archives:
                    archive.unlink()
                log.info("%s: %d files extracted", src.name, n)
        missing = [w for w in wanted if not (staging / w).is_file()]
        if missing:
            raise VerificationError(
                f"{dataset}: {len(missing)} of {len(wanted)} ground-truth images missing after extraction, "
                f"e.g. {missing[:3]}; to start over remove {staging} and {lock.path}"
            )
        if staging.name == "jpg.partial":
            os.replace(staging, folder / "jpg")
        if not keep_archives:
            shutil.rmtree(folder / "archives", ignore_errors=True)
        lock.data["verified"] = {"images_expected": len(wanted), "images_found": len(wanted) - len(missing)}
        lock.data["complete"] = True
        lock.save()
        log.info("%s complete: %d images verified in %s", dataset, len(wanted), folder / "jpg")
        return lock.data


def _wanted_files(dataset: str, gnd_path: Path, expected: tuple[int, int] | None) -> list[str]:
    """Relative image paths the ground truth needs, after checking it parses and has the expected sizes."""
    try:
        if dataset == "revisitop1m":
            names = load_distractor_list(str(gnd_path))
            n_db, n_q = len(names), 0
            wanted = names
        else:
            ds = load_revisitop_pkl(str(gnd_path), dataset)
            n_db, n_q = len(ds.images), len(ds.queries)
            wanted = sorted({f"{i}{ds.ext}" for i in ds.images} | {f"{q}{ds.qext}" for q in ds.queries})
    except DatasetError as exc:
        raise VerificationError(f"{gnd_path.name}: {exc}") from None
    if expected is not None and (n_db, n_q) != tuple(expected):
        raise VerificationError(
            f"{gnd_path.name}: {n_db} database images and {n_q} queries, expected {expected[0]} and {expected[1]}"
        )
    return wanted
