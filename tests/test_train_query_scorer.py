"""End to end on a tiny real index (seed 000 integration): jobs.benchmark builds the index (with an ITQ prefilter
on its regional index), jobs.train_query_scorer trains the region scorer with the noboxfree protocol and writes the
artefact into the run, then ``patches:3`` ranks through the search service, jobs.search and jobs.benchmark.

The dataset is a 20-image slice of museum-landmarks: the Sceaux castle photos (each queries the others), three
qsd1_w1 painting queries and two qsd2_w2 wall photos that are also the queries of a ``no-box`` track.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jobs import benchmark as bm
from jobs import search as search_job
from jobs import train_query_scorer as tqs
from pipeline.region_scoring import LAMBDA_GRID, PROFILE_NAMES
from service.benchmark import slug
from service.search import SearchService
from storage.datasets import load_gnd_json
from storage.images import decode_image
from storage.query_scorer import default_location, load_query_scorer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"


def _remap(g: dict, new: dict[int, int]) -> dict:
    g = dict(g)
    for k in ("easy", "hard", "junk"):
        g[k] = [new[i] for i in g[k] if i in new]
    return g


def _mini(tmp: Path) -> Path:
    src = json.loads((DATA / "gnd.json").read_text())
    nobox = json.loads((DATA / "no-box" / "gnd.json").read_text())
    names = [q for q in src["qimlist"] if q.startswith("sceaux_castle")] + src["qimlist"][:3] + \
        ["qsd2_w2_00000", "qsd2_w2_00001"]
    qidx = [src["qimlist"].index(q) for q in names]
    keep = [i for qi in qidx for k in ("easy", "hard", "junk") for i in src["gnd"][qi][k]]
    keep += [i for i, n in enumerate(src["imlist"]) if n.startswith("distractor_")][:4]
    keep = list(dict.fromkeys(keep))
    new = {old: j for j, old in enumerate(keep)}
    imlist = [src["imlist"][i] for i in keep]
    root = tmp / "mini"
    (root / "no-box").mkdir(parents=True)
    os.symlink(DATA / "jpg", root / "jpg")
    os.symlink(DATA / "jpg", root / "no-box" / "jpg")
    (root / "gnd.json").write_text(json.dumps({"imlist": imlist, "qimlist": names,
                                               "gnd": [_remap(src["gnd"][qi], new) for qi in qidx]}))
    nb = [nobox["qimlist"].index(q) for q in names[-2:]]
    (root / "no-box" / "gnd.json").write_text(json.dumps({"imlist": imlist, "qimlist": names[-2:],
                                                          "gnd": [_remap(nobox["gnd"][i], new) for i in nb]}))
    return root


@pytest.mark.slow
def test_train_then_search_with_patches(tmp_path, ray_local, capsys):
    if not (DATA / "gnd.json").exists():
        pytest.skip("museum-landmarks data not available")
    import torch

    torch.set_num_threads(1)
    root, out = _mini(tmp_path), tmp_path / "bench"
    common = ["--dataset", str(root), "--out", str(out), "--max-side", "256", "--examples", "0",
              "--index-set", "extract.local_features=0", "--index-set", "whiten.dim=64", "--index-set", "graph.k=10",
              "--index-set", "object_saliency.k=10", "--index-set", "faiss.methods=[gem]",
              "--index-set", "faiss.regional=[os_egm]", "--index-set", "faiss.itq_bits=64"]
    assert bm.main([*common, "--methods", "gem"]) == 0
    index = str(out / "index")

    rc = tqs.main(["--dataset", str(root), "--index", index, "--proposals", "grid", "--patches-per-photo", "40",
                   "--k", "3", "--folds", "3", "--cache", str(tmp_path / "qcache"), "--profile"])
    assert rc == 0
    arrays, info = load_query_scorer(default_location(index))
    assert not [q for q in info["queries"] if q.startswith("qsd2_")]  # noboxfree: no no-box photo
    assert info["n_queries"] == 14 and info["lambda"] in np.round(LAMBDA_GRID, 10).tolist()
    assert info["C"] in info["cv_Cs"] and np.isfinite(info["cv_map"])
    assert len(info["feature_names"]) == len(arrays["coef"])
    assert tuple(info["feature_names"][-len(PROFILE_NAMES):]) == PROFILE_NAMES and info["groups"] == "object"
    assert info["config"]["k"] == 3 and info["config"]["source"] == "os_egm"
    printed = capsys.readouterr().out
    assert "CV mean squared error" in printed and "[lambda] chosen" in printed

    # the service: patches:3 over the ITQ-prefiltered regional index equals the exact ranking (prefilter >= rows)
    svc = SearchService(index)
    ds = load_gnd_json(str(root / "gnd.json"))
    qi = ds.queries.index("sceaux_castle_0000")
    q = svc.encode(decode_image(open(ds.query_path(qi), "rb").read()), patches=True)
    spec = svc.spec("patches:3")
    idx = svc.index(spec)
    assert idx.itq is not None and idx.itq.prefilter >= len(idx.region_image)
    r = svc.rank([q], "patches:3")[0]
    idx.itq, itq = None, idx.itq
    r_exact = svc.rank([q], "patches:3")[0]
    idx.itq = itq
    assert r.image_ids == r_exact.image_ids and np.allclose(r.scores, r_exact.scores, atol=1e-5)
    assert len(r.extra["patch_boxes"]) == 3 and r.extra["lambda"] == info["lambda"]
    castle = {ds.images[i] for i in ds.gnd[qi]["easy"]}
    assert len(castle & set(r.image_ids[:5])) >= 3, r.image_ids[:5]

    assert search_job.main(["--index", index, "--query", ds.query_path(qi), "--method", "patches:3",
                            "--top-k", "5"]) == 0
    assert capsys.readouterr().out.count("sceaux_castle") >= 3

    # the benchmark: patches:3 on both tracks, with the scorer it used recorded
    assert bm.main([*common, "--reuse", "--methods", "regional:os_egm,patches:3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["query_scorer"]["config"]["lam"] == info["lambda"]
    # the root row is flagged as optimistic (14 of its queries trained the scorer), the no-box row is not
    assert [n.split(":")[0] for n in report["notes"] if n.startswith("patches on")] == ["patches on root"]
    assert "14 of its 16 query photos" in next(n for n in report["notes"] if n.startswith("patches on root"))
    for track in ("root", "no-box"):
        m = report["tracks"][track]["methods"]
        assert {"regional:os_egm", "patches:3"} <= set(m) and m["patches:3"]["medium"]["map"] is not None
    saved = np.load(out / "rankings" / "root.npz", allow_pickle=False)[slug("patches:3")]
    assert saved.shape[0] == len(ds.queries)
    for i in (0, len(ds.queries) - 1):  # the benchmark ranks through the same service (index ids = imlist names)
        qd = svc.encode(decode_image(open(ds.query_path(i), "rb").read()), ds.query_bbox(i), patches=True)
        want = svc.rank([qd], "patches:3")[0].image_ids
        assert [ds.images[j] for j in saved[i] if j >= 0] == want
