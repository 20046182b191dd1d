"""The benchmark: method parsing, ranking helpers, synthetic distractors, ranking through the search service,
and a tiny end-to-end run.

The end-to-end test indexes 20 real museum-landmarks images (max side 256), runs two methods (GeM and
regional:fs_egm) on 4 queries and checks report.json against rankings recomputed here independently (plain
numpy / Python loops over the index's tables and freshly encoded queries) and a direct compute_map.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from jobs import benchmark as bm
from pipeline.distractors import SYNTH_CHUNK, calibrate_noise, negative_pool, synthetic_globals, \
    synthetic_regions_chunk
from pipeline.evaluation import compute_map, protocol_gnd
from pipeline.ranking import RegionSet, best_region, rank_scores, regional_image_scores, trim_width
from service.benchmark import ASMK_ORDER, Benchmark, default_methods, slug
from service.encoder import QueryDescriptors
from service.indexes import LoadedIndex
from service.search import MethodSpec, SearchService, parse_method
from service.errors import UserError
from service.tracks import Track, label_of
from storage.datasets import Dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"


def _l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------- method names
def test_parse_method_names():
    assert parse_method("gem") == MethodSpec("gem", "global", "gem")
    assert parse_method("os_egm+aqe").reranks == ("aqe",)
    assert parse_method("gem+aqe+diffusion").reranks == ("aqe", "diffusion")
    r = parse_method("regional:fs_egm@full")
    assert (r.family, r.base, r.query_regions) == ("regional", "fs_egm", False)
    assert parse_method("regional:grid").query_regions
    assert parse_method("r_asmk_star").family == "asmk" and parse_method("r_asmk_star").index_name == "asmk_r_asmk_star"
    for bad in ("gem+foo", "regional:sift", "vlad2", "regional:fs_egm@x"):
        with pytest.raises(UserError, match="unknown"):
            parse_method(bad)


def test_default_methods_follow_what_the_index_has():
    m = default_methods({"gem", "mac", "fs_egm", "regional:fs_egm", "regional:grid"})
    assert m == ["mac", "gem", "fs_egm", "gem+aqe", "gem+local_diffusion", "regional:fs_egm",
                 "regional:fs_egm@full", "regional:grid", "regional:grid@full"]
    m = default_methods({"gem", "os_egm", "regional:os_egm", "diffusion_os_egm", *ASMK_ORDER})
    assert "os_egm+diffusion" in m and "gem+diffusion" not in m and "os_egm+local_diffusion" in m
    assert m[-3:] == list(ASMK_ORDER)


# ------------------------------------------------------------------------------------------- search helpers
def test_rank_scores_ties_by_id_and_missing_last():
    S = np.array([[0.5, 0.9, 0.5, -np.inf, 0.1]], np.float32)
    D, I = rank_scores(S, 5)
    assert I.tolist() == [[1, 0, 2, 4, -1]]
    assert D[0, :4].tolist() == pytest.approx([0.9, 0.5, 0.5, 0.1])
    _, I = rank_scores(S, 2, ids=np.array([10, 11, 12, 13, 14]))
    assert I.tolist() == [[11, 10]]


def test_regional_image_scores_equal_a_loop():
    rng = np.random.default_rng(0)
    d, n_img = 8, 7
    img = rng.integers(0, n_img - 1, size=40)          # image 6 has no region
    X = _l2n(rng.normal(size=(40, d))).astype(np.float32)
    items = [_l2n(rng.normal(size=(m, d))).astype(np.float32) for m in (1, 3, 0, 5)]
    rs = RegionSet.build(X, img, boxes=np.c_[np.arange(40), np.zeros(40), np.arange(40) + 1, np.ones(40)])
    for budget in (1 << 25, 64):                       # one block, and many tiny blocks / batches
        S = regional_image_scores(items, rs, n_img, budget=budget)
        for q, it in enumerate(items):
            for i in range(n_img):
                rows = np.flatnonzero(img == i)
                expect = -np.inf if len(rows) == 0 or len(it) == 0 else max(
                    float(a @ X[r]) for a in it for r in rows)
                assert S[q, i] == pytest.approx(expect, abs=1e-6)
    # the best region's box is the one of the arg-max row
    q, i = 1, int(img[0])
    rows = np.flatnonzero(img == i)
    r_best = rows[np.argmax((items[q] @ X[rows].T).max(axis=0))]
    assert best_region(items[q], rs, i)[0] == pytest.approx(r_best)
    assert best_region(items[q], rs, 6) is None


def test_trim_width_drops_padding_consistently():
    X = np.zeros((3, 6), np.float32)
    X[:, :3] = 1
    Q = np.zeros((2, 6), np.float32)
    Q[:, :2] = 1
    Xt, Qt = trim_width(X, Q)
    assert Xt.shape == (3, 3) and Qt.shape == (2, 3)
    assert np.allclose(Xt @ Qt.T, X @ Q.T)


def test_negative_pool_and_labels():
    gnd = [{"easy": np.array([0]), "hard": np.array([2]), "junk": np.array([3])},
           {"easy": np.array([5]), "hard": np.empty(0, np.int64), "junk": np.empty(0, np.int64)}]
    assert negative_pool(gnd, 7).tolist() == [1, 4, 6]
    assert [label_of(gnd[0], i) for i in (0, 2, 3, 1)] == ["pos", "pos", "junk", "neg"]


# ------------------------------------------------------------------------------------------- synthetic distractors
def test_synthetic_globals_are_nested_unit_vectors_matching_the_statistics():
    rng = np.random.default_rng(1)
    centre = _l2n(rng.normal(size=32))
    pool = _l2n(centre + 0.6 * rng.normal(size=(300, 32))).astype(np.float32)
    noise, target, got = calibrate_noise(pool, pool, seed=0)
    sim = pool @ pool.T
    np.fill_diagonal(sim, -np.inf)
    assert target == pytest.approx(sim.max(axis=1).mean(), abs=1e-5)   # all 300 rows sampled: exact
    assert noise > 0 and got == pytest.approx(target, abs=0.01)
    big = synthetic_globals(pool, SYNTH_CHUNK + 50, noise, seed=3)
    small = synthetic_globals(pool, 70, noise, seed=3)
    assert np.array_equal(big[:70], small)
    assert np.allclose(np.linalg.norm(big, axis=1), 1, atol=1e-5)
    # a fresh sample of synthetic rows is as close to its nearest real row as real rows are to each other
    assert float((big[:3000] @ pool.T).max(axis=1).mean()) == pytest.approx(target, abs=0.02)
    # with groups, rows of the same image are not neighbours of each other
    g = np.repeat(np.arange(150), 2)
    _, target_g, _ = calibrate_noise(pool, pool, g, g, seed=0)
    sim_g = pool @ pool.T
    sim_g[g[:, None] == g[None, :]] = -np.inf
    assert target_g == pytest.approx(sim_g.max(axis=1).mean(), abs=1e-5)


def test_synthetic_regions_copy_a_negative_layout():
    rng = np.random.default_rng(2)
    img = np.repeat(np.arange(5), [1, 2, 3, 4, 5])
    X = _l2n(rng.normal(size=(15, 16))).astype(np.float32)
    rs = RegionSet.build(X, img)
    Xs, simg = synthetic_regions_chunk(rs, np.array([2, 4]), chunk=0, size=40, noise=0.1, seed=0)
    counts = np.bincount(simg, minlength=40)
    assert set(counts.tolist()) <= {3, 5}                  # layouts of the negatives 2 (3 regions) and 4 (5)
    assert np.allclose(np.linalg.norm(Xs, axis=1), 1, atol=1e-5)
    Xs2, simg2 = synthetic_regions_chunk(rs, np.array([2, 4]), chunk=0, size=10, noise=0.1, seed=0)
    n10 = int(np.searchsorted(simg, 10))
    assert np.array_equal(simg2, simg[:n10]) and np.allclose(Xs2, Xs[:n10])


# ------------------------------------------------------------------------------------------- through the service
def _fake_bench(n_db=12, d=6, seed=0):
    """A track of ``n_db`` images whose GeM descriptors are in an in-memory index (one image failed)."""
    rng = np.random.default_rng(seed)
    X = _l2n(rng.normal(size=(n_db, d))).astype(np.float32)
    Xpad = np.pad(X, ((0, 0), (0, 2)))                    # the table pads narrow methods with zero columns
    ids = [f"im{i:02d}" for i in range(n_db)]
    order = rng.permutation(n_db)                          # index order differs from database order
    index = LoadedIndex.from_vectors(Xpad[order[1:]], [ids[i] for i in order[1:]])  # order[0] failed extraction
    service = SearchService("/nonexistent", encoder=object(), indexes={"global_gem": index})
    ds = Dataset(name="fake", root="/nonexistent", images=ids, queries=["q0", "q1"],
                 gnd=[{"easy": np.array([1]), "hard": np.array([2]), "junk": np.empty(0, np.int64), "bbx": None},
                      {"easy": np.array([3]), "hard": np.empty(0, np.int64), "junk": np.empty(0, np.int64),
                       "bbx": None}])
    t = Track("fake", ds, np.arange(2), db_union=np.arange(n_db))
    Q = _l2n(rng.normal(size=(2, d))).astype(np.float32)
    qdesc = {"k0": QueryDescriptors(globals={"gem": np.pad(Q[0], (0, 2))}),
             "k1": QueryDescriptors(globals={"gem": np.pad(Q[1], (0, 2))})}
    b = Benchmark(service, [t], ids, qdesc, {"fake": ["k0", "k1"]})
    return b, t, X, Q, int(order[0])


def test_ranking_through_the_service_matches_numpy_search_and_aqe():
    b, t, X, Q, missing = _fake_bench()
    r = b.run(t, parse_method("gem"))
    S = Q @ X.T
    S[:, missing] = -np.inf
    expect = np.argsort(-S, axis=1, kind="stable")[:, : len(X) - 1]
    assert np.array_equal(r.ids[:, : len(X) - 1], expect)
    assert missing not in r.ids
    assert r.index_bytes == (len(X) - 1) * X.shape[1] * 4      # padding columns are not stored
    # AQE: q' = L2(q + sum of the top 10 descriptors), then a second exact search
    ra = b.run(t, parse_method("gem+aqe"))
    Q2 = _l2n(Q + X[expect[:, :10]].sum(axis=1))
    S2 = Q2 @ X.T
    S2[:, missing] = -np.inf
    assert np.array_equal(ra.ids[:, : len(X) - 1], np.argsort(-S2, axis=1, kind="stable")[:, : len(X) - 1])


def test_restriction_to_a_track_database():
    b, t, X, Q, missing = _fake_bench()
    allowed = [f"im{i:02d}" for i in (0, 3, 5, 7) if i != missing]
    r = b.service.rank([b.qdesc["k0"]], "gem", allowed=allowed)[0]
    assert set(r.image_ids) == set(allowed)
    S = {i: float(Q[0] @ X[int(i[2:])]) for i in allowed}
    assert r.image_ids == sorted(allowed, key=lambda i: -S[i])


def test_synthetic_rows_are_appended_as_negative_ids():
    b, t, X, Q, missing = _fake_bench()
    idx = b.service.index(parse_method("gem"))
    synth = _l2n(np.random.default_rng(5).normal(size=(4, X.shape[1]))).astype(np.float32)
    synth[0] = Q[0]                                          # a distractor identical to query 0: ranked first
    ext = idx.extended(synth)
    rk = b.service.rank([b.qdesc["k0"], b.qdesc["k1"]], "gem", allowed=b.allowed(t) + [f"synthetic:{j}" for j in
                                                                                        range(4)], index=ext)
    I, _ = b.to_track(t, rk, t.n_db + 4)
    assert I[0, 0] == t.n_db + 0
    assert set(I.ravel()) == (set(range(t.n_db)) - {missing}) | set(range(t.n_db, t.n_db + 4)) | {-1}
    S = Q @ np.concatenate([X, synth]).T
    S[:, missing] = -np.inf
    assert np.array_equal(I[:, : S.shape[1] - 1], np.argsort(-S, axis=1, kind="stable")[:, : S.shape[1] - 1])


def test_published_diffusion_through_the_service_equals_a_dense_solve():
    """``+diffusion``: y = max(s, 0)^gamma on the query's kq nearest images, f = (I - alpha S)^-1 y over the whole
    database's graph, images ranked by f (seed 001 / Iscen et al.); checked with numpy.linalg.solve."""
    import scipy.sparse as sp

    from pipeline.diffusion import DiffusionConfig, build_diffusion_graph
    from service.indexes import LoadedDiffusion

    b, t, X, Q, missing = _fake_bench(n_db=30, seed=4)
    idx = b.service.index(parse_method("gem"))
    params = DiffusionConfig(k=4, kq=3, maxiter=500, tol=1e-12)
    Xi = idx.vectors()
    b.service._diffusion["gem"] = LoadedDiffusion(build_diffusion_graph(Xi, params), idx.image_ids, params)
    got = b.service.rank([b.qdesc["k0"]], "gem+diffusion")[0]
    S = sp.csr_matrix((b.service._diffusion["gem"].graph["data"], b.service._diffusion["gem"].graph["indices"],
                       b.service._diffusion["gem"].graph["indptr"]), shape=(len(Xi), len(Xi))).toarray()
    s = Xi @ np.pad(Q[0], (0, Xi.shape[1] - len(Q[0])))
    y = np.zeros(len(Xi))
    top = np.argsort(-s, kind="stable")[:3]
    y[top] = np.maximum(s[top], 0) ** 3
    f = np.linalg.solve(np.eye(len(Xi)) - 0.99 * S, y)
    order = np.lexsort((np.arange(len(f)), -f))
    expect = [str(idx.image_ids[i]) for i in order if np.isfinite(f[i])]
    assert got.image_ids == expect
    np.testing.assert_allclose(got.scores, f[order], rtol=1e-4, atol=1e-6)


