"""Issue 17's product path: jobs.mine_pairs -> jobs.train_projection -> jobs.index with whiten.kind learned.

A small index is built from a copy of some museum-landmarks photos (two landmarks, a few paintings and
distractors); the copy is removed before mining, and mining runs with ``open`` watched: it reads the index only,
never an image, a dataset folder or a ground-truth file. The trained projection then becomes the run's
``rmac_learned`` globals and FAISS snapshot next to the PCA-whitened ``rmac``; an RPN trained on the run's OS.EGM
boxes adds ``rpn`` regions (``rmac_rpn``, ``rmac_learned_rpn``, ``regional:rpn``), all searchable through the
service and listed as benchmark rows.
"""
from __future__ import annotations

import builtins
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from jobs import index as index_job
from jobs import mine_pairs as mine_job
from jobs import train_projection as train_job
from jobs import train_rpn as train_rpn_job
from service.benchmark import default_methods
from service.errors import EXIT_USAGE
from service.search import SearchService
from storage.arrays import save_json
from storage.layout import RunLayout
from storage.readers import image_uris, read_globals
from storage.run import RunManifest
from storage.schemas import descriptor_array, keypoints_schema
from storage.snapshot import list_names
from storage.tables import StageManifest, TableStore, read_parquet
from storage.training import default_pairs_location, load_pairs, load_projection

pytestmark = pytest.mark.slow   # every test here shares one small index (Ray and the backbone)
PHOTOS = ("lund_000", "sacre_coeur_000", "painting_0010", "distractor_ewer_image_000")
STAGES = "extract,whiten,graph,object_saliency,descriptors,faiss"


def _index_args(images: Path, out: Path, *extra: str) -> list[str]:
    return ["--images", str(images), "--out", str(out), "--max-side", "256", "--shard-size", "16",
            "--stages", STAGES, "--set", "extract.local_features=0", "--set", "graph.k=8",
            "--set", "whiten.dim=48", "--set", "faiss.methods=[rmac]", "--set", "faiss.regional=[]",
            "--set", "extract.keypoints.name=none", *extra]  # no keypoints: the weak (unverified) mining path


@pytest.fixture(scope="module")
def small_run(museum, ray_local, tmp_path_factory):
    """An index of a copied photo folder that is moved away after indexing (no dataset next to it either)."""
    base = tmp_path_factory.mktemp("learned")
    images = base / "images"
    images.mkdir()
    for p in sorted(museum.joinpath("jpg").iterdir()):
        if p.name.startswith(PHOTOS):
            shutil.copy(p, images / p.name)
    assert len(list(images.iterdir())) >= 20
    out = base / "run"
    assert index_job.main(_index_args(images, out)) == 0
    hidden = base / "moved_away"
    images.rename(hidden)   # mining runs without the photos; later stages get them back (same files, same mtimes)
    yield out, images, museum
    if hidden.exists():
        shutil.rmtree(hidden)


def _photos_back(images: Path) -> None:
    hidden = images.parent / "moved_away"
    if hidden.exists():
        hidden.rename(images)


def test_mining_reads_the_index_only(small_run, monkeypatch) -> None:
    out, images, museum = small_run
    opened: list[str] = []
    real_open = builtins.open

    def watched(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watched)
    rc = mine_job.main(["--index", str(out), "--weak-min-sim", "0.0", "--weak-min-pairs", "1"])
    monkeypatch.setattr(builtins, "open", real_open)
    assert rc == 0
    assert opened, "the watch saw no file at all"
    bad = [f for f in opened if "gnd" in Path(f).name or f.startswith((str(images), str(museum)))]
    assert not bad, bad
    assert all(f.startswith(str(out)) or not f.startswith(str(images.parent)) for f in opened)
    pairs = load_pairs(str(out))
    assert pairs.num_rows > 0
    kinds = set(pairs.column("kind").to_pylist())
    assert kinds <= {"weak_positive", "weak_negative"} and "weak_positive" in kinds   # no keypoints: weak labels
    assert not any(pairs.column("verified").to_pylist())
    assert set(pairs.column("inliers").to_pylist()) == {-1}
    sims = np.asarray(pairs.column("similarity"))
    assert np.all(np.isfinite(sims)) and np.all(sims <= 1.0001)
    a, b = pairs.column("image_a").to_pylist(), pairs.column("image_b").to_pylist()
    assert all(x < y for x, y in zip(a, b))


