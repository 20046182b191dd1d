"""Retries of transient S3 errors in storage.uri, by failure injection into the s3fs filesystem object.

The s3fs object's methods (cat_file, pipe_file, exists, ls, rm) are replaced by fakes that raise what s3fs
really raises (botocore ClientErrors translated by s3fs.errors.translate_boto_error, ConnectionResetError,
botocore EndpointConnectionError) a given number of times, then succeed. No server is needed; the waits are
recorded instead of slept.
"""
from __future__ import annotations

import errno
import logging
import types

import pytest

botocore_exc = pytest.importorskip("botocore.exceptions")
s3fs_errors = pytest.importorskip("s3fs.errors")

from storage import uri as U  # noqa: E402 - after the importorskip guards

SECRET = "retryTestSecretDoNotLog/0123456789abcdef"


def client_error(code: str, status: int, op: str = "GetObject") -> Exception:
    return botocore_exc.ClientError({"Error": {"Code": code, "Message": f"{code} message"},
                                     "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def s3fs_error(code: str, status: int) -> Exception:
    """What s3fs raises for a ClientError after its own retries (translated, cause kept)."""
    return s3fs_errors.translate_boto_error(client_error(code, status))


class Flaky:
    """A callable failing with ``errors`` (one per call, in order) and then returning ``result``."""

    def __init__(self, errors: list[BaseException], result=None):
        self.errors, self.result, self.calls = list(errors), result, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


@pytest.fixture
def s3(monkeypatch):
    """An s3fs filesystem for a fake endpoint (never contacted), fast recorded sleeps, 5 attempts."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIARETRYTEST0000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv(U.RETRIES_ENV, "5")
    monkeypatch.setenv(U.RETRY_BASE_ENV, "0.2")
    monkeypatch.setenv(U.RETRY_MAX_ENV, "20")
    sleeps: list[float] = []
    monkeypatch.setattr(U, "time", types.SimpleNamespace(sleep=sleeps.append))
    fs, _ = U.get_fs("s3://bucket/x")
    return types.SimpleNamespace(fs=fs, sleeps=sleeps, patch=lambda name, f: monkeypatch.setattr(fs, name, f))


def retry_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "storage.uri" and "retrying in" in r.getMessage()]


def test_read_retries_slowdown_503_and_reset_then_succeeds(s3, caplog):
    caplog.set_level(logging.DEBUG, logger="storage.uri")
    fake = Flaky([client_error("SlowDown", 503), s3fs_error("ServiceUnavailable", 503), ConnectionResetError(
        errno.ECONNRESET, "Connection reset by peer")], result=b"payload")
    s3.patch("cat_file", fake)
    assert U.read_bytes("s3://bucket/a/b.bin") == b"payload"
    assert fake.calls == 4
    lines = retry_lines(caplog)
    assert len(lines) == 3
    assert "attempt 1/5" in lines[0] and "s3://bucket/a/b.bin" in lines[0] and "SlowDown" in lines[0]
    assert "ConnectionResetError" in lines[2]
    assert all(SECRET not in line for line in lines)
    # exponential backoff with jitter in [0.5, 1] x 0.2 * 2**n
    assert len(s3.sleeps) == 3
    for n, d in enumerate(s3.sleeps):
        assert 0.5 * 0.2 * 2 ** n <= d <= 0.2 * 2 ** n, (n, d)


def test_write_retries_translated_errors_and_endpoint_outage(s3):
    fake = Flaky([s3fs_error("InternalError", 500), botocore_exc.EndpointConnectionError(
        endpoint_url="http://127.0.0.1:9/bucket/k"), TimeoutError("RequestTimeout")])
    s3.patch("pipe_file", fake)
    U.write_bytes_atomic("s3://bucket/k", b"data")
    assert fake.calls == 4


def test_listdir_and_remove_redo_the_whole_operation(s3):
    exists = Flaky([botocore_exc.ConnectionClosedError(endpoint_url="http://x")], result=True)
    ls = Flaky([client_error("ServiceUnavailable", 503, "ListObjectsV2")],
               result=["bucket/d/one.json", "bucket/d/two.json"])
    s3.patch("exists", exists)
    s3.patch("ls", ls)
    assert U.listdir("s3://bucket/d") == ["s3://bucket/d/one.json", "s3://bucket/d/two.json"]
    assert (exists.calls, ls.calls) == (3, 2)  # exists failed once; exists+ls redone after ls failed

    rm = Flaky([s3fs_error("SlowDown", 503), FileNotFoundError("already gone")])
    exists2 = Flaky([], result=True)
    s3.patch("rm", rm)
    s3.patch("exists", exists2)
    U.remove("s3://bucket/d/one.json")  # the second attempt finds it gone: fine
    assert rm.calls == 2


@pytest.mark.parametrize("error,expect", [
    (lambda: s3fs_error("AccessDenied", 403), "credentials were rejected"),
    (lambda: s3fs_error("SignatureDoesNotMatch", 403), "credentials were rejected"),
    (lambda: s3fs_error("InvalidAccessKeyId", 403), "credentials were rejected"),
    (lambda: client_error("AccessDenied", 403), "credentials were rejected"),
    (lambda: s3fs_error("InvalidArgument", 400), "InvalidArgument message"),
])
def test_permanent_errors_are_not_retried(s3, caplog, error, expect):
    caplog.set_level(logging.DEBUG, logger="storage.uri")
    fake = Flaky([error()] * 5, result=b"never")
    s3.patch("cat_file", fake)
    with pytest.raises(U.StorageError) as info:
        U.read_bytes("s3://bucket/x")
    assert fake.calls == 1 and s3.sleeps == [] and retry_lines(caplog) == []
    assert expect in str(info.value) and "gave up" not in str(info.value)
    assert SECRET not in str(info.value)


def test_missing_key_and_bucket_keep_file_not_found(s3):
    for err in (s3fs_error("NoSuchKey", 404), s3fs_error("NoSuchBucket", 404)):
        fake = Flaky([err], result=b"never")
        s3.patch("cat_file", fake)
        with pytest.raises(FileNotFoundError):
            U.read_bytes("s3://bucket/x")
        assert fake.calls == 1
    # a write into a missing bucket: a StorageError that says so, no retries
    fake = Flaky([s3fs_error("NoSuchBucket", 404)])
    s3.patch("pipe_file", fake)
    with pytest.raises(U.StorageError, match="bucket does not exist"):
        U.write_bytes_atomic("s3://bucket/x", b"1")
    assert fake.calls == 1


def test_gives_up_after_the_configured_attempts(s3, monkeypatch):
    monkeypatch.setenv(U.RETRIES_ENV, "3")
    fake = Flaky([s3fs_error("SlowDown", 503)] * 10, result=b"never")
    s3.patch("cat_file", fake)
    with pytest.raises(U.StorageError) as info:
        U.read_bytes("s3://bucket/x")
    assert fake.calls == 3 and len(s3.sleeps) == 2
    assert "gave up after 3 attempts" in str(info.value) and U.RETRIES_ENV in str(info.value)
    monkeypatch.setenv(U.RETRIES_ENV, "1")  # retries off
    fake = Flaky([s3fs_error("SlowDown", 503)], result=b"x")
    s3.patch("cat_file", fake)
    with pytest.raises(U.StorageError):
        U.read_bytes("s3://bucket/x")
    assert fake.calls == 1
    monkeypatch.setenv(U.RETRIES_ENV, "lots")
    with pytest.raises(U.StorageError, match="INDEXER_S3_RETRIES"):
        U.retry_settings()


def test_backoff_is_capped(s3, monkeypatch):
    monkeypatch.setenv(U.RETRIES_ENV, "8")
    monkeypatch.setenv(U.RETRY_MAX_ENV, "0.5")
    fake = Flaky([ConnectionResetError()] * 7, result=b"ok")
    s3.patch("cat_file", fake)
    assert U.read_bytes("s3://bucket/x") == b"ok"
    assert len(s3.sleeps) == 7 and max(s3.sleeps) <= 0.5 and min(s3.sleeps[3:]) >= 0.25


def test_local_files_are_not_retried(tmp_path, monkeypatch):
    calls = []

    def fn():
        calls.append(1)
        raise ConnectionResetError("local")

    with pytest.raises(ConnectionResetError):
        U.retry_call(fn, str(tmp_path / "x"))
    assert len(calls) == 1


def test_is_transient_classification():
    aiohttp = pytest.importorskip("aiohttp")
    transient = [client_error("SlowDown", 503), client_error("RequestTimeout", 400), client_error("Weird", 502),
                 s3fs_error("ServiceUnavailable", 503), s3fs_error("InternalError", 500),
                 s3fs_error("RequestTimeout", 400), ConnectionResetError(), BrokenPipeError(),
                 botocore_exc.EndpointConnectionError(endpoint_url="http://x"),
                 botocore_exc.ReadTimeoutError(endpoint_url="http://x"),
                 botocore_exc.ResponseStreamingError(error="reset"),
                 aiohttp.ClientPayloadError("truncated"), aiohttp.ServerDisconnectedError()]
    permanent = [client_error("AccessDenied", 403), client_error("NoSuchBucket", 404),
                 client_error("PreconditionFailed", 412), s3fs_error("SignatureDoesNotMatch", 403),
                 s3fs_error("NoSuchKey", 404), s3fs_error("InvalidArgument", 400), FileExistsError(),
                 botocore_exc.NoCredentialsError(), ValueError("bad"), OSError(errno.EINVAL, "bad")]
    assert [U.is_transient(e) for e in transient] == [True] * len(transient)
    assert [U.is_transient(e) for e in permanent] == [False] * len(permanent)
    # s3fs's `raise translate_boto_error(e, set_cause=False)` inside `except ClientError`: judged by the context
    try:
        try:
            raise client_error("BadGateway", 502)
        except botocore_exc.ClientError as e:
            raise s3fs_errors.translate_boto_error(e, set_cause=False)
    except OSError as translated:
        assert translated.errno == errno.EIO and U.is_transient(translated)
    # a bug raised while handling a reset is not retried
    try:
        try:
            raise ConnectionResetError()
        except ConnectionResetError:
            raise ValueError("bug")
    except ValueError as bug:
        assert not U.is_transient(bug)
