"""Fine-tuning the backbone's last blocks with seed 003's triplet ranking loss (GPU work; CPU for smoke tests).

Seed 003 §3.1 back-propagates the triplet loss through the whole three-stream network — convolutions, R-MAC
pooling over the rigid grid, shift + FC, sum aggregation, L2 — and updates "the convolutional layers together
with the 'PCA' layers". Here only the last ``unfreeze_blocks`` blocks of the backbone learn (the early layers
are generic; their gradients would cost memory and time on a small discovered training set), with the
projection learned jointly from its (PCA-initialised or already learned) arrays.

As in the seed (§5.1): one triplet of (possibly differently sized) images at a time, gradients accumulated
over ``triplets_per_step`` triplets before each SGD update (lr 1e-3, weight decay 5e-5, margin 0.1), hard
triplets re-mined every ``remine_every`` updates (the seed: 16) from the descriptors of the training images
under the current weights (:func:`pipeline.projection.mine_hard_negatives`).

Decisions: the network stays in ``eval()`` mode (batch-norm statistics and dropout frozen), since one image
per forward pass gives no usable batch statistics (VGG16 in the seed has no batch norm). Regions are the
rigid R-MAC grid (the seed learns the representation on the grid, before the RPN).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.determinism import single_threaded_torch
from pipeline.pooling import l2n, regional_mac, rmac_grid
from pipeline.projection import LearnedProjection, mine_hard_negatives, positive_components, triplet_loss


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning parameters (seed 003 §5.1 values where it gives them)."""

    unfreeze_blocks: int = 2
    margin: float = 0.1
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    steps: int = 100
    triplets_per_step: int = 64
    remine_every: int = 16
    negatives_per_pair: int = 5
    grid_levels: int = 3
    learn_projection: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def backbone_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ordered stages of a torchvision-like classifier: ``features.*`` (MobileNet, VGG, EfficientNet in
    torchvision), ``layer1..layer4`` (ResNet), ``_blocks.*`` (efficientnet-lite), else the top-level children."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [(f"features.{n}", m) for n, m in features.named_children()]
    layers = [(n, m) for n, m in model.named_children() if n.startswith("layer") and n[5:].isdigit()]
    if layers:
        return sorted(layers, key=lambda nm: int(nm[0][5:]))
    blocks = getattr(model, "_blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return [(f"_blocks.{n}", m) for n, m in blocks.named_children()]
    return list(model.named_children())


def unfreeze_last_blocks(model: nn.Module, n: int, up_to: str | None = None) -> list[str]:
    """Freeze every parameter of ``model`` except those of its last ``n`` blocks (of :func:`backbone_blocks`,
    counted back from block ``up_to`` when given: the block that produces the pooled layer). Returns the
    names of the trainable parameters."""
    blocks = backbone_blocks(model)
    names = [b for b, _ in blocks]
    if up_to is not None:
        stop = next((i for i, b in enumerate(names) if up_to == b or up_to.startswith(b + ".")), None)
        if stop is None:
            raise ValueError(f"layer {up_to!r} is in none of the blocks {names}")
        blocks = blocks[: stop + 1]
    chosen = {b for b, _ in blocks[max(len(blocks) - n, 0):]} if n > 0 else set()
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == b or name.startswith(b + ".") for b in chosen))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def rmac_forward(trunk: nn.Module, image: torch.Tensor, projection: LearnedProjection, levels: int = 3) -> torch.Tensor:
    """Differentiable R-MAC of one image ``(3, H, W)``: conv map, regional MACs of the rigid grid, shift + FC,
    sum, L2 (seed 003 Fig. 1)."""
    out = trunk(image[None])
    A = (out["out"] if isinstance(out, dict) else out)[0].clamp_min(0)
    boxes = rmac_grid(int(A.shape[1]), int(A.shape[2]), levels=levels)
    return l2n(projection.project(regional_mac(A, boxes)).sum(0))


def finetune_backbone(model: nn.Module, layer: str, images: Sequence[torch.Tensor], positives: np.ndarray,
                      projection: Mapping[str, np.ndarray], config: FinetuneConfig = FinetuneConfig(),
                      groups: np.ndarray | None = None, trunk: nn.Module | None = None,
                      device: torch.device | str = "cpu"
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict]]:
    """Fine-tune the last ``config.unfreeze_blocks`` blocks of ``model`` (a torchvision-like classifier) with the
    triplet loss on R-MAC descriptors of its ``layer`` activations.

    ``images``: preprocessed ``(3, H, W)`` tensors (sizes may differ); ``positives`` (P, 2) matching image pairs
    (from pair mining); ``groups`` as in ``pipeline.projection.TripletData`` (default: components of the
    positives); ``projection``: ``mean``/``projection`` arrays of the initial whitening or learned layer.
    ``trunk`` defaults to ``create_feature_extractor(model, {layer: "out"})``, which shares ``model``'s
    parameters. Returns ``(model state dict as arrays — loadable by pipeline.backbone.build_backbone —,
    projection arrays, per-update statistics)``. Deterministic on CPU for a seed.
    """
    positives = np.asarray(positives, dtype=np.int64).reshape(-1, 2)
    n_img = len(images)
    groups = positive_components(positives, n_img) if groups is None else np.asarray(groups, dtype=np.int64)
    pairs = np.unique(np.concatenate([positives, positives[:, ::-1]]), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with single_threaded_torch(config.seed):
        model.to(device).eval()
        trunk = (trunk or create_feature_extractor(model, {layer: "out"})).to(device).eval()
        unfreeze_last_blocks(model, config.unfreeze_blocks, up_to=layer)
        proj = LearnedProjection.from_whitening(projection["mean"], projection["projection"]).to(device)
        proj.requires_grad_(config.learn_projection)
        params = [p for p in model.parameters() if p.requires_grad] + [p for p in proj.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: unfreeze_blocks = 0 and learn_projection = False")
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        gen = torch.Generator().manual_seed(config.seed)
        imgs = [im.to(device) for im in images]
        stats: list[dict] = []
        triplets = np.zeros((0, 3), np.int64)
        for step in range(config.steps):
            if step % config.remine_every == 0:
                with torch.no_grad():
                    desc = torch.stack([rmac_forward(trunk, im, proj, config.grid_levels) for im in imgs])
                triplets, _ = mine_hard_negatives(desc, pairs, groups, config.margin, config.negatives_per_pair)
            if triplets.shape[0] == 0:
                stats.append({"step": step, "loss": 0.0, "triplets": 0})
                continue
            pick = torch.randint(triplets.shape[0], (config.triplets_per_step,), generator=gen).numpy()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for q, p, n in triplets[pick]:  # one triplet in memory at a time, gradients accumulated (seed 003)
                d = [rmac_forward(trunk, imgs[i], proj, config.grid_levels) for i in (q, p, n)]
                loss = triplet_loss(d[0][None], d[1][None], d[2][None], config.margin).sum()
                loss.backward()
                total += float(loss.detach())
            opt.step()
            stats.append({"step": step, "loss": total / config.triplets_per_step, "triplets": int(triplets.shape[0])})
        state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        return state, proj.to_arrays(), stats