def test_learned_projection_and_rpn_are_indexed_next_to_rmac(small_run, tmp_path) -> None:
    out, images, _ = small_run
    if not Path(default_pairs_location(str(out))).exists():
        assert mine_job.main(["--index", str(out), "--weak-min-sim", "0.0", "--weak-min-pairs", "1"]) == 0
    common = ["--index", str(out), "--epochs", "2", "--kinds", "weak_positive", "--batch-size", "16", "--seed", "3"]
    assert train_job.main(common + ["--plain", "--out", str(tmp_path / "plain")]) == 0
    assert train_job.main(common) == 0            # Ray Train (one worker) into the run's own artefact
    ray_arrays, info = load_projection(str(out))
    plain_arrays, _ = load_projection(str(tmp_path / "plain"))
    for key in ("mean", "projection"):             # same seed and data: the same weights either way
        np.testing.assert_array_equal(ray_arrays[key], plain_arrays[key])
    assert info["config"]["epochs"] == 2 and info["pairs"]["positives"] > 0

    # the RPN on the run's own OS.EGM boxes (a smoke configuration: few images and steps)
    _photos_back(images)
    assert train_rpn_job.main(["--index", str(out), "--images", "6", "--iterations", "30"]) == 0
    folder = RunLayout(str(out)).artefact_dir("learned_projection")
    assert index_job.main(_index_args(images, out, "--set", "whiten.kind=learned", "--set",
                                      f"whiten.projection={folder}", "--set", "regions.source=rpn")) == 0
    manifest = RunManifest(str(out))
    assert manifest.stage("descriptors")["result"]["projection"] == folder
    assert manifest.stage("rpn")["result"]["images"] > 0
    # a projection trained for rmac_learned_rpn: the R-MACs of training pool the full image and the RPN regions
    assert train_job.main(common + ["--plain", "--sources", "full,rpn", "--out", str(tmp_path / "proj_full_rpn")]) == 0
    rpn_arrays, rpn_info = load_projection(str(tmp_path / "proj_full_rpn"))
    assert rpn_info["sources"] == ["full", "rpn"] and info["sources"] == ["full", "grid"]
    assert rpn_info["regions"] != info["regions"] and not np.array_equal(rpn_arrays["projection"],
                                                                         plain_arrays["projection"])
    assert train_job.main(common + ["--plain", "--sources", "full,nosuch", "--out", str(tmp_path / "x")]) == EXIT_USAGE
    assert manifest.stage("extract")["status"] == "done"
    names = set(list_names(str(out)))
    assert {"global_rmac", "global_rmac_learned", "global_rmac_rpn", "global_rmac_learned_rpn",
            "regional_rpn"} <= names
    ids, X = read_globals(str(out), "rmac_learned")
    ids_pca, X_pca = read_globals(str(out), "rmac")
    assert sorted(ids) == sorted(ids_pca) and not np.allclose(X[:, :X_pca.shape[1]], X_pca)
    with SearchService(str(out)) as service:
        rows = default_methods(service.available_methods())   # the benchmark's rows
        for m in ("rmac", "rmac_learned", "rmac_rpn", "rmac_learned_rpn", "regional:rpn"):
            assert m in rows
        photo = sorted(images.iterdir())[0]
        for m in ("rmac_learned", "rmac_rpn", "rmac_learned_rpn", "regional:rpn"):
            results, _ = service.search(photo.read_bytes(), method=m, top_k=3)
            assert results[0].image_id == photo.stem, (m, results)   # a database photo finds itself first


def _plant_keypoints(root: str, ids: list[str], scene: set[str], n: int = 150, dim: int = 32) -> dict[str, dict]:
    """A ``keypoints`` table committed as the extract stage commits it (one file per extract shard, listed in the
    shard's marker): the images of ``scene`` see one planar scene (the same descriptors at affinely moved
    positions); every other image has its own random keypoints. Returns the original markers (to restore)."""
    rng = np.random.default_rng(0)
    base_xy = rng.uniform(10, 240, size=(n, 2)).astype(np.float32)
    base_desc = rng.standard_normal((n, dim)).astype(np.float32)
    rows = {"image_id": [], "keypoint_id": [], "x": [], "y": [], "score": []}
    descs = []
    for k, i in enumerate(ids):
        if i in scene:
            xy, desc = base_xy * (0.8 + 0.05 * (k % 4)) + 3.0 * (k % 5), base_desc
        else:
            xy, desc = rng.uniform(0, 250, size=(n, 2)).astype(np.float32), rng.standard_normal((n, dim))
        rows["image_id"] += [i] * n
        rows["keypoint_id"] += list(range(n))
        rows["x"] += xy[:, 0].tolist()
        rows["y"] += xy[:, 1].tolist()
        rows["score"] += np.linspace(1, 0.1, n).tolist()
        descs.append(desc / np.linalg.norm(desc, axis=1, keepdims=True))
    table = pa.table({**rows, "descriptor": descriptor_array(np.concatenate(descs), "int8")},
                     schema=keypoints_schema(dim, "int8"))
    manifest = StageManifest(root, "extract")
    markers = manifest.committed()
    for label, m in markers.items():
        shard_ids = read_parquet(m["files"]["images"]).column("image_id")
        part = table.filter(pc.is_in(table.column("image_id"), value_set=shard_ids.combine_chunks()))
        uri = TableStore(root).write("keypoints", "extract", label, part)
        manifest.commit(label, {**m["files"], "keypoints": uri})
    return markers


