"""The typed config tree: defaults that depend on the stages, type checks, clear errors, round trip."""
from __future__ import annotations

import json

import pytest

from pipeline.config import DEFAULT_LOCAL_FEATURES, ConfigError, IndexConfig, config_from_dict, load_config
from pipeline.egm import FS_EGM, OS_EGM
from pipeline.extract import ExtractConfig

BASE = {"images": "/data/images", "out": "/data/out"}


def test_local_features_default_follows_the_asmk_stage():
    assert load_config(None, BASE).extract.local_features == DEFAULT_LOCAL_FEATURES == 1000  # asmk in stages
    no_asmk = load_config(None, {**BASE, "stages": ["extract", "whiten", "faiss"]})
    assert no_asmk.extract.local_features == 0
    assert load_config(None, {**BASE, "extract.local_features": 300}).extract.local_features == 300
    with pytest.raises(ConfigError, match="asmk needs extract.local_features"):
        load_config(None, {**BASE, "extract.local_features": 0})


def test_values_are_type_checked_and_unknown_keys_refused():
    cfg = load_config(None, {**BASE, "extract.local_scales": [1, 1.5], "asmk.query_multiple_assignment": 3})
    assert cfg.extract.local_scales == (1.0, 1.5) and cfg.asmk.query_multiple_assignment == 3
    with pytest.raises(ConfigError, match=r"asmk.codebook_size: expected an integer"):
        load_config(None, {**BASE, "asmk.codebook_size": "big"})
    with pytest.raises(ConfigError, match=r"extract: unknown keys \['max_sidee'\]"):
        load_config(None, {**BASE, "extract.max_sidee": 512})
    with pytest.raises(ConfigError, match="stages: unknown"):
        load_config(None, {**BASE, "stages": ["extract", "cluster"]})
    with pytest.raises(ConfigError, match=r"object_saliency.egm.rho: expected a number"):
        load_config(None, {**BASE, "object_saliency.egm.rho": "sharp"})
    with pytest.raises(ConfigError, match=r"asmk: kernels: unknown \['asmk_turbo'\]"):
        load_config(None, {**BASE, "asmk.kernels": ["asmk_turbo"]})


def test_extract_section_is_the_pipeline_config():
    cfg = load_config(None, {**BASE, "extract.local_features": 200, "extract.local_scales": [1.0, 1.41],
                             "extract.scales": [1.0, 0.5], "extract.regions": ["grid"]})
    ec = cfg.extract
    assert isinstance(ec, ExtractConfig)
    assert ec.scales == (1.0, 0.5) and ec.local_scales == (1.0, 1.41) and ec.local_features == 200
    assert ec.forward_scales == (1.0, 0.5, 1.41)  # globals' scales first, then the local-only one
    assert ec.regions == ("grid",) and ec.max_side == 1024


def test_saliency_presets_live_in_one_place():
    cfg = load_config(None, BASE)
    assert cfg.extract.fs == FS_EGM and (FS_EGM.rho, FS_EGM.tau, FS_EGM.sigma) == (5.0, 0.4, 2.5)
    assert cfg.object_saliency.egm == OS_EGM and (OS_EGM.rho, OS_EGM.tau, OS_EGM.sigma) == (2.0, 0.0, 2.0)
    sharper = load_config(None, {**BASE, "extract.fs.rho": 6})
    assert sharper.extract.fs.rho == 6.0 and sharper.extract.fs.tau == 0.4


def test_stored_config_reads_back_identically():
    cfg = load_config(None, {**BASE, "graph.k": 30, "faiss.regional": ["fs_egm", "grid"], "extract.max_side": 512})
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again, IndexConfig)
    assert again.faiss.regional == ("fs_egm", "grid")


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_learned_matchers_need_their_extractor():
    base = {"images": "x", "out": "y"}
    ok = load_config(None, {**base, "verify.rescore_matcher": "lighterglue"})
    assert ok.verify.rescore_matcher == "lighterglue" and ok.extract.keypoints.name == "xfeat"
    with pytest.raises(ConfigError, match="verify.rescore_matcher: lightglue matches aliked keypoints"):
        load_config(None, {**base, "verify.rescore_matcher": "lightglue"})
    with pytest.raises(ConfigError, match="verify.matcher.name: lighterglue matches xfeat keypoints"):
        load_config(None, {**base, "extract.keypoints.name": "aliked", "verify.matcher.name": "lighterglue"})
    aliked = load_config(None, {**base, "extract.keypoints.name": "aliked", "verify.rescore_matcher": "lightglue"})
    assert aliked.verify.rescore_matcher == "lightglue"


def test_a_partly_given_section_keeps_its_fields_own_defaults(tmp_path):
    """``verify.matcher`` defaults to the tuned MNN (cosine 0.75, not MatcherConfig's 0.82): setting one of its keys,
    on the command line or in a file, keeps the others at the field's default instance."""
    base = {"images": "x", "out": "y"}
    assert load_config(None, base).verify.matcher.min_similarity == 0.75
    m = load_config(None, {**base, "verify.matcher.max_keypoints": 1024}).verify.matcher
    assert (m.name, m.min_similarity, m.max_keypoints) == ("mnn", 0.75, 1024)
    f = tmp_path / "c.yaml"
    f.write_text("images: x\nout: y\nverify:\n  min_inliers: 20\n  matcher: {max_ratio: 0.9}\n")
    v = load_config(f).verify
    assert (v.min_inliers, v.matcher.min_similarity, v.matcher.max_ratio) == (20, 0.75, 0.9)
    # a whole section replaced explicitly still works; a bad value inside it is still named
    assert load_config(None, {**base, "verify.matcher.min_similarity": 0.9}).verify.matcher.min_similarity == 0.9
    with pytest.raises(ConfigError, match="verify.matcher.max_keypoints"):
        load_config(None, {**base, "verify.matcher.max_keypoints": "many"})
