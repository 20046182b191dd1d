"""The index job's typed config: defaults that depend on the stages, type checks, clear errors."""
from __future__ import annotations

import dataclasses

import pytest

from jobs.config import DEFAULT_LOCAL_FEATURES, ConfigError, load_config
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
    assert cfg.extract.local_scales == [1.0, 1.5] and cfg.asmk.query_multiple_assignment == 3
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, {**BASE, "asmk.codebook_size": "big"})
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(None, {**BASE, "extract.max_sidee": 512})
    with pytest.raises(ConfigError, match="stages: unknown"):
        load_config(None, {**BASE, "stages": ["extract", "cluster"]})


def test_extract_section_maps_onto_the_pipeline_config():
    cfg = load_config(None, {**BASE, "extract.local_features": 200, "extract.local_scales": [1.0, 1.41],
                             "extract.scales": [1.0, 0.5], "extract.regions": ["grid"]})
    ec = ExtractConfig.from_section(dataclasses.asdict(cfg.extract))
    assert ec.scales == (1.0, 0.5) and ec.local_scales == (1.0, 1.41) and ec.local_features == 200
    assert ec.forward_scales == (1.0, 0.5, 1.41)  # globals' scales first, then the local-only one
    assert ec.region_sources == ("grid",) and ec.max_side == cfg.extract.max_side
