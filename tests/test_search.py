"""jobs.search on a real museum-landmarks query: its painting comes back in the top 5 (issue 6).

A small index (30 paintings + 15 distractors) is built with every stage; queries are qsd1_w1 photos whose
painting is in that index. Each search path is exercised through the CLI and the Python API.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import index as index_job
from service.search import SearchService

REPO = Path(__file__).resolve().parents[1]
PAINTINGS = ["painting_0010*", "painting_0011*", "painting_0012*"]
pytestmark = pytest.mark.slow  # every test searches the module's indexed run (every stage over 45 images)


@pytest.fixture(scope="module")
def search_run(museum, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("search_run")
    rc = index_job.main([
        "--images", str(museum / "jpg"), "--out", str(out), "--limit", "45", "--max-side", "384",
        "--shard-size", "16", "--stages", "extract,whiten,graph,object_saliency,descriptors,faiss,asmk,diffusion",
        "--set", f"include={PAINTINGS}", "--set", "exclude=['qsd*','lund_*','sceaux*','sacre*','monstree*']",
        "--set", "extract.local_features=200", "--set", "extract.local_pca_images=16", "--set", "graph.k=10",
        "--set", "whiten.dim=64", "--set", "faiss.methods=[gem, rmac, os_egm]",
        "--set", "faiss.regional=[fs_egm]", "--set", "asmk.codebook_size=64", "--set", "asmk.kernels=[asmk_star]"])
    assert rc == 0
    gnd = json.loads((museum / "gnd.json").read_text())
    queries = []
    for name, g in zip(gnd["qimlist"], gnd["gnd"]):
        target = gnd["imlist"][g["easy"][0]] if g["easy"] else None
        if g["set"] == "qsd1_w1" and target and target.startswith(tuple(p.rstrip("*") for p in PAINTINGS)):
            queries.append((museum / "jpg" / f"{name}.jpg", target))
    assert len(queries) >= 2, "the chosen paintings should have qsd1_w1 queries"
    return out, queries[:3]


@pytest.mark.parametrize("method", ["gem", "rmac", "os_egm", "regional:fs_egm", "asmk_star"])
def test_query_finds_its_painting_in_top5(search_run, method):
    out, queries = search_run
    service = SearchService(str(out))
    for path, target in queries:
        results, _ = service.search(path.read_bytes(), method=method, top_k=5)
        assert target in [r.image_id for r in results], (method, path.name, [r.image_id for r in results])
        scores = [r.score for r in results]
        assert scores == sorted(scores, reverse=True)


def test_query_expansion_and_diffusion_keep_the_painting(search_run):
    out, queries = search_run
    service = SearchService(str(out))
    path, target = queries[0]
    for method in ("gem+aqe:3", "gem+alphaqe:3", "gem+diffusion", "gem+aqe:3+diffusion:20"):
        results, _ = service.search(path.read_bytes(), method=method, top_k=5)
        assert target in [r.image_id for r in results], method


def test_cli_prints_ranking_and_writes_html(search_run, tmp_path):
    out, queries = search_run
    path, target = queries[0]
    html = tmp_path / "results.html"
    proc = subprocess.run([sys.executable, "-m", "jobs.search", "--index", str(out), "--query", str(path),
                           "--method", "gem", "--top-k", "5", "--html", str(html)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert target in proc.stdout
    assert html.exists() and target in html.read_text()


def test_diffusion_graphs_are_not_listed_as_methods(search_run):
    """A published ``diffusion_<method>`` graph serves ``<method>+diffusion``; it is no method of its own (the
    results browser preloads every listed method, so listing it broke ``jobs.serve`` on a full index)."""
    with SearchService(str(search_run[0])) as service:
        methods = service.available_methods()
        assert "gem" in methods and not any(m.startswith("diffusion") for m in methods)
        assert service.diffusion_methods() == ["gem", "os_egm"]  # the diffusion stage's default methods
        for m in methods:
            service.spec(m)  # every listed method parses


def test_spatial_verification_reranks_every_family(search_run):
    """+sv over the run's keypoints table (XFeat by default): the painting verified at rank 1, its inlier matches
    in the ranking, for a global, a regional and an ASMK shortlist."""
    out, queries = search_run
    service = SearchService(str(out))
    path, target = queries[0]
    q = service.encode(path.read_bytes())
    for method in ("gem+sv", "regional:fs_egm+sv:20", "asmk_star+sv"):
        r = service.search_ranking(q, method, top_k=5)
        assert r.image_ids[0] == target, (method, r.image_ids, r.extra.get("inliers"))
        m = r.extra["matches"][target]
        assert m.ndim == 2 and m.shape[1] == 4 and len(m) >= service.verifier().cfg.min_inliers
    # the three shortlists share the inlier cache: the painting was verified once
    assert sum(k[1] == target for k in service.verifier().pairs) == 1


def test_cli_rerank_sv_draws_the_matches(search_run, tmp_path):
    out, queries = search_run
    path, target = queries[0]
    html = tmp_path / "sv.html"
    proc = subprocess.run([sys.executable, "-m", "jobs.search", "--index", str(out), "--query", str(path),
                           "--method", "gem", "--rerank", "sv:20", "--top-k", "5", "--html", str(html)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[1].split()[-1] == target
    page = html.read_text()
    assert "verified matches" in page and (tmp_path / "sv_matches" / "001.jpg").exists()
