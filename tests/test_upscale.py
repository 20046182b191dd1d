"""Multi-scale locals: an upscaled local-only scale must feed the network an upscaled image.

``scaled_sizes`` asks for ``scale * max_side`` (or ``scale *`` the image's own side when smaller), but the
database and query paths pass only ``max(w, h)`` to ``pipeline.preprocess.to_network_input``, whose
``resized_size`` clamps the scale with ``min(1.0, ...)``: for an image smaller than the requested size the
"1.41x" input is a copy of the scale-1 input, so the extra forward pass adds nothing. These tests look at the
tensors actually handed to the backbone on both sides (they failed before the fix: both call sites now pass
the exact per-scale size, ``to_network_input(img, size=(w, h))``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actors.extract import ImageShardMapper, ImageStageSpec
from pipeline.extract import ExtractConfig, scaled_sizes
from service.encoder import QueryEncoder

torch.set_num_threads(1)

CFG = ExtractConfig(max_side=512, globals=("mac",), regions=("full",), local_features=8,
                    local_scales=(1.0, 1.41))
W0, H0 = 300, 200                                   # smaller than max_side: scale 1 is the image itself
EXPECTED = [(300, 200), (423, 282)]                 # (w, h) per forward scale: 1.0 and the local-only 1.41


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(H0, W0, 3), dtype=np.uint8), "RGB")


def test_scaled_sizes_asks_for_the_upscaled_size() -> None:
    """The request is right today; what goes wrong is the tensor built from it (below)."""
    assert CFG.forward_scales == (1.0, 1.41)
    assert scaled_sizes(W0, H0, CFG) == EXPECTED


def test_database_side_feeds_the_upscaled_tensor(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    _image().save(path)
    worker = ImageShardMapper.__new__(ImageShardMapper)   # only the decode step: no backbone, no Ray
    worker.spec, worker.config = ImageStageSpec(str(tmp_path), "extract", CFG), CFG
    d = worker._decode({"uri": str(path), "image_id": "small"})
    assert d.error is None
    assert [tuple(t.shape) for t in d.inputs] == [(3, h, w) for w, h in EXPECTED]


class _Recorder(torch.nn.Module):
    """Stands in for the backbone: records its inputs, stops the encoder after the last scale."""

    class Stop(Exception):
        pass

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.seen = n, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        if len(self.seen) == self.n:
            raise self.Stop
        return torch.zeros(1, 4, 2, 2)


def test_query_side_feeds_the_upscaled_tensor() -> None:
    enc = QueryEncoder.__new__(QueryEncoder)        # only encode's input construction: no run, no weights
    enc.config, enc.device = CFG, torch.device("cpu")
    enc.backbone = _Recorder(len(EXPECTED))
    with pytest.raises(_Recorder.Stop):
        enc.encode(_image())
    shapes = [tuple(x.shape) for x in enc.backbone.seen]
    assert shapes == [(1, 3, h, w) for w, h in EXPECTED]
    assert not torch.equal(enc.backbone.seen[0], enc.backbone.seen[1][..., :H0, :W0])