def test_local_diffusion_keeps_the_result_set():
    b, t, X, Q, missing = _fake_bench(n_db=30, seed=4)
    r0 = b.run(t, parse_method("gem"))
    rd = b.run(t, parse_method("gem+local_diffusion"))
    for a, c in zip(r0.ids, rd.ids):
        assert sorted(a.tolist()) == sorted(c.tolist())


# ------------------------------------------------------------------------------------------- end to end
def _mini_dataset(tmp: Path) -> Path:
    """gnd.json over 20 museum images: 4 queries (two paintings, one with a box, two landmarks)."""
    src = json.loads((DATA / "gnd.json").read_text())
    imlist = src["imlist"]
    want = {"qsd1_w1_00003": None, "qsd2_w3_00002": None, "lund_0000": 5, "sceaux_castle_0000": 4}
    qidx = [src["qimlist"].index(q) for q in want]
    keep: list[int] = []
    for q, qi in zip(want, qidx):
        g = src["gnd"][qi]
        pos = list(g["easy"]) + list(g["hard"])
        keep += pos[: want[q] or len(pos)] + list(g["junk"])
    extra = [i for i, n in enumerate(imlist) if n.startswith("distractor_")][:4]
    extra += [i for i, n in enumerate(imlist) if n.startswith("painting_") and i not in keep][:2]
    keep = list(dict.fromkeys(keep + extra))
    assert len(keep) == 20
    new = {old: j for j, old in enumerate(keep)}
    gnd = []
    for qi in qidx:
        g = dict(src["gnd"][qi])
        for k in ("easy", "hard", "junk"):
            g[k] = [new[i] for i in g[k] if i in new]
        gnd.append(g)
    root = tmp / "mini"
    root.mkdir()
    os.symlink(DATA / "jpg", root / "jpg")
    (root / "gnd.json").write_text(json.dumps({"imlist": [imlist[i] for i in keep],
                                               "qimlist": [src["qimlist"][i] for i in qidx], "gnd": gnd}))
    return root / "gnd.json"


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path, ray_local):
    if not (DATA / "gnd.json").exists():
        pytest.skip("museum-landmarks data not available")
    import torch

    torch.set_num_threads(1)
    gnd_path = _mini_dataset(tmp_path)
    out = tmp_path / "bench"
    rc = bm.main(["--dataset", str(gnd_path), "--out", str(out), "--max-side", "256",
                  "--methods", "gem,regional:fs_egm", "--examples", "2",
                  "--index-set", "extract.local_features=0", "--index-set", "extract.shard_size=32",
                  "--index-set", "whiten.dim=64", "--index-set", "graph.k=10", "--index-set", "object_saliency.k=10"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    tr = report["tracks"]["mini"]
    assert tr["n_queries"] == 4 and tr["n_db"] == 20 and tr["missing_db_images"] == 0
    # the run has keypoints (XFeat by default): every method also gets its +sv row, verified as Ray tasks
    assert set(tr["methods"]) == {"gem", "regional:fs_egm", "gem+sv", "regional:fs_egm+sv"}
    assert report["verification"]["pairs"] > 0 and report["verification"]["tasks"] > 0

    # ---- independent rankings from the index's tables and freshly encoded queries
    from service.encoder import QueryEncoder
    from storage.datasets import load_gnd_json
    from storage.images import decode_image
    from storage.readers import read_globals
    from storage.schemas import descriptors_to_numpy
    from storage.tables import TableStore

    ds = load_gnd_json(str(gnd_path))
    enc = QueryEncoder(str(out / "index"))
    pos = {name: i for i, name in enumerate(ds.images)}       # index ids are file stems = imlist names
    qs = [enc.encode(decode_image(open(ds.query_path(i), "rb").read()), ds.query_bbox(i)) for i in range(4)]

    ids, X = read_globals(str(out / "index"), "gem")
    Xdb = np.zeros((20, X.shape[1]), np.float32)
    Xdb[[pos[i] for i in ids]] = X
    rank_gem = [np.argsort(-(Xdb @ q.globals["gem"]), kind="stable") for q in qs]

    t = TableStore(str(out / "index")).read("regions", ["extract"])
    src = np.asarray(t.column("source").to_pylist())
    rimg = np.asarray([pos[i] for i in t.column("image_id").to_pylist()])
    R = enc.whitenings["regions"].apply(descriptors_to_numpy(t.column("descriptor")))
    sel = np.isin(src, ["full", "fs_egm"])
    rank_reg = []
    for q in qs:
        items = np.concatenate([q.regions["full"], q.regions.get("fs_egm", np.zeros((0, R.shape[1])))])
        score = np.array([max(float(a @ r) for a in items for r in R[sel & (rimg == i)]) for i in range(20)])
        rank_reg.append(np.argsort(-score, kind="stable"))

    saved = np.load(out / "rankings" / "mini.npz", allow_pickle=False)
    for name, ranks in (("gem", rank_gem), ("regional:fs_egm", rank_reg)):
        assert np.array_equal(saved[slug(name)], np.stack(ranks)), name
        for proto in ("easy", "medium", "hard"):
            m, aps, mpr, _ = compute_map(ranks, protocol_gnd(ds.gnd, proto))
            got = tr["methods"][name][proto]
            if np.isnan(m):
                assert got["map"] is None
                continue
            assert got["map"] == pytest.approx(m, abs=1e-12)
            assert [got["mp@1"], got["mp@5"], got["mp@10"]] == pytest.approx(mpr.tolist(), abs=1e-12)
            assert got["aps"] == pytest.approx([None if np.isnan(a) else a for a in aps])
        assert tr["methods"][name]["index_bytes"] > 0 and tr["methods"][name]["seconds"] >= 0

    # ---- HTML report with thumbnails, PR plot, examples and saliency overlays
    html = (out / "report.html").read_text()
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', html)
    thumbs = [s for s in srcs if s.startswith("thumbs/")]
    assert len(thumbs) >= 1 + 2 * 2 and all((out / s).is_file() for s in srcs)
    assert "plots/pr_mini.png" in srcs
    shown = {e["method"] for e in tr["examples"]}
    assert len(tr["examples"]) == 2 * 3 and {"gem", "regional:fs_egm"} < shown and len(shown) == 3
    # +sv re-orders the base method's shortlist (here the whole 20-image database): same images per query
    for name in ("gem", "regional:fs_egm"):
        base, sv = saved[slug(name)], saved[slug(name + "+sv")]
        assert all(set(b.tolist()) == set(s.tolist()) for b, s in zip(base, sv)), name
    assert any(e["results"] and "boxes" in e["results"][0] for e in tr["examples"] if e["method"] != "gem")
    assert len(tr["saliency"]) == 2 * 2   # FS and OS map of each example query

    # ---- the +sv cascade (verify.rescore_matcher): its pairs are re-verified as Ray tasks ahead of the
    # re-ranking, and the re-ranking then finds every one of them cached
    from service.verify import SpatialVerifier
    from service.verify import query_key as sv_query_key

    calls = {"in_process": 0}
    orig = SpatialVerifier.verify

    def counting(self, q, image_ids, rescore=False):
        if rescore:
            key = sv_query_key(q)
            calls["in_process"] += sum((key, i) not in self.rescored for i in image_ids)
        return orig(self, q, image_ids, rescore)

    SpatialVerifier.verify = counting
    try:
        rc = bm.main(["--dataset", str(gnd_path), "--out", str(out), "--max-side", "256", "--reuse",
                      "--methods", "gem", "--examples", "1",
                      "--index-set", "extract.local_features=0", "--index-set", "extract.shard_size=32",
                      "--index-set", "whiten.dim=64", "--index-set", "graph.k=10",
                      "--index-set", "object_saliency.k=10", "--index-set", "verify.rescore_matcher=lighterglue",
                      "--index-set", "verify.rescore_top=2"])
    finally:
        SpatialVerifier.verify = orig
    assert rc == 0
    again = json.loads((out / "report.json").read_text())
    assert again["verification"]["rescore"]["pairs"] > 0 and calls["in_process"] == 0
    cascade = np.load(out / "rankings" / "mini.npz", allow_pickle=False)[slug("gem+sv")]
    assert all(set(b.tolist()) == set(s.tolist()) for b, s in zip(saved[slug("gem")], cascade))


def test_reuse_takes_a_complete_index_as_it_was_built(tmp_path, monkeypatch):
    """An index built without some stages (no ASMK: ``extract.local_features=0``) is complete for ``--reuse``:
    indexing it again with the default config would redo (and overwrite) every stage whose parameters differ.
    One whose own stages are not all done is indexed again, as is any run when ``--index-set`` asks for a config."""
    import argparse

    from storage.run import RunManifest, save_run_config

    root = str(tmp_path / "index")
    assert bm.stages_left(root) is None  # no run there
    built = ["extract", "whiten", "graph", "object_saliency", "descriptors", "faiss", "diffusion"]
    save_run_config(root, {"stages": built})
    manifest = RunManifest(root)
    for s in built[:-1]:
        manifest.record(s, {"status": "done"})
    assert bm.stages_left(root) == ["diffusion"]
    manifest.record("diffusion", {"status": "done"})
    assert bm.stages_left(root) == []

    calls = []
    monkeypatch.setattr(bm, "index", lambda cfg: calls.append(cfg))
    args = argparse.Namespace(reuse=True, index_set=[], config=str(bm.DEFAULT_CONFIG), num_cpus=None,
                              ray_address=None, max_side=256)
    bm.run_index(args, str(tmp_path / "list.txt"), root)
    assert calls == []  # reused: the ASMK stage it never had does not trigger a rebuild
    bm.run_index(argparse.Namespace(**{**vars(args), "index_set": ["graph.k=5"]}), str(tmp_path / "list.txt"), root)
    assert len(calls) == 1 and calls[0].graph.k == 5
