"""Learned query-region scoring, diverse top-k patch selection and patch voting (seed 000 §3.2, §4.2; ALGORITHMS.md §9).

* Labels (§3.2): a training patch ``q`` retrieves the images of a labelled corpus ranked by
  ``sim_patch_img(q, im) = max_{r in regions(im)} sim(q, r)``; its label is ``DCG@10 = rel_1 + sum_{i=2..10}
  rel_i / log2(i)`` with ``rel = 0`` for a wrong image and ``0.95 + 0.05 * sim_patch_img`` for a correct one
  (:func:`patch_labels`).
* Regressor (§3.2): a linear L2-regularised, L2-loss support-vector regressor (LIBLINEAR's ``-s 11``, here
  ``sklearn.svm.LinearSVR(loss="squared_epsilon_insensitive")``, which wraps LIBLINEAR) from patch features to
  the label; ``C`` chosen by cross-validation grouped by source photo (:class:`RegionScorer`).
* Selection (§4.2): the ``k = 5`` patches chosen greedily for ``sum_i psi(r_i) + lambda max_{j != i} sim(r_i, r_j)``
  (:func:`greedy_diverse_topk`); ``lambda`` grid-searched over ``-5 .. 5`` step 0.2 on out-of-fold unaries
  (:func:`select_lambda`; the paper learned ``-0.4``).
* Voting (§4.2): database image score ``sim_img(q, im) + sum_{chosen p} sim_patch_img(p, im)``
  (:func:`patch_vote_scores`).

Departure: the paper does not say how ``C`` was chosen; we minimise the out-of-fold squared error of
grouped K-fold CV (groups = source photos, so near-identical patches of one photo never sit on both sides of
a fold, which would reward over-fitting). Features are standardised (zero mean, unit variance on the
training set) before the SVR; the paper's fc7 features need no scaling but ours mix a descriptor with
geometry and saliency columns of other ranges.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
# scikit-learn (about a second to import) is imported inside the two training functions that use it: the query side
# imports this module only to score patches with a fitted RegionScorer

from pipeline.evaluation import compute_map

DCG_K = 10  # seed 000 §3.2: DCG at position 10
REL_BASE, REL_SIM = 0.95, 0.05  # relevance of a correct image: 0.95 + 0.05 * sim
TOP_K_PATCHES = 5  # §4.2: five patches ("more gave better performance, but was slower")
LAMBDA_GRID = tuple(np.round(np.arange(-5.0, 5.0 + 1e-9, 0.2), 10))  # §4.2: -5 .. 5 step 0.2
_SIM_CHUNK_ELEMS = 1 << 24  # bound on the (patches x regions) similarity block, ~64 MB float32


# ----------------------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------------------
def dcg_at_k(relevances: np.ndarray, k: int = DCG_K) -> np.ndarray:
    """``rel_1 + sum_{i=2..k} rel_i / log2(i)`` over the last axis of ranked relevances (shorter lists: zeros)."""
    r = np.asarray(relevances, dtype=np.float64)[..., :k]
    n = r.shape[-1]
    disc = np.ones(n)
    disc[1:] = 1.0 / np.log2(np.arange(2, n + 1))
    return r @ disc


def sim_patch_img(patch_desc: np.ndarray, db_region_desc: np.ndarray, db_region_image: np.ndarray,
                  n_images: int | None = None) -> np.ndarray:
    """``max_{r in im} <q, r>`` for every patch ``q`` and database image ``im``: (P, n_images) float32.

    ``db_region_image`` (R,) maps each region row to its image id in ``0 .. n_images-1``; images without
    regions get ``-inf``. Computed in patch chunks with one ``maximum.reduceat`` over region rows grouped by
    image, so memory stays at one (chunk, R) block; rows already sorted by image are used in place (no copy of
    a large, e.g. Ray object-store, region matrix).
    """
    Q = np.asarray(patch_desc, dtype=np.float32)
    V = np.asarray(db_region_desc, dtype=np.float32)
    img = np.asarray(db_region_image, dtype=np.int64)
    n_images = int(img.max()) + 1 if n_images is None else int(n_images)
    out = np.full((Q.shape[0], n_images), -np.inf, np.float32)
    if V.shape[0] == 0 or Q.shape[0] == 0:
        return out
    if np.all(img[1:] >= img[:-1]):  # already grouped by image (as region tables are): no copy of V
        Vs, imgs = V, img
    else:
        order = np.argsort(img, kind="stable")
        Vs, imgs = V[order], img[order]
    starts = np.flatnonzero(np.r_[True, imgs[1:] != imgs[:-1]])
    present = imgs[starts]
    step = max(1, _SIM_CHUNK_ELEMS // V.shape[0])
    for s in range(0, Q.shape[0], step):
        S = Q[s:s + step] @ Vs.T
        out[s:s + step, present] = np.maximum.reduceat(S, starts, axis=1)
    return out


def patch_labels(patch_desc: np.ndarray, db_region_desc: np.ndarray, db_region_image: np.ndarray,
                 positives: Sequence[int] | np.ndarray, junk: Sequence[int] | np.ndarray = (), k: int = DCG_K,
                 n_images: int | None = None) -> np.ndarray:
    """DCG@k usefulness label of each patch of one training image (seed 000 §3.2) -> (P,) float64.

    ``positives``: database image ids of the same place as the patch's source photo; ``junk``: ids removed
    from the ranking before DCG (pass the source photo itself here when it is in the corpus, otherwise every
    patch trivially retrieves its own photo first). Ranking is by ``sim_patch_img`` descending, ties by image
    id; images with no region are not ranked.
    """
    return labels_from_similarities(sim_patch_img(patch_desc, db_region_desc, db_region_image, n_images), positives,
                                    junk, k)


def labels_from_similarities(patch_img: np.ndarray, positives: Sequence[int] | np.ndarray,
                             junk: Sequence[int] | np.ndarray = (), k: int = DCG_K) -> np.ndarray:
    """:func:`patch_labels` from already computed ``sim_patch_img`` rows (P, n_images) -> (P,) float64."""
    spi = np.array(patch_img, dtype=np.float64)  # a copy: junk is masked in place
    n_img = spi.shape[1]
    junk = np.asarray(junk, dtype=np.int64).ravel()
    spi[:, junk[(junk >= 0) & (junk < n_img)]] = -np.inf
    is_pos = np.zeros(n_img, bool)
    pos = np.asarray(positives, dtype=np.int64).ravel()
    is_pos[pos[(pos >= 0) & (pos < n_img)]] = True
    kk = min(k, n_img)
    # top-k by (-sim, id): argsort of -sim is stable, so equal similarities keep ascending image ids
    top = np.argsort(-spi, axis=1, kind="stable")[:, :kk]
    s = np.take_along_axis(spi, top, 1)
    rel = np.where(is_pos[top] & np.isfinite(s), REL_BASE + REL_SIM * np.where(np.isfinite(s), s, 0.0), 0.0)
    return dcg_at_k(rel, k)


# ----------------------------------------------------------------------------------------------------------
# retrieval-profile features
# ----------------------------------------------------------------------------------------------------------
PROFILE_K = DCG_K  # the label looks at a patch's first 10 images; so do its profile features
PROFILE_NAMES = ("profile_top1", "profile_gap2", "profile_gap10", "profile_mean10", "profile_vs_full",
                 "profile_full_agree")


def retrieval_profile(patch_top: np.ndarray, full_top: float, full_at_best: np.ndarray) -> np.ndarray:
    """Features of how each patch retrieves (P, 6), columns :data:`PROFILE_NAMES`.

    Departure from seed 000, which scores a patch from its appearance alone: score-based query-performance
    predictors (the shape of a query's top scores, e.g. NQC, Shtok et al., TOIS 2012) say whether a search
    found one strong match or a flat list of weak ones, which is what DCG@10 of the patch's own search measures.
    A painting patch matches one image far better than the rest; a patch of wall, frame or visitor matches
    many images about equally. These columns mean the same on a crop and on a cluttered photo, where the
    appearance columns do not (measured in the README: the scorer's CV error falls from 0.59 to 0.51).

    ``patch_top`` (P, K): each patch's K best ``sim_patch_img`` values, descending (-inf pads a short list);
    ``full_top``: the full query image's best image score; ``full_at_best`` (P,): the full query image's score
    of each patch's best image. Columns: the best score, its gaps to the 2nd and K-th, the mean of the K (pads
    count as the lowest listed score), the best score minus the full image's, and the full image's score of the
    patch's best image minus its own best (0 when the full image ranks that image first).
    """
    top = np.asarray(patch_top, np.float64)
    if top.ndim != 2 or top.shape[1] < 2:
        raise ValueError(f"patch_top must be (P, K >= 2), got {top.shape}")
    finite = np.isfinite(top)
    low = np.where(finite, top, np.inf).min(axis=1, keepdims=True)
    top = np.where(finite, top, np.where(np.isfinite(low), low, 0.0))
    full_top = float(full_top)
    agree = np.asarray(full_at_best, np.float64).reshape(-1) - full_top
    return np.stack([top[:, 0], top[:, 0] - top[:, 1], top[:, 0] - top[:, -1], top.mean(axis=1),
                     top[:, 0] - full_top, np.where(np.isfinite(agree), agree, 0.0)], axis=1)


def retrieval_profile_dense(patch_img: np.ndarray, full_img: np.ndarray, k: int = PROFILE_K) -> np.ndarray:
    """:func:`retrieval_profile` from dense scores: ``patch_img`` (P, n_images) ``sim_patch_img`` of every patch,
    ``full_img`` (n_images,) that of the full query image (images without items: -inf)."""
    S = np.asarray(patch_img, np.float64)
    full = np.asarray(full_img, np.float64).reshape(-1)
    kk = min(int(k), S.shape[1])
    part = np.partition(S, S.shape[1] - kk, axis=1)[:, S.shape[1] - kk:] if kk else S[:, :0]
    top = -np.sort(-part, axis=1)
    best = np.argmax(S, axis=1)
    return retrieval_profile(top, float(full.max()), full[best])


def split_by_photo(photo_ids: Sequence[Any] | np.ndarray, test_fraction: float = 0.2,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) with every source photo wholly on one side.

    Photos (not rows) are shuffled with ``seed`` and the first ``round(test_fraction * n_photos)`` (at least
    one when there are two or more photos) go to the test side. Patches of one photo overlap heavily, so a
    row-level split would leak near-duplicates into the test set.
    """
    ids = np.asarray(photo_ids)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    uniq, inv = np.unique(ids, return_inverse=True)
    n = len(uniq)
    n_test = 0 if n < 2 else min(n - 1, max(1, int(round(test_fraction * n))))
    test_photo = np.zeros(n, bool)
    test_photo[np.random.default_rng(seed).permutation(n)[:n_test]] = True
    is_test = test_photo[inv.reshape(-1)]
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


# ----------------------------------------------------------------------------------------------------------
# regressor
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScorerConfig:
    """Linear SVR settings. ``Cs``: the regulariser grid (log-spaced, chosen by grouped CV); ``n_folds = 10`` as
    the paper's cross-validated unaries (§4.1, §4.2); ``epsilon = 0.1`` LIBLINEAR's default ``-p`` for SVR
    (the implementation the paper used); ``tol``/``max_iter`` tightened from sklearn's defaults so the primal
    solver converges on standardised features."""

    Cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    n_folds: int = 10
    epsilon: float = 0.1
    tol: float = 1e-5
    max_iter: int = 20000


def _fit_linear_svr(X: np.ndarray, y: np.ndarray, C: float, cfg: ScorerConfig) -> tuple[np.ndarray, ...]:
    """(x_mean, x_scale, coef, intercept) of an L2-loss linear SVR on standardised X and centred y.

    Centring y keeps LIBLINEAR's regularised intercept (it penalises the bias like a weight) near zero, so the
    fit is close to one with a free intercept.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    mean = X.mean(0)
    scale = X.std(0)
    scale[scale < 1e-12] = 1.0
    y_mean = float(y.mean())
    from sklearn.svm import LinearSVR

    svr = LinearSVR(C=C, epsilon=cfg.epsilon, loss="squared_epsilon_insensitive", fit_intercept=True,
                    dual=X.shape[0] < X.shape[1], tol=cfg.tol, max_iter=cfg.max_iter, random_state=0)
    svr.fit((X - mean) / scale, y - y_mean)
    return mean, scale, np.asarray(svr.coef_, np.float64), y_mean + float(np.ravel(svr.intercept_)[0])


def _predict(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    return ((np.asarray(X, dtype=np.float64) - mean) / scale) @ coef + intercept


def grouped_folds(groups: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) index pairs of group K-fold (``min(n_folds, n_groups)`` folds, each group in one fold)."""
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError("grouped cross-validation needs at least two groups (photos)")
    from sklearn.model_selection import GroupKFold

    kf = GroupKFold(n_splits=min(n_folds, n_groups))
    return list(kf.split(np.zeros((len(groups), 1)), groups=groups))


def out_of_fold_predictions(X: np.ndarray, y: np.ndarray, groups: np.ndarray, C: float,
                            cfg: ScorerConfig = ScorerConfig()) -> np.ndarray:
    """Grouped K-fold predictions: each row predicted by a model that never saw its photo (the unaries used to
    learn ``lambda``, seed 000 §4.2)."""
    oof = np.empty(len(y), np.float64)
    for tr, te in grouped_folds(groups, cfg.n_folds):
        oof[te] = _predict(X[te], *_fit_linear_svr(X[tr], y[tr], C, cfg))
    return oof


@dataclass(eq=False)
class RegionScorer:
    """A learned linear patch scorer ``psi(x) = ((x - x_mean) / x_scale) . coef + intercept`` (float64 arrays)."""

    coef: np.ndarray
    intercept: float
    x_mean: np.ndarray
    x_scale: np.ndarray
    C: float = float("nan")
    cv: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.coef = np.asarray(self.coef, np.float64).ravel()
        self.x_mean = np.asarray(self.x_mean, np.float64).ravel()
        self.x_scale = np.asarray(self.x_scale, np.float64).ravel()
        self.intercept = float(self.intercept)
        if not self.coef.shape == self.x_mean.shape == self.x_scale.shape:
            raise ValueError("coef, x_mean and x_scale must have the same length")

    @property
    def n_features(self) -> int:
        return int(self.coef.shape[0])

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
            cfg: ScorerConfig = ScorerConfig()) -> "RegionScorer":
        """Choose ``C`` from ``cfg.Cs`` by grouped K-fold CV (lowest out-of-fold MSE; ties: the smaller C), then
        refit on all rows. ``groups`` = source photo of each row. ``cv`` holds the curve
        (``Cs``, ``mse``) and the out-of-fold predictions ``oof`` at the chosen C."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64).ravel()
        groups = np.asarray(groups)
        if X.ndim != 2 or X.shape[0] != y.shape[0] or groups.shape[0] != y.shape[0]:
            raise ValueError("X (N, F), y (N,) and groups (N,) must agree")
        folds = grouped_folds(groups, cfg.n_folds)
        Cs = sorted(float(c) for c in cfg.Cs)
        mse, oofs = [], []
        for C in Cs:
            oof = np.empty(len(y))
            for tr, te in folds:
                oof[te] = _predict(X[te], *_fit_linear_svr(X[tr], y[tr], C, cfg))
            oofs.append(oof)
            mse.append(float(np.mean((oof - y) ** 2)))
        best = int(np.argmin(mse))  # first minimum = smallest C among ties (strongest regularisation)
        mean, scale, coef, intercept = _fit_linear_svr(X, y, Cs[best], cfg)
        return cls(coef=coef, intercept=intercept, x_mean=mean, x_scale=scale, C=Cs[best],
                   cv={"Cs": np.asarray(Cs), "mse": np.asarray(mse), "oof": oofs[best]})

    @classmethod
    def fit_fixed(cls, X: np.ndarray, y: np.ndarray, C: float, cfg: ScorerConfig = ScorerConfig()) -> "RegionScorer":
        """Fit at a given ``C`` (no cross-validation): one fold's model, or a refit at a known regulariser."""
        mean, scale, coef, intercept = _fit_linear_svr(np.asarray(X, np.float64), np.asarray(y, np.float64), C, cfg)
        return cls(coef=coef, intercept=intercept, x_mean=mean, x_scale=scale, C=float(C))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted DCG@10 ``psi`` of each row of ``X`` (N, F) -> (N,)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected (N, {self.n_features}) features, got {X.shape}")
        return _predict(X, self.x_mean, self.x_scale, self.coef, self.intercept)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickle): ``coef``, ``intercept`` (1,), ``x_mean``, ``x_scale``, ``C`` (1,)."""
        return {"coef": self.coef, "intercept": np.array([self.intercept]), "x_mean": self.x_mean,
                "x_scale": self.x_scale, "C": np.array([self.C])}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "RegionScorer":
        """Inverse of :meth:`to_arrays`."""
        return cls(coef=arrays["coef"], intercept=float(np.ravel(arrays["intercept"])[0]),
                   x_mean=arrays["x_mean"], x_scale=arrays["x_scale"],
                   C=float(np.ravel(arrays.get("C", [np.nan]))[0]))


# ----------------------------------------------------------------------------------------------------------
# diverse top-k selection
# ----------------------------------------------------------------------------------------------------------
def diversity_objective(selected: Sequence[int], scores: np.ndarray, sim: np.ndarray, lam: float) -> float:
    """Seed 000 §4.2's set objective ``F(S) = sum_{i in S} [psi(r_i) + lam * max_{j in S, j != i} sim(r_i, r_j)]``.

    The max over an empty set (``|S| = 1``) contributes 0: a lone patch has no neighbour to be similar to.
    """
    S = list(selected)
    total = float(np.sum(np.asarray(scores, np.float64)[S]))
    if len(S) > 1:
        sub = np.asarray(sim, np.float64)[np.ix_(S, S)].copy()
        np.fill_diagonal(sub, -np.inf)
        total += lam * float(sub.max(axis=1).sum())
    return total


def greedy_diverse_topk(scores: np.ndarray, sim: np.ndarray, k: int = TOP_K_PATCHES, lam: float = -0.4) -> np.ndarray:
    """Greedy maximisation of :func:`diversity_objective` (seed 000 §4.2): indices of ``min(k, P)`` patches in
    the order they were picked.

    Interpretation of the paper's "we optimize it greedily": start from the empty set and ``k`` times add the
    patch with the largest *exact marginal gain* of the set objective ``F(S + r) - F(S)``. That gain is the new
    patch's own term ``psi(r) + lam * max_{j in S} sim(r, r_j)`` **plus** the change of the terms already in
    ``S`` (a patch's max similarity can rise when ``r`` joins). So step 1 picks the best-scored patch, step 2 the
    ``r`` maximising ``psi(r) + lam (sim(r, r_1) + sim(r_1, r))`` (``2 lam sim`` for a symmetric ``sim``), and
    so on. Maximising ``F`` over ``k``-subsets is NP-hard (the paper says so) and greedy carries no optimality
    guarantee here, so the result is the greedy set, which need not be the best ``k``-subset; with ``lam = 0`` it
    is exactly the top-``k`` by score. Negative ``lam`` penalises near-duplicate patches. Ties go to the lowest
    index. ``sim`` (P, P): patch-patch cosine similarity
    (only off-diagonal entries are read; row ``i`` holds ``sim(r_i, .)``).
    """
    psi = np.asarray(scores, np.float64).ravel()
    P = psi.size
    Sm = np.asarray(sim, np.float64)
    if Sm.shape != (P, P):
        raise ValueError(f"sim must be ({P}, {P}), got {Sm.shape}")
    k = min(int(k), P)
    chosen: list[int] = []
    avail = np.ones(P, bool)
    cur_max = np.empty(0)  # current max_{j != i} sim of each chosen patch; -inf while it is alone
    for _ in range(k):
        if chosen:
            own = Sm[:, chosen].max(axis=1)  # max_{j in S} sim(r, r_j): the candidate's own term
            to_r = Sm[chosen, :].T  # (P, |S|): sim(r_i, r) for each chosen r_i, as candidate r varies
            # change of the chosen patches' terms: a lone patch goes from 0 to sim(r_i, r), the others
            # from m_i to max(m_i, sim(r_i, r))
            alone = ~np.isfinite(cur_max)
            base = np.where(alone, 0.0, cur_max)
            inc = np.where(alone[None, :], to_r, np.maximum(to_r, base[None, :]) - base[None, :])
            gain = psi + lam * (own + inc.sum(axis=1))
        else:
            gain = psi.copy()
        gain[~avail] = -np.inf
        r = int(np.argmax(gain))
        if chosen:
            cur_max = np.append(np.maximum(cur_max, Sm[chosen, r]), Sm[r, chosen].max())
        else:
            cur_max = np.array([-np.inf])
        chosen.append(r)
        avail[r] = False
    return np.asarray(chosen, dtype=np.int64)


def best_subset_bruteforce(scores: np.ndarray, sim: np.ndarray, k: int, lam: float) -> tuple[tuple[int, ...], float]:
    """Exhaustive maximiser of :func:`diversity_objective` over all ``k``-subsets (small P only; for tests and
    for measuring greedy's gap)."""
    best, best_val = (), -np.inf
    for S in combinations(range(len(scores)), k):
        v = diversity_objective(S, scores, sim, lam)
        if v > best_val + 1e-12:
            best, best_val = S, v
    return best, best_val


# ----------------------------------------------------------------------------------------------------------
# voting and lambda search
# ----------------------------------------------------------------------------------------------------------
def patch_vote_scores(sim_img: np.ndarray, sim_patch_img: np.ndarray, chosen: Sequence[int] | np.ndarray) -> np.ndarray:
    """Database image scores ``sim_img(q, im) + sum_{p in chosen} sim_patch_img(p, im)`` (seed 000 §4.2).

    ``sim_img`` (n_images,): the full query image as one more patch; ``sim_patch_img`` (P, n_images)."""
    chosen = np.asarray(chosen, dtype=np.int64).ravel()
    spi = np.asarray(sim_patch_img, np.float64)
    return np.asarray(sim_img, np.float64) + spi[chosen].sum(axis=0)


def dense_from_topk(scores: np.ndarray, ids: np.ndarray, n_images: int) -> np.ndarray:
    """Dense (P, n_images) ``sim_patch_img`` from per-patch top lists of image scores (``regional_search`` output).

    An image outside a patch's list gets that list's lowest score: an upper bound of its true
    ``sim_patch_img`` (it ranked below every listed image), so truncation never makes an unlisted image look
    worse than a listed one. Exact when the lists cover every image.
    """
    scores = np.asarray(scores, np.float64)
    ids = np.asarray(ids, np.int64)
    valid = (ids >= 0) & np.isfinite(scores)
    fill = np.where(valid.any(axis=1), np.where(valid, scores, np.inf).min(axis=1), 0.0)
    out = np.repeat(fill[:, None], n_images, axis=1)
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1]).reshape(ids.shape)
    out[rows[valid], ids[valid]] = scores[valid]
    return out


