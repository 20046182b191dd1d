"""Synthetic distractors for scale experiments: new descriptors near the real data, neither duplicates nor noise.

A synthetic global descriptor is ``L2(lam a + (1 - lam) b + noise * sd * eps)`` for two real negatives ``a``,
``b`` (database images relevant to no query), ``lam ~ U(0, 1)``, ``eps ~ N(0, I)``, ``sd`` the negatives'
per-dimension standard deviation; :func:`calibrate_noise` picks ``noise`` so that a synthetic descriptor is as
similar to its nearest real descriptor as a real image is to its nearest *other* real image. Regional
distractors copy the region layout of a real negative image. Generation is chunked and seeded, so sets are
nested (the first 10k of the 100k set are the 10k set).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline.ranking import RegionSet

SYNTH_CHUNK = 8192       # synthetic distractors are generated in seeded chunks (nested sets, bounded memory)


def negative_pool(gnd: Sequence[dict[str, Any]], n_db: int) -> np.ndarray:
    """Database indices listed in no query's easy / hard / junk lists (relevant to nothing)."""
    used = np.zeros(n_db, bool)
    for g in gnd:
        for key in ("easy", "hard", "junk", "ok"):
            v = np.asarray(g.get(key, []), np.int64).ravel()
            used[v[(v >= 0) & (v < n_db)]] = True
    return np.flatnonzero(~used)


def _l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _mix(A: np.ndarray, B: np.ndarray, lam: np.ndarray, sd: np.ndarray, noise: float,
         rng: np.random.Generator) -> np.ndarray:
    return _l2n(lam * A + (1.0 - lam) * B + noise * sd * rng.standard_normal(A.shape, dtype=np.float32))


