"""Backbone fine-tuning with the triplet loss: CPU smoke test on a tiny random network."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torchvision
from torch import nn

from pipeline.finetune import FinetuneConfig, backbone_blocks, finetune_backbone, rmac_forward, unfreeze_last_blocks
from pipeline.projection import LearnedProjection
from pipeline.whitening import learn_pca_whitening

torch.set_num_threads(1)


class _Tiny(nn.Module):
    """A torchvision-like classifier: ``features`` (Sequential of blocks) then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        def block(i: int, o: int, s: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=s, padding=1), nn.BatchNorm2d(o), nn.ReLU())
        self.features = nn.Sequential(block(3, 8, 2), block(8, 8, 2), block(8, 16, 2), block(16, 16, 1))
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def test_unfreeze_last_blocks_of_torchvision_models() -> None:
    m = torchvision.models.mobilenet_v2(weights=None)
    assert [b for b, _ in backbone_blocks(m)][-2:] == ["features.17", "features.18"]
    names = unfreeze_last_blocks(m, 2, up_to="features.18")
    assert names and all(n.startswith(("features.17.", "features.18.")) for n in names)
    assert not m.classifier[1].weight.requires_grad
    r = torchvision.models.resnet18(weights=None)
    names = unfreeze_last_blocks(r, 1, up_to="layer3")  # the pooled layer is layer3: layer4 stays frozen
    assert names and all(n.startswith("layer3.") for n in names)


def test_finetune_smoke_on_a_tiny_network() -> None:
    torch.manual_seed(0)
    model = _Tiny()
    g = torch.Generator().manual_seed(1)
    images = ([torch.rand(3, 32, 32, generator=g) for _ in range(4)]
              + [torch.rand(3, 48, 32, generator=g) for _ in range(2)])
    positives = np.array([[0, 1], [2, 3], [4, 5]])
    # initial projection: PCA-whitening of the initial regional MACs
    trunk = torchvision.models.feature_extraction.create_feature_extractor(model.eval(), {"features.3": "out"})
    with torch.no_grad():
        regs = torch.cat([trunk(im[None])["out"][0].flatten(1).T for im in images]).numpy()  # 1-cell regions
    w = learn_pca_whitening(regs, dim=8)
    cfg = FinetuneConfig(unfreeze_blocks=2, steps=3, triplets_per_step=4, remine_every=2, margin=0.5, lr=0.05)
    before = copy.deepcopy(model.state_dict())
    state, proj, stats = finetune_backbone(copy.deepcopy(model), "features.3", images, positives, w.to_arrays(), cfg)
    assert len(stats) == 3 and stats[0]["triplets"] > 0
    for k, v in before.items():
        changed = not np.array_equal(v.numpy(), state[k])
        trainable = k.startswith(("features.2.", "features.3.")) and not k.endswith(
            ("running_mean", "running_var", "num_batches_tracked"))
        assert changed == trainable, k  # frozen blocks, classifier and BN statistics untouched
    assert not np.array_equal(proj["projection"], w.projection)
    # loadable by a fresh network (strict), and deterministic for a seed
    fresh = _Tiny()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    state2, proj2, _ = finetune_backbone(copy.deepcopy(model), "features.3", images, positives, w.to_arrays(), cfg)
    assert all(np.array_equal(state[k], state2[k]) for k in state)
    assert np.array_equal(proj["projection"], proj2["projection"])
    # the descriptor is the differentiable R-MAC: unit norm, width of the projection
    d = rmac_forward(trunk, images[0], LearnedProjection.from_arrays(proj)).detach()
    assert d.shape == (8,) and abs(float(d.norm()) - 1) < 1e-5
