"""Image → network input: resize to a longest side and ImageNet-normalise."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) after scaling so the longest side equals ``max_side`` (never upscales; min 1 px)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_network_input(image: Image.Image, max_side: int = 1024, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB PIL image → float tensor (3, H, W), ImageNet mean/std normalised.

    ``size=(w, h)`` resizes to exactly that size, up or down (the per-scale sizes of
    ``pipeline.extract.scaled_sizes``, which upscale for local-only scales above 1); without it the longest side
    becomes ``max_side`` and the image is never upscaled."""
    w, h = size if size is not None else resized_size(image.width, image.height, max_side)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t - mean) / std
