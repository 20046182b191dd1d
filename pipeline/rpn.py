"""A region proposal network on the frozen conv map (seed 003 §3.2, after Faster R-CNN, Ren et al. 2015).

Seed 003 replaces R-MAC's rigid grid by the proposals of an RPN: "a first layer that uses 3 x 3 filters, and
two sibling convolutional layers with 1 x 1 filters that predict, for each candidate box, both the
objectness score and the regressed location", trained with "a binary class label [per] candidate box,
depending on how much the box overlaps with the ground-truth region of interest" and "a multi-task loss that
combines a classification loss (log loss ...) and a regression loss (smooth L1)"; NMS then keeps ``k``
proposals. The seed learns it after the ranking loss, with the convolutions fixed; so do we (on stored or
recomputed activation maps). Without labels the "ground-truth regions of interest" are the regions the
corpus itself discovered (OS.EGM boxes, seed 001).

Coordinates. The public functions that take or return *regions* (:func:`train_rpn`, :func:`propose`) use
continuous feature-cell units ``[x0, y0, x1, y1]``, like ``pipeline.egm`` and ``pipeline.regions``
(``regions.to_cells`` rounds them for pooling, ``regions.cells_to_pixels`` maps them to the image). Inside,
anchors live in the pixel frame the map covers (cell ``j`` spans ``[j*stride, (j+1)*stride)``), so anchor
sizes read as pixels at the network's input scale.

Details from Faster R-CNN (Ren et al., §3.1): anchors of 3 aspect ratios at every cell; an anchor is positive
if its IoU with some box is >= 0.7, or if it has the highest IoU with some box (ties included); negative if
its best IoU is < 0.3; otherwise ignored. Each image contributes 256 sampled anchors with at most 50 %
positives. Box parameterisation ``t = ((gx - ax) / aw, (gy - ay) / ah, log(gw / aw), log(gh / ah))``.
Decisions and departures (with reasons):

* Anchor sizes ``64, 128, 256, 512`` px: the map of a 512 px image at stride 32 is ~16 x 16 cells; an
  anchor of 2 cells is the smallest region worth max-pooling and 512 px is the whole image. (Faster R-CNN's
  128-512 at stride 16 targets objects in 600 px images.) Anchors are centred on cell centres.
* Cross-boundary anchors are kept (torchvision / detectron2 default) instead of being ignored in training
  as in the paper: with 512 px anchors on a 512 px image every large anchor crosses the border, and whole-image
  regions are exactly what OS.EGM often returns. ``allowed_border`` restores the paper's rule.
* Loss normalisation as torchvision: both terms averaged over the sampled anchors (lambda = 1), smooth L1 with
  ``beta = 1/9``; the paper's ``1/N_cls``, ``lambda/N_reg`` weights balance the terms about equally too.
* Proposals: top ``pre_nms_top_n`` by objectness, decoded, clipped to the map's frame, boxes smaller than one
  cell dropped, NMS at 0.7, then the best ``post_nms_top_n`` (32: seed 003 Table 2 finds 32-64 proposals
  already beat the rigid grid).
* Training: one image of 256 anchors per step (Faster R-CNN), lr 1e-3 and weight decay 5e-5 (seed 003
  §5.1), weights initialised N(0, 0.01) (Faster R-CNN). Departure: AdamW instead of SGD by default. The
  seed's SGD runs 200k iterations; on CPU we afford a few thousand, and on the planted problem of
  ``tests/test_rpn.py`` SGD at lr 1e-3 learned nothing in 600-1500 steps while AdamW reached a recall
  (IoU >= 0.5, top 5 proposals) of 0.95 in 2000. ``optimizer="sgd"`` gives the seed's optimiser.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
# torchvision (box_iou, nms) is imported where it is used: importing it takes seconds (it pulls in torch._dynamo)
# and pipeline.config, so every job and Ray worker, imports this module

from pipeline.determinism import single_threaded_torch

BBOX_CLIP = math.log(1000.0 / 16)  # torchvision's cap on exp() of the size deltas


@dataclass(frozen=True)
class RPNConfig:
    """RPN geometry, labelling, proposal and training parameters (see the module docstring for sources)."""

    stride: int = 32
    anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)  # sqrt(area) in pixels
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width (Faster R-CNN)
    pos_iou: float = 0.7
    neg_iou: float = 0.3
    allowed_border: float | None = None  # None: keep cross-boundary anchors (see module docstring)
    batch_anchors: int = 256
    pos_fraction: float = 0.5
    box_loss_beta: float = 1.0 / 9.0
    nms_iou: float = 0.7
    pre_nms_top_n: int = 2000
    post_nms_top_n: int = 32
    min_size_cells: float = 1.0
    mid_channels: int = 256
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-5
    iterations: int = 2000
    optimizer: str = "adam"  # "adam" (AdamW) or "sgd" (the seed's); see the module docstring
    init_std: float | None = 0.01
    seed: int = 0

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.aspect_ratios)

    def to_dict(self) -> dict:
        return asdict(self)


def make_anchors(feat_h: int, feat_w: int, stride: float, sizes: Sequence[float],
                 ratios: Sequence[float]) -> torch.Tensor:
    """Anchors ``(feat_h * feat_w * A, 4)`` float32 ``[x0, y0, x1, y1]`` in pixels, ``A = len(ratios) * len(sizes)``.

    Row ``(y * feat_w + x) * A + a`` is anchor ``a`` (ratio-major: ``a = ratio_index * len(sizes) +
    size_index``, torchvision's order) centred on cell ``(y, x)``'s centre ``((x + .5) stride, (y + .5)
    stride)``, of area ``size^2`` and height / width ``ratio``. Matches the layout of :class:`RPNHead`.
    """
    s = torch.as_tensor(sizes, dtype=torch.float64)
    r = torch.as_tensor(ratios, dtype=torch.float64)
    hr = torch.sqrt(r)
    ws = (s[None, :] / hr[:, None]).reshape(-1)
    hs = (s[None, :] * hr[:, None]).reshape(-1)
    base = torch.stack([-ws / 2, -hs / 2, ws / 2, hs / 2], dim=1)  # (A, 4)
    cy, cx = torch.meshgrid((torch.arange(feat_h, dtype=torch.float64) + 0.5) * stride,
                            (torch.arange(feat_w, dtype=torch.float64) + 0.5) * stride, indexing="ij")
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (centres + base[None]).reshape(-1, 4).to(torch.float32)


def label_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, cfg: RPNConfig,
                  image_hw: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Faster R-CNN anchor labels: ``labels`` (N,) int64 in {1 positive, 0 negative, -1 ignored} and
    ``matched`` (N,) index of each anchor's best box (-1 when there is no box).

    Negative if the best IoU < ``neg_iou``; positive if >= ``pos_iou`` or if the anchor has the highest IoU
    with some box (every anchor tied at that maximum, when it is > 0); the rest ignored. With
    ``cfg.allowed_border`` set (and ``image_hw`` given), anchors crossing the frame by more are ignored.
    """
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    gt = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    n = anchors.shape[0]
    labels = torch.full((n,), -1, dtype=torch.int64)
    matched = torch.full((n,), -1, dtype=torch.int64)
    if gt.shape[0] == 0:
        labels[:] = 0
    else:
        from torchvision.ops import box_iou

        iou = box_iou(anchors, gt)  # (N, G)
        best, matched = iou.max(dim=1)
        labels[best < cfg.neg_iou] = 0
        gt_best = iou.max(dim=0).values  # (G,)
        lowq = ((iou == gt_best[None, :]) & (gt_best[None, :] > 0)).any(dim=1)
        labels[lowq] = 1
        labels[best >= cfg.pos_iou] = 1
    if cfg.allowed_border is not None and image_hw is not None:
        h, w = image_hw
        b = cfg.allowed_border
        inside = ((anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] <= w + b)
                  & (anchors[:, 3] <= h + b))
        labels[~inside] = -1
    return labels, matched


