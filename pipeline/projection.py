"""Learned R-MAC projection trained with a triplet ranking loss (seed 003 §3.1, ALGORITHMS.md §1).

Seed 003 implements the PCA-whitening of the regional MACs as "a shifting and a fully connected (FC)
layer" and learns it (with the convolutions) by a ranking loss on image triplets,
``L(q, d+, d-) = 0.5 * max(0, m + ||q - d+||^2 - ||q - d-||^2)`` with ``m = 0.1`` (§5.1). Here the backbone is
frozen: training runs on *stored* regional MACs, so only the shift and the FC layer learn (CPU minutes).

* :class:`LearnedProjection` — ``project(x) = l2n((l2n(x) + shift) @ weight)``. Initialised by
  :meth:`LearnedProjection.from_whitening` with ``shift = -mean`` and ``weight = projection``, which is
  *exactly* ``Whitening.apply`` (same operations in the same order, so the same float32 bits). Its arrays
  use the keys of :class:`pipeline.whitening.Whitening` (``mean = -shift``, ``projection = weight``): a
  learned projection is stored and applied as an ordinary whitening (``whiten.kind: learned``).
* R-MAC aggregation (seed 003 §3.1): ``L2( sum_R project(m_A(R)) )`` per image.
* :func:`mine_hard_negatives` — seed 003 §5.1: compute the descriptors of all images, the losses of all
  triplets ``(q, p, n)`` for the known positive pairs, and keep the ones with the largest loss. Re-mined once
  per epoch (the seed re-mines every 16 updates of 64 triplets; on a small stored collection an epoch is a
  few such rounds, and mining costs one forward pass of the collection).
* :func:`train_projection` — deterministic SGD (single thread, seeded shuffles, no other randomness: the
  initialisation is the whitening), stepping in the whitening's own coordinates (:class:`WhitenedTrainable`;
  why is in its docstring). The loop body is :func:`run_epoch`, shared with the Ray Train worker
  (``actors.train``), so a plain call and a 1-worker ``TorchTrainer`` give bit-identical weights.

Negatives without labels: the positive pairs come from pair mining (``pipeline.pair_mining``); their
connected components play the role of seed 003's landmark classes (as the 3D models of Radenović et al.),
so a negative of ``q`` is any image outside ``q``'s component. The mined hard-negative pairs (similar but
unverified) are therefore already candidates; an unverified pair inside one component is *not* used as a
negative, because transitivity of verified matches is stronger evidence than one failed verification.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from torch import nn

from pipeline.determinism import single_threaded_torch
from pipeline.pooling import l2n
from pipeline.whitening import Whitening

# seed 003 §5.1: "with margin m = 0.1"; "SGD with momentum, with a learning rate of 10^-3 and weight decay of
# 5 * 10^-5"; gradients of n = 64 triplets accumulated per update.
SEED003_MARGIN = 0.1
SEED003_LR = 1e-3
SEED003_WEIGHT_DECAY = 5e-5
SEED003_TRIPLETS_PER_UPDATE = 64
_CHUNK = 65536


@dataclass(frozen=True)
class ProjectionConfig:
    """Parameters of the triplet training of the shift + FC layer (defaults from seed 003 §5.1).

    ``lr`` applies to the *sum* of the batch's triplet losses, as the seed accumulates the gradients of its
    64 triplets before each update (so ``lr = 1e-3`` is the seed's step), taken in the whitened
    coordinates of the initial whitening (see :func:`train_projection`). ``momentum`` is not given in the
    seed; 0.9 is the usual value. ``negatives_per_pair``: hardest negatives kept per (query, positive)
    pair at each mining. ``semi_hard``: keep only negatives farther than the positive (FaceNet's
    semi-hard triplets; off by default: the seed keeps the largest losses). ``learn_shift``: also learn
    the shift (off by default, see :func:`train_projection`). ``dim``: output width; ``None`` keeps the
    initial whitening's, a smaller value starts from its leading columns (principal axes) while the
    training can still use every direction the initial whitening spans. ``mine_chunk``: query rows per
    block of the mining similarity matrix (bounds memory at ``mine_chunk x N`` floats).
    """

    dim: int | None = None
    margin: float = SEED003_MARGIN
    lr: float = SEED003_LR
    momentum: float = 0.9
    weight_decay: float = SEED003_WEIGHT_DECAY
    epochs: int = 10
    batch_size: int = SEED003_TRIPLETS_PER_UPDATE
    negatives_per_pair: int = 5
    semi_hard: bool = False
    learn_shift: bool = False
    seed: int = 0
    mine_chunk: int = 4096

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for checkpoints and Ray configs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ProjectionConfig":
        return cls(**dict(d))


@dataclass(eq=False)
class TripletData:
    """Stored regional MACs of ``N`` images and what is known about which images match.

    ``regions`` (R, D) raw regional MACs (L2-normalised inside the model); ``offsets`` (N+1,) int64: image
    ``i`` owns ``regions[offsets[i]:offsets[i+1]]`` (at least one region each); ``positives`` (P, 2) int64
    image pairs that match (either order; used in both directions); ``groups`` (N,) optional: images of one
    group are never negatives of each other (default: connected components of ``positives``).
    """

    regions: np.ndarray
    offsets: np.ndarray
    positives: np.ndarray
    groups: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.regions = np.ascontiguousarray(self.regions, dtype=np.float32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1)
        self.positives = np.asarray(self.positives, dtype=np.int64).reshape(-1, 2)
        n = self.n_images
        if self.offsets[0] != 0 or self.offsets[-1] != self.regions.shape[0] or np.any(np.diff(self.offsets) < 1):
            raise ValueError("offsets must start at 0, end at len(regions) and give every image >= 1 region")
        if self.positives.size and (self.positives.min() < 0 or self.positives.max() >= n):
            raise ValueError("positive pair ids out of range")
        if self.groups is None:
            self.groups = positive_components(self.positives, n)
        self.groups = np.asarray(self.groups, dtype=np.int64).reshape(-1)
        if self.groups.shape[0] != n:
            raise ValueError("groups must have one label per image")

    @property
    def n_images(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def directed_pairs(self) -> np.ndarray:
        """(P', 2) unique (query, positive) pairs in both directions, self pairs dropped, sorted."""
        p = self.positives
        both = np.concatenate([p, p[:, ::-1]])
        both = both[both[:, 0] != both[:, 1]]
        return np.unique(both, axis=0) if both.size else both.reshape(0, 2)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(regions, segment id per region, offsets) as CPU tensors, built once."""
        if "t" not in self._cache:
            lengths = np.diff(self.offsets)
            seg = np.repeat(np.arange(self.n_images, dtype=np.int64), lengths)
            # copy only read-only arrays (object store, memory maps): torch needs writable memory
            regions = self.regions if self.regions.flags.writeable else self.regions.copy()
            self._cache["t"] = (torch.from_numpy(regions), torch.from_numpy(seg),
                                torch.from_numpy(self.offsets.copy()))
        return self._cache["t"]


def positive_components(positives: np.ndarray, n_images: int) -> np.ndarray:
    """Connected-component label of every image in the graph of positive pairs (singletons get their own)."""
    p = np.asarray(positives, dtype=np.int64).reshape(-1, 2)
    A = sp.coo_matrix((np.ones(p.shape[0]), (p[:, 0], p[:, 1])), shape=(n_images, n_images))
    return connected_components(A, directed=False)[1].astype(np.int64)


class LearnedProjection(nn.Module):
    """Seed 003's "PCA" layers: shift ``(D,)`` + fully connected ``(D, d)`` on L2-normalised regional MACs."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(in_dim))
        self.weight = nn.Parameter(torch.zeros(in_dim, out_dim))

    @property
    def in_dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def from_whitening(cls, mean: np.ndarray, projection: np.ndarray, dim: int | None = None) -> "LearnedProjection":
        """Initialise so that :meth:`project` equals ``Whitening(mean, projection).apply`` (first ``dim`` columns)."""
        mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        projection = np.asarray(projection, dtype=np.float32)
        dim = projection.shape[1] if dim is None else int(dim)
        if not 0 < dim <= projection.shape[1]:
            raise ValueError(f"dim must be in 1..{projection.shape[1]}")
        m = cls(projection.shape[0], dim)
        with torch.no_grad():
            m.shift.copy_(torch.tensor(-mean))  # copies: the arrays may be read-only (object store, mmap)
            m.weight.copy_(torch.tensor(projection[:, :dim]))
        return m

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``l2n((l2n(x) + shift) @ weight)``: the whitening ``w(.)`` of each regional MAC, (R, D) -> (R, d)."""
        return l2n((l2n(x) + self.shift) @ self.weight)

    def forward(self, regions: torch.Tensor, segments: torch.Tensor, n_images: int) -> torch.Tensor:
        """R-MAC of ``n_images`` images: ``l2n(sum over each image's regions of project(region))`` -> (n, d).

        ``segments`` (R,) int64 gives the image (0..n_images-1) of each row of ``regions``.
        """
        v = self.project(regions)
        return l2n(v.new_zeros((n_images, v.shape[1])).index_add_(0, segments, v))

    @torch.no_grad()
    def describe(self, data: TripletData) -> torch.Tensor:
        """R-MAC descriptors of every image of ``data`` (N, d), without gradients."""
        regions, seg, _ = data.tensors()
        return self(regions, seg, data.n_images)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"mean", "projection"}`` float32: the keys (and semantics) of ``Whitening.to_arrays``."""
        return {"mean": (-self.shift.detach()).cpu().numpy().astype(np.float32),
                "projection": self.weight.detach().cpu().numpy().astype(np.float32)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "LearnedProjection":
        """Inverse of :meth:`to_arrays` (also accepts ``Whitening.to_arrays()``)."""
        return cls.from_whitening(arrays["mean"], arrays["projection"])

    def to_whitening(self) -> Whitening:
        """The trained layer as a :class:`pipeline.whitening.Whitening` (same ``apply``)."""
        return Whitening.from_arrays(self.to_arrays())


def triplet_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = SEED003_MARGIN) -> torch.Tensor:
    """Seed 003 eq. (1) per triplet: ``0.5 * max(0, m + ||q - p||^2 - ||q - n||^2)``; rows of (T, d) -> (T,)."""
    return 0.5 * torch.clamp(margin + (q - p).pow(2).sum(-1) - (q - n).pow(2).sum(-1), min=0.0)


@torch.no_grad()
def mine_hard_negatives(desc: torch.Tensor, pairs: np.ndarray, groups: np.ndarray, margin: float,
                        per_pair: int, chunk: int = 4096, semi_hard: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The hardest negatives of every (query, positive) pair under the current descriptors.

    ``desc`` (N, d) L2-normalised; ``pairs`` (P, 2) directed (query, positive); ``groups`` (N,): a negative
    of ``q`` is any image of another group. For each pair, the loss of ``(q, p, n)`` is computed for every
    candidate ``n`` (``||a - b||^2 = 2 - 2 a.b`` for unit vectors), and the ``per_pair`` largest *non-zero*
    ones are kept (ties broken by the lower image index, so mining is deterministic). Returns
    ``(triplets (T, 3) int64, losses (T,) float32)`` ordered by pair then decreasing loss.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    N = desc.shape[0]
    k = int(min(per_pair, N))
    if pairs.shape[0] == 0 or k == 0:
        return np.zeros((0, 3), np.int64), np.zeros(0, np.float32)
    dev = desc.device
    g = torch.from_numpy(np.asarray(groups, dtype=np.int64)).to(dev)
    out_t, out_l = [], []
    for start in range(0, pairs.shape[0], chunk):
        pr = torch.from_numpy(pairs[start:start + chunk]).to(dev)
        q, p = desc[pr[:, 0]], desc[pr[:, 1]]
        d_qp = (2.0 - 2.0 * (q * p).sum(-1))[:, None]           # (B, 1)
        d_qn = 2.0 - 2.0 * q @ desc.T                            # (B, N)
        loss = 0.5 * torch.clamp(margin + d_qp - d_qn, min=0.0)
        valid = g[None, :] != g[pr[:, 0]][:, None]
        if semi_hard:
            valid &= d_qn > d_qp
        loss = torch.where(valid, loss, torch.full_like(loss, -1.0))
        # stable descending sort: equal losses keep the lower image index first
        top_l, top_i = torch.sort(loss, dim=1, descending=True, stable=True)
        top_l, top_i = top_l[:, :k], top_i[:, :k]
        keep = top_l > 0
        rows = torch.arange(pr.shape[0], device=dev)[:, None].expand_as(top_i)[keep]
        out_t.append(torch.stack([pr[rows, 0], pr[rows, 1], top_i[keep]], dim=1))
        out_l.append(top_l[keep])
    return torch.cat(out_t).cpu().numpy(), torch.cat(out_l).cpu().numpy().astype(np.float32)


class WhitenedTrainable(nn.Module):
    """The shift + FC layer in the coordinates of its initial whitening, as it is trained.

    With the initial whitening ``(mu, P)`` fixed, ``W = P @ A`` and ``shift = -mu + s`` with ``s @ W = b``:
    ``(l2n(x) + shift) @ W = z @ A + b`` where ``z = (l2n(x) - mu) @ P`` are the whitened coordinates
    (computed once for every stored region). ``A`` (r, d) starts as the identity's first ``d`` columns and
    ``b`` (d,) at 0, i.e. at the whitening itself. Same model family as seed 003's shift + FC; only the
    coordinates the optimiser steps in differ (see ``train_projection`` for why).
    """

    def __init__(self, r: int, d: int, learn_shift: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.eye(r, d))
        self.b = nn.Parameter(torch.zeros(d), requires_grad=learn_shift)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return l2n(z @ self.A + self.b)

    def forward(self, z: torch.Tensor, segments: torch.Tensor, n_images: int) -> torch.Tensor:
        """R-MAC ``l2n(sum_R l2n(z_R A + b))`` of ``n_images`` images from whitened regions ``z`` (R, r)."""
        v = self.project(z)
        return l2n(v.new_zeros((n_images, v.shape[1])).index_add_(0, segments, v))

    def to_arrays(self, mean: np.ndarray, projection: np.ndarray) -> dict[str, np.ndarray]:
        """Back to shift + FC arrays (``mean``, ``projection``) given the initial whitening ``(mu, P)``."""
        P = np.asarray(projection, dtype=np.float32)
        A = self.A.detach().cpu()
        W = (torch.from_numpy(np.ascontiguousarray(P)) @ A).numpy()
        mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        b = self.b.detach().cpu().numpy().astype(np.float64)
        if np.any(b != 0):
            # minimum-norm s with s @ W = b (exact when W has full column rank, as P and A have)
            s = np.linalg.lstsq(W.astype(np.float64).T, b, rcond=None)[0]
            mean = (mean.astype(np.float64) - s).astype(np.float32)
        return {"mean": mean.copy(), "projection": np.ascontiguousarray(W, dtype=np.float32)}


class Prepared:
    """Training inputs as tensors: whitened regions ``z`` (R, r), offsets, directed positive pairs, groups."""

    def __init__(self, data: TripletData, mean: np.ndarray, projection: np.ndarray,
                 device: torch.device | str = "cpu") -> None:
        w = LearnedProjection.from_whitening(mean, projection)
        regions, segments, offsets = data.tensors()
        with torch.no_grad():  # by row blocks: no (R, D) temporary for a large collection
            self.z = torch.cat([(l2n(regions[i:i + _CHUNK]) + w.shift) @ w.weight
                                for i in range(0, regions.shape[0], _CHUNK)]).to(device)
        self.segments, self.offsets = segments.to(device), offsets.to(device)
        self.n_images = data.n_images
        self.pairs = data.directed_pairs()
        self.groups = data.groups

    def batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whitened regions of ``images`` (U,) concatenated, and the local segment id (0..U-1) of each."""
        starts, ends = self.offsets[images], self.offsets[images + 1]
        lengths = ends - starts
        dev = self.z.device
        seg = torch.repeat_interleave(torch.arange(images.shape[0], device=dev), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        idx = starts[seg] + torch.arange(int(lengths.sum()), device=dev) - first[seg]
        return self.z[idx], seg


def batch_loss(model: nn.Module, prep: Prepared, triplets: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum of the triplet losses of ``triplets`` (T, 3), each image described once per batch."""
    if triplets.shape[0] == 0:  # keeps every parameter in the graph (DDP needs a backward on each rank)
        return sum((p.sum() * 0.0 for p in model.parameters()), torch.zeros((), device=prep.z.device))
    images, inv = torch.unique(triplets.reshape(-1).to(prep.z.device), return_inverse=True)
    z, seg = prep.batch(images)
    desc = model(z, seg, int(images.shape[0]))
    inv = inv.reshape(-1, 3)
    return triplet_loss(desc[inv[:, 0]], desc[inv[:, 1]], desc[inv[:, 2]], margin).sum()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _mean_similarity(desc: torch.Tensor, limit: int = 2048) -> float:
    """Mean pairwise cosine of (up to ``limit``) descriptors: near 1 flags a collapsed embedding."""
    d = desc[:limit]
    return float((d @ d.T).mean())


def run_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, prep: Prepared, config: ProjectionConfig,
              epoch: int, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """One epoch: re-mine hard triplets with the current weights, shuffle them, SGD over batches.

    ``model`` may be wrapped (DDP): mining uses the bare module, updates go through the wrapper. Every rank
    mines the same triplets (same weights, deterministic) and takes the ``rank::world_size`` share of each
    batch; DDP averages the shares' gradients, so one update is ``1/world_size`` of the single-process one
    (identical for 1 worker; with N workers scale ``lr`` by N).
    """
    core = _unwrap(model)
    with torch.no_grad():
        desc = core(prep.z, prep.segments, prep.n_images)
    triplets, losses = mine_hard_negatives(desc, prep.pairs, prep.groups, config.margin,
                                           config.negatives_per_pair, config.mine_chunk, config.semi_hard)
    gen = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + int(epoch))
    t = torch.from_numpy(triplets)[torch.randperm(triplets.shape[0], generator=gen)]
    total, n_batches = 0.0, 0
    for start in range(0, t.shape[0], config.batch_size):
        shard = t[start:start + config.batch_size][rank::world_size]
        optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(model, prep, shard, config.margin)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        n_batches += 1
    return {"epoch": float(epoch), "triplets": float(triplets.shape[0]),
            "mined_loss_mean": float(losses.mean()) if losses.size else 0.0,
            "train_loss_sum": total, "batches": float(n_batches),
            "mean_similarity": _mean_similarity(desc)}


def make_optimizer(model: nn.Module, config: ProjectionConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (seed 003 §5.1) over the trainable parameters."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                           momentum=config.momentum, weight_decay=config.weight_decay)


EpochCallback = Callable[[int, dict, dict], None]


def train_projection(config: ProjectionConfig, data: TripletData, init: Mapping[str, np.ndarray],
                     seed: int | None = None, epoch_callback: EpochCallback | None = None,
                     prepare_model: Callable[[nn.Module], nn.Module] | None = None,
                     rank: int = 0, world_size: int = 1,
                     device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Train the shift + FC layer from ``init`` (``Whitening.to_arrays()``: ``mean``, ``projection``).

    Deterministic: single-threaded torch, shuffles from ``seed`` (default ``config.seed``), no other
    randomness. ``epoch_callback(epoch, stats, arrays)`` runs after every epoch (the Ray worker reports and
    checkpoints there). ``prepare_model`` wraps the module (``ray.train.torch.prepare_model``); ``rank`` and
    ``world_size`` split each batch between data-parallel workers; ``device`` holds the whitened regions
    and the model (bit-reproducible on CPU only: CUDA's ``index_add_`` uses atomics). Returns shift + FC arrays
    with the keys of ``Whitening.to_arrays`` (``epochs = 0`` returns ``init`` truncated to ``dim``, bit for bit).

    Departure from seed 003: SGD steps in the whitened coordinates of ``init`` (``W = P A``, see
    :class:`WhitenedTrainable`) rather than on ``W`` itself. A PCA-whitening's entries scale like
    ``lambda^-1/2`` (large for conv features), so a plain step on ``W`` moves it by ``~lr / |W|^2`` relative
    to its size and nothing learns at the seed's ``lr``, while the raw shift's gradient is amplified by
    ``|W|`` and it runs away: every descriptor turns towards the shift and the loss sits at ``m / 2``
    (observed on planted data: mean pairwise cosine -> 1.0). In whitened coordinates a step is scale-free.
    ``learn_shift=False`` (the default) also freezes the shift at ``-mean``: even in whitened coordinates
    it is the one parameter that can make all descriptors alike, while the FC alone maps centred
    regional vectors and cannot.
    """
    if seed is not None and seed != config.seed:
        config = ProjectionConfig(**{**config.to_dict(), "seed": int(seed)})
    mean = np.asarray(init["mean"], dtype=np.float32)
    projection = np.asarray(init["projection"], dtype=np.float32)
    r = projection.shape[1]
    d = r if config.dim is None else int(config.dim)
    if not 0 < d <= r:
        raise ValueError(f"dim must be in 1..{r} (the width of the initial whitening)")
    with single_threaded_torch():
        prep = Prepared(data, mean, projection, device)
        core = WhitenedTrainable(r, d, config.learn_shift).to(device)
        model = prepare_model(core) if prepare_model is not None else core
        optimizer = make_optimizer(model, config)
        for epoch in range(config.epochs):
            stats = run_epoch(model, optimizer, prep, config, epoch, rank, world_size)
            if epoch_callback is not None:
                epoch_callback(epoch, stats, _unwrap(model).to_arrays(mean, projection))
        return _unwrap(model).to_arrays(mean, projection)


def triplet_accuracy(desc: torch.Tensor | np.ndarray, data: TripletData) -> float:
    """Share of (query, positive, negative) triplets with ``q.p > q.n`` over all directed positive pairs and
    all negatives (images of another group): 1.0 when every positive outranks every negative."""
    d = torch.as_tensor(np.asarray(desc, dtype=np.float32))
    pairs = data.directed_pairs()
    if pairs.shape[0] == 0:
        return math.nan
    g = torch.from_numpy(data.groups)
    q = d[pairs[:, 0]]
    s_qp = (q * d[pairs[:, 1]]).sum(-1, keepdim=True)
    s_qn = q @ d.T
    valid = g[None, :] != g[torch.from_numpy(pairs[:, 0])][:, None]
    wins = ((s_qp > s_qn) & valid).sum()
    return float(wins) / max(int(valid.sum()), 1)
