"""The Ray Train run of the learned projection gives the plain run's weights bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.projection import ProjectionConfig, train_projection
from pipeline.whitening import Whitening, learn_pca_whitening
from tests.test_projection import _planted


@pytest.mark.slow
def test_ray_train_run_equals_plain_run(ray_local, tmp_path) -> None:
    from actors.train import load_projection_checkpoint, train_projection_ray

    data, _ = _planted(classes=4, per=4, regions=3)
    w = learn_pca_whitening(data.regions)
    cfg = ProjectionConfig(dim=8, epochs=2, batch_size=16, seed=7)
    plain = train_projection(cfg, data, w.to_arrays())
    assert not np.array_equal(plain["projection"], w.projection[:, :8])  # it did train
    run = train_projection_ray(cfg, data, w.to_arrays(), storage_path=str(tmp_path / "runs"), name="t")
    for key in ("mean", "projection"):
        np.testing.assert_array_equal(run.arrays[key], plain[key])
    # the checkpoint on storage holds the arrays (loadable as a whitening) and the config
    arrays, doc = load_projection_checkpoint(run.checkpoint_path)
    assert doc["config"] == cfg.to_dict() and doc["epoch"] == cfg.epochs - 1
    np.testing.assert_array_equal(Whitening.from_arrays(arrays).projection, plain["projection"])
    assert run.metrics["epoch"] == cfg.epochs - 1