def test_mining_verifies_with_a_keypoints_table(small_run, tmp_path) -> None:
    """With keypoints the labels are the verified ones: pairs inside the planted scene pass (positive when their
    regions are mutual neighbours), every other verified pair is a hard negative."""
    out, _, _ = small_run
    ids = sorted(image_uris(str(out)))
    scene = {i for i in ids if i.startswith("lund_")}
    markers = _plant_keypoints(str(out), ids, scene)
    pairs_uri = str(tmp_path / "verified.parquet")
    try:
        assert mine_job.main(["--index", str(out), "--out", pairs_uri]) == 0
    finally:  # the run is shared with the other tests
        for label, m in markers.items():
            save_json(StageManifest(str(out), "extract").marker_uri(label), m)
    t = load_pairs(pairs_uri)
    assert t.num_rows > 0 and all(t.column("verified").to_pylist())
    for a, b, kind, inl, mutual in zip(*(t.column(c).to_pylist()
                                         for c in ("image_a", "image_b", "kind", "inliers", "mutual_links"))):
        same = a in scene and b in scene
        assert (inl >= 15) if same else (inl <= 5), (a, b, inl)
        assert kind == ("positive" if same and mutual >= 2 else "ambiguous" if same else "hard_negative")
    assert "hard_negative" in t.column("kind").to_pylist()


def test_mining_cascade_rescores_positives_and_hard_negatives(small_run) -> None:
    """With ``verify.rescore_matcher`` set, the learned matcher re-verifies the pairs MNN labels positive or hard
    negative and its inlier counts replace MNN's (checked against the glue matcher run pair by pair here); the
    ambiguous pairs keep MNN's counts."""
    from dataclasses import replace

    from actors.mine_pairs import mine_pairs
    from pipeline.keypoints import Keypoints
    from pipeline.matching import build_matcher
    from pipeline.pair_mining import MiningConfig
    from pipeline.verification import VerifyConfig, verify_pair
    from storage.keypoint_weights import load_keypoint_weights
    from storage.readers import KeypointReader

    out, _, _ = small_run
    ids = sorted(image_uris(str(out)))
    markers = _plant_keypoints(str(out), ids, {i for i in ids if i.startswith("lund_")}, dim=64)
    cfg = MiningConfig()
    try:
        mnn, info_mnn = mine_pairs(str(out), cfg, verify=VerifyConfig())
        casc, info = mine_pairs(str(out), cfg, verify=VerifyConfig(rescore_matcher="lighterglue"))
        reader = KeypointReader(str(out))
        kps = Keypoints.from_table_rows(reader.read(ids), reader.size_of)
    finally:
        for label, m in markers.items():
            save_json(StageManifest(str(out), "extract").marker_uri(label), m)
    key = lambda cols: {(a, b): (k, n) for a, b, k, n in zip(cols["image_a"], cols["image_b"], cols["kind"],  # noqa: E731
                                                              cols["inliers"])}
    before, after = key(mnn), key(casc)
    assert before.keys() == after.keys() and info_mnn["rescored_pairs"] == 0
    again = [p for p, (k, _) in before.items() if k in ("positive", "hard_negative")]
    assert info["rescore_matcher"] == "lighterglue" and info["rescored_pairs"] == len(again) > 0
    # mining accepts models from the lower of the positive and negative thresholds (30 and 10 + 1)
    vcfg = VerifyConfig(min_inliers=min(30, replace(cfg, min_inliers=30).negative_inliers + 1),
                        rescore_matcher="lighterglue")
    glue = build_matcher(vcfg.rescorer_config(), "cpu", load_keypoint_weights("lighterglue"))
    for a, b in again:
        assert after[(a, b)][1] == verify_pair(kps[a], kps[b], vcfg, glue).inliers, (a, b)
    for p, (k, n) in before.items():
        if k == "ambiguous":
            assert after[p][1] == n