def sample_anchors(labels: torch.Tensor, cfg: RPNConfig, generator: torch.Generator) -> torch.Tensor:
    """Keep at most ``batch_anchors`` labelled anchors, at most ``pos_fraction`` of them positive, chosen at
    random; the others become -1 (ignored). Returns a new label vector."""
    out = labels.clone()
    pos = torch.nonzero(labels == 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    n_pos = min(pos.numel(), int(cfg.batch_anchors * cfg.pos_fraction))
    n_neg = min(neg.numel(), cfg.batch_anchors - n_pos)
    drop_pos = pos[torch.randperm(pos.numel(), generator=generator)[n_pos:]]
    drop_neg = neg[torch.randperm(neg.numel(), generator=generator)[n_neg:]]
    out[drop_pos] = -1
    out[drop_neg] = -1
    return out


def _centre_size(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = b[..., 2] - b[..., 0]
    h = b[..., 3] - b[..., 1]
    return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode_boxes(anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Faster R-CNN regression targets ``(tx, ty, tw, th)`` of boxes ``gt`` w.r.t. ``anchors`` (both (N, 4))."""
    ax, ay, aw, ah = _centre_size(anchors)
    gx, gy, gw, gh = _centre_size(gt)
    return torch.stack([(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], dim=-1)


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes` (size deltas capped at ``log(1000/16)`` as torchvision does)."""
    ax, ay, aw, ah = _centre_size(anchors)
    cx = deltas[..., 0] * aw + ax
    cy = deltas[..., 1] * ah + ay
    w = torch.exp(deltas[..., 2].clamp(max=BBOX_CLIP)) * aw
    h = torch.exp(deltas[..., 3].clamp(max=BBOX_CLIP)) * ah
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then sibling 1x1 convs: objectness (A per cell) and box deltas (4A per cell)."""

    def __init__(self, in_channels: int, num_anchors: int, mid_channels: int = 256,
                 init_std: float | None = 0.01) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.cls = nn.Conv2d(mid_channels, num_anchors, 1)
        self.reg = nn.Conv2d(mid_channels, 4 * num_anchors, 1)
        if init_std is not None:  # Faster R-CNN: N(0, 0.01), zero bias; None keeps PyTorch's default init
            for layer in (self.conv, self.cls, self.reg):
                nn.init.normal_(layer.weight, std=init_std)
                nn.init.zeros_(layer.bias)

    @property
    def num_anchors(self) -> int:
        return int(self.cls.out_channels)

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``fmap`` (B, C, h, w) -> objectness logits (B, h*w*A) and deltas (B, h*w*A, 4), in anchor order."""
        t = F.relu(self.conv(fmap))
        B, _, h, w = t.shape
        A = self.num_anchors
        logits = self.cls(t).permute(0, 2, 3, 1).reshape(B, h * w * A)
        deltas = self.reg(t).reshape(B, A, 4, h, w).permute(0, 3, 4, 1, 2).reshape(B, h * w * A, 4)
        return logits, deltas

    def to_arrays(self) -> dict[str, np.ndarray]:
        """State dict as float32 arrays (no pickle)."""
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.state_dict().items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "RPNHead":
        """Inverse of :meth:`to_arrays` (sizes read from the weights; extra keys ignored)."""
        conv_w = np.asarray(arrays["conv.weight"])
        head = cls(int(conv_w.shape[1]), int(np.asarray(arrays["cls.weight"]).shape[0]), int(conv_w.shape[0]))
        head.load_state_dict({k: torch.tensor(np.asarray(arrays[k])) for k in head.state_dict()}, strict=True)
        return head


def rpn_loss(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: torch.Tensor,
             cfg: RPNConfig, generator: torch.Generator | None = None,
             image_hw: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Objectness and box losses of one image: ``logits`` (N,), ``deltas`` (N, 4), ``anchors`` (N, 4), ``gt`` (G, 4).

    Anchors are labelled (:func:`label_anchors`) and, when ``generator`` is given, sampled
    (:func:`sample_anchors`). Objectness: binary cross-entropy over the labelled anchors, averaged; box:
    smooth L1 (``beta = cfg.box_loss_beta``) of the positives' deltas against their targets, summed and
    divided by the same number of labelled anchors.
    """
    labels, matched = label_anchors(anchors, gt_boxes, cfg, image_hw)
    if generator is not None:
        labels = sample_anchors(labels, cfg, generator)
    used = labels >= 0
    n_used = max(int(used.sum()), 1)
    cls_loss = F.binary_cross_entropy_with_logits(logits[used], labels[used].to(logits.dtype), reduction="sum") / n_used
    pos = labels == 1
    if bool(pos.any()):
        gt = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
        targets = encode_boxes(anchors[pos], gt[matched[pos]])
        box_loss = F.smooth_l1_loss(deltas[pos], targets, beta=cfg.box_loss_beta, reduction="sum") / n_used
    else:
        box_loss = deltas.sum() * 0.0
    return cls_loss, box_loss


def select_proposals(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
                     frame_hw: tuple[float, float], cfg: RPNConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposals of one image in pixels: top ``pre_nms_top_n`` anchors by objectness, decoded, clipped to
    the frame ``(H, W)``, boxes with a side under ``min_size_cells * stride`` dropped, NMS at ``nms_iou``,
    then the ``post_nms_top_n`` best. Returns ``(boxes (K, 4), scores (K,) = sigmoid(logit))``."""
    k = min(cfg.pre_nms_top_n, logits.shape[0])
    top = torch.topk(logits, k, sorted=True).indices
    boxes = decode_boxes(anchors[top], deltas[top])
    h, w = frame_hw
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                         boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
    scores = torch.sigmoid(logits[top])
    min_side = cfg.min_size_cells * cfg.stride
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)
    boxes, scores = boxes[keep], scores[keep]
    from torchvision.ops import nms

    keep = nms(boxes, scores, cfg.nms_iou)[: cfg.post_nms_top_n]
    return boxes[keep], scores[keep]


@torch.no_grad()
def propose(head: RPNHead, fmap: torch.Tensor | np.ndarray, cfg: RPNConfig) -> tuple[np.ndarray, np.ndarray]:
    """Region proposals of one activation map ``(C, h, w)``: boxes ``(K, 4)`` float32 in continuous cell
    units (as ``pipeline.egm``; ``regions.to_cells`` rounds them for pooling) and objectness ``(K,)``."""
    A = torch.as_tensor(np.asarray(fmap) if not torch.is_tensor(fmap) else fmap, dtype=torch.float32)
    h, w = A.shape[-2:]
    logits, deltas = head(A.reshape(1, *A.shape[-3:]).to(next(head.parameters()).device))
    anchors = make_anchors(h, w, cfg.stride, cfg.anchor_sizes, cfg.aspect_ratios).to(logits.device)
    boxes, scores = select_proposals(logits[0], deltas[0], anchors, (h * cfg.stride, w * cfg.stride), cfg)
    return (boxes / cfg.stride).cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32)


RPNSample = tuple[torch.Tensor | np.ndarray, np.ndarray]


def train_rpn(config: RPNConfig, samples: Sequence[RPNSample], seed: int | None = None,
              step_callback: Callable[[int, dict], None] | None = None) -> dict[str, np.ndarray]:
    """Train an :class:`RPNHead` on ``samples``: (activation map (C, h, w), target boxes (G, 4) in cell units).

    One image per SGD step (its ``batch_anchors`` sampled anchors), images visited in a seeded random order
    epoch after epoch for ``config.iterations`` steps. Deterministic for a seed (initialisation, order and
    anchor sampling all come from it; single-threaded). Returns :func:`rpn_to_arrays` of the head.
    ``step_callback(step, {"cls": ..., "box": ...})`` sees every step's losses.
    """
    seed = config.seed if seed is None else int(seed)
    if not samples:
        raise ValueError("train_rpn needs at least one sample")
    maps = [torch.as_tensor(np.asarray(m) if not torch.is_tensor(m) else m, dtype=torch.float32) for m, _ in samples]
    targets = [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4) * config.stride) for _, b in samples]
    with single_threaded_torch(seed):
        head = RPNHead(int(maps[0].shape[0]), config.num_anchors, config.mid_channels, config.init_std)
        gen = torch.Generator().manual_seed(seed)
        if config.optimizer == "sgd":
            opt = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=config.momentum,
                                  weight_decay=config.weight_decay)
        elif config.optimizer == "adam":
            opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {config.optimizer!r}")
        anchor_cache: dict[tuple[int, int], torch.Tensor] = {}
        order = torch.empty(0, dtype=torch.int64)
        for step in range(config.iterations):
            pos = step % len(maps)
            if pos == 0:
                order = torch.randperm(len(maps), generator=gen)
            i = int(order[pos])
            A = maps[i]
            h, w = A.shape[-2:]
            if (h, w) not in anchor_cache:
                anchor_cache[(h, w)] = make_anchors(h, w, config.stride, config.anchor_sizes, config.aspect_ratios)
            logits, deltas = head(A[None])
            cls_loss, box_loss = rpn_loss(logits[0], deltas[0], anchor_cache[(h, w)], targets[i], config, gen,
                                          (h * config.stride, w * config.stride))
            opt.zero_grad(set_to_none=True)
            (cls_loss + box_loss).backward()
            opt.step()
            if step_callback is not None:
                step_callback(step, {"cls": float(cls_loss.detach()), "box": float(box_loss.detach())})
    return rpn_to_arrays(head, config)


