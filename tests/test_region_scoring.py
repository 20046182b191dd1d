"""Region scoring (seed 000 §3.2, §4.2): DCG labels by hand, the SVR on a planted rule, photo-disjoint
splits, greedy diverse selection against brute force, patch voting and the lambda search."""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from pipeline.region_scoring import (PROFILE_NAMES, LambdaQuery, RegionScorer, ScorerConfig, best_subset_bruteforce,
                                     dcg_at_k, dense_from_topk, diversity_objective, greedy_diverse_topk,
                                     grouped_folds, out_of_fold_predictions, patch_labels, patch_vote_scores,
                                     retrieval_profile, retrieval_profile_dense, select_lambda, sim_patch_img,
                                     split_by_photo)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


LOG2_3 = np.log2(3.0)


# ------------------------------------------------------------------------------------------------ labels
def test_dcg_by_hand() -> None:
    assert dcg_at_k([1.0, 0.0, 0.5]) == pytest.approx(1.0 + 0.0 / 1.0 + 0.5 / LOG2_3)
    rel = np.arange(12, dtype=float)
    want = 0.0 + sum(rel[i - 1] / np.log2(i) for i in range(2, 11))  # positions 11, 12 are cut
    assert dcg_at_k(rel) == pytest.approx(want)
    np.testing.assert_allclose(dcg_at_k(np.array([[1.0, 1.0], [0.0, 2.0]]), k=10), [2.0, 2.0])


def _three_image_corpus():
    """2-d unit descriptors; regions listed out of image order to exercise the grouping."""
    regions = np.array([[0.8, 0.6],    # image 2
                        [1.0, 0.0],    # image 0
                        [0.6, 0.8],    # image 1
                        [-1.0, 0.0],   # image 2
                        [0.0, 1.0]],   # image 0
                       np.float32)
    region_image = np.array([2, 0, 1, 2, 0])
    patches = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    return patches, regions, region_image


def test_patch_labels_on_three_image_corpus_by_hand() -> None:
    patches, regions, region_image = _three_image_corpus()
    # sim_patch_img = max over each image's regions of the dot product
    # patch 0 = (1,0): image 0 max(1, 0) = 1;  image 1: 0.6;  image 2: max(0.8, -1) = 0.8
    # patch 1 = (0,1): image 0 max(0, 1) = 1;  image 1: 0.8;  image 2: max(0.6, 0)  = 0.6
    np.testing.assert_allclose(sim_patch_img(patches, regions, region_image), [[1.0, 0.6, 0.8], [1.0, 0.8, 0.6]],
                               rtol=1e-6)
    positives = [0, 1]  # image 2 is another place
    # patch 0 ranks 0 (1.0), 2 (0.8), 1 (0.6): rel = [0.95+0.05*1, 0, 0.95+0.05*0.6] = [1.0, 0, 0.98]
    #   DCG = 1.0 + 0/log2(2) + 0.98/log2(3)
    # patch 1 ranks 0 (1.0), 1 (0.8), 2 (0.6): rel = [1.0, 0.99, 0]  ->  DCG = 1.0 + 0.99/1
    want = [1.0 + 0.98 / LOG2_3, 1.0 + 0.99]
    np.testing.assert_allclose(patch_labels(patches, regions, region_image, positives), want, rtol=1e-6)
    # image 0 as junk (e.g. the query's own photo): removed from the ranking before DCG
    # patch 0: 2 (0.8), 1 (0.6) -> rel [0, 0.98] -> 0.98/log2(2);  patch 1: 1 (0.8), 2 -> rel [0.99, 0] -> 0.99
    np.testing.assert_allclose(patch_labels(patches, regions, region_image, positives, junk=[0]), [0.98, 0.99],
                               rtol=1e-6)
    # DCG@1 keeps only the first retrieval
    np.testing.assert_allclose(patch_labels(patches, regions, region_image, positives, k=1), [1.0, 1.0], rtol=1e-6)


