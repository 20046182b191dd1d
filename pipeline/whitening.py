"""Descriptor whitening (ALGORITHMS.md §1): learned once, stored as plain arrays, applied as
``w(x) = l2n((l2n(x) - mean) @ projection)``.

* :func:`learn_pca_whitening` — unsupervised PCA-whitening (Jégou & Chum): centre the L2-normalised
  samples, eigen-decompose their covariance, scale each kept eigenvector by ``(lambda + ridge)^-1/2``.
* :func:`learn_supervised_whitening` — "Lw" of Radenović, Tolias, Chum (CNN image retrieval learns from
  BoW, TPAMI 2018), after Mikolajczyk & Matas: whiten by the covariance of the differences of matching
  pairs (intra-class), then rotate onto the principal axes of all samples in that whitened space
  (inter-class) and keep the ``dim`` leading ones.

Covariances are accumulated in float64 over row chunks, so a large sample (10^5 x 2048) never needs a
float64 copy of the whole matrix.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import scipy.linalg
import torch

_CHUNK = 16384
WHITEN_KINDS = ("pca", "learned")


@dataclass(frozen=True)
class WhitenConfig:
    """The ``whiten`` stage: PCA-whitening of regional MACs (supervised Lw when matching pairs are given)."""

    dim: int = 512                      # output dimension of the learned whitening (<= channels)
    sample: int = 100_000               # region descriptors sampled to learn it
    sources: tuple[str, ...] = ("grid", "fs_egm")
    pairs: str | None = None            # optional Parquet of matching (image_id, region_id) pairs -> Lw whitening
    # "learned": also apply a projection trained by jobs.train_projection (folder URI in ``projection``) to the
    # R-MAC regional MACs, as the extra global ``rmac_learned``; the PCA-whitening above stays for every other use
    kind: str = "pca"
    projection: str | None = None

    def __post_init__(self) -> None:
        if self.dim < 1 or self.sample < 2:
            raise ValueError("dim must be >= 1 and sample >= 2")
        if self.kind not in WHITEN_KINDS:
            raise ValueError(f"kind must be one of {list(WHITEN_KINDS)}, got {self.kind!r}")
        if (self.kind == "learned") != bool(self.projection):
            raise ValueError("kind: learned needs projection: <folder URI of jobs.train_projection> (and only it)")

    def pca_params(self) -> dict:
        """The parameters the PCA-whitening itself depends on (the ``whiten`` stage's hash)."""
        return {"dim": self.dim, "sample": self.sample, "sources": list(self.sources), "pairs": self.pairs}


def _l2n64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(eq=False)
class Whitening:
    """A learned whitening: ``mean`` (D,) and ``projection`` (D, d), both float32.

    ``apply`` accepts numpy arrays or torch tensors (any device) of shape (D,) or (N, D) and returns the
    same kind; it is also the instance's ``__call__``.
    """

    mean: np.ndarray
    projection: np.ndarray
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float32).reshape(-1)
        self.projection = np.ascontiguousarray(self.projection, dtype=np.float32)
        if self.projection.ndim != 2 or self.projection.shape[0] != self.mean.shape[0]:
            raise ValueError(f"projection {self.projection.shape} does not match mean {self.mean.shape}")

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.projection.shape[1])

    def _torch(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            # copies: the arrays may be read-only (memory-mapped or from Ray's object store)
            self._cache[key] = (torch.tensor(np.array(self.mean)).to(like.device, like.dtype),
                                torch.tensor(np.array(self.projection)).to(like.device, like.dtype))
        return self._cache[key]

    def project(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``(l2n(x) - mean) @ projection`` without the final normalisation (whitened coordinates)."""
        if torch.is_tensor(x):
            mean, proj = self._torch(x)
            xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return (xn - mean) @ proj
        x = np.asarray(x, dtype=np.float32)
        xn = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return (xn - self.mean) @ self.projection

    def apply(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``l2n((l2n(x) - mean) @ projection)``: the post-processing ``w(.)`` of ALGORITHMS.md §1."""
        y = self.project(x)
        if torch.is_tensor(y):
            return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)

    __call__ = apply

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``storage.arrays.save_arrays`` (no pickle)."""
        return {"mean": self.mean, "projection": self.projection}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "Whitening":
        """Inverse of :meth:`to_arrays`."""
        return cls(mean=np.asarray(arrays["mean"]), projection=np.asarray(arrays["projection"]))


def _mean_and_cov(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (biased) covariance of the L2-normalised rows of ``X``, float64, accumulated by chunks."""
    n, D = X.shape
    s = np.zeros(D)
    ss = np.zeros((D, D))
    for start in range(0, n, _CHUNK):
        c = _l2n64(X[start:start + _CHUNK])
        s += c.sum(0)
        ss += c.T @ c
    mean = s / n
    return mean, ss / n - np.outer(mean, mean)


def _eigh_desc(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, U = np.linalg.eigh((C + C.T) / 2)
    order = np.argsort(lam)[::-1]
    return np.clip(lam[order], 0.0, None), U[:, order]


def learn_pca_whitening(X: np.ndarray, dim: int | None = None, eps: float = 1e-6) -> Whitening:
    """PCA-whitening learned on the L2-normalised rows of ``X`` (N, D).

    Projection: the ``dim`` leading eigenvectors of the sample covariance, each divided by
    ``sqrt(lambda + eps * mean(lambda))`` (a small ridge so near-null directions are not blown up).
    ``dim`` defaults to the rank of the centred sample (at most ``min(D, N - 1)``). Asking for more than
    the rank (few or duplicated samples) warns and pads the projection with zero columns: whitening a
    direction the sample does not span would only amplify noise, and the padding keeps the requested
    output width for fixed-size descriptor columns. When ``N < D`` the eigenvectors come from the
    N x N Gram matrix (cheaper, same result).
    """
    X = np.asarray(X)
    N, D = X.shape
    if N < 2:
        raise ValueError("PCA whitening needs at least 2 samples")
    if N >= D:
        mean, C = _mean_and_cov(X)
        lam, U = _eigh_desc(C)
    else:
        Xn = _l2n64(X)
        mean = Xn.mean(0)
        Xc = Xn - mean
        lam, V = _eigh_desc(Xc @ Xc.T / N)
        pos = lam > 0
        U = np.zeros((D, N))
        U[:, pos] = Xc.T @ V[:, pos] / np.sqrt(N * lam[pos])
    rank = int((lam > 1e-10 * max(lam[0], 1e-300)).sum())
    if dim is None:
        dim = rank
    if not 0 < dim <= D:
        raise ValueError(f"dim must be in 1..{D}")
    ridge = eps * lam[:rank].mean() if rank else eps
    projection = np.zeros((D, dim))
    k = min(dim, rank)
    projection[:, :k] = U[:, :k] / np.sqrt(lam[:k] + ridge)[None, :]
    if dim > rank:
        warnings.warn(f"PCA whitening to {dim} dims: the {N} samples span only {rank}; "
                      f"the last {dim - rank} output dims are 0", RuntimeWarning, stacklevel=2)
    return Whitening(mean=mean, projection=projection)


def learn_supervised_whitening(X: np.ndarray, pairs: np.ndarray, dim: int | None = None,
                               eps: float = 1e-6) -> Whitening:
    """Supervised "Lw" whitening from matching pairs (Radenović et al.).

    ``X`` (N, D) descriptors (L2-normalised internally), ``pairs`` (P, 2) row indices of matching
    descriptors. Steps: ``S_w`` = covariance of the pair differences (plus a ridge
    ``eps * trace(S_w) / D`` so it stays positive definite when P < D), ``S_w = L L^T``; whiten
    with ``L^-1``; PCA (rotation only) of all centred samples in the whitened space; keep the ``dim``
    leading axes (default: all D). The mean is that of all samples (Radenović et al. use the query
    side of the pairs; with symmetric pairs the two agree).
    """
    X = np.asarray(X)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    N, D = X.shape
    if pairs.shape[0] == 0:
        raise ValueError("supervised whitening needs at least one matching pair")
    dim = D if dim is None else dim
    if not 0 < dim <= D:
        raise ValueError(f"dim must be in 1..{D}")
    Sw = np.zeros((D, D))
    for start in range(0, pairs.shape[0], _CHUNK):
        p = pairs[start:start + _CHUNK]
        d = _l2n64(X[p[:, 0]]) - _l2n64(X[p[:, 1]])
        Sw += d.T @ d
    Sw /= pairs.shape[0]
    Sw += (eps * max(np.trace(Sw), 1e-12) / D) * np.eye(D)
    L = np.linalg.cholesky(Sw)
    Linv_T = scipy.linalg.solve_triangular(L, np.eye(D), lower=True).T  # (D, D) = L^-T
    mean, C = _mean_and_cov(X)
    lam, V = _eigh_desc(Linv_T.T @ C @ Linv_T)  # covariance of the whitened samples
    projection = Linv_T @ V[:, :dim]
    return Whitening(mean=mean, projection=projection)


def whitenings_from_arrays(arrays: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Whitening]:
    """Stored whitenings by name (``regions``, ``global-<method>``) as :class:`Whitening` objects."""
    return {name: Whitening.from_arrays(a) for name, a in arrays.items()}
