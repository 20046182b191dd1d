"""PCA and supervised (Lw) whitening: exact identities on the training sample, and a retrieval gain."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.whitening import Whitening, learn_pca_whitening, learn_supervised_whitening

torch.set_num_threads(1)


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cov(y: np.ndarray) -> np.ndarray:
    yc = y - y.mean(0)
    return yc.T @ yc / y.shape[0]


def test_pca_whitening_gives_identity_covariance_on_training_sample() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 8)) * np.array([5, 3, 2, 1, 0.5, 0.3, 0.2, 0.1]) + 4.0
    w = learn_pca_whitening(X, eps=1e-9)
    y = w.project(X).astype(np.float64)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(_cov(y), np.eye(w.out_dim), atol=1e-4)
    assert w.out_dim == 8  # full rank by default
    # reduced dimension keeps the leading components, still white
    w3 = learn_pca_whitening(X, dim=3, eps=1e-9)
    np.testing.assert_allclose(_cov(w3.project(X).astype(np.float64)), np.eye(3), atol=1e-4)
    np.testing.assert_allclose(np.abs(w3.projection), np.abs(w.projection[:, :3]), rtol=1e-4, atol=1e-6)


def test_pca_whitening_with_fewer_samples_than_dimensions() -> None:
    rng = np.random.default_rng(1)
    X = np.abs(rng.normal(size=(20, 50)))
    w = learn_pca_whitening(X, eps=1e-9)
    assert w.projection.shape == (50, 19)  # rank of 20 centred samples
    np.testing.assert_allclose(_cov(w.project(X).astype(np.float64)), np.eye(19), atol=1e-4)
    # more dims than the sample spans: warned, padded with zero columns, the spanned part unchanged
    with pytest.warns(RuntimeWarning, match="span only 19"):
        w30 = learn_pca_whitening(X, dim=30, eps=1e-9)
    assert w30.projection.shape == (50, 30)
    np.testing.assert_array_equal(w30.projection[:, 19:], 0.0)
    np.testing.assert_allclose(w30.projection[:, :19], w.projection, rtol=1e-5, atol=1e-6)
    # duplicated rows do not add rank
    wd = learn_pca_whitening(np.concatenate([X, X]), eps=1e-9)
    assert wd.out_dim == 19


def test_apply_numpy_torch_and_serialisation() -> None:
    rng = np.random.default_rng(2)
    X = np.abs(rng.normal(size=(100, 12))).astype(np.float32)
    w = learn_pca_whitening(X, dim=6)
    y = w.apply(X)
    expected = _l2n((_l2n(X.astype(np.float64)) - w.mean) @ w.projection)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    yt = w(torch.from_numpy(X))
    assert isinstance(yt, torch.Tensor) and yt.shape == (100, 6)
    np.testing.assert_allclose(yt.numpy(), y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w.apply(X[3]), y[3], rtol=1e-4, atol=1e-5)
    w2 = Whitening.from_arrays(w.to_arrays())
    np.testing.assert_array_equal(w2.mean, w.mean)
    np.testing.assert_array_equal(w2.projection, w.projection)
    np.testing.assert_array_equal(w2.apply(X), y)


def _classes(rng: np.random.Generator, n_classes: int, per_class: int, D: int):
    """Class centres vary along the first half of the axes; nuisance noise is large on the second half."""
    centres = np.zeros((n_classes, D))
    centres[:, : D // 2] = rng.normal(size=(n_classes, D // 2))
    noise_scale = np.r_[np.full(D // 2, 0.15), np.full(D - D // 2, 1.5)]
    X = np.repeat(centres, per_class, axis=0) + rng.normal(size=(n_classes * per_class, D)) * noise_scale
    labels = np.repeat(np.arange(n_classes), per_class)
    return X + 10.0, labels  # offset so the L2 normalisation stays close to a linear map


def _nn_accuracy(Y: np.ndarray, labels: np.ndarray) -> float:
    sim = Y @ Y.T
    np.fill_diagonal(sim, -np.inf)
    return float((labels[sim.argmax(1)] == labels).mean())


def test_supervised_whitening_whitens_pairs_and_helps_retrieval() -> None:
    rng = np.random.default_rng(3)
    D = 12
    X, labels = _classes(rng, n_classes=150, per_class=3, D=D)
    base = np.arange(150) * 3
    pairs = np.concatenate([np.stack([base, base + 1], 1), np.stack([base + 1, base + 2], 1),
                            np.stack([base, base + 2], 1)])
    w = learn_supervised_whitening(X, pairs, eps=1e-10)
    assert w.projection.shape == (D, D)
    # intra-class (pair difference) second moment is the identity in the whitened space
    Xn = _l2n(X)
    d = (Xn[pairs[:, 0]] - Xn[pairs[:, 1]]) @ w.projection.astype(np.float64)
    np.testing.assert_allclose(d.T @ d / d.shape[0], np.eye(D), atol=1e-3)
    # inter-class step is a PCA: the whitened sample covariance is diagonal, decreasing
    C = _cov(w.project(X).astype(np.float64))
    np.testing.assert_allclose(C - np.diag(np.diag(C)), 0.0, atol=1e-3 * C.max())
    assert np.all(np.diff(np.diag(C)) <= 1e-6 * C.max())
    # on new classes, Lw reduced to the discriminative half beats raw descriptors and PCA-whitening
    Xt, lt = _classes(np.random.default_rng(4), n_classes=100, per_class=3, D=D)
    w6 = learn_supervised_whitening(X, pairs, dim=D // 2)
    acc_lw = _nn_accuracy(w6.apply(Xt), lt)
    acc_raw = _nn_accuracy(_l2n(Xt), lt)
    acc_pca = _nn_accuracy(learn_pca_whitening(X, dim=D // 2).apply(Xt), lt)
    assert acc_lw > acc_raw + 0.2 and acc_lw > acc_pca + 0.2, (acc_lw, acc_raw, acc_pca)


def test_supervised_whitening_with_fewer_pairs_than_dimensions_stays_finite() -> None:
    rng = np.random.default_rng(5)
    X = np.abs(rng.normal(size=(30, 40)))
    pairs = np.array([[0, 1], [2, 3], [4, 5]])
    w = learn_supervised_whitening(X, pairs, dim=10, eps=1e-3)
    y = w.apply(X)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
