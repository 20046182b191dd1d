"""The patches[:k] method's integration (seed 000): the photo-disjoint training split on the real ground truth,
lambda search and out-of-fold unaries against the reference implementations, patch voting against a brute force,
the method grammar and the service path over an in-memory regional index, the scorer artefact, and the faiss
stage's ITQ prefilter snapshot."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from actors.indexes import _publish, publish_itq
from pipeline import faiss_index as fi
from pipeline.config import to_plain
from pipeline.faiss_index import FaissConfig, stage_parameters
from actors.query_scorer import patch_profiles
from pipeline.query_patches import (PatchSearchConfig, lambda_aps, noboxfree_queries, object_groups,
                                    out_of_fold_scores, pick_lambda, source_photo, vote_rankings)
from pipeline.query_regions import ProposalConfig
from pipeline.region_scoring import (PROFILE_NAMES, LambdaQuery, RegionScorer, ScorerConfig, greedy_diverse_topk,
                                     grouped_folds, out_of_fold_predictions, patch_vote_scores, select_lambda,
                                     sim_patch_img)
from service.encoder import QueryDescriptors
from service.errors import UserError
from service.indexes import LoadedIndex, open_index, open_itq
from service.patches import PatchSearch
from service.search import LIST_RERANKERS, Ranking, SearchService, parse_method, register_reranker
from storage.query_scorer import load_query_scorer, resolve_location, save_query_scorer


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def _unit(rng, n, d):
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ training split
def test_noboxfree_split_is_disjoint_by_photo_on_the_real_ground_truth(museum):
    root = json.loads((museum / "gnd.json").read_text())
    nobox = json.loads((museum / "no-box" / "gnd.json").read_text())
    train = noboxfree_queries(root["qimlist"], nobox["qimlist"])
    train_photos = {source_photo(root["qimlist"][i]) for i in train}
    nobox_photos = {source_photo(q) for q in nobox["qimlist"]}
    assert train_photos and not train_photos & nobox_photos
    # what is left are the landmark and qsd1 queries (README: qsd2_* are the no-box wall photos, cropped)
    sets = {root["gnd"][i]["set"] for i in train}
    assert sets == {"landmarks", "qsd1_w1", "qsd1_w3"}
    assert len(train) == sum(g["set"] in sets for g in root["gnd"])
    dropped = set(range(len(root["qimlist"]))) - set(train.tolist())
    assert all(root["qimlist"][i].startswith("qsd2_") for i in dropped)


def test_cv_folds_over_root_queries_never_split_a_photo(museum):
    root = json.loads((museum / "gnd.json").read_text())
    photos = np.array([source_photo(q) for q in root["qimlist"]])
    assert len(set(photos)) < len(photos)  # some wall photos are queried twice (two paintings)
    rows = np.repeat(np.arange(len(photos)), 3)  # three patches per query
    for tr, te in grouped_folds(photos[rows], 10):
        assert not set(photos[rows[tr]]) & set(photos[rows[te]])


# ------------------------------------------------------------------------------------------ lambda, unaries
def _toy_queries(rng, n_q=4, P=12, d=8, n_img=15):
    X = _unit(rng, 60, d)
    img = np.sort(rng.integers(0, n_img, 60))
    out = []
    for _ in range(n_q):
        desc = _unit(rng, P, d)
        full = _unit(rng, 1, d)[0]
        pos = rng.choice(n_img, 2, replace=False)
        out.append((rng.standard_normal(P), desc, full, pos, np.array([int(rng.integers(n_img))])))
    return X, img, n_img, out


def test_lambda_aps_reproduce_select_lambda():
    rng = np.random.default_rng(0)
    X, img, n_img, qs = _toy_queries(rng)
    grid = np.round(np.arange(-2.0, 2.01, 0.4), 10)
    aps = np.stack([lambda_aps(psi, desc, full, X, img, n_img, pos, junk, grid, k=3)
                    for psi, desc, full, pos, junk in qs])
    lq = [LambdaQuery(psi, desc, sim_patch_img(full[None], X, img, n_img)[0], sim_patch_img(desc, X, img, n_img),
                      pos, junk) for psi, desc, full, pos, junk in qs]
    best, curve = select_lambda(lq, grid, k=3)
    np.testing.assert_allclose(aps.mean(axis=0), curve[:, 1], atol=1e-12)
    assert pick_lambda(grid, aps.mean(axis=0)) == best


def test_pick_lambda_ties_go_towards_zero_then_smaller():
    assert pick_lambda([-1.0, -0.4, 0.4, 1.0], [0.5, 0.7, 0.7, 0.6]) == -0.4
    assert pick_lambda([-0.2, 0.0, 0.2], [0.5, 0.5, 0.5]) == 0.0
    assert pick_lambda([-1.0, 1.0], [np.nan, 0.1]) == 1.0


def test_out_of_fold_scores_match_the_reference_oof_predictions():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((90, 5))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0, 0.0]) + 0.1 * rng.standard_normal(90)
    groups = np.repeat(np.arange(9), 10).astype(str)
    cfg = ScorerConfig(n_folds=3)
    want = out_of_fold_predictions(X, y, groups, 1.0, cfg)
    np.testing.assert_allclose(out_of_fold_scores(X, y, groups, 1.0, X, groups, cfg), want, rtol=1e-9, atol=1e-9)
    # more rows per photo than were trained on: the extra rows come from the model that did not see the photo
    extra = rng.standard_normal((9, 5))
    got = out_of_fold_scores(X, y, groups, 1.0, np.concatenate([X, extra]), np.r_[groups, np.arange(9).astype(str)],
                             cfg)
    for tr, te in grouped_folds(groups, 3):
        model = RegionScorer.fit_fixed(X[tr], y[tr], 1.0, cfg)
        held = np.unique(groups[te]).astype(int)
        np.testing.assert_allclose(got[90 + held], model.predict(extra[held]), rtol=1e-9)
    with pytest.raises(ValueError):
        out_of_fold_scores(X, y, groups, 1.0, extra[:1], np.array(["unknown"]), cfg)


# ------------------------------------------------------------------------------------------ voting
def test_vote_rankings_with_full_lists_equal_the_dense_vote_and_fill_truncated_lists():
    rng = np.random.default_rng(2)
    spi = rng.standard_normal((4, 10))  # full image + 3 patches over 10 images
    ids = np.tile(np.arange(10), (4, 1))
    scores, ranked = vote_rankings(spi, ids, 10, None)
    want = patch_vote_scores(spi[0], spi[1:], [0, 1, 2])
    np.testing.assert_array_equal(ranked, np.argsort(-want, kind="stable"))
    np.testing.assert_allclose(scores, np.sort(want)[::-1], rtol=1e-6)
    # truncated to the top 3 per item: an unlisted image gets the item's lowest listed score
    top = np.argsort(-spi, axis=1)[:, :3]
    S = np.take_along_axis(spi, top, 1)
    dense = np.repeat(S[:, -1:], 10, axis=1)
    np.put_along_axis(dense, top, S, 1)
    scores, ranked = vote_rankings(S, top, 10, 4)
    np.testing.assert_array_equal(ranked, np.argsort(-dense.sum(0), kind="stable")[:4])
    allowed = np.zeros(10, bool)
    allowed[[1, 3, 5]] = True
    scores, ranked = vote_rankings(spi, ids, 10, None, allowed)
    assert ranked.tolist() == sorted([1, 3, 5], key=lambda i: -want[i])


# ------------------------------------------------------------------------------------------ method grammar
def test_parse_patches_and_generic_list_rerankings():
    spec = parse_method("patches:5")
    assert (spec.family, spec.k, spec.reranks) == ("patches", 5, ())
    assert parse_method("patches").k is None
    for bad in ("patches:0", "patches:x", "patches:5+nosuch"):
        with pytest.raises(UserError):
            parse_method(bad)
    register_reranker("testrev", lambda svc, qs, rankings, n, allowed: rankings)
    try:
        spec = parse_method("patches:3+testrev:7")
        assert spec.list_reranks == ["testrev:7"] and spec.vector_reranks == []
        assert parse_method("gem+aqe+testrev").vector_reranks == ["aqe"]
    finally:
        LIST_RERANKERS.pop("testrev")


# ------------------------------------------------------------------------------------------ service path
def _scorer_folder(tmp_path, F, cfg, names=None):
    rng = np.random.default_rng(3)
    scorer = RegionScorer(coef=rng.standard_normal(F), intercept=0.5, x_mean=np.zeros(F), x_scale=np.ones(F), C=1.0)
    folder = str(tmp_path / "scorer")
    info = {"config": to_plain(cfg), "feature_names": names or [f"f{i}" for i in range(F)], "lambda": cfg.lam}
    save_query_scorer(folder, scorer.to_arrays(), info)
    return scorer, folder


def _query(rng, d, P, F):
    desc = _unit(rng, P, d)
    return QueryDescriptors(regions={"full": _unit(rng, 1, d)}, image_size=(100, 80),
                            patch_boxes=rng.uniform(0, 80, (P, 4)).astype(np.float32), patch_desc=desc,
                            patch_feat=rng.standard_normal((P, F)).astype(np.float32))


def _regional_index(rng, n_rows, d, n_img):
    """(items, item -> image, the exact LoadedIndex over them) of a random regional index of images im0.."""
    img = np.sort(rng.integers(0, n_img, n_rows))
    X = _unit(rng, n_rows, d)
    return X, img, LoadedIndex.from_vectors(X, [f"im{i}" for i in range(n_img)], img)


def test_service_ranks_patches_as_the_numpy_vote(tmp_path):
    rng = np.random.default_rng(4)
    d, P, F, n_img = 16, 30, 7, 12
    X, img, idx = _regional_index(rng, 80, d, n_img)
    cfg = PatchSearchConfig(k=4, lam=-0.4, source="os_egm")
    scorer, folder = _scorer_folder(tmp_path, F, cfg)
    svc = SearchService(str(tmp_path / "run"), encoder=object(), indexes={"regional_os_egm": idx}, scorer=folder)
    assert "patches" in svc.available_methods()
    q = _query(rng, d, P, F)
    r = svc.rank([q], "patches", allowed=[f"im{i}" for i in range(0, n_img, 2)])[0]
    # reference: greedy top-4 on the scorer's unaries, votes from the dense sim_patch_img
    chosen = greedy_diverse_topk(scorer.predict(q.patch_feat), q.patch_desc @ q.patch_desc.T, 4, -0.4)
    spi = sim_patch_img(np.concatenate([q.regions["full"], q.patch_desc[chosen]]), X, img, n_img)
    votes = spi[0] + spi[1:].sum(0)
    want = sorted(range(0, n_img, 2), key=lambda i: (-votes[i], i))
    assert r.image_ids == [f"im{i}" for i in want]
    np.testing.assert_allclose(r.scores, votes[want], rtol=1e-5)
    assert r.extra["patch_boxes"] == q.patch_boxes[chosen].tolist()
    # k from the method name; a registered list re-ranking runs after it
    register_reranker("testrev", lambda s, qs, rankings, n, allowed: [Ranking(x.image_ids[::-1], x.scores[::-1])
                                                                      for x in rankings])
    try:
        r2 = svc.rank([q], "patches:2+testrev", depth=3)[0]
    finally:
        LIST_RERANKERS.pop("testrev")
    chosen2 = greedy_diverse_topk(scorer.predict(q.patch_feat), q.patch_desc @ q.patch_desc.T, 2, -0.4)
    spi2 = sim_patch_img(np.concatenate([q.regions["full"], q.patch_desc[chosen2]]), X, img, n_img)
    top3 = np.argsort(-(spi2[0] + spi2[1:].sum(0)), kind="stable")[:3]
    assert r2.image_ids == [f"im{i}" for i in top3[::-1]]


def test_profile_features_at_query_time_equal_those_the_scorer_was_trained_on(tmp_path):
    """A scorer with retrieval-profile columns: the service computes them through the regional index as the
    training job computes them from the corpus items (actors.query_scorer.patch_profiles), so psi is the same."""
    rng = np.random.default_rng(6)
    d, P, F, n_img = 16, 40, 5, 12
    X, img, idx = _regional_index(rng, 90, d, n_img)
    cfg = PatchSearchConfig(k=3, lam=-0.4, source="os_egm")
    names = [f"f{i}" for i in range(F)] + list(PROFILE_NAMES)
    scorer, folder = _scorer_folder(tmp_path, F + len(PROFILE_NAMES), cfg, names)
    svc = SearchService(str(tmp_path / "run"), encoder=object(), indexes={"regional_os_egm": idx}, scorer=folder)
    assert svc.patch_search().uses_profile
    q = _query(rng, d, P, F)
    prof = patch_profiles(X, img, n_img, q.regions["full"][0], q.patch_desc)
    np.testing.assert_allclose(svc.patch_search().profile(q, idx), prof, rtol=1e-5, atol=1e-6)
    psi = scorer.predict(np.hstack([q.patch_feat, prof]))
    chosen = greedy_diverse_topk(psi, q.patch_desc @ q.patch_desc.T, 3, -0.4)
    r = svc.rank([q], "patches")[0]
    assert r.extra["patch_boxes"] == q.patch_boxes[chosen].tolist()
    np.testing.assert_allclose(r.extra["patch_scores"], psi[chosen], rtol=1e-5)
    with pytest.raises(ValueError, match="regional index"):
        svc.patch_search().choose(q, 3)


def test_object_groups_join_photos_that_share_a_photo_or_a_positive():
    groups = object_groups(["a", "a", "b", "c", "d", "e"], [[1], [2], [2], [3], [], [3, 9]])
    assert groups.tolist() == ["g0", "g0", "g0", "g1", "g2", "g1"]


def test_service_says_how_to_train_when_there_is_no_scorer(tmp_path):
    idx = LoadedIndex.from_vectors(np.eye(4, dtype=np.float32), ["a", "b"], np.array([0, 0, 1, 1]))
    svc = SearchService(str(tmp_path / "run"), encoder=object(), indexes={"regional_os_egm": idx})
    assert "patches" not in svc.available_methods()
    with pytest.raises(UserError, match="jobs.train_query_scorer"):
        svc.spec("patches:5")
    q = QueryDescriptors(regions={"full": np.eye(4, dtype=np.float32)[:1]})
    _, folder = _scorer_folder(tmp_path, 3, PatchSearchConfig())
    svc = SearchService(str(tmp_path / "run"), encoder=object(), indexes={"regional_os_egm": idx}, scorer=folder)
    with pytest.raises(UserError, match="without patches"):
        svc.rank([q], "patches")
    with pytest.raises(UserError, match="global methods only"):
        svc.rank([q], "patches+aqe")


def test_scorer_artefact_and_query_patches_round_trip(tmp_path):
    cfg = PatchSearchConfig(proposals=ProposalConfig(source="egm", max_proposals=50), k=3, lam=0.6)
    scorer, folder = _scorer_folder(tmp_path, 5, cfg)
    assert resolve_location(folder) == folder and resolve_location(str(tmp_path / "none")) is None
    arrays, info = load_query_scorer(folder)
    np.testing.assert_array_equal(RegionScorer.from_arrays(arrays).coef, scorer.coef)
    assert PatchSearch.load(folder).cfg == cfg
    q = _query(np.random.default_rng(5), 8, 6, 5)
    back = QueryDescriptors.from_arrays(q.to_arrays())
    assert back.has_patches and not QueryDescriptors().has_patches
    for f in ("patch_boxes", "patch_desc", "patch_feat"):
        np.testing.assert_array_equal(getattr(back, f), getattr(q, f))


# ------------------------------------------------------------------------------------------ ITQ prefilter
def test_faiss_stage_hash_is_unchanged_while_itq_is_off():
    old = {f.name: getattr(FaissConfig(), f.name) for f in dataclasses.fields(FaissConfig)
           if not f.name.startswith("itq_")}
    assert stage_parameters(FaissConfig()) == old
    assert stage_parameters(FaissConfig(itq_bits=256))["itq_bits"] == 256
    with pytest.raises(ValueError):
        FaissConfig(itq_bits=12)


def _clustered(rng, n_img, per, d, spread=0.35):
    centres = _unit(rng, n_img, d)
    X = np.repeat(centres, per, axis=0) + spread * rng.standard_normal((n_img * per, d)).astype(np.float32) / np.sqrt(d)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(n_img), per)


def _published_regional(tmp_path, X, img):
    root = str(tmp_path / "run")
    trained = fi.train_index("IDMap2,Flat", X, X.shape[1])
    shard = fi.serialize(fi.add_shard(trained, X, np.arange(len(X))))
    out = _publish(root, "regional_os_egm", "regional", "os_egm", [shard], "IDMap2,Flat", {},
                   [f"im{i}" for i in range(int(img.max()) + 1)], X.shape[1], len(X), img)
    return root, out


@pytest.mark.parametrize("exact", [True, False])
def test_itq_snapshot_search_equals_exact_when_the_prefilter_keeps_everything(tmp_path, exact):
    rng = np.random.default_rng(6)
    X, img = _clustered(rng, 40, 6, 32)
    root, reg = _published_regional(tmp_path, X, img)
    res = publish_itq(root, "regional_os_egm", reg, X, FaissConfig(itq_bits=32, itq_prefilter=len(X)), exact)
    assert res["bits"] == 32
    idx = open_index(root, "regional_os_egm")
    idx.itq = open_itq(root, idx)
    assert idx.itq is not None and idx.itq.prefilter == len(X)
    plain = open_index(root, "regional_os_egm")
    items = [_unit(rng, 3, 32), _unit(rng, 1, 32)]
    allowed = np.array([f"im{i}" for i in range(0, 40, 3)])
    for k, al in ((None, None), (10, None), (5, allowed)):
        S1, I1 = idx.search_regional(items, k, al)
        S0, I0 = plain.search_regional(items, k, al)
        np.testing.assert_array_equal(I1, I0)
        np.testing.assert_allclose(S1, S0, rtol=1e-5)


def test_itq_prefilter_recall_is_high_on_clustered_regions(tmp_path):
    """60 scenes of 5 images of 8 regions each; a query near a scene's centre: the exact top 5 images are that
    scene's, and a 200-of-2400 Hamming prefilter must keep >= 90% of them."""
    rng = np.random.default_rng(7)
    scenes = _unit(rng, 60, 64)
    X, img = _clustered(rng, 300, 8, 64)
    X = np.repeat(scenes, 40, axis=0) + 0.8 * X
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    root, reg = _published_regional(tmp_path, X, img)
    publish_itq(root, "regional_os_egm", reg, X, FaissConfig(itq_bits=64, itq_prefilter=200), True)
    idx = open_index(root, "regional_os_egm")
    idx.itq = open_itq(root, idx)
    plain = open_index(root, "regional_os_egm")
    items = [(scenes[s] + 0.5 * rng.standard_normal(64).astype(np.float32) / 8)[None]
             for s in rng.choice(60, 30, replace=False)]
    _, I1 = idx.search_regional(items, 5)
    _, I0 = plain.search_regional(items, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(I1, I0)])
    assert recall >= 0.9, recall
    assert all(len(set(b // 5)) == 1 for b in I0)  # the exact top 5 is one scene: the case is not degenerate


def test_itq_of_another_regional_version_is_ignored(tmp_path):
    rng = np.random.default_rng(8)
    X, img = _clustered(rng, 20, 4, 16)
    root, reg = _published_regional(tmp_path, X, img)
    publish_itq(root, "regional_os_egm", reg, X, FaissConfig(itq_bits=16), True)
    _published_regional(tmp_path, X, img)  # a newer regional version without its ITQ
    assert open_itq(root, open_index(root, "regional_os_egm")) is None



def test_patches_over_a_shallow_itq_prefilter_vote_with_exact_scores(tmp_path):
    """A prefilter that keeps 30 of 240 region codes: each chosen patch reaches only a few images. Every image
    some item reached is re-scored exactly for every item (LoadedIndex.rescore_images), so the reached images'
    votes equal the exact ``sim_img + sum sim_patch_img``; filling an item's unreached images with its lowest
    listed score did not (the lowest listed score of a prefilter is not a bound of what it missed)."""
    rng = np.random.default_rng(9)
    d, P, F = 32, 40, 5
    X, img = _clustered(rng, 60, 4, d)
    root, reg = _published_regional(tmp_path, X, img)
    publish_itq(root, "regional_os_egm", reg, X, FaissConfig(itq_bits=32, itq_prefilter=30), True)
    idx = open_index(root, "regional_os_egm")
    idx.itq = open_itq(root, idx)
    assert idx.itq is not None and idx.itq.prefilter == 30
    cfg = PatchSearchConfig(k=4, lam=-0.4, source="os_egm")
    scorer, folder = _scorer_folder(tmp_path, F, cfg)
    svc = SearchService(root, encoder=object(), indexes={"regional_os_egm": idx}, scorer=folder)
    q = _query(rng, d, P, F)
    q.regions["full"] = X[img == 3][:1] + 0.0  # the full query image is one of image 3's regions
    q.patch_desc[:10] = X[rng.choice(len(X), 10)]  # some patches are database regions of other images
    r = svc.rank([q], "patches")[0]
    chosen = greedy_diverse_topk(scorer.predict(q.patch_feat), q.patch_desc @ q.patch_desc.T, 4, -0.4)
    items = [q.regions["full"]] + [q.patch_desc[c:c + 1] for c in chosen]
    spi = sim_patch_img(np.concatenate(items), X, img, 60)
    votes = spi[0] + spi[1:].sum(0)
    S, I = idx.search_regional(items, 60)
    reached = np.unique(I[I >= 0])
    assert 4 <= len(reached) < 60 and (I < 0).any()  # the prefilter really is shallow
    ranked = np.array([int(i[2:]) for i in r.image_ids])
    head = ranked[:len(reached)]
    assert set(head.tolist()) == set(reached.tolist())  # reached images first, in exact vote order
    np.testing.assert_allclose(np.asarray(r.scores)[:len(reached)], votes[head], rtol=1e-5)
    assert head[0] == np.argmax(votes) == 3


def test_rescore_images_equals_the_dense_regional_scores():
    from pipeline.ranking import RegionSet, regional_image_scores

    rng = np.random.default_rng(10)
    img = rng.integers(0, 50, 400)
    img[img == 7] = 8  # image 7 has no region rows
    X = rng.standard_normal((400, 16)).astype(np.float32)
    idx = LoadedIndex.from_vectors(X, [f"i{j}" for j in range(50)], img)
    items = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(4)]
    sel = np.array([3, 7, 0, 49, 8])
    got = idx.rescore_images(items, sel)
    np.testing.assert_allclose(got, regional_image_scores(items, RegionSet.build(X, img), 50)[:, sel], rtol=1e-6)
    assert np.isneginf(got[:, 1]).all() and idx.rescore_images(items, np.zeros(0, np.int64)).shape == (4, 0)
    assert idx.can_rescore  # exact rows at hand; an approximate FAISS index without ITQ is not rebuilt for it
    assert not dataclasses.replace(idx, exact=False, _vectors=None).can_rescore


def test_profile_over_a_shallow_itq_prefilter_takes_the_full_images_exact_score(tmp_path):
    """profile_full_agree is the full query image's score of each patch's best image. Training computes it exactly;
    over a 30-of-240 prefilter, images outside the full image's list must get their exact score, not its lowest."""
    from pipeline.region_scoring import PROFILE_K, retrieval_profile

    rng = np.random.default_rng(11)
    d, P, F = 32, 30, 5
    X, img = _clustered(rng, 60, 4, d)
    root, reg = _published_regional(tmp_path, X, img)
    publish_itq(root, "regional_os_egm", reg, X, FaissConfig(itq_bits=32, itq_prefilter=30), True)
    idx = open_index(root, "regional_os_egm")
    idx.itq = open_itq(root, idx)
    cfg = PatchSearchConfig(k=3, lam=-0.4, source="os_egm")
    names = [f"f{i}" for i in range(F)] + list(PROFILE_NAMES)
    _, folder = _scorer_folder(tmp_path, F + len(PROFILE_NAMES), cfg, names)
    q = _query(rng, d, P, F)
    q.regions["full"] = X[:1] + 0.0
    got = PatchSearch.load(folder).profile(q, idx)
    S, I = idx.search_regional([q.patch_desc[i:i + 1] for i in range(P)], PROFILE_K)
    Sf, If = idx.search_regional([q.regions["full"]], cfg.item_depth)
    full_exact = sim_patch_img(q.regions["full"], X, img, 60)[0]
    assert not set(I[:, 0]) <= set(If[0][If[0] >= 0])  # some best images lie outside the full image's list
    np.testing.assert_allclose(got, retrieval_profile(S, float(Sf[0, 0]), full_exact[I[:, 0]]), rtol=1e-5, atol=1e-6)