@dataclass
class LambdaQuery:
    """One training query for :func:`select_lambda`: out-of-fold unaries ``psi`` (P,), patch descriptors (P, d),
    ``sim_img`` (n_images,), ``sim_patch_img`` (P, n_images), positive and junk database ids."""

    psi: np.ndarray
    patch_desc: np.ndarray
    sim_img: np.ndarray
    sim_patch_img: np.ndarray
    positives: np.ndarray
    junk: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def select_lambda(queries: Sequence[LambdaQuery], lambdas: Sequence[float] = LAMBDA_GRID,
                  k: int = TOP_K_PATCHES) -> tuple[float, np.ndarray]:
    """Grid search of ``lambda`` maximising the mAP of top-``k`` patch voting on training queries (seed 000 §4.2).

    Returns ``(best lambda, curve (L, 2) of [lambda, mAP])``; ties go to the lambda closest to 0 (then the
    smaller). The unaries must be out-of-fold predictions (:func:`out_of_fold_predictions`), as in the paper,
    or lambda would be tuned to over-confident scores.
    """
    lambdas = np.asarray(list(lambdas), np.float64)
    gnd = [{"ok": np.asarray(q.positives, np.int64), "junk": np.asarray(q.junk, np.int64)} for q in queries]
    sims = [np.asarray(q.patch_desc, np.float64) @ np.asarray(q.patch_desc, np.float64).T for q in queries]
    maps = np.empty(len(lambdas))
    for li, lam in enumerate(lambdas):
        ranks = []
        for q, S in zip(queries, sims):
            chosen = greedy_diverse_topk(q.psi, S, k, float(lam))
            votes = patch_vote_scores(q.sim_img, q.sim_patch_img, chosen)
            ranks.append(np.argsort(-votes, kind="stable"))
        maps[li] = compute_map(ranks, gnd)[0]
    key = np.lexsort((lambdas, np.abs(lambdas), -np.round(maps, 12)))
    return float(lambdas[key[0]]), np.stack([lambdas, maps], axis=1)
