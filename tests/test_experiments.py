"""The experiment scripts run against the current APIs: tiny smoke runs of each ``main`` whose outputs are checked
against properties that hold by construction (mutual k-NN degree <= k, exact search recall 1, R-ASMK* keeping
ASMK*'s vector count, ...), plus hand-computed values for their small helpers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from experiments import (bench_asmk, bench_extract, bench_faiss, bench_graph, bench_regions, bench_saliency,
                         figure_regions)
from experiments.asmk_reference import import_reference
from experiments.common import DEFAULT_CONFIG, index_config, parse_sets


# ------------------------------------------------------------------------------------------ config and helpers
def test_experiments_read_the_index_config():
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg = index_config(DEFAULT_CONFIG)
    assert cfg.extract.max_side == raw["extract"]["max_side"]
    assert cfg.asmk.codebook_size == raw["asmk"]["codebook_size"]
    assert cfg.extract.local_scales == tuple(raw["extract"]["local_scales"])
    over = index_config(DEFAULT_CONFIG, ["graph.k=7", "extract.local_scales=[1.0]"], extract__max_side=256,
                        asmk__codebook_size=None)
    assert (over.graph.k, over.extract.local_scales, over.extract.max_side) == (7, (1.0,), 256)
    assert over.asmk.codebook_size == raw["asmk"]["codebook_size"]  # None overrides are ignored
    assert index_config("none").graph.k == 50  # the package defaults
    assert parse_sets(["a.b=[1, 2]", "c=x"]) == {"a.b": [1, 2], "c": "x"}
    with pytest.raises(SystemExit):
        parse_sets(["no_equals_sign"])


def test_cell_coverage_and_mass_share_by_hand():
    # the left half of a 4x4-pixel image on a 2x2 feature grid
    cov = bench_regions.cell_coverage(np.array([[0, 0, 2, 4]], float), (2, 2), (4, 4))
    np.testing.assert_allclose(cov, [[1, 0], [1, 0]])
    assert bench_regions.mass_share(np.ones((2, 2)), cov) == pytest.approx(0.5)
    assert bench_regions.mass_share(np.array([[3.0, 1.0], [0.0, 0.0]]), cov) == pytest.approx(0.75)
    # one pixel column in three: a third of the left cell of a 1x2 grid over a 6-pixel-wide image
    cov = bench_saliency.box_coverage(np.array([[0, 0, 1, 2]]), (2, 6), (1, 2))
    np.testing.assert_allclose(cov, [[1 / 3, 0]])


def test_asmk_helpers_by_hand():
    assert bench_asmk.label("d2r_asmk_star") == "D2R-ASMK*"
    assert bench_asmk.label("naive_r_asmk") == "Naive-R-ASMK"
    # one query, the only easy positive ranked second: AP = (0/1 + 1/2) / 2 = 0.25; Hard has no positives
    m = bench_asmk.evaluate([np.array([0, 1, 2])], [{"easy": [1], "hard": [], "junk": []}])
    assert m["easy"] == pytest.approx(25.0) and m["medium"] == pytest.approx(25.0) and np.isnan(m["hard"])


def test_reference_asmk_is_optional(tmp_path, capsys):
    try:
        import asmk  # noqa: F401
        pytest.skip("the reference asmk package is installed here")
    except ImportError:
        pass
    assert import_reference(str(tmp_path)) is None
    assert "--asmk-path" in capsys.readouterr().out  # says how to enable the comparison


# ------------------------------------------------------------------------------------------ synthetic benches
def test_bench_graph_smoke(tmp_path):
    out = tmp_path / "graph.json"
    assert bench_graph.main(["--n", "3000", "--growth-from", "1000", "--recall-queries", "200", "--nprobe-sweep",
                             "16", "--set", "graph.k=7", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    big = res["big"]
    assert res["k"] == 7 and big["n"] == 3000 and res["small"]["n"] == 1000
    assert 0 < big["mean_degree"] <= 7  # a mutual k-NN graph has at most k edges per vertex
    assert 0.5 < big["recall"] <= 1 and big["cg_converged"]
    assert big["g_clustered"] > big["g_noise"]  # clustered regions are the central ones


def test_bench_faiss_smoke(tmp_path):
    out = tmp_path / "faiss.json"
    args = ["--only", "global", "--n-global", "4000", "--d-global", "32", "--queries", "40", "--single-queries",
            "10", "--batch", "10", "--k", "10", "--shards", "2", "--tmp", str(tmp_path), "--json", str(out)]
    assert bench_faiss.main(args + ["--set", "faiss.flat_max_vectors=1000"]) == 0
    rows = json.loads(out.read_text())["global"]
    assert rows["factory"].startswith("IVF")
    exact = next(v for k, v in rows.items() if k.startswith("recall@10 exact faiss.knn"))
    assert exact.startswith("1.0000")  # FAISS's exact search against the numpy ground truth
    assert bench_faiss.main(args) == 0  # the package default flat_max_vectors (50k): an exact index
    assert json.loads(out.read_text())["global"]["factory"] == "IDMap2,Flat"


# ------------------------------------------------------------------------------------------ backbone on real photos
def test_bench_regions_and_figure_smoke(museum, tmp_path):
    out = tmp_path / "regions.json"
    assert bench_regions.main(["--data", str(museum), "--limit", "2", "--max-side", "128", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["photos"] == 2 and res["max_side"] == 128 and res["cam_boxes_per_photo"] == 5
    assert all(0 < v < 1 for v in res["precision"].values())
    assert all(0 <= v <= 1 for v in res["mean_best_iou"].values())
    png = tmp_path / "fig.png"
    photo = museum / "jpg" / "qsd2_w3_00000.jpg"
    assert figure_regions.main(["--images", str(photo), "--out", str(png), "--max-side", "128", "--dpi", "30"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_saliency_smoke(museum, tmp_path, capsys):
    assert bench_saliency.main(["--data", str(museum), "--paintings", "6", "--photos", "2", "--distractors", "2",
                                "--max-side", "128", "--k", "3", "--cache", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| OS held-out (graph rebuilt without the photo) | k 3, side 3 |" in text
    assert "collection: 6 paintings, 2 qsd2_w3 photos" in text


@pytest.mark.slow
def test_bench_asmk_smoke(museum, tmp_path):
    out = tmp_path / "asmk.json"
    assert bench_asmk.main(["--data", str(museum), "--limit", "24", "4", "--tracks", "no-box", "--k", "8",
                            "--repeats", "1", "--max-side", "128", "--skip-reference", "--cache", str(tmp_path),
                            "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {(v["kernel"], v["pooling"]): v for v in res["tracks"][0]["variants"]}
    assert set(rows) == {("asmk_star", "max"), ("d2r_asmk_star", "max"), ("d2r_asmk_star", "avg"),
                         ("r_asmk_star", "max")}  # configs/benchmark.yaml's asmk.kernels
    assert rows[("r_asmk_star", "max")]["vectors_rel"] == 1.0  # regional aggregation: one vector per image+word
    assert rows[("d2r_asmk_star", "max")]["vectors_rel"] > 1.0  # D2R: one item per region
    assert res["k"] == 8 and res["reference"] is None
    for row in rows.values():
        assert all(np.isnan(v) or 0 <= v <= 100 for v in row["map"].values())


@pytest.mark.slow
def test_bench_extract_smoke(museum, ray_local, tmp_path):
    out = tmp_path / "extract.json"
    assert bench_extract.main(["--images", str(museum / "jpg"), "--n", "2", "--max-side", "96", "--repeats", "1",
                               "--threads", "1", "--set", "extract.local_features=0", "--set",
                               "stages=[extract]", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 2 and res["errors"] == 0 and res["max_side"] == 96 and res["forward_scales"] == [1.0]
    assert res["bare_forward_images_per_s"] > 0 and res["ratio_steady"] > 0
    assert res["ratio_steady"] >= res["ratio_wall"] >= res["ratio_stage"]  # each adds work to the same images
    # the default config's learned keypoints are part of the reference forward, as of the actor's pass
    assert res["bare_runs"][0]["keypoints"] == "xfeat @640 px"
