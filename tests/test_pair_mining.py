"""Pair mining from the region k-NN of the index: candidates, shards, caps and labels against hand values and a
brute force."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from pipeline.knn_graph import mutual_knn_graph
from pipeline.pair_mining import (CANDIDATE_COLUMNS, UNVERIFIED, WEAK_NEGATIVE, WEAK_POSITIVE, MiningConfig,
                                  cap_per_image, candidates_from_graph, candidates_from_knn, candidates_from_links,
                                  classify_pairs, merge_candidates, training_pairs, weak_negatives)

# regions r0, r1 in image 0; r2, r3 in image 1; r4 in image 2. Lists start with the region itself (a search
# with k + 1), -1 marks a missing neighbour.
REGION_IMAGE = np.array([0, 0, 1, 1, 2])
IDS = np.array([[0, 2, 1], [1, 4, 3], [2, 0, 3], [3, 1, 4], [4, 1, 0]])
SIMS = np.array([[1, .9, .5], [1, .6, .4], [1, .9, .8], [1, .4, .3], [1, .6, .2]], dtype=np.float32)
IDS_MISSING = IDS.copy()
IDS_MISSING[0, 2] = -1  # r0 -> r1 is inside image 0 anyway


def _check(cand, expected) -> None:
    assert list(cand) == list(CANDIDATE_COLUMNS)
    for col, values in expected.items():
        np.testing.assert_allclose(cand[col], values, err_msg=col)


# cross-image directed links: r0->r2 .9, r1->r4 .6, r1->r3 .4, r2->r0 .9, r3->r1 .4, r3->r4 .3, r4->r1 .6,
# r4->r0 .2; mutual: r0<->r2, r1<->r4, r1<->r3 (r3->r4 and r4->r0 are one-way)
EXPECTED = {
    "image_a": [0, 0, 1], "image_b": [1, 2, 2],
    "best_sim": [.9, .6, .3], "links": [4, 3, 1], "mutual_links": [4, 2, 0],
    "best_mutual_sim": [.9, .6, -np.inf], "region_a": [0, 1, 3], "region_b": [2, 4, 4],
}


def test_candidates_from_knn_by_hand() -> None:
    _check(candidates_from_knn(IDS, SIMS, REGION_IMAGE), EXPECTED)
    _check(candidates_from_knn(IDS_MISSING, SIMS, REGION_IMAGE), EXPECTED)


def test_shards_merge_to_the_whole() -> None:
    parts = [candidates_from_knn(IDS, SIMS, REGION_IMAGE, rows=np.array([0, 1, 2])),
             candidates_from_knn(IDS, SIMS, REGION_IMAGE, rows=np.array([3, 4]))]
    _check(merge_candidates(parts), EXPECTED)
    # from the stored mutual graph, by row blocks: only mutual links remain
    W = mutual_knn_graph(IDS, SIMS, beta=3.0)
    graph = merge_candidates([candidates_from_graph(W, REGION_IMAGE, 3.0, 0, 2),
                              candidates_from_graph(W, REGION_IMAGE, 3.0, 2, 5)])
    _check(graph, {"image_a": [0, 0], "image_b": [1, 2], "links": [4, 2], "mutual_links": [4, 2],
                   "region_a": [0, 1], "region_b": [2, 4]})
    np.testing.assert_allclose(graph["best_sim"], [.9, .6], atol=1e-6)
    np.testing.assert_allclose(graph["best_mutual_sim"], [.9, .6], atol=1e-6)


def test_candidates_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    R, k, n_img = 60, 6, 9
    region_image = rng.integers(0, n_img, size=R)
    ids = np.stack([rng.choice(R, size=k, replace=False) for _ in range(R)])
    ids[rng.random(ids.shape) < 0.05] = -1
    sims = rng.random((R, k)).astype(np.float32)
    lists = {i: {int(j) for j in ids[i] if j >= 0} for i in range(R)}
    acc = defaultdict(lambda: {"links": 0, "mutual": 0, "best": -1.0, "bestm": -np.inf})
    for i in range(R):
        for j, s in zip(ids[i], sims[i]):
            if j < 0 or j == i or region_image[i] == region_image[j]:
                continue
            a, b = sorted((int(region_image[i]), int(region_image[j])))
            e = acc[(a, b)]
            e["links"] += 1
            e["best"] = max(e["best"], float(s))
            if i in lists[int(j)]:
                e["mutual"] += 1
                e["bestm"] = max(e["bestm"], float(s))
    assert sum(e["mutual"] > 0 for e in acc.values()) >= 5 and sum(e["mutual"] == 0 for e in acc.values()) >= 5
    shards = np.array_split(rng.permutation(R), 3)
    for cand in (candidates_from_knn(ids, sims, region_image),
                 merge_candidates([candidates_from_knn(ids, sims, region_image, rows=r) for r in shards])):
        keys = list(zip(cand["image_a"].tolist(), cand["image_b"].tolist()))
        assert keys == sorted(acc)
        for t, key in enumerate(keys):
            e = acc[key]
            assert (cand["links"][t], cand["mutual_links"][t]) == (e["links"], e["mutual"])
            assert cand["best_sim"][t] == np.float32(e["best"])
            assert cand["best_mutual_sim"][t] == np.float32(e["bestm"])
            ra, rb = cand["region_a"][t], cand["region_b"][t]
            assert (region_image[ra], region_image[rb]) == key
            # the reported regions are linked with the best similarity
            hit = [s for i, j in ((ra, rb), (rb, ra)) for jj, s in zip(ids[i], sims[i]) if jj == j]
            assert np.float32(e["best"]) in hit


def test_cap_per_image_by_hand() -> None:
    cand = candidates_from_knn(IDS, SIMS, REGION_IMAGE)
    # image 0: (0,1) .9 > (0,2) .6; image 1: (0,1) .9 > (1,2) .3; image 2: (0,2) .6 > (1,2) .3
    capped = cap_per_image(cand, 1)
    assert list(zip(capped["image_a"], capped["image_b"])) == [(0, 1), (0, 2)]
    assert cap_per_image(cand, 2)["image_a"].size == 3 and cap_per_image(cand, None) is cand


def test_classify_pairs_by_hand() -> None:
    cand = candidates_from_knn(IDS, SIMS, REGION_IMAGE)
    cfg = MiningConfig(min_inliers=15)  # >= 15 inliers positive, <= 15 // 3 = 5 hard negative
    assert classify_pairs(cand, np.array([30, 3, 10]), cfg).tolist() == ["positive", "hard_negative", "ambiguous"]
    with pytest.raises(ValueError, match="min_inliers"):  # the default defers to the run's verify.min_inliers
        classify_pairs(cand, np.array([30, 3, 10]), MiningConfig())
    assert MiningConfig(min_inliers=30).negative_inliers == 10
    assert MiningConfig(min_inliers=30, max_negative_inliers=4).negative_inliers == 4
    # at the verification stage's 30: 10 inliers is now a hard negative, 29 ambiguous
    assert classify_pairs(cand, np.array([29, 10, 11]), MiningConfig(min_inliers=30)).tolist() == \
        ["ambiguous", "hard_negative", "ambiguous"]
    # many inliers but no mutual region pair: not a positive; -1 = not verified
    assert classify_pairs(cand, np.array([30, -1, 20]), cfg).tolist() == ["positive", "unverified", "ambiguous"]
    # a hard negative must be similar enough
    strict = MiningConfig(min_inliers=15, hard_negative_min_sim=0.7)
    assert classify_pairs(cand, np.array([0, 0, 0]), strict).tolist() == ["hard_negative", "ambiguous", "ambiguous"]
    # without verification: weak positives only (pair (0,1): 2 mutual region pairs, best .9)
    assert classify_pairs(cand, None, cfg).tolist() == ["weak_positive", "unverified", "unverified"]
    loose = MiningConfig(weak_min_pairs=1, weak_min_sim=0.5)
    labels = classify_pairs(cand, None, loose)
    assert labels.tolist() == ["weak_positive", "weak_positive", "unverified"]
    np.testing.assert_array_equal(training_pairs(cand, labels), [[0, 1], [0, 2]])
    np.testing.assert_array_equal(training_pairs(cand, labels, accept=("positive",)).shape, (0, 2))


def test_links_with_mutuality_from_the_stored_graph_equal_the_whole_lists() -> None:
    """A shard of k-NN lists, mutual links read from the stored mutual graph (jobs.mine_pairs), gives what the
    whole lists give."""
    W = mutual_knn_graph(IDS, SIMS, beta=3.0)
    parts = [candidates_from_links(IDS[rows], SIMS[rows], rows, W[rows], REGION_IMAGE)
             for rows in (np.array([0, 1]), np.array([2, 3, 4]))]
    _check(merge_candidates(parts), EXPECTED)


def test_weak_negatives_by_hand() -> None:
    """Without verification: pair (1, 2) has no mutual region pair and is the second most similar candidate of
    both its images: a weak negative within rank 2, not within rank 1."""
    cand = candidates_from_knn(IDS, SIMS, REGION_IMAGE)
    labels = classify_pairs(cand, None, MiningConfig(weak_min_sim=0.5, weak_min_pairs=1))
    assert labels.tolist() == [WEAK_POSITIVE, WEAK_POSITIVE, UNVERIFIED]
    assert weak_negatives(cand, labels, rank=2).tolist() == [WEAK_POSITIVE, WEAK_POSITIVE, WEAK_NEGATIVE]
    assert weak_negatives(cand, labels, rank=1).tolist() == labels.tolist()


def test_pair_check_identities_by_hand(tmp_path) -> None:
    """experiments/learned_projection_e2e.py's ground-truth check (never used by mining): a query shows the
    objects of its positives, also where another track files its photo under its own group; distractors none."""
    import json

    from experiments.learned_projection_e2e import object_identities

    (tmp_path / "t").mkdir()
    (tmp_path / "gnd.json").write_text(json.dumps({
        "imlist": ["p0", "p1", "d0"], "groups": ["painting_0", "painting_1", "distractor"], "qimlist": ["q0"],
        "gnd": [{"easy": [0], "hard": [], "junk": [2]}]}))
    (tmp_path / "t" / "gnd.json").write_text(json.dumps({
        "imlist": ["q0", "d1"], "groups": ["q0", "distractor"], "qimlist": [], "gnd": []}))
    ident = object_identities(str(tmp_path))
    assert ident == {"p0": {"painting_0"}, "p1": {"painting_1"}, "d0": set(), "q0": {"painting_0", "q0"},
                     "d1": set()}
