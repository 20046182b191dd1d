"""The extraction mapper's lanes (forward + features in parallel threads) write exactly what the serial loop did.

The reference is the mapper's former loop, spelled out here: decode, batch by equal input size, forward in the
calling thread, ``pipeline.extract.extract_features`` per image, rows added in corpus order. Float results
depend on torch's intra-op thread count (reduction order), so the reference runs with the lanes' thread count:
one lane with the actor's two threads is the former configuration, two single-threaded lanes the new CPU
default. Real photos plus a missing and a truncated file, so the errors table's order is checked as well.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.extract import ImageShardMapper, ImageStageSpec, LocalPCA
from pipeline.extract import ExtractConfig
from pipeline.keypoints import IndexKeypointsConfig
from storage.shard_writer import ShardTables
from storage.tables import read_parquet
from tests.helpers_images import DATA_DIR, REAL_PHOTO_IDS

CFG = ExtractConfig(max_side=224, local_features=40, local_scales=(1.0, 1.41), batch_size=4,
                    keypoints=IndexKeypointsConfig(top_n=128, max_side=256))
IDS = REAL_PHOTO_IDS[6:9] + REAL_PHOTO_IDS[11:14]  # three landmark photos (equal sizes batch), three distractors


def _rows(tmp: Path) -> list[dict]:
    truncated = tmp / "truncated.jpg"
    truncated.write_bytes((DATA_DIR / f"{IDS[0]}.jpg").read_bytes()[:3000])
    rows = [{"image_id": i, "uri": str(DATA_DIR / f"{i}.jpg"), "shard": 0} for i in IDS]
    rows.insert(2, {"image_id": "truncated", "uri": str(truncated), "shard": 0})
    rows.insert(5, {"image_id": "missing", "uri": str(tmp / "missing.jpg"), "shard": 0})
    return rows


def _pca(channels: int) -> LocalPCA:
    rng = np.random.default_rng(0)
    return LocalPCA((rng.standard_normal(channels) * 0.01).astype(np.float32),
                    np.linalg.qr(rng.standard_normal((channels, 16)))[0].astype(np.float32))


def _serial(m: ImageShardMapper, rows: list[dict], threads: int) -> dict[str, str]:
    """The former ``ImageShardMapper.__call__``: everything in the calling thread with ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ShardTables(m.spec.tables, m.backbone.channels, CFG.descriptor_dtype, m.spec.local_pca.dim,
                          m.keypoint_dim)
        for good, bad in m._batches(rows):
            for d in bad:
                out.add_error(d.row["image_id"], d.row["uri"], "extract", *d.error)
            if good:
                m._keypoints(good)
                for d, a in zip(good, m._forward(good)):
                    m._add(out, d, m.compute(a, d.image_hw))
        return out.write(m.store, "extract", "serial")
    finally:
        torch.set_num_threads(before)


def _tables(files: dict[str, str]) -> dict[str, pa.Table]:
    return {k: read_parquet(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def photos() -> None:
    if not all((DATA_DIR / f"{i}.jpg").exists() for i in IDS):
        pytest.skip("museum-landmarks photos not available")


@pytest.mark.parametrize("lanes", [1, 2])
def test_lanes_write_the_serial_tables(tmp_path: Path, photos: None, lanes: int) -> None:
    m = ImageShardMapper(ImageStageSpec(str(tmp_path / "run"), "extract", CFG, torch_threads=2, lanes=lanes))
    m.spec.local_pca = _pca(m.backbone.channels)
    assert (m.n_lanes, m.lane_threads) == (lanes, 2 // lanes)
    assert torch.get_num_threads() == 2  # the lanes' own thread count leaves the actor's thread alone
    rows = _rows(tmp_path)
    new = _tables(m(0, rows).files)
    ref = _tables(_serial(m, rows, threads=m.lane_threads))
    assert new["images"].num_rows == len(IDS)
    assert new["errors"].column("image_id").to_pylist() == ["truncated", "missing"]
    assert new["errors"].column("reason").to_pylist() == ["truncated", "missing"]
    assert new["locals"].num_rows > 0 and new["regions"].num_rows > len(IDS)
    assert new["keypoints"].num_rows > 0
    for name in ("images", "regions", "globals", "locals", "keypoints", "errors"):
        assert new[name].equals(ref[name]), name


def test_thread_count_changes_floats_by_rounding_only(tmp_path: Path, photos: None) -> None:
    """One lane of two threads (the former default) against two lanes of one thread (the new CPU default):
    the same rows, descriptors equal up to float16 rounding of a few units in the last place."""
    rows = _rows(tmp_path)[:4]
    out = {}
    for lanes in (1, 2):
        m = ImageShardMapper(ImageStageSpec(str(tmp_path / f"run{lanes}"), "extract", CFG, torch_threads=2,
                                            lanes=lanes))
        m.spec.local_pca = _pca(m.backbone.channels)
        out[lanes] = _tables(m(0, rows).files)
    for name in ("images", "regions", "globals"):
        a, b = out[1][name], out[2][name]
        assert a.num_rows == b.num_rows and a.column_names == b.column_names
    for name in ("regions", "globals"):
        x = np.stack(out[1][name].column("descriptor").to_numpy(zero_copy_only=False)).astype(np.float32)
        y = np.stack(out[2][name].column("descriptor").to_numpy(zero_copy_only=False)).astype(np.float32)
        np.testing.assert_allclose(x, y, rtol=0, atol=2e-3)
    assert out[1]["regions"].column("source").equals(out[2]["regions"].column("source"))