def rpn_to_arrays(head: RPNHead, config: RPNConfig) -> dict[str, np.ndarray]:
    """The head's state dict plus the anchor geometry it was trained with (``stride``, ``anchor_sizes``,
    ``aspect_ratios``), as plain arrays."""
    return {**head.to_arrays(), "stride": np.asarray(config.stride, dtype=np.int64),
            "anchor_sizes": np.asarray(config.anchor_sizes, dtype=np.float64),
            "aspect_ratios": np.asarray(config.aspect_ratios, dtype=np.float64)}


def rpn_from_arrays(arrays: Mapping[str, np.ndarray], config: RPNConfig | None = None) -> tuple[RPNHead, RPNConfig]:
    """Inverse of :func:`rpn_to_arrays`: the head, and ``config`` (default :class:`RPNConfig`) with the stored
    anchor geometry (so proposals use the anchors the head was trained on)."""
    cfg = replace(config or RPNConfig(), stride=int(np.asarray(arrays["stride"])),
                  anchor_sizes=tuple(float(s) for s in np.asarray(arrays["anchor_sizes"]).ravel()),
                  aspect_ratios=tuple(float(r) for r in np.asarray(arrays["aspect_ratios"]).ravel()))
    head = RPNHead.from_arrays(arrays)
    if head.num_anchors != cfg.num_anchors:
        raise ValueError(f"head predicts {head.num_anchors} anchors per cell, geometry gives {cfg.num_anchors}")
    return head.eval(), cfg
