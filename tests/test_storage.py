"""Storage layer: schemas, shard-atomic tables, corpus manifests, arrays and weights without pickle."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from storage import arrays, corpus, schemas
from storage.tables import StageManifest, TableStore, read_parquet
from storage.uri import StorageError, redact, write_bytes_atomic
from storage.weights import load_state_dict


def _globals(ids: list[str], dim: int = 4, dtype: str = "float16") -> pa.Table:
    x = np.arange(len(ids) * dim, dtype=np.float32).reshape(len(ids), dim) / 10
    return pa.table({"image_id": ids, "method": ["mac"] * len(ids),
                     "descriptor": schemas.descriptor_array(x, dtype)}, schema=schemas.globals_schema(dim, dtype))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_descriptor_roundtrip(tmp_path, dtype: str) -> None:
    t = _globals(["a", "b", "c"], dtype=dtype)
    uri = str(tmp_path / "g.parquet")
    from storage.tables import write_parquet

    write_parquet(uri, t)
    back = read_parquet(uri)
    assert back.schema.field("descriptor").type == schemas.descriptor_type(4, dtype)
    x = schemas.descriptors_to_numpy(back.column("descriptor"))
    np.testing.assert_allclose(x, np.arange(12, dtype=np.float32).reshape(3, 4) / 10, rtol=1e-3)


def test_int8_descriptors_keep_each_rows_direction(tmp_path) -> None:
    from storage.tables import write_parquet

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[3] = 0.0                                        # a zero row stays zero
    x[4] = np.eye(64, dtype=np.float32)[7] * -1.0     # one-hot: exact
    q = schemas.encode_int8_rows(x)
    assert q.dtype == np.int8
    # hand-checked rows: the largest magnitude becomes 127, the rest scale with it and round
    np.testing.assert_array_equal(schemas.encode_int8_rows(np.array([[0.5, -0.25, 0.1, 0.0]])), [[127, -64, 25, 0]])
    np.testing.assert_array_equal(np.abs(q[np.arange(500) != 3]).max(axis=1), 127)
    uri = str(tmp_path / "k.parquet")
    ids = [str(i) for i in range(500)]
    write_parquet(uri, pa.table({"image_id": ids, "keypoint_id": np.zeros(500, np.int32),
                                 "x": np.zeros(500, np.float32), "y": np.zeros(500, np.float32),
                                 "score": np.zeros(500, np.float32), "descriptor": schemas.descriptor_array(x, "int8")},
                                schema=schemas.keypoints_schema(64, "int8")))
    col = read_parquet(uri).column("descriptor")
    assert col.type == schemas.descriptor_type(64, "int8")
    back = schemas.descriptors_to_numpy(col)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back[3], 0.0)
    np.testing.assert_array_equal(back[4], x[4])
    cos = np.sum(back * x, axis=1)[np.arange(500) != 3]
    assert cos.min() > 0.9995 and np.allclose(np.linalg.norm(back[np.arange(500) != 3], axis=1), 1.0, atol=1e-6)
    # cosine similarities move by at most a few thousandths: half a step of 1/127 per component of the peak-scaled
    # rows (|peak| <= 1) bounds each row's error by sqrt(64) * 0.5 / 127 = 0.031; measured far below that
    err = np.abs(x @ x.T - back @ back.T)
    assert err.max() < 0.01 and err.mean() < 0.002
    with pytest.raises(ValueError, match="2-D"):
        schemas.descriptor_array(np.zeros(4, np.float32), "int8")


def test_schema_version_is_checked(tmp_path) -> None:
    t = _globals(["a"]).replace_schema_metadata({b"schema_version": b"99"})
    uri = str(tmp_path / "old.parquet")
    pq.write_table(t, uri)
    with pytest.raises(ValueError, match="schema version 99"):
        read_parquet(uri)


def test_uncommitted_shards_are_invisible_and_rewrites_do_not_duplicate(tmp_path) -> None:
    root = str(tmp_path)
    store, manifest = TableStore(root), StageManifest(root, "extract")
    f0 = store.write("globals", "extract", 0, _globals(["a", "b"]))
    manifest.commit(0, {"globals": f0}, images=2)
    store.write("globals", "extract", 1, _globals(["c"]))  # written, never committed (worker killed)
    assert store.read("globals").column("image_id").to_pylist() == ["a", "b"]
    # the retry rewrites shard 1 under the same name and commits it
    f1 = store.write("globals", "extract", 1, _globals(["c"]))
    manifest.commit(1, {"globals": f1})
    store.write("globals", "extract", 1, _globals(["c"]))  # a late duplicate attempt overwrites, never appends
    assert sorted(store.read("globals").column("image_id").to_pylist()) == ["a", "b", "c"]
    assert set(manifest.committed()) == {"00000", "00001"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_markers_list_files_relative_to_the_run_so_a_moved_run_reads_its_own(tmp_path) -> None:
    import json
    import shutil

    root = str(tmp_path / "run")
    store = TableStore(root)
    uri = store.write("globals", "extract", 0, _globals(["a", "b"]))
    StageManifest(root, "extract").commit(0, {"globals": uri, "elsewhere": "s3://bucket/x.parquet"})
    marker = json.loads(open(StageManifest(root, "extract").marker_uri(0)).read())
    assert uri.startswith(root + "/")
    assert marker["files"] == {"globals": uri[len(root) + 1:], "elsewhere": "s3://bucket/x.parquet"}
    assert StageManifest(root, "extract").committed()["00000"]["files"]["globals"] == uri
    shutil.move(root, tmp_path / "moved")  # a run copied to another folder (or bucket) reads its own files
    moved = str(tmp_path / "moved")
    assert StageManifest(moved, "extract").committed()["00000"]["files"]["globals"].startswith(moved + "/")
    assert TableStore(moved).read("globals").column("image_id").to_pylist() == ["a", "b"]


def test_atomic_write_leaves_old_content_on_failure(tmp_path, monkeypatch) -> None:
    target = tmp_path / "x.bin"
    write_bytes_atomic(str(target), b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("storage.uri.os.replace", boom)
    with pytest.raises(StorageError, match="disk full"):
        write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"


def test_corpus_folder_ids_shards_and_hidden_files(tmp_path) -> None:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for name in ["b.jpg", "a.jpg", "a.png", "sub/c.jpeg", ".hidden.jpg", "notes.txt"]:
        (d / name).write_bytes(b"x")
    t = corpus.list_corpus(str(d))
    ids = t.column("image_id").to_pylist()
    assert ids == ["a.jpg", "a.png", "b", "notes", "sub/c"]  # a.jpg/a.png keep extensions to stay unique
    sharded = corpus.assign_shards(t, shard_size=2)
    assert sharded.column("shard").to_pylist() == [0, 0, 1, 1, 2]
    assert corpus.assign_shards(corpus.list_corpus(str(d)), 2).equals(sharded)  # deterministic


def test_corpus_from_uri_list_and_parquet(tmp_path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n/data/x/one.jpg\n\n/data/y/two.jpg\n")
    assert corpus.list_corpus(str(lst)).column("image_id").to_pylist() == ["one", "two"]
    pqf = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["s3://b/k1.jpg", "s3://b/k2.jpg"], "image_id": ["k2", "k1"]}), pqf)
    t = corpus.list_corpus(str(pqf))
    assert t.column("image_id").to_pylist() == ["k1", "k2"]
    assert t.column("uri").to_pylist() == ["s3://b/k2.jpg", "s3://b/k1.jpg"]
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="'uri' column"):
        corpus.list_corpus(str(tmp_path / "bad.parquet"))


def test_subset_is_deterministic() -> None:
    ids = [f"img{i:03d}" for i in range(100)]
    a = corpus.subset_ids(ids, 10)
    assert a == corpus.subset_ids(list(reversed(ids)), 10) and len(a) == 10 and a == sorted(a)


def test_arrays_refuse_pickled_objects(tmp_path) -> None:
    uri = str(tmp_path / "a.npz")
    arrays.save_arrays(uri, mean=np.ones(3), proj=np.eye(3, dtype=np.float32))
    back = arrays.load_arrays(uri)
    np.testing.assert_array_equal(back["proj"], np.eye(3))
    buf = io.BytesIO()
    np.savez(buf, obj=np.array([{"evil": 1}], dtype=object))
    (tmp_path / "evil.npz").write_bytes(buf.getvalue())
    with pytest.raises(ValueError):
        arrays.load_arrays(str(tmp_path / "evil.npz"))
    ids = np.asarray(["b", "a"], dtype=str)
    np.testing.assert_array_equal(arrays.npy_from_bytes(arrays.npy_bytes(ids)), ids)
    evil_npy = io.BytesIO()
    np.save(evil_npy, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        arrays.npy_from_bytes(evil_npy.getvalue())
    with pytest.raises(ValueError):
        arrays.npy_bytes(np.array([{"evil": 1}], dtype=object))
    arrays.save_json(str(tmp_path / "m.json"), {"n": np.int64(3), "v": np.arange(2)})
    assert arrays.load_json(str(tmp_path / "m.json")) == {"n": 3, "v": [0, 1]}


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_weights_load_without_unpickling_objects(tmp_path) -> None:
    state = load_state_dict("builtin:mobilenet_v2")
    assert state["classifier.1.weight"].shape == (1000, 1280)
    good = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, good)
    assert list(load_state_dict(str(good))) == ["w"]
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"w": _Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(str(evil))


def test_redact_hides_credentials(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3tKEY")
    assert "s3cr3tKEY" not in redact("failed with key s3cr3tKEY at https://user:pw@host/x")
    assert "user:pw" not in redact("https://user:pw@host/x")
