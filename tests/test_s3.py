"""The index job against a real S3 server on 127.0.0.1 (moto's server, with signature checking enabled).

The moto server runs as a subprocess with ``INITIAL_NO_AUTH_ACTION_COUNT=3``: the first three requests
(create an IAM user, its access key and an allow-all policy) are unauthenticated, every later request must be
signed with that key. A wrong secret therefore gets ``SignatureDoesNotMatch``, as on AWS.
The storage-layer test is fast (in-process); the two job tests start Ray and are marked slow.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage.layout import RunLayout
from tests import helpers_images as H

if not H.DATA_DIR.is_dir():
    pytest.skip(f"real test images not found at {H.DATA_DIR}", allow_module_level=True)
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

BUCKET = "bucket"
REGION = "us-east-1"
S3_PHOTO_IDS = ["painting_00003", "painting_00120", "lund_0002", "lund_0020",
                "distractor_BACKGROUND_Google_image_0093", "distractor_BACKGROUND_Google_image_0101"]
BROKEN = {"broken_truncated.jpg": (H.truncated_jpeg(), "truncated")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server_cmd(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server requiring valid signatures, a bucket with 6 real photos + 1 broken file, and its keys."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    server = subprocess.Popen(_moto_server_cmd(port), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"moto server did not start (rc={server.poll()})")
                time.sleep(0.1)
        common = {"endpoint_url": endpoint, "region_name": REGION}
        # the three unauthenticated bootstrap actions
        iam = boto3.client("iam", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", **common)
        iam.create_user(UserName="indexer")
        key = iam.create_access_key(UserName="indexer")["AccessKey"]
        iam.put_user_policy(UserName="indexer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        client = boto3.client("s3", aws_access_key_id=key["AccessKeyId"],
                              aws_secret_access_key=key["SecretAccessKey"], **common)
        client.create_bucket(Bucket=BUCKET)
        for p in H.real_photos(S3_PHOTO_IDS):
            client.put_object(Bucket=BUCKET, Key=f"images/{p.name}", Body=p.read_bytes())
        for name, (data, _) in BROKEN.items():
            client.put_object(Bucket=BUCKET, Key=f"images/{name}", Body=data)
        env_vars = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                    "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": REGION}
        yield {"endpoint": endpoint, "client": client, "env": env_vars, "common": common}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _run_job(env_vars: dict[str, str], images: str, out: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = H.index_command(images, out, "--shard-size", "4", "--max-side", "320", "--num-cpus", "2")
    return subprocess.run(cmd, cwd=H.PROJECT_ROOT, env=H.job_env(**env_vars), capture_output=True, text=True,
                          timeout=timeout)


def _objects(client, prefix: str) -> dict[str, tuple[str, float]]:
    """key → (ETag, LastModified) of every object under ``prefix``."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], o["LastModified"].timestamp())
    return out


def test_storage_layer_against_s3(s3, monkeypatch):
    from storage.corpus import list_corpus
    from storage.uri import StorageError, check_access, read_bytes

    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)
    check_access(f"s3://{BUCKET}/run")
    corpus = list_corpus(f"s3://{BUCKET}/images").to_pydict()
    expected_ids = sorted(S3_PHOTO_IDS + [H.stem(k) for k in BROKEN])
    assert corpus["image_id"] == expected_ids
    assert all(u == f"s3://{BUCKET}/images/{u.rsplit('/', 1)[1]}" for u in corpus["uri"])
    assert all(v for v in corpus["version"])  # ETags: a changed object is detectable
    photo = H.real_photos(S3_PHOTO_IDS[:1])[0]
    assert read_bytes(f"s3://{BUCKET}/images/{photo.name}") == photo.read_bytes()
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{BUCKET}/images/does_not_exist.jpg")

    wrong = "Wr0ngSecretKeyDoNotPrint/0123456789abcdefghij"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    for call in (lambda: check_access(f"s3://{BUCKET}/run"), lambda: list_corpus(f"s3://{BUCKET}/images"),
                 lambda: read_bytes(f"s3://{BUCKET}/images/{photo.name}")):
        with pytest.raises(StorageError) as info:
            call()
        msg = str(info.value)
        assert "credentials were rejected" in msg and "AWS_SECRET_ACCESS_KEY" in msg, msg
        assert wrong not in msg


@pytest.mark.slow
def test_wrong_secret_is_rejected_before_anything_is_done(s3):
    wrong = "Wr0ngSecretKeyDoNotPrint/abcdefghijklmnopqrstu"
    env_vars = {**s3["env"], "AWS_SECRET_ACCESS_KEY": wrong}
    proc = _run_job(env_vars, f"s3://{BUCKET}/images", f"s3://{BUCKET}/run-wrong", timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert wrong not in text and wrong[:12] not in text
    assert "AWS_SECRET_ACCESS_KEY" in text and "credentials" in text.lower(), text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert _objects(s3["client"], "run-wrong") == {}  # nothing written



@pytest.mark.slow
def test_index_from_and_to_s3_then_noop_rerun(s3, monkeypatch):
    from storage.tables import StageManifest, TableStore

    env_vars, client = s3["env"], s3["client"]
    out = f"s3://{BUCKET}/run"
    proc = _run_job(env_vars, f"s3://{BUCKET}/images", out)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert env_vars["AWS_SECRET_ACCESS_KEY"] not in text

    objects = _objects(client, "run/")
    run = RunLayout("run")
    assert run.corpus_manifest in objects
    assert sorted(k for k in objects if k.startswith("run/stages/extract/shards/")) == [
        "run/stages/extract/shards/00000.json", "run/stages/extract/shards/00001.json"]  # 7 inputs, 4 per shard

    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    store = TableStore(out)
    images = store.read("images").to_pydict()
    assert sorted(images["image_id"]) == sorted(S3_PHOTO_IDS)
    assert all(u.startswith(f"s3://{BUCKET}/images/") for u in images["uri"])
    errors = store.read("errors").to_pydict()
    assert dict(zip(errors["image_id"], errors["reason"])) == {H.stem(k): v[1] for k, v in BROKEN.items()}
    regions = store.read("regions", columns=["image_id", "region_id"]).to_pydict()
    assert set(regions["image_id"]) == set(S3_PHOTO_IDS)
    assert len(set(zip(regions["image_id"], regions["region_id"]))) == len(regions["image_id"])
    globals_ = store.read("globals", columns=["image_id", "method"]).to_pydict()
    assert set(globals_["image_id"]) == set(S3_PHOTO_IDS)
    markers = StageManifest(out, "extract").committed()
    assert all(f.startswith(f"s3://{BUCKET}/run/tables/") for m in markers.values() for f in m["files"].values())

    run = RunLayout("run")
    tables_prefix = run.table_file("x", "extract", 0).rsplit("/", 2)[0] + "/"
    published = {k: v for k, v in objects.items() if k.startswith((tables_prefix, run.shard_markers_dir("extract"),
                                                                    run.corpus_manifest))}
    proc = _run_job(env_vars, f"s3://{BUCKET}/images", out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    after = _objects(client, "run/")
    assert {k: after[k] for k in published} == published  # same ETags and modification times
    assert not set(after) - set(objects) - {run.run_manifest, run.config, run.stage_summary("extract")}
    m = re.search(r"^\s*extract: (.*)$", proc.stdout, flags=re.M)
    assert m, proc.stdout
    line = m.group(1)
    assert "skipped=True" in line or ("images=0," in line and "skipped_shards=2, shards=2" in line), line
