"""Katz centrality on the normalised region graph (seed 001 §3.7, ALGORITHMS.md §4).

The centrality ``g*`` solves ``L_alpha g = 1`` with ``L_alpha = (I - alpha Wn) / (1 - alpha)``, i.e.
``(I - alpha Wn) g = (1 - alpha) 1``. ``Wn`` is symmetric with spectrum in [-1, 1], so the system matrix is
symmetric positive definite for ``alpha`` in [0, 1) and conjugate gradients applies (as in the paper). Its
condition number is at most ``(1 + alpha) / (1 - alpha)`` (199 for alpha = 0.99), so CG needs on the order
of ``sqrt(199) log(1/tol)`` ~ a few hundred matrix-vector products whatever the graph size; each costs
``O(nnz(Wn))``. Only the product ``x -> Wn x`` is needed, which is what lets
:func:`katz_centrality_operator` run over a distributed row-block matvec (``actors.graph``).

Scale: ``g_i = 1 - alpha`` for an isolated vertex and ``g = 1`` on a connected regular graph, so values are
comparable across graphs; hubs of large dense clusters score above 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, cg


@dataclass(frozen=True)
class KatzConfig:
    """Katz centrality by CG (seed 001 §3.7): ``alpha`` and CG's relative-residual target and budget."""

    alpha: float = 0.99
    tol: float = 1e-6
    maxiter: int = 1000
    retries: int = 1                    # continue an unconverged solve this many times (x4 iterations each)
    distributed_above: int = 2_000_000  # regions above which the matvec runs over Ray row blocks

    def __post_init__(self) -> None:
        if not 0 <= self.alpha < 1:
            raise ValueError("alpha must be in [0, 1)")
        if self.tol <= 0 or self.maxiter < 1 or self.retries < 0:
            raise ValueError("tol must be > 0, maxiter >= 1 and retries >= 0")