def test_sim_patch_img_matches_loop_and_marks_empty_images() -> None:
    rng = np.random.default_rng(0)
    V = rng.normal(size=(40, 6)).astype(np.float32)
    img = rng.integers(0, 9, 40)
    img[img == 4] = 5  # image 4 has no region
    Q = rng.normal(size=(7, 6)).astype(np.float32)
    got = sim_patch_img(Q, V, img, n_images=10)
    for i in range(10):
        if (img == i).any():
            np.testing.assert_allclose(got[:, i], (Q @ V[img == i].T).max(axis=1), rtol=1e-5)
        else:
            assert np.isneginf(got[:, i]).all()


def test_split_by_photo_is_disjoint_and_grouped_folds_too() -> None:
    rng = np.random.default_rng(0)
    photos = rng.choice([f"photo_{i}" for i in range(23)], size=500)
    tr, te = split_by_photo(photos, test_fraction=0.25, seed=3)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 500
    assert not set(photos[tr]) & set(photos[te])
    assert len(set(photos[te])) == round(0.25 * len(set(photos)))
    tr2, te2 = split_by_photo(photos, test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(te, te2)  # reproducible
    for a, b in grouped_folds(photos, 10):
        assert not set(photos[a]) & set(photos[b])


# ------------------------------------------------------------------------------------------------ scorer
def test_svr_recovers_a_planted_linear_rule() -> None:
    rng = np.random.default_rng(0)
    N, F = 600, 8
    scales = np.array([1, 100, 0.01, 1, 5, 1, 1, 0.2])  # columns of very different ranges
    X = rng.normal(size=(N, F)) * scales + 3.0
    w = np.array([0.5, -0.004, 30.0, 0.0, 0.1, -0.7, 0.2, 1.0])  # y-units per column unit
    y = X @ w + 2.0 + rng.normal(scale=0.02, size=N)
    groups = rng.integers(0, 30, N)
    cfg = ScorerConfig(Cs=(1e-4, 1e-2, 1.0), n_folds=5, epsilon=0.0)
    scorer = RegionScorer.fit(X, y, groups, cfg)
    # the weight per original column unit is coef / x_scale; it should be the planted one
    np.testing.assert_allclose(scorer.coef / scorer.x_scale, w, rtol=0.01, atol=0.01)
    resid = scorer.predict(X) - y
    assert np.sqrt(np.mean(resid ** 2)) < 0.05
    # strong regularisation shrinks the weights: CV must prefer a weak one here
    assert scorer.C > 1e-4 and scorer.cv["mse"][0] > 10 * scorer.cv["mse"].min()
    # arrays round trip
    back = RegionScorer.from_arrays({k: v.copy() for k, v in scorer.to_arrays().items()})
    np.testing.assert_array_equal(back.predict(X), scorer.predict(X))
    assert back.C == scorer.C
    with pytest.raises(ValueError):
        scorer.predict(X[:, :5])


def test_out_of_fold_predictions_never_see_their_photo() -> None:
    # every photo has its own random label offset, shared by its rows, which only a model that saw the photo
    # can learn through a photo-identity column: out of fold that column is useless, in-sample it is perfect
    rng = np.random.default_rng(1)
    n_photos, per = 40, 10
    groups = np.repeat(np.arange(n_photos), per)
    offset = rng.normal(size=n_photos)
    onehot = np.eye(n_photos)[groups]
    y = offset[groups]
    cfg = ScorerConfig(n_folds=5, epsilon=0.0)
    oof = out_of_fold_predictions(onehot, y, groups, C=10.0, cfg=cfg)
    in_sample = RegionScorer.fit(onehot, y, groups, ScorerConfig(Cs=(10.0,), n_folds=5, epsilon=0.0)).predict(onehot)
    assert np.mean((in_sample - y) ** 2) < 0.01
    assert np.mean((oof - y) ** 2) > 0.5 * np.var(y)


# ------------------------------------------------------------------------------------------------ greedy
def _instance(seed: int, P: int = 9, d: int = 4):
    rng = np.random.default_rng(seed)
    D = rng.normal(size=(P, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    return rng.uniform(0, 2, P), D @ D.T


def test_greedy_with_lambda_zero_is_the_brute_force_top5() -> None:
    for seed in range(5):
        psi, S = _instance(seed)
        greedy = greedy_diverse_topk(psi, S, 5, 0.0)
        best, _ = best_subset_bruteforce(psi, S, 5, 0.0)
        assert sorted(greedy) == sorted(best) == sorted(np.argsort(-psi)[:5])
        np.testing.assert_array_equal(greedy, np.argsort(-psi)[:5])  # picked in score order


@pytest.mark.parametrize("lam", [-3.0, -0.4, 0.7, 2.5])
def test_each_greedy_step_is_the_brute_force_best_extension(lam: float) -> None:
    """Greedy = at every step, the candidate maximising the set objective F(S + r) evaluated from scratch
    (F = sum_i psi_i + lam max_{j != i} sim_ij, an independent implementation), and never above the best
    5-subset found by exhaustive search."""
    for seed in range(6):
        psi, S = _instance(seed)
        greedy = greedy_diverse_topk(psi, S, 5, lam)
        assert len(set(greedy.tolist())) == 5
        for t in range(5):
            prefix = list(greedy[:t])
            rest = [r for r in range(len(psi)) if r not in prefix]
            vals = [diversity_objective(prefix + [r], psi, S, lam) for r in rest]
            assert greedy[t] == rest[int(np.argmax(vals))]
        _, opt = best_subset_bruteforce(psi, S, 5, lam)
        assert diversity_objective(greedy, psi, S, lam) <= opt + 1e-9


def test_diverse_selection_skips_near_duplicates_and_matches_the_optimum() -> None:
    # patches 0-3 are near-duplicates (sim 0.98) with the best scores; 4-8 mutually orthogonal, slightly lower
    P = 9
    S = np.zeros((P, P))
    S[:4, :4] = 0.98
    np.fill_diagonal(S, 1.0)
    psi = np.array([1.0, 0.99, 0.98, 0.97, 0.9, 0.85, 0.8, 0.75, 0.7])
    lam = -0.4
    greedy = greedy_diverse_topk(psi, S, 5, lam)
    # top-5 by score would take all four duplicates; the diverse set keeps one of them
    assert sorted(greedy) == [0, 4, 5, 6, 7]
    best, opt = best_subset_bruteforce(psi, S, 5, lam)
    assert sorted(best) == [0, 4, 5, 6, 7]
    assert diversity_objective(greedy, psi, S, lam) == pytest.approx(opt)
    # F by hand: orthogonal set, every max-sim is 0 -> F = 1.0 + 0.9 + 0.85 + 0.8 + 0.75
    assert opt == pytest.approx(4.3)
    # with fewer patches than k, all are returned
    assert sorted(greedy_diverse_topk(psi[:3], S[:3, :3], 5, lam)) == [0, 1, 2]


def test_bruteforce_helper_really_enumerates() -> None:
    psi, S = _instance(11, P=7)
    vals = {c: diversity_objective(c, psi, S, -1.0) for c in combinations(range(7), 3)}
    best, opt = best_subset_bruteforce(psi, S, 3, -1.0)
    assert opt == pytest.approx(max(vals.values())) and vals[best] == pytest.approx(opt)


# ------------------------------------------------------------------------------------------------ voting
def test_patch_vote_scores_by_hand() -> None:
    sim_img = np.array([0.5, 0.2, 0.1])
    spi = np.array([[0.1, 0.9, 0.0], [0.3, 0.0, 0.2], [0.7, 0.1, 0.4]])
    # chosen 0 and 2: [0.5+0.1+0.7, 0.2+0.9+0.1, 0.1+0.0+0.4]
    np.testing.assert_allclose(patch_vote_scores(sim_img, spi, [0, 2]), [1.3, 1.2, 0.5])
    np.testing.assert_allclose(patch_vote_scores(sim_img, spi, []), sim_img)


def test_dense_from_topk_fills_with_each_lists_lowest_score() -> None:
    scores = np.array([[0.9, 0.5, -np.inf], [0.7, 0.6, 0.2]])
    ids = np.array([[3, 0, -1], [1, 2, 4]])
    got = dense_from_topk(scores, ids, 5)
    np.testing.assert_allclose(got, [[0.5, 0.5, 0.5, 0.9, 0.5], [0.2, 0.7, 0.6, 0.2, 0.2]])


def test_select_lambda_prefers_diversity_when_duplicates_mislead() -> None:
    # one query, 3 images, image 0 relevant. Patches A, A' (duplicates, psi 1.0 / 0.99) vote for the wrong
    # image 1; patch B (psi 0.5) votes for image 0. k = 2.
    desc = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    spi = np.array([[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.9, 0.0, 0.0]])
    q = LambdaQuery(psi=np.array([1.0, 0.99, 0.5]), patch_desc=desc, sim_img=np.array([0.5, 0.5, 0.0]),
                    sim_patch_img=spi, positives=np.array([0]))
    # lam = 0: picks A, A' -> votes [0.7, 2.3, 0] -> image 0 at 0-based rank 1 -> trapezoidal AP of the
    #   reference (pipeline.evaluation.compute_ap): (0/1 + 1/2) / 2 = 1/4
    # lam = -1: after A, gain(A') = 0.99 - 2*1 < gain(B) = 0.5 - 0 -> picks A, B -> votes [1.5, 1.4, 0] -> AP 1
    # lam = 1: like lam = 0 (the duplicate is rewarded) -> AP 1/4
    best, curve = select_lambda([q], lambdas=[-1.0, 0.0, 1.0], k=2)
    assert best == -1.0
    np.testing.assert_allclose(curve, [[-1.0, 1.0], [0.0, 0.25], [1.0, 0.25]])


def test_sim_patch_img_same_for_sorted_and_shuffled_regions() -> None:
    rng = np.random.default_rng(4)
    V = rng.normal(size=(30, 5)).astype(np.float32)
    img = np.sort(rng.integers(0, 6, 30))
    Q = rng.normal(size=(4, 5)).astype(np.float32)
    perm = rng.permutation(30)
    np.testing.assert_allclose(sim_patch_img(Q, V, img, 6), sim_patch_img(Q, V[perm], img[perm], 6), rtol=1e-6)


def test_retrieval_profile_by_hand():
    top = np.array([[0.9, 0.5, 0.4], [0.6, 0.6, -np.inf]])
    got = retrieval_profile(top, 0.8, np.array([0.8, 0.3]))
    # row 0: best .9, gaps .4 and .5, mean .6, .9 - .8, and the full image ranks the patch's best image first
    # row 1: the -inf pad counts as the lowest listed score (.6): best .6, gaps 0, mean .6, -.2, .3 - .8
    np.testing.assert_allclose(got, [[0.9, 0.4, 0.5, 0.6, 0.1, 0.0], [0.6, 0.0, 0.0, 0.6, -0.2, -0.5]], atol=1e-12)
    assert len(PROFILE_NAMES) == got.shape[1]
    with pytest.raises(ValueError):
        retrieval_profile(np.zeros((3, 1)), 0.0, np.zeros(3))


def test_retrieval_profile_dense_equals_a_sorted_reference():
    rng = np.random.default_rng(2)
    S, full = rng.uniform(-1, 1, (7, 30)), rng.uniform(-1, 1, 30)
    got = retrieval_profile_dense(S, full, k=10)
    srt = -np.sort(-S, axis=1)[:, :10]
    want = np.stack([srt[:, 0], srt[:, 0] - srt[:, 1], srt[:, 0] - srt[:, 9], srt.mean(1), srt[:, 0] - full.max(),
                     full[S.argmax(1)] - full.max()], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-12)
