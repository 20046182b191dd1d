"""Katz CG non-convergence: a clear ConvergenceError with the numbers and the config keys, and a bounded retry."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.katz import (ConvergenceError, check_convergence, katz_centrality, katz_centrality_checked)
from pipeline.knn_graph import knn_graph, normalize_graph


def _graph(n: int = 150, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return normalize_graph(knn_graph(X, k=10, beta=3.0))


def _dense_residual(Wn: sp.csr_matrix, g: np.ndarray, alpha: float) -> float:
    A = np.eye(Wn.shape[0]) - alpha * Wn.toarray().astype(np.float64)
    b = np.full(Wn.shape[0], 1.0 - alpha)
    return float(np.linalg.norm(b - A @ g) / np.linalg.norm(b))


def test_non_converging_cg_raises_with_iterations_residual_and_keys() -> None:
    Wn = _graph()
    g2, _ = katz_centrality(Wn, alpha=0.99, tol=1e-10, maxiter=2)
    expected_residual = _dense_residual(Wn, g2, 0.99)   # independent of the solver's own bookkeeping
    assert expected_residual > 1e-10
    with pytest.raises(ConvergenceError) as err:
        katz_centrality_checked(Wn, alpha=0.99, tol=1e-10, maxiter=2)
    e = err.value
    assert e.iterations == 2 and e.maxiter == 2 and e.tol == 1e-10
    assert e.residual == pytest.approx(expected_residual, rel=1e-6)
    msg = str(e)
    for part in ("Katz centrality", "did not converge", "after 2 iterations", "katz.maxiter", "katz.tol",
                 f"{expected_residual:.3e}"):
        assert part in msg


def test_retry_with_more_iterations_converges_to_the_dense_solution() -> None:
    Wn = _graph(seed=1)
    g, info = katz_centrality_checked(Wn, alpha=0.99, tol=1e-9, maxiter=3, retries=4, growth=6.0)
    assert info["converged"] and info["attempts"] > 1 and info["total_iterations"] > 3
    A = np.eye(Wn.shape[0]) - 0.99 * Wn.toarray().astype(np.float64)
    g_ref = np.linalg.solve(A, np.full(Wn.shape[0], 0.01))
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)


def test_retries_exhausted_still_raise() -> None:
    Wn = _graph(seed=2)
    with pytest.raises(ConvergenceError, match="after 3 iterations"):   # 1 + 2 iterations in total
        katz_centrality_checked(Wn, alpha=0.99, tol=1e-12, maxiter=1, retries=1, growth=2.0)


def test_check_convergence_passes_converged_info_and_names_custom_keys() -> None:
    Wn = _graph(seed=3)
    g, info = katz_centrality(Wn, alpha=0.9, tol=1e-8)
    assert check_convergence(info) is info
    bad = dict(info, converged=False, residual=1e-3)
    with pytest.raises(ConvergenceError, match=r"diffusion\.maxiter.*diffusion\.tol"):
        check_convergence(bad, what="diffusion", maxiter=20, maxiter_key="diffusion.maxiter", tol_key="diffusion.tol")
    with pytest.raises(ConvergenceError):
        check_convergence(dict(info, residual=float("nan")))
