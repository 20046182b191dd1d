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
    # one uint8 -> float32 pass into a contiguous (3, H, W) tensor, then the same float32 operations in place
    # (x / 255, - mean, / std): the same numbers as numpy's float32 division, half the time and memory traffic
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t.div_(255.0).sub_(mean).div_(std)


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF ``orientation`` (1..8) to an image tensor ``(C, H, W)``, as ``PIL.ImageOps.exif_transpose``
    does to a decoded image (for decoders that return the stored pixels, e.g. a GPU JPEG decoder)."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, dims=(-2, -1))
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, dims=(-2, -1))
    return x


def tensor_to_network_input(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 image tensor ``(3 or 1, H, W)`` on any device → float32 ``(3, h, w)`` for ``size = (w, h)``,
    ImageNet mean/std normalised, on the same device.

    The device twin of :func:`to_network_input` (bilinear with antialiasing when shrinking, like Pillow's
    resize, but not bit-identical to it): used when images are decoded on the GPU.
    """
    w, h = size
    t = x.float()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if tuple(t.shape[-2:]) != (h, w):
        t = torch.nn.functional.interpolate(t[None], size=(h, w), mode="bilinear", antialias=True,
                                            align_corners=False)[0]
    mean = torch.tensor(IMAGENET_MEAN, device=t.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=t.device).view(3, 1, 1)
    return (t / 255.0 - mean) / std
