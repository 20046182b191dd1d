"""Issue 17's index options without a run: ``whiten.kind: learned`` and ``regions.source: rpn`` in the typed config,
the R-MAC variants of the descriptors stage, RPN regions, and that the default configuration keeps its stage
hashes (existing runs are not redone)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.engine import params_hash, stage_params
from jobs.index import DAG
from pipeline.config import ALL_STAGES, STAGES, ConfigError, IndexConfig, load_config
from pipeline.descriptors import DescriptorRows, final_descriptors
from pipeline.regions import cells_to_pixels
from pipeline.rpn import RPNConfig, RPNHead
from pipeline.rpn_regions import pixels_to_cells, rpn_features
from pipeline.whitening import Whitening, learn_pca_whitening

BASE = {"images": "x", "out": "y"}
# the stage hashes of the default configuration: issue 17's options must not change them. Pinned before issue 17
# (main at 6cf17ab); the keypoints of issue 13 (extract.keypoints, asmk.locals) then changed extract's and asmk's
# (6ce583d8ad3f6e0c -> 4c0a2562447d48fd, 824e936b49c2871d -> 0c7045ce0fa7761b), and nothing else; int8 keypoint
# descriptors (extract.keypoints.descriptor_dtype) changed extract's again (-> 3ab511af8f6e6d57).
DEFAULT_HASHES = ["3ab511af8f6e6d57", "ad4729344d254a06", "f09875689a569fb1", "9bba99d69389ea85",
                  "c5dfc0c1beabe6dc", "fac5947edcfe76b6", "0c7045ce0fa7761b", "b99ca74926e90804"]


def test_default_config_keeps_its_stages_and_hashes() -> None:
    cfg = load_config(None, BASE)
    assert cfg.stages == STAGES and "rpn" not in cfg.stages
    assert "rmac_learned" not in cfg.descriptors.methods and "rmac_learned" not in cfg.faiss.methods
    c = IndexConfig(**BASE)
    hashes = [params_hash(stage_params(s, c)) for s in DAG if s.name in STAGES]
    assert hashes == DEFAULT_HASHES


def test_learned_and_rpn_options_add_their_methods_and_stage() -> None:
    with pytest.raises(ConfigError, match="projection"):
        load_config(None, {**BASE, "whiten.kind": "learned"})
    with pytest.raises(ConfigError, match="kind"):
        load_config(None, {**BASE, "whiten.kind": "lw"})
    cfg = load_config(None, {**BASE, "whiten.kind": "learned", "whiten.projection": "p"})
    assert "rmac_learned" in cfg.descriptors.methods and "rmac_learned" in cfg.faiss.methods
    assert "rpn" not in cfg.stages
    cfg = load_config(None, {**BASE, "whiten.kind": "learned", "whiten.projection": "p", "regions.source": "rpn"})
    assert {"rmac_rpn", "rmac_learned_rpn"} <= set(cfg.faiss.methods) and "rpn" in cfg.faiss.regional
    assert cfg.stages == ALL_STAGES
    cfg = load_config(None, {**BASE, "regions.source": "rpn", "stages": ["descriptors", "faiss"]})
    assert cfg.stages == ("rpn", "descriptors", "faiss") and "rmac_learned_rpn" not in cfg.faiss.methods
    # the whiten stage's hash ignores the learned projection (PCA-whitening, graph ... are not redone)
    a = IndexConfig(**BASE)
    b = load_config(None, {**BASE, "whiten.kind": "learned", "whiten.projection": "p"})
    assert stage_params(DAG[1], a) == stage_params(DAG[1], b)


def test_rmac_variants_pool_their_regions_with_their_whitening() -> None:
    rng = np.random.default_rng(0)
    labels = np.array(["full", "grid", "grid", "rpn", "rpn", "full", "grid", "rpn"])
    ids = np.array(["a"] * 5 + ["b"] * 3)
    X = rng.random((8, 16)).astype(np.float32)
    pca = learn_pca_whitening(rng.random((64, 16)).astype(np.float32), dim=8)
    learned = Whitening(pca.mean + 0.01, pca.projection[:, ::-1].copy())
    methods = ("rmac", "rmac_learned", "rmac_rpn", "rmac_learned_rpn")
    regions = DescriptorRows(ids, labels, X)
    none = DescriptorRows.empty(16)
    out = final_descriptors(regions, none, methods, {"regions": pca})
    assert sorted(set(out.methods)) == ["rmac", "rmac_rpn"]          # no learned whitening: no learned methods
    out = final_descriptors(regions, none, methods, {"regions": pca, "learned": learned})
    got = {(i, m): x for i, m, x in zip(out.image_ids, out.methods, out.X)}

    def rmac(w: Whitening, rows: np.ndarray) -> np.ndarray:
        v = w.apply(X[rows]).sum(0)
        return v / np.linalg.norm(v)

    np.testing.assert_allclose(got[("a", "rmac")], rmac(pca, np.array([0, 1, 2])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[("a", "rmac_learned")], rmac(learned, np.array([0, 1, 2])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[("b", "rmac_rpn")], rmac(pca, np.array([5, 7])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[("a", "rmac_learned_rpn")], rmac(learned, np.array([0, 3, 4])), rtol=1e-5,
                               atol=1e-6)


def test_rpn_regions_are_pooled_proposals_in_pixels() -> None:
    feat_hw, image_hw = (8, 12), (400, 600)
    cells = np.array([[0, 0, 12, 8], [2, 1, 5, 7]], np.float32)
    np.testing.assert_allclose(pixels_to_cells(cells_to_pixels(cells, feat_hw, image_hw), feat_hw, image_hw), cells,
                               rtol=1e-6)
    cfg = RPNConfig(mid_channels=8)
    torch.manual_seed(0)
    head = RPNHead(16, cfg.num_anchors, cfg.mid_channels, cfg.init_std).eval()
    A = torch.rand(16, *feat_hw)
    f = rpn_features(head, cfg, A, image_hw, proposals=5)
    n = len(f.region_source)
    assert 1 <= n <= 5 and set(f.region_source) == {"rpn"}
    assert f.region_desc.shape == (n, 16) and f.region_boxes.shape == (n, 4)
    assert np.all(f.region_boxes[:, 2] <= image_hw[1] + 1e-3) and np.all(f.region_boxes[:, 3] <= image_hw[0] + 1e-3)
    # each descriptor is the MAC of its box on the map
    x0, y0, x1, y1 = np.round(pixels_to_cells(f.region_boxes[:1], feat_hw, image_hw)[0]).astype(int)
    np.testing.assert_allclose(f.region_desc[0], A[:, y0:y1, x0:x1].amax(dim=(1, 2)).numpy(), rtol=1e-6)
