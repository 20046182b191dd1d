"""Region detection on a 2-d saliency map with an expanding Gaussian mixture (EGM), seed 001 §3.4.

ALGORITHMS.md §3. The map ``S`` (H, W) is a set of Gaussian *functions* ``s_i(x) = S_i N(x | p_i, sigma^2 I)``
centred on the cell centres ``p_i = (x + 0.5, y + 0.5)`` (continuous cell coordinates, so boxes come out in
the ``[x0, y0, x1, y1]`` cell units of ``pipeline.regions``). Components ``q_k = pi_k N(mu_k, Sigma_k)`` have
diagonal covariances and start as one per non-zero position. Each iteration runs

* E-step: ``gamma_ik ∝ <s_i, q_k> = S_i pi_k N(p_i | mu_k, sigma^2 I + Sigma_k)`` (closed-form inner product);
* M-step with samples weighted by their mass ``S_i``:
  ``l_k = sum_i S_i gamma_ik``, ``pi_k = l_k / sum_i S_i``, ``mu_k = sum_i S_i gamma_ik p_i / l_k``,
  ``Sigma_k = sigma^2 I + sum_i S_i gamma_ik diag(p_i - mu_k)^2 / l_k``;
* P-step: visit components by decreasing ``pi_k`` and drop one whose normalised overlap with an already
  kept component exceeds ``overlap_threshold``.

It stops when the number of components no longer changes, or after ``max_iter`` iterations.

Decisions where seed 001 is silent or garbled (its eq. 6-8 are the point-set M-step of Avrithis &
Kalantidis' EGM; we follow ALGORITHMS.md's function version):

* Mass weighting: samples are functions with mass ``S_i``; zero-saliency positions carry no mass and are
  left out of the sample set entirely (they would not change any estimate).
* ``+ sigma^2 I`` in the M-step: moment matching of a mixture of Gaussian *functions* adds the samples' own
  covariance, which makes the components expand (hence "expanding" GM) and keeps a component fitted to a
  single position non-degenerate.
* Overlap in the P-step is the cosine of the two unit-mass Gaussian functions,
  ``<N_k, N_j> / sqrt(<N_k, N_k> <N_j, N_j>) = prod_d sqrt(2 sqrt(v_kd v_jd) / (v_kd + v_jd))
  * exp(-(mu_kd - mu_jd)^2 / (2 (v_kd + v_jd)))``, in [0, 1] and independent of the mixing weights.
  Default threshold ``OVERLAP_THRESHOLD = 0.5``: for two equal isotropic components of std ``s`` the
  overlap is ``exp(-d^2 / (4 s^2))``, so 0.5 merges components whose centres are closer than
  ``2 sqrt(ln 2) s ~ 1.67 s`` (their 1-std ellipses largely intersect) and keeps them apart beyond. On the
  30 qsd2_w3 photos of ``experiments.bench_regions`` (mobilenet_v2, FS preset)
  thresholds 0.3 .. 0.7 give 2.2 .. 3.3 boxes per photo for a mean best IoU with the paintings of
  0.59 .. 0.64: the threshold mostly trades the number of boxes, not their fit, so the principled 0.5
  is kept rather than a value tuned on that small set.
* Boxes: centre ``mu_k``, half-sides ``BOX_SCALE * sqrt(diag Sigma_k)`` with ``BOX_SCALE = sqrt(3)``: a
  uniform mass over an interval of half-width ``h`` has std ``h / sqrt(3)``, so ``sqrt(3)`` std recovers
  the extent of a flat region. Because ``Sigma_k`` includes ``sigma^2`` the box is that extent widened
  (half-side ``sqrt(h^2 + 3 sigma^2)``), which is the "larger regions" effect of ``sigma`` in seed 001
  §4.2, and an isolated peak still gets a box of half-side ``sqrt(3) sigma``. Boxes are clipped to the
  map.
* Components whose final mixing weight is below ``MIN_WEIGHT = 1e-3`` (0.1 % of the map's mass) are
  dropped: they are left-overs fitted to the faint tails of the map (e.g. far from every blob of a
  smooth map that is nowhere exactly zero) and explain no visible saliency.
* ``scores`` are the final mixing weights ``pi_k``: the share of the map's mass each component took at
  the last M-step (at most 1 in total once the purge removed some; not renormalised).
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.saliency import sharpen

OVERLAP_THRESHOLD = 0.5
BOX_SCALE = math.sqrt(3.0)
MAX_ITER = 50
MIN_WEIGHT = 1e-3



@dataclass(frozen=True)
class EGMParams:
    """Sharpening of a saliency map before EGM (``tau``: zero below ``tau * max``; ``rho``: power) and the
    samples' ``sigma`` (feature cells). One place for the presets of both maps."""

    rho: float = 5.0
    tau: float = 0.4
    sigma: float = 2.5

    def __post_init__(self) -> None:
        if self.rho <= 0 or self.sigma <= 0 or not 0 <= self.tau < 1:
            raise ValueError(f"EGM parameters need rho > 0, sigma > 0, 0 <= tau < 1 (got {self})")

    def as_kwargs(self) -> dict[str, float]:
        return asdict(self)


