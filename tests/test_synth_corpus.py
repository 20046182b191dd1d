"""The synthetic corpus of the scale experiment (``experiments.synth_corpus``): what extraction would write.

Checked: the tables have the storage schemas and the extraction layout (one file per table and shard, listed by
the shard's commit marker), every image is in the tables exactly once with the per-image counts of the real
distribution, generation is deterministic and resumable, objects recur (regions of images showing the same
object are closer than those of different ones), and the engine takes the generated run as extracted: it skips
``extract`` as up to date and reuses the corpus manifest. The slow test runs every later stage of the DAG on it
(object saliency over simulated maps).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest

from actors.engine import Stage, prepare_manifest, run_pipeline
from experiments.synth_corpus import SynthSpec, Stats, generate, image_plan, keypoints_schema, scale_config
from jobs.index import DAG
from storage.layout import RunLayout
from storage.readers import read_regions
from storage.schemas import ERRORS_SCHEMA, globals_schema, images_schema, locals_schema, regions_schema
from storage.snapshot import open_latest
from storage.tables import StageManifest, TableStore, read_parquet, write_parquet

N, SHARD = 40, 16
SETS = {"extract.shard_size": SHARD, "extract.local_features": 60}


def _make(root, n=N, **kw):
    cfg = scale_config(str(root), None, {**SETS, "stages": ["extract", "whiten", "graph", "object_saliency",
                                                            "descriptors", "faiss", "asmk"],
                                         "whiten.dim": 32, "graph.k": 5, "object_saliency.k": 5,
                                         "asmk.codebook_size": 16, "asmk.codebook_sample": 4000,
                                         "faiss.methods": ["mac", "gem", "rmac", "fs_egm", "os_egm"],
                                         "faiss.regional": ["fs_egm", "os_egm"]})
    spec = SynthSpec(n, keypoints=kw.pop("keypoints", 32), **kw)
    return cfg, spec, generate(cfg, spec)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    cfg, spec, result = _make(root)
    return root, cfg, spec, result


def test_tables_have_the_schemas_and_layout_of_extraction(corpus):
    root, cfg, spec, result = corpus
    markers = StageManifest(str(root), "extract").committed()
    assert sorted(markers) == ["00000", "00001", "00002"] and result["written_shards"] == 3
    schemas = {"images": images_schema(1280), "regions": regions_schema(1280), "globals": globals_schema(1280),
               "locals": locals_schema(128), "keypoints": keypoints_schema(64), "errors": ERRORS_SCHEMA}
    store = TableStore(str(root))
    for name, schema in schemas.items():  # as written by storage and read back (Parquet names list items "element")
        uri = str(root / f"empty-{name}.parquet")
        write_parquet(uri, schema.empty_table())
        schemas[name] = read_parquet(uri).schema
    for label, m in markers.items():
        assert set(m["files"]) == set(schemas) and m["images"] == (SHARD if label != "00002" else N - 2 * SHARD)
        for table, uri in m["files"].items():
            assert uri == store.file_uri(table, "extract", label)
            assert read_parquet(uri).schema.equals(schemas[table], check_metadata=True), table
    ids = store.read("images", ["extract"]).column("image_id").to_pylist()
    assert ids == [f"synth_{i:07d}" for i in range(N)]  # every image once, in shard order


def test_per_image_counts_follow_the_real_distribution(corpus):
    root, cfg, spec, _ = corpus
    store = TableStore(str(root))
    plan = image_plan(spec, np.arange(N), Stats())
    regions = store.read("regions", ["extract"], columns=["image_id", "source", "level"])
    for j in range(N):
        r = regions.filter(pc.equal(regions.column("image_id"), f"synth_{j:07d}"))
        src = r.column("source").to_pylist()
        lev = r.column("level").to_pylist()
        assert src.count("full") == 1 and src.count("cam") == 5
        assert src.count("fs_egm") == max(1, plan["fs_egm0"][j])
        for level in (1, 2, 3):
            assert sum(1 for s, v in zip(src, lev) if s == "grid" and v == level) == plan[f"grid{level}"][j]
    locals_ = store.read("locals", ["extract"], columns=["image_id"]).column("image_id").to_pylist()
    want = np.minimum(plan["n_loc"], 60)
    assert [locals_.count(f"synth_{j:07d}") for j in range(N)] == want.tolist()
    assert store.read("keypoints", ["extract"], columns=["image_id"]).num_rows == N * spec.keypoints
    g = store.read("globals", ["extract"], columns=["method"]).column("method").to_pylist()
    assert sorted(set(g)) == sorted(cfg.extract.globals) and len(g) == N * len(cfg.extract.globals)


def test_descriptors_look_like_relu6_maps_and_objects_recur(tmp_path):
    cfg, spec, _ = _make(tmp_path, n=200, images_per_object=4.0, distractor_fraction=0.3, keypoints=0)
    ids, _, X = read_regions(str(tmp_path), "fs_egm")
    assert X.min() >= 0 and X.max() <= 6 and 0.1 < (X == 0).mean() < 0.4  # the real maps: 20 % zeros, max 6
    assert 60 < np.linalg.norm(X, axis=1).mean() < 100                     # the real regional MACs: ~78
    obj = image_plan(spec, np.array([int(i.rsplit("_", 1)[1]) for i in ids]), Stats())["object"]
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = Xn @ Xn.T
    same = (obj[:, None] == obj[None]) & (np.array(ids)[:, None] != np.array(ids)[None])
    assert same.any()
    assert S[same].mean() > S[~same].mean() + 0.05  # regions of one object are nearer than others


def test_generation_is_deterministic_and_resumes(corpus, tmp_path):
    root, cfg, spec, _ = corpus
    cfg2, _, again = _make(tmp_path)
    for table in ("regions", "locals", "keypoints", "globals", "images"):
        assert TableStore(str(tmp_path)).read(table, ["extract"]).equals(TableStore(str(root)).read(table, ["extract"]))
    assert generate(cfg2, spec)["written_shards"] == 0  # everything committed: nothing rewritten


def test_the_engine_takes_the_corpus_as_extracted(corpus):
    root, cfg, spec, _ = corpus
    before = json.loads((root / RunLayout(str(root)).run_manifest.rsplit("/", 1)[-1]).read_text())
    assert before["stages"]["extract"]["status"] == "done"

    def refuse(*_):
        raise AssertionError("extraction must not run on a synthetic corpus")

    dag = (Stage("extract", refuse, DAG[0].params),) + DAG[1:]
    manifest = prepare_manifest(cfg, dag)
    assert manifest.column("shard").to_pylist() == [i // SHARD for i in range(N)]
    summary = run_pipeline(cfg.__class__(**{**cfg.__dict__, "stages": ("extract",)}), manifest, dag)
    assert summary["stages"]["extract"] == {"skipped": True}


@pytest.mark.slow
def test_every_later_stage_runs_on_the_synthetic_tables(tmp_path, ray_local):
    from experiments.scale_dag import scale_stages

    cfg, spec, _ = _make(tmp_path, n=48)
    manifest = prepare_manifest(cfg, scale_stages())
    summary = run_pipeline(cfg, manifest, scale_stages())
    assert summary["stages"]["extract"] == {"skipped": True}
    for stage in ("whiten", "graph", "object_saliency", "descriptors", "faiss", "asmk"):
        assert not summary["stages"][stage].get("skipped"), stage
    assert summary["stages"]["object_saliency"]["images"] == 48
    ids = [f"synth_{i:07d}" for i in range(48)]
    for name in ("global_mac", "global_rmac", "global_fs_egm", "global_os_egm", "regional_os_egm", "asmk_asmk_star",
                 "asmk_r_asmk_star"):
        snap = open_latest(str(tmp_path), name)
        assert sorted(np.load(snap.path("image_ids.npy")).tolist()) == ids, name
    os_regions = TableStore(str(tmp_path)).read("regions", ["object_saliency"], columns=["image_id", "source"])
    assert set(os_regions.column("source").to_pylist()) == {"os_egm"}
    assert set(os_regions.column("image_id").to_pylist()) == set(ids)


def test_scale_dag_measures_and_fits(tmp_path):
    import sys

    from experiments.scale_dag import growth_exponent, measure, report

    assert growth_exponent([1000, 10000], [2.0, 20.0]) == pytest.approx(1.0)
    assert growth_exponent([10**3, 10**4, 10**5], [n ** 1.5 for n in (10**3, 10**4, 10**5)]) == pytest.approx(1.5)
    assert growth_exponent([1000], [5.0]) is None
    # a child that holds 300 MB and spins for ~1.5 s of CPU, writing 1 MB into the measured folder
    code = ("import time, numpy as np; a = np.ones(300 * 2**18, np.int64); t = time.process_time()\n"
            "while time.process_time() - t < 1.5: pass\n"
            f"open({str(tmp_path / 'w' / 'f.bin')!r}, 'wb').write(b'x' * 2**20)")
    (tmp_path / "w").mkdir()
    row = measure([sys.executable, "-c", code], tmp_path / "w", tmp_path / "log.txt")
    assert row["returncode"] == 0 and row["bytes_written"] == 2**20
    assert row["peak_rss_bytes"] >= 300 * 2**20 and row["cpu_s"] >= 1.0
    runs = [{"n": n, "stage": "graph", "returncode": 0, "wall_s": n / 100, "stage_s": n / 200, "cpu_s": n / 50,
             "peak_rss_bytes": 2**30 * n / 1000, "peak_pss_bytes": 2**29, "bytes_written": 10 * n,
             "load_before": 1.0, "load_after": 2.0} for n in (1000, 10000)]
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    table = report(tmp_path / "results.json")
    assert "| graph | 1,000 | 5 s | 20 s | 1.0 GB (512 MB) | 9.8 KB | 1.0 / 2.0 |" in table
    assert "| graph | 1.00 | 1.00 | 1.00 | 1.00 | 1,000, 10,000 |" in table
