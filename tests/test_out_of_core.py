"""The out-of-core paths of the offline stages give what the in-memory ones gave, on small inputs:

* ``pipeline.inverted_file.merged_postings`` (the ASMK merge a range of words at a time) equals
  ``merge_inverted_files`` array for array, whatever the range size;
* ``actors.whiten.sample_globals`` returns every row (same order) when a method has at most ``n`` rows, and a
  uniform ``n``-row subset (in order, deterministic) otherwise;
* ``storage.readers.read_globals(trim=True)`` equals the untrimmed read cut at its last non-zero column, and
  ``iter_regions`` concatenates to ``read_regions``;
* the ASMK stage's streamed snapshot equals ``merge_inverted_files`` of the shards built in memory.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from actors.whiten import sample_globals
from pipeline.asmk import ASMKConfig, build_index, kernel_config, merge_inverted_files
from pipeline.codebook import assign
from pipeline.inverted_file import InvertedFile, merged_postings, merged_word_ptr
from storage.readers import iter_regions, read_globals, read_regions
from storage.schemas import descriptor_array, descriptors_to_numpy, globals_schema, regions_schema
from storage.tables import StageManifest, TableStore


def _random_parts(n_parts: int, K: int, cfg: ASMKConfig, seed: int = 0) -> list[InvertedFile]:
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((K, 16)).astype(np.float32)
    parts = []
    for s in range(n_parts):
        n = int(rng.integers(1, 60)) if s != 1 else 1          # one nearly empty shard
        des = rng.standard_normal((n, 16)).astype(np.float32)
        words = assign(des, C, multiple=cfg.multiple)[0] if n else np.zeros((0, 1), np.int64)
        img = np.sort(rng.integers(0, 5, n))
        parts.append(build_index(des, words, img, C, cfg))
    return parts


@pytest.mark.parametrize("kernel", ["asmk_star", "asmk"])
@pytest.mark.parametrize("max_postings", [1, 7, 10**9])
def test_merged_postings_equal_the_in_memory_merge(kernel, max_postings):
    parts = _random_parts(6, 12, kernel_config(kernel))
    want = merge_inverted_files(parts)
    blocks = list(merged_postings(parts, max_postings=max_postings))
    ids = np.concatenate([b[0] for b in blocks])
    vecs = np.concatenate([b[1] for b in blocks])
    assert np.array_equal(merged_word_ptr(parts), want.word_ptr)
    assert ids.dtype == want.item_ids.dtype and np.array_equal(ids, want.item_ids)
    assert vecs.dtype == want.vecs.dtype and np.array_equal(vecs, want.vecs)
    if max_postings == 1:  # every range holds one word's postings (or a run of empty words)
        assert len(blocks) >= len(np.flatnonzero(np.diff(want.word_ptr)))


def _write_shards(root: str, n_shards: int = 4, per: int = 5, dim: int = 12, seed: int = 0) -> None:
    """Extraction-like ``globals`` (3 methods, one of them 4-d zero-padded) and ``regions`` tables, committed."""
    rng = np.random.default_rng(seed)
    store, man = TableStore(root), StageManifest(root, "extract")
    for s in range(n_shards):
        ids = [f"img{s}_{j}" for j in range(per)]
        methods = ["gem", "spoc", "narrow"]
        X = rng.random((per * 3, dim)).astype(np.float32)
        X[2::3, 4:] = 0.0
        g = pa.table({"image_id": [i for i in ids for _ in methods], "method": methods * per,
                      "descriptor": descriptor_array(X, "float16")}, schema=globals_schema(dim, "float16"))
        src = ["full", "fs_egm", "grid"] * per
        R = rng.random((len(src), dim)).astype(np.float32)
        r = pa.table({"image_id": [i for i in ids for _ in range(3)], "region_id": np.tile(np.arange(3, dtype=np.int32),
                                                                                             per),
                      "source": src, "level": np.zeros(len(src), np.int16),
                      **{c: rng.random(len(src)).astype(np.float32) for c in ("x0", "y0", "x1", "y1")},
                      "score": np.ones(len(src), np.float32), "saliency": np.ones(len(src), np.float32),
                      "descriptor": descriptor_array(R, "float16")}, schema=regions_schema(dim, "float16"))
        files = {"globals": store.write("globals", "extract", s, g), "regions": store.write("regions", "extract", s, r)}
        man.commit(s, files, images=per)
        StageManifest(root, "descriptors").commit(s, {"globals": files["globals"]})


def test_sample_globals_takes_all_rows_or_a_uniform_subset(tmp_path):
    root = str(tmp_path)
    _write_shards(root)
    files = TableStore(root).committed_files("globals", ["extract"])
    g = TableStore(root).read("globals", ["extract"])
    everything = sample_globals(files, ("gem", "spoc"), 10**6)
    for m in ("gem", "spoc"):
        want = descriptors_to_numpy(g.filter(pc.equal(g.column("method"), m)).column("descriptor"))
        assert everything[m].dtype == np.float16
        assert np.array_equal(everything[m].astype(np.float32), want)  # all rows, file and row order
    sub = sample_globals(files, ("gem",), 7, seed=3)["gem"].astype(np.float32)
    allg = descriptors_to_numpy(g.filter(pc.equal(g.column("method"), "gem")).column("descriptor"))
    rows = [int(np.flatnonzero((allg == x).all(1))[0]) for x in sub]
    assert len(sub) == 7 and len(set(rows)) == 7 and rows == sorted(rows)  # distinct rows, in order
    assert np.array_equal(sample_globals(files, ("gem",), 7, seed=3)["gem"].astype(np.float32), sub)
    assert "missing" not in sample_globals(files, ("missing",), 5)


def test_trimmed_globals_and_region_iteration_equal_the_whole_reads(tmp_path):
    root = str(tmp_path)
    _write_shards(root)
    ids, full = read_globals(root, "narrow")
    ids_t, trimmed = read_globals(root, "narrow", trim=True)
    assert ids_t == ids and full.shape[1] == 12 and trimmed.shape[1] == 4
    assert np.array_equal(trimmed, full[:, :4]) and trimmed.dtype == np.float32
    ids_g, gem = read_globals(root, "gem", trim=True)
    assert np.array_equal(gem, read_globals(root, "gem")[1])  # nothing to trim: unchanged
    for source in ("full", "fs_egm"):
        rid, boxes, X = read_regions(root, source)
        parts = list(iter_regions(root, source))
        assert len(parts) == 4
        assert sum((p[0] for p in parts), []) == rid
        assert np.array_equal(np.concatenate([p[1] for p in parts]), boxes)
        assert np.array_equal(np.concatenate([p[2] for p in parts]), X)


def test_npy_file_reads_rows_lazily(tmp_path):
    from storage.arrays import NpyFile, save_npy

    for a in (np.arange(24, dtype=np.int64).reshape(6, 4), np.arange(5, dtype=np.float16), np.array(3.5),
              np.array("asmk_star"), np.zeros((0, 3), np.uint8)):
        path = str(tmp_path / "a.npy")
        save_npy(path, a)
        f = NpyFile(path)
        assert f.shape == a.shape and f.dtype == a.dtype and np.array_equal(np.asarray(f), a)
        if a.ndim:
            assert len(f) == len(a) and np.array_equal(f[1:4], a[1:4]) and np.array_equal(f[2:2], a[2:2])
            if len(a):
                assert np.array_equal(f[-1], a[-1]) and np.array_equal(f[0], a[0])
        else:
            assert f[()] == a[()]
    parts = _random_parts(3, 8, kernel_config("asmk_star"))
    lazy = []
    for i, p in enumerate(parts):
        arrays = {}
        for k, v in p.to_arrays().items():
            save_npy(str(tmp_path / f"{i}-{k}.npy"), v)
            arrays[k] = NpyFile(str(tmp_path / f"{i}-{k}.npy"))
        lazy.append(InvertedFile.from_arrays(arrays))
    want = merge_inverted_files(parts)
    got = np.concatenate([b[1] for b in merged_postings(lazy, max_postings=5)])
    assert np.array_equal(got, want.vecs) and np.array_equal(merged_word_ptr(lazy), want.word_ptr)