# presets of seed 001 §4.2 (tuned on Oxford5k): FS map and OS map
FS_EGM = EGMParams(rho=5.0, tau=0.4, sigma=2.5)
OS_EGM = EGMParams(rho=2.0, tau=0.0, sigma=2.0)


def _log_gauss_diag(p: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``log N(p_i | mu_k, diag(var_k))`` for all pairs: p (N,2), mu (K,2), var (K,2) -> (N,K).

    The Mahalanobis term is expanded as ``p^2/v - 2 p mu/v + mu^2/v`` so it is two (N,2)x(2,K) products
    instead of an (N,K,2) temporary.
    """
    iv = 1.0 / var
    quad = (p * p) @ iv.T - 2.0 * p @ (mu * iv).T + (mu * mu * iv).sum(1)[None, :]
    return -0.5 * (np.clip(quad, 0.0, None) + np.log(2.0 * np.pi * var).sum(-1)[None, :])


def gaussian_overlap(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Normalised L2 inner product of unit-mass diagonal Gaussians: mu, var (K,2) -> (K,K) in [0,1]."""
    vs = var[:, None, :] + var[None, :, :]
    gm = np.sqrt(var[:, None, :] * var[None, :, :])
    d2 = (mu[:, None, :] - mu[None, :, :]) ** 2
    return np.exp((0.5 * np.log(2.0 * gm / vs) - d2 / (2.0 * vs)).sum(-1))


def _overlap_with(mu: np.ndarray, var: np.ndarray, mu_ref: np.ndarray, var_ref: np.ndarray) -> np.ndarray:
    """Normalised overlap of components (mu, var) (K,2) with one reference component (2,), (K,)."""
    vs = var + var_ref
    return np.prod(np.sqrt(2.0 * np.sqrt(var * var_ref) / vs) * np.exp(-((mu - mu_ref) ** 2) / (2.0 * vs)), axis=1)


def _purge(pi: np.ndarray, mu: np.ndarray, var: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of kept components: NMS by decreasing ``pi`` with the Gaussian overlap.

    Equivalent to "visit by decreasing pi, drop one overlapping an already kept component by more than
    ``threshold``", but the loop runs once per *kept* component, each time suppressing every later
    component it overlaps with one O(K) numpy expression.
    """
    order = np.argsort(-pi, kind="stable")
    mu, var = mu[order], var[order]
    alive = np.ones(order.size, dtype=bool)
    kept = []
    k = 0
    while True:
        kept.append(k)
        rest = slice(k + 1, None)
        alive[rest] &= _overlap_with(mu[rest], var[rest], mu[k], var[k]) <= threshold
        nxt = np.flatnonzero(alive[rest])
        if nxt.size == 0:
            break
        k = k + 1 + int(nxt[0])
    return order[np.asarray(kept, dtype=np.int64)]


def egm(S: np.ndarray, sigma: float, max_iter: int = MAX_ITER,
        overlap_threshold: float = OVERLAP_THRESHOLD, box_scale: float = BOX_SCALE,
        min_weight: float = MIN_WEIGHT, return_components: bool = False):
    """Fit an expanding Gaussian mixture to saliency map ``S`` (H, W) and return its regions.

    Returns ``(boxes, scores)``: float64 ``(R, 4)`` boxes ``[x0, y0, x1, y1]`` in continuous cell coordinates
    (clipped to the map, sorted by decreasing score) and the mixing weights ``(R,)``. An all-zero map gives
    no region. With ``return_components`` also returns ``(mu (R,2), var (R,2), n_iter)`` (x, y order).
    """
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2:
        raise ValueError(f"saliency map must be 2-d, got shape {S.shape}")
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    H, W = S.shape
    ys, xs = np.nonzero(S > 0)
    empty = (np.zeros((0, 4)), np.zeros((0,)))
    if ys.size == 0:
        return (*empty, (np.zeros((0, 2)), np.zeros((0, 2)), 0)) if return_components else empty
    p = np.stack([xs + 0.5, ys + 0.5], axis=1)  # (N, 2) sample centres
    w = S[ys, xs]  # (N,) sample masses
    total = w.sum()
    s2 = float(sigma) ** 2
    # initialisation: one component per non-zero position, q_k = s_k
    pi = w / total
    mu = p.copy()
    var = np.full_like(p, s2)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        m_before = pi.size
        # E-step: gamma_ik ∝ pi_k N(p_i | mu_k, sigma^2 I + Sigma_k)  (S_i cancels in the ratio)
        logr = _log_gauss_diag(p, mu, var + s2) + np.log(pi)[None, :]
        logr -= logr.max(axis=1, keepdims=True)
        gamma = np.exp(logr)
        gamma /= gamma.sum(axis=1, keepdims=True)
        # M-step, samples weighted by their mass
        r = gamma * w[:, None]  # (N, K)
        lk = r.sum(axis=0)
        live = lk > 1e-12 * total
        r, lk = r[:, live], lk[live]
        pi = lk / total
        mu = (r.T @ p) / lk[:, None]
        second = (r.T @ (p * p)) / lk[:, None]
        var = s2 + np.clip(second - mu * mu, 0.0, None)
        # P-step
        keep = _purge(pi, mu, var, overlap_threshold)
        pi, mu, var = pi[keep], mu[keep], var[keep]
        if pi.size == m_before:
            break
    order = np.argsort(-pi, kind="stable")
    order = order[pi[order] >= min_weight]
    pi, mu, var = pi[order], mu[order], var[order]
    half = box_scale * np.sqrt(var)
    boxes = np.concatenate([mu - half, mu + half], axis=1)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0.0, W)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0.0, H)
    if return_components:
        return boxes, pi, (mu, var, n_iter)
    return boxes, pi


def detect_regions_with(S: np.ndarray, params: EGMParams, **egm_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """:func:`detect_regions` with a preset (:data:`FS_EGM`, :data:`OS_EGM` or a config's own)."""
    return detect_regions(S, tau=params.tau, rho=params.rho, sigma=params.sigma, **egm_kwargs)


def detect_regions(S: np.ndarray, tau: float, rho: float, sigma: float, **egm_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Sharpen ``S`` (zero below ``tau * max``, power ``rho``) then run :func:`egm` with ``sigma``.

    With a preset: :func:`detect_regions_with` (``FS_EGM``, ``OS_EGM``). Accepts numpy or torch maps.
    """
    S = S.detach().cpu().numpy() if hasattr(S, "detach") else np.asarray(S)
    return egm(sharpen(S.astype(np.float64, copy=False), tau, rho), sigma, **egm_kwargs)