def calibrate_noise(pool: np.ndarray, reference: np.ndarray, pool_groups: np.ndarray | None = None,
                    ref_groups: np.ndarray | None = None, seed: int = 0, n: int = 1000, n_ref: int = 5000,
                    iters: int = 14) -> tuple[float, float, float]:
    """Noise level at which synthetic mixtures are as far from the real data as real images are from each other.

    Statistic: the mean nearest-neighbour cosine to ``reference``. Target: over a sample of ``pool`` rows, the
    best cosine to a reference row of *another* image (``pool_groups`` / ``ref_groups`` give the image of each
    row; by default every row is its own image). Synthetic rows (new images) take the best over all reference
    rows. (The plain mean cosine is useless here: whitened descriptors are centred, so it is ~0 for any noise.)
    Returns ``(noise, target, achieved)``; bisection on [0, 8] (the statistic falls as the noise grows).
    """
    rng = np.random.default_rng(seed)
    pool = np.asarray(pool, np.float32)
    reference = np.asarray(reference, np.float32)
    pg = np.arange(len(pool)) if pool_groups is None else np.asarray(pool_groups)
    rg = None if ref_groups is None else np.asarray(ref_groups)
    ri = rng.choice(len(reference), min(len(reference), n_ref), replace=False)
    ref = reference[ri]
    pi = rng.choice(len(pool), min(len(pool), n), replace=False)
    sim = pool[pi] @ ref.T
    if rg is None:  # rows are images: exclude the row itself (and exact duplicates)
        sim = np.where(sim > 0.9999, -np.inf, sim)
    else:
        sim = np.where(pg[pi][:, None] == rg[ri][None, :], -np.inf, sim)
    best = sim.max(axis=1)
    target = float(best[np.isfinite(best)].mean()) if np.isfinite(best).any() else 0.0
    sd = pool.std(axis=0).astype(np.float32)
    a, b = rng.integers(len(pool), size=n), rng.integers(len(pool), size=n)
    lam = rng.uniform(0, 1, (n, 1)).astype(np.float32)
    eps = rng.standard_normal((n, pool.shape[1]), dtype=np.float32)

    def nn_cos(noise: float) -> float:
        Y = _l2n(lam * pool[a] + (1 - lam) * pool[b] + noise * sd * eps)
        return float((Y @ ref.T).max(axis=1).mean())

    lo, hi = 0.0, 8.0
    if nn_cos(lo) <= target:
        return lo, target, nn_cos(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if nn_cos(mid) > target:
            lo = mid
        else:
            hi = mid
    noise = 0.5 * (lo + hi)
    return noise, target, nn_cos(noise)


def synthetic_globals(pool: np.ndarray, n: int, noise: float, seed: int = 0) -> np.ndarray:
    """``n`` synthetic distractor descriptors: ``L2(lam a + (1 - lam) b + noise * sd * eps)``.

    ``a``, ``b`` random rows of ``pool`` (real negatives), ``lam ~ U(0, 1)``, ``eps ~ N(0, I)``, ``sd`` the
    pool's per-dimension standard deviation. Generated in seeded chunks of SYNTH_CHUNK, so the first ``m`` of
    ``synthetic_globals(pool, n)`` equal ``synthetic_globals(pool, m)`` (nested sets).
    """
    pool = np.asarray(pool, np.float32)
    sd = pool.std(axis=0).astype(np.float32)
    parts = []
    for c in range(0, n, SYNTH_CHUNK):
        rng = np.random.default_rng([seed, c // SYNTH_CHUNK])
        a, b = rng.integers(len(pool), size=SYNTH_CHUNK), rng.integers(len(pool), size=SYNTH_CHUNK)
        lam = rng.uniform(0, 1, (SYNTH_CHUNK, 1)).astype(np.float32)
        parts.append(_mix(pool[a], pool[b], lam, sd, noise, rng)[: n - c])
    return np.concatenate(parts) if parts else np.zeros((0, pool.shape[1]), np.float32)


def synthetic_regions_chunk(rs: RegionSet, pool_images: np.ndarray, chunk: int, size: int, noise: float,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic images ``chunk*SYNTH_CHUNK ...`` (first ``size`` of the chunk): regions and image offsets.

    Each synthetic image copies the region layout of a random real negative image (its rows) and mixes each
    of those regions with a random region of the negative images, plus per-dimension noise. Returns ``X``
    (T, d) and the synthetic image index within the chunk (T,).
    """
    pos = np.searchsorted(rs.images, pool_images)
    ok = (pos < len(rs.images)) & (rs.images[np.minimum(pos, len(rs.images) - 1)] == pool_images)
    pos = pos[ok]
    ends = np.r_[rs.starts[1:], len(rs.X)]
    s0, cnt = rs.starts[pos], ends[pos] - rs.starts[pos]
    pool_rows = np.concatenate([np.arange(a, a + c) for a, c in zip(s0, cnt)])
    sd = rs.X[pool_rows].std(axis=0).astype(np.float32)
    rng = np.random.default_rng([seed, 1_000_003, chunk])
    donor = rng.integers(len(pos), size=SYNTH_CHUNK)   # the whole chunk is drawn, then cut: nested sets
    lam = rng.uniform(0, 1, SYNTH_CHUNK).astype(np.float32)
    c = cnt[donor]
    img = np.repeat(np.arange(SYNTH_CHUNK), c)
    rows = np.repeat(s0[donor], c) + (np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c))
    partner = pool_rows[rng.integers(len(pool_rows), size=len(rows))]
    eps = rng.standard_normal((len(rows), rs.X.shape[1]), dtype=np.float32)
    n = int(np.searchsorted(img, size))
    lam_r = lam[img[:n]][:, None]
    X = _l2n(lam_r * rs.X[rows[:n]] + (1.0 - lam_r) * rs.X[partner[:n]] + noise * sd * eps[:n])
    return X, img[:n]


__all__ = ["negative_pool", "calibrate_noise", "synthetic_globals", "synthetic_regions_chunk", "SYNTH_CHUNK"]