def katz_centrality_operator(matvec: Callable[[np.ndarray], np.ndarray], n: int, alpha: float = 0.99,
                             tol: float = 1e-6, maxiter: int | None = None,
                             x0: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Solve ``(I - alpha Wn) g = (1 - alpha) 1`` by CG given only ``matvec(x) = Wn @ x``.

    ``tol`` is CG's relative residual target ``||b - A g|| / ||b||``. Returns ``g`` (float64, (n,)) and
    ``info``: ``iterations``, ``residual`` (relative, recomputed with one extra matvec), ``converged``,
    ``matvecs``, ``alpha``, ``tol``.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError("alpha must be in [0, 1)")
    n = int(n)
    counts = {"matvecs": 0, "iterations": 0}

    def system(x: np.ndarray) -> np.ndarray:
        counts["matvecs"] += 1
        x = np.asarray(x, dtype=np.float64).ravel()
        return x - alpha * np.asarray(matvec(x), dtype=np.float64).ravel()

    def on_iter(_xk: np.ndarray) -> None:
        counts["iterations"] += 1

    op = LinearOperator((n, n), matvec=system, dtype=np.float64)
    b = np.full(n, 1.0 - alpha, dtype=np.float64)
    if n == 0:
        return np.zeros(0), {"iterations": 0, "residual": 0.0, "converged": True, "matvecs": 0,
                             "alpha": alpha, "tol": tol}
    g, status = cg(op, b, x0=x0, rtol=tol, atol=0.0, maxiter=maxiter if maxiter is not None else 10 * n,
                   callback=on_iter)
    residual = float(np.linalg.norm(b - system(g)) / np.linalg.norm(b))
    info = {"iterations": counts["iterations"], "residual": residual, "converged": status == 0,
            "matvecs": counts["matvecs"], "alpha": alpha, "tol": tol}
    return g, info


def katz_centrality(Wn: sp.spmatrix, alpha: float = 0.99, tol: float = 1e-6, maxiter: int | None = 1000,
                    x0: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Katz centrality of every vertex of the normalised graph ``Wn`` (n, n); see module docstring.

    ``Wn`` is converted to float64 once (a float32 matrix times the float64 CG vectors would be upcast by
    scipy on every product).
    """
    Wn = sp.csr_matrix(Wn, dtype=np.float64)
    return katz_centrality_operator(lambda x: Wn @ x, Wn.shape[0], alpha=alpha, tol=tol, maxiter=maxiter, x0=x0)


# ---------------------------------------------------------------------------------------------- convergence
# CG that stops on ``maxiter`` returns its last iterate silently (scipy's status > 0); a centrality vector that
# is still far from the solution skews object saliency without any visible error. These helpers turn that
# into a clear failure (or a bounded retry). Config keys named in the message are those of the run config.
KATZ_MAXITER_KEY = "katz.maxiter"
KATZ_TOL_KEY = "katz.tol"


class ConvergenceError(RuntimeError):
    """An iterative solve stopped before reaching its tolerance; carries the numbers and the keys to change."""

    def __init__(self, what: str, iterations: int, residual: float, tol: float, maxiter: int | None,
                 maxiter_key: str = KATZ_MAXITER_KEY, tol_key: str = KATZ_TOL_KEY) -> None:
        self.what, self.iterations, self.residual = what, int(iterations), float(residual)
        self.tol, self.maxiter = float(tol), maxiter
        self.maxiter_key, self.tol_key = maxiter_key, tol_key
        super().__init__(
            f"{what}: conjugate gradients did not converge: relative residual {self.residual:.3e} > tol "
            f"{self.tol:.1e} after {self.iterations} iterations (maxiter {maxiter}). Raise {maxiter_key} "
            f"(e.g. to {max(2 * self.iterations, 1)}) or loosen {tol_key}; the system's condition number grows "
            f"like (1 + alpha) / (1 - alpha), so alpha close to 1 needs more iterations.")


def check_convergence(info: dict, what: str = "Katz centrality", maxiter: int | None = None,
                      maxiter_key: str = KATZ_MAXITER_KEY, tol_key: str = KATZ_TOL_KEY) -> dict:
    """Raise :class:`ConvergenceError` unless ``info`` (as returned by the CG solvers here) reports convergence.

    Convergence means CG's own status was 0 *and* the recomputed relative residual is within ``tol`` (with
    a 10 % slack for the round-off between CG's recursive residual and the recomputed one). Returns ``info``.
    """
    residual, tol = float(info["residual"]), float(info["tol"])
    if not np.isfinite(residual) or not info.get("converged", True) or residual > 1.1 * tol:
        iterations = int(info.get("total_iterations", info.get("iterations", -1)))
        raise ConvergenceError(what, iterations, residual, tol,
                               maxiter if maxiter is not None else info.get("maxiter"), maxiter_key, tol_key)
    return info


def katz_centrality_checked(Wn: sp.spmatrix, alpha: float = 0.99, tol: float = 1e-6, maxiter: int = 1000,
                            retries: int = 0, growth: float = 4.0,
                            x0: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """:func:`katz_centrality` that raises :class:`ConvergenceError` instead of returning an unconverged vector.

    With ``retries > 0`` an unconverged solve is continued (warm-started from its last iterate) with
    ``maxiter * growth**r`` more iterations, up to ``retries`` times, before raising. ``info`` gains
    ``maxiter`` (of the last attempt), ``attempts`` and ``total_iterations``.
    """
    total = 0
    for attempt in range(retries + 1):
        budget = int(round(maxiter * growth ** attempt))
        g, info = katz_centrality(Wn, alpha=alpha, tol=tol, maxiter=budget, x0=x0)
        total += int(info["iterations"])
        info.update(maxiter=budget, attempts=attempt + 1, total_iterations=total)
        if info["converged"] and info["residual"] <= 1.1 * tol:
            return g, info
        x0 = g
    check_convergence(info, maxiter=info["maxiter"])
    return g, info  # unreachable: check_convergence raised
