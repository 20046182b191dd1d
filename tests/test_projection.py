"""Learned R-MAC projection (seed 003): triplet loss by hand, exact PCA initialisation, mining against a brute
force, and training on a planted problem."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.pooling import rmac_from_regions
from pipeline.projection import (LearnedProjection, ProjectionConfig, TripletData, WhitenedTrainable,
                                 mine_hard_negatives, positive_components, train_projection, triplet_accuracy,
                                 triplet_loss)
from pipeline.whitening import Whitening, learn_pca_whitening

torch.set_num_threads(1)


def test_triplet_loss_and_gradient_by_hand() -> None:
    # active triplet: ||q-p||^2 = 2, ||q-n||^2 = 0.16 + 0.64 = 0.8, loss = 0.5 (0.1 + 2 - 0.8) = 0.65
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p = torch.tensor([[0.0, 1.0]], requires_grad=True)
    n = torch.tensor([[0.6, 0.8]], requires_grad=True)
    loss = triplet_loss(q, p, n, margin=0.1)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.65, abs=1e-7)
    loss.sum().backward()
    # d/dq = (q - p) - (q - n) = n - p; d/dp = p - q; d/dn = q - n
    np.testing.assert_allclose(q.grad.numpy(), [[0.6, -0.2]], atol=1e-7)
    np.testing.assert_allclose(p.grad.numpy(), [[-1.0, 1.0]], atol=1e-7)
    np.testing.assert_allclose(n.grad.numpy(), [[0.4, -0.8]], atol=1e-7)
    # inactive triplet (negative beyond the margin): loss and gradients are 0
    q2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p2 = torch.tensor([[0.8, 0.6]])   # ||q-p||^2 = 0.4
    n2 = torch.tensor([[0.6, 0.8]])   # ||q-n||^2 = 0.8; 0.1 + 0.4 - 0.8 < 0
    l2 = triplet_loss(q2, p2, n2, margin=0.1)
    l2.sum().backward()
    assert l2.item() == 0.0 and torch.count_nonzero(q2.grad) == 0
    # the margin is seed 003's
    assert ProjectionConfig().margin == 0.1


def _random_whitening(D: int = 12, n: int = 200, seed: int = 0) -> tuple[np.ndarray, Whitening]:
    rng = np.random.default_rng(seed)
    X = np.abs(rng.normal(size=(n, D)) * np.linspace(3, 0.2, D) + 1.0).astype(np.float32)
    return X, learn_pca_whitening(X)


def test_from_whitening_equals_whitening_apply_exactly() -> None:
    X, w = _random_whitening()
    m = LearnedProjection.from_whitening(w.mean, w.projection)
    xt = torch.from_numpy(X)
    with torch.no_grad():
        ours = m.project(xt)
    assert torch.equal(ours, w.apply(xt))                        # same float32 bits
    np.testing.assert_allclose(ours.numpy(), w.apply(X), atol=1e-6)  # and the numpy path
    # truncated: the leading columns, i.e. the whitening to fewer dimensions
    m4 = LearnedProjection.from_whitening(w.mean, w.projection, dim=4)
    w4 = Whitening(w.mean, w.projection[:, :4])
    with torch.no_grad():
        assert torch.equal(m4.project(xt), w4.apply(xt))
    # arrays use the Whitening keys and round-trip exactly
    arrays = m.to_arrays()
    assert set(arrays) == {"mean", "projection"}
    np.testing.assert_array_equal(arrays["mean"], w.mean)
    np.testing.assert_array_equal(arrays["projection"], w.projection)
    np.testing.assert_array_equal(m.to_whitening().projection, w.projection)


def test_rmac_aggregation_matches_pooling_with_whitening() -> None:
    X, w = _random_whitening()
    offsets = np.array([0, 3, 4, 9])
    data = TripletData(X[:9], offsets, np.zeros((0, 2)))
    m = LearnedProjection.from_whitening(w.mean, w.projection)
    ours = m.describe(data).numpy()
    for i in range(3):
        ref = rmac_from_regions(torch.from_numpy(X[offsets[i]:offsets[i + 1]]), whiten=w).numpy()
        np.testing.assert_allclose(ours[i], ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_zero_epochs_returns_the_whitening_bit_for_bit() -> None:
    X, w = _random_whitening()
    data = TripletData(X[:10], np.arange(11), np.array([[0, 1]]))
    out = train_projection(ProjectionConfig(epochs=0, dim=5), data, w.to_arrays())
    np.testing.assert_array_equal(out["mean"], w.mean)
    np.testing.assert_array_equal(out["projection"], w.projection[:, :5])


def test_trainable_with_shift_exports_an_equivalent_shift_and_fc() -> None:
    X, w = _random_whitening()
    t = WhitenedTrainable(w.out_dim, 6, learn_shift=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        t.A.add_(0.3 * torch.randn(t.A.shape, generator=g))
        t.b.copy_(torch.randn(6, generator=g))
    arrays = t.to_arrays(w.mean, w.projection)
    exported = LearnedProjection.from_arrays(arrays)
    xt = torch.from_numpy(X)
    with torch.no_grad():
        expected = t.project(w.project(xt))
        np.testing.assert_allclose(exported.project(xt).numpy(), expected.numpy(), atol=1e-5)


def test_positive_components_by_hand() -> None:
    labels = positive_components(np.array([[0, 2], [2, 4], [1, 3]]), 6)
    assert labels[0] == labels[2] == labels[4]
    assert labels[1] == labels[3] != labels[0]
    assert len({labels[5], labels[0], labels[1]}) == 3


def test_mine_hard_negatives_against_brute_force() -> None:
    rng = np.random.default_rng(4)
    desc = rng.normal(size=(9, 4)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    groups = np.array([0, 0, 1, 1, 2, 3, 3, 4, 5])
    pairs = np.array([[0, 1], [1, 0], [2, 3], [5, 6]])
    margin, k = 0.6, 3
    def brute(semi_hard: bool) -> list[tuple]:
        expected = []
        for q, p in pairs:
            d_qp = np.sum((desc[q] - desc[p]) ** 2)
            cand = []
            for n in range(9):
                d_qn = np.sum((desc[q] - desc[n]) ** 2)
                if groups[n] == groups[q] or (semi_hard and d_qn <= d_qp):
                    continue
                lo = 0.5 * max(0.0, margin + d_qp - d_qn)
                if lo > 0:
                    cand.append((-lo, n))
            expected += [(q, p, n, -neg_lo) for neg_lo, n in sorted(cand)[:k]]
        return expected

    for semi_hard in (False, True):
        trip, loss = mine_hard_negatives(torch.from_numpy(desc), pairs, groups, margin, k, chunk=2,
                                         semi_hard=semi_hard)
        expected = brute(semi_hard)
        assert [tuple(t) for t in trip] == [e[:3] for e in expected]
        np.testing.assert_allclose(loss, [e[3] for e in expected], atol=1e-5)
    # the example exercises the cap k, the loss > 0 filter and the semi-hard filter
    hard, semi = brute(False), brute(True)
    assert len(hard) > 4 and 0 < len(semi) < len(hard)
    assert max(e[3] for e in semi) < margin / 2 < max(e[3] for e in hard)


def _planted(seed: int = 0, classes: int = 8, per: int = 6, regions: int = 4, D: int = 32):
    """Images of ``classes`` objects: the identity lives in 16 low-variance dimensions, 16 others carry
    strong per-region nuisance, so the leading 8 PCA axes mostly keep the nuisance."""
    rng = np.random.default_rng(seed)
    cls = np.repeat(np.arange(classes), per)
    proto = rng.normal(size=(classes, D)) * np.r_[np.zeros(D // 2), np.ones(D // 2)]
    scale = np.r_[np.full(D // 2, 3.0), np.full(D // 2, 0.3)]
    X = np.concatenate([rng.normal(size=(regions, D)) * scale + proto[c] + 5.0 for c in cls]).astype(np.float32)
    offsets = np.arange(len(cls) + 1) * regions
    pos = np.array([(i, j) for i, j in itertools.combinations(range(len(cls)), 2) if cls[i] == cls[j]])
    return TripletData(X, offsets, pos), cls


def test_training_separates_positives_from_negatives_on_a_planted_problem() -> None:
    data, cls = _planted()
    np.testing.assert_array_equal(positive_components(data.positives, data.n_images),
                                  np.unique(cls, return_inverse=True)[1])
    w = learn_pca_whitening(data.regions)
    cfg = ProjectionConfig(dim=8, epochs=15, batch_size=64)
    before = triplet_accuracy(LearnedProjection.from_whitening(w.mean, w.projection, 8).describe(data), data)
    stats = []
    out = train_projection(cfg, data, w.to_arrays(), epoch_callback=lambda e, s, a: stats.append(s))
    after = triplet_accuracy(LearnedProjection.from_arrays(out).describe(data), data)
    assert before < 0.7 and after > 0.99, (before, after)
    assert stats[-1]["triplets"] < stats[0]["triplets"]
    assert stats[-1]["mean_similarity"] < 0.1  # no collapse onto one direction
    # deterministic: the same seed gives the same bits, another seed other weights
    again = train_projection(cfg, data, w.to_arrays())
    for k in out:
        np.testing.assert_array_equal(out[k], again[k])
    other = train_projection(ProjectionConfig(dim=8, epochs=15, batch_size=64, seed=1), data, w.to_arrays())
    assert not np.array_equal(other["projection"], out["projection"])
