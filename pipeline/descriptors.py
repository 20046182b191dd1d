"""Final global descriptors of an image from its regional and raw global descriptors (the ``descriptors`` stage).

* ``rmac`` = ``L2( sum_R w(m_A(R)) )`` over the full-image and R-MAC grid regions (seed 003, ALGORITHMS.md §1);
* ``fs_egm`` / ``os_egm`` / ``os_egm4`` = ``w( sum_R L2(m_A(R)) )`` over the detected regions (seed 001 §3.9):
  the sums are computed at extraction time (``fs_egm_sum``, ``os_egm_sum``, ``os_egm4_sum``) and whitened here;
* MAC uses the regional whitening (same space as regional MACs); GAP/sum-pooled globals (GeM, SPoC, CroW, and
  ``cam_ofa_sum``: CAM class vectors summed, then whitened) live in other spaces and get their own whitening
  (``global-<method>``); ``cam_ofa`` / ``cam_ona`` were whitened class vector by class vector at extraction, in
  seed 004's order, and are only L2-normalised here.

The same function serves the database (per shard) and queries, so both sides are encoded identically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from pipeline.pooling import l2n_np
from pipeline.whitening import Whitening

DEFAULT_METHODS = ("mac", "gem", "spoc", "crow", "cam_ofa", "cam_ofa_sum", "cam_ona", "rmac", "fs_egm", "os_egm",
                   "os_egm4")
RMAC_SOURCES = ("full", "grid")
# R-MAC variants (issue 17): (whitening, region sources). ``learned``: the projection trained by
# jobs.train_projection (whiten.kind: learned); ``rpn``: regions proposed by the trained RPN (regions.source: rpn)
RMAC_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rmac": ("regions", RMAC_SOURCES), "rmac_learned": ("learned", RMAC_SOURCES),
    "rmac_rpn": ("regions", ("full", "rpn")), "rmac_learned_rpn": ("learned", ("full", "rpn"))}
FINAL_METHODS = DEFAULT_METHODS + ("rmac_learned", "rmac_rpn", "rmac_learned_rpn")
MAC_FAMILY = ("mac", "rmac", "fs_egm", "os_egm", "os_egm4", "rmac_learned", "rmac_rpn", "rmac_learned_rpn")
OWN_WHITENING = ("gem", "spoc", "crow", "cam_ofa_sum")
PRE_WHITENED = ("cam_ofa", "cam_ona")   # whitened class vector by class vector at extraction (seed 004): L2 only
SUM_INPUTS = {"fs_egm": "fs_egm_sum", "os_egm": "os_egm_sum", "os_egm4": "os_egm4_sum"}


@dataclass(frozen=True)
class DescriptorsConfig:
    """Which final global descriptors the ``descriptors`` stage writes."""

    methods: tuple[str, ...] = DEFAULT_METHODS   # the R-MAC variants of issue 17 are added when configured

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in FINAL_METHODS]
        if bad:
            raise ValueError(f"methods: unknown {bad}; known: {list(FINAL_METHODS)}")


@dataclass
class DescriptorRows:
    """Rows of descriptors with an image id and a label each (a region source or a raw global method)."""

    image_ids: np.ndarray                 # (N,) str
    labels: np.ndarray                    # (N,) str
    X: np.ndarray                         # (N, d) float32

    @classmethod
    def empty(cls, dim: int = 0) -> "DescriptorRows":
        return cls(np.zeros(0, dtype=str), np.zeros(0, dtype=str), np.zeros((0, dim), np.float32))


@dataclass
class FinalDescriptors:
    """Output of :func:`final_descriptors`: one row per (image, method), zero-padded to one width."""

    image_ids: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    X: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


def whitening_for(method: str, whitenings: Mapping[str, Whitening]) -> Whitening | None:
    """The whitening a final method uses: none for pre-whitened ones, its own for GAP/sum-pooled globals, else
    the regional one."""
    if method in PRE_WHITENED:
        return None
    return whitenings.get(f"global-{method}") if method in OWN_WHITENING else whitenings["regions"]


def final_descriptors(regions: DescriptorRows, raw_globals: DescriptorRows, methods: tuple[str, ...] | list[str],
                      whitenings: Mapping[str, Whitening]) -> FinalDescriptors:
    """Final global descriptors of a set of images (see the module docstring).

    ``whitenings`` maps ``"regions"`` and ``"global-<method>"`` to learned whitenings; a GAP method without its
    own whitening is only L2-normalised. Methods whose input is missing are skipped.
    """
    out = FinalDescriptors()
    parts: list[np.ndarray] = []

    def emit(ids: np.ndarray, method: str, X: np.ndarray) -> None:
        out.image_ids.extend(str(i) for i in ids)
        out.methods.extend([method] * len(ids))
        parts.append(X.astype(np.float32))

    for method, (white, sources) in RMAC_VARIANTS.items():
        if method in methods and white in whitenings and len(regions.image_ids):
            mask = np.isin(regions.labels, sources)
            ids = regions.image_ids[mask]
            if len(ids) and (sources == RMAC_SOURCES or np.isin(regions.labels[mask], sources[1:]).any()):
                order = np.argsort(ids, kind="stable")  # group rows per image, keeping their order inside it
                ids, R = ids[order], whitenings[white].apply(regions.X[mask][order])
                starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
                emit(ids[starts], method, l2n_np(np.add.reduceat(R, starts, axis=0)))
    for method in methods:
        if method in RMAC_VARIANTS:
            continue
        mask = raw_globals.labels == SUM_INPUTS.get(method, method)
        if not mask.any():
            continue
        white = whitening_for(method, whitenings)
        X = raw_globals.X[mask]
        emit(raw_globals.image_ids[mask], method, white.apply(X) if white is not None else l2n_np(X))
    if parts:
        width = max(p.shape[1] for p in parts)
        # one table file holds one width: zero-padding keeps inner products and norms unchanged
        out.X = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts])
    return out


__all__ = ["DescriptorsConfig", "DescriptorRows", "FinalDescriptors", "final_descriptors", "whitening_for",
           "FINAL_METHODS", "DEFAULT_METHODS", "RMAC_VARIANTS", "MAC_FAMILY", "OWN_WHITENING", "SUM_INPUTS"]
