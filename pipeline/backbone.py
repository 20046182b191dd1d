"""Backbone registry: CNNs that map an image batch to non-negative conv activations.

The registry never downloads anything: weights arrive as a ``state_dict`` (loaded by ``storage.weights``,
which knows the offline packages and reads files/URIs without pickle). ``layer`` picks the conv layer whose
activations are returned; the classifier (for CAM) is only exposed when that layer feeds global average
pooling and a linear classifier directly.

On a CUDA device the backbone runs in bfloat16 autocast with channels-last weights and inputs (tensor cores,
no layout conversions inside the convolutions) and returns float32 activations; on the CPU it stays float32
throughout, so CPU results do not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# torchvision is imported only when a backbone is built: importing it takes seconds (it pulls in torch._dynamo), and
# the query side imports this module in processes that never build one (argument and config errors, --help)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone: constructor, default layer, classifier names, stride and channels."""

    build: Callable[[], nn.Module]
    default_layer: str
    classifier: str | None  # module path of the Linear after GAP, valid for the default layer only
    stride: int
    channels: int
    builtin_weights: str | None = None  # name understood by storage.weights.load_state_dict("builtin:<name>")


def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _torchvision_model(builder: str) -> Callable[[], nn.Module]:
    """A constructor of ``torchvision.models.<builder>`` without weights."""
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, builder)(weights=None)

    return build


REGISTRY: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(_torchvision_model("mobilenet_v2"), "features.18", "classifier.1", 32, 1280,
                                 "mobilenet_v2"),
    "efficientnet_lite0": BackboneSpec(_efficientnet_lite0, "head", "_fc", 32, 1280, "efficientnet_lite0"),
    "resnet50": BackboneSpec(_torchvision_model("resnet50"), "layer4", "fc", 32, 2048),
    "resnet101": BackboneSpec(_torchvision_model("resnet101"), "layer4", "fc", 32, 2048),
    "vgg16": BackboneSpec(_torchvision_model("vgg16"), "features.29", None, 16, 512),
}


class _EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite up to the conv head (``layer='head'``) or up to block ``i`` (``layer='blocks.i'``)."""

    def __init__(self, net: nn.Module, layer: str) -> None:
        super().__init__()
        self.net = net
        self.last_block = None if layer == "head" else int(layer.split(".")[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        for idx, block in enumerate(n._blocks):
            x = block(x, drop_connect_rate=None)
            if self.last_block is not None and idx == self.last_block:
                return x
        return n._swish(n._bn1(n._conv_head(x)))


class Backbone(nn.Module):
    """A CNN trunk returning non-negative activations ``(B, C, h, w)`` of one layer, in eval mode.

    Attributes: ``name``, ``layer``, ``channels``, ``stride`` and, when the layer feeds the classifier,
    ``classifier_weight`` ``(K, C)`` / ``classifier_bias`` ``(K,)`` for class activation maps. ``amp_dtype``
    (None: float32) is the autocast dtype used for CUDA inputs (set by :func:`build_backbone`).
    """

    def __init__(self, name: str, trunk: nn.Module, layer: str, channels: int, stride: int,
                 classifier: nn.Linear | None) -> None:
        super().__init__()
        self.name, self.layer, self.channels, self.stride = name, layer, channels, stride
        self.trunk = trunk
        has_cls = classifier is not None
        self.register_buffer("classifier_weight", classifier.weight.detach().clone() if has_cls else None)
        self.register_buffer("classifier_bias", classifier.bias.detach().clone() if has_cls else None)
        self.amp_dtype: torch.dtype | None = None
        self.eval()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.amp_dtype is not None and images.is_cuda:
            with torch.autocast("cuda", dtype=self.amp_dtype):
                out = self.trunk(images.contiguous(memory_format=torch.channels_last))
            out = out["out"] if isinstance(out, dict) else out
            # the pipeline functions take float32 (C, H, W) maps in the default layout
            return out.float().contiguous().clamp_min_(0)
        out = self.trunk(images)
        if isinstance(out, dict):
            out = out["out"]
        # layers after ReLU/ReLU6 are already >= 0; clamping makes any other chosen layer valid for MAC/FS
        return out.clamp_min_(0)

    def use_mixed_precision(self, dtype: torch.dtype | None = torch.bfloat16) -> "Backbone":
        """Run CUDA inputs in ``dtype`` autocast with channels-last weights (None: back to float32)."""
        self.amp_dtype = dtype
        self.to(memory_format=torch.channels_last if dtype is not None else torch.contiguous_format)
        return self


def _get_module(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part) if not part.isdigit() else mod[int(part)]
    return mod


def build_backbone(name: str = "mobilenet_v2", state_dict: dict[str, torch.Tensor] | None = None,
                   layer: str | None = None, device: str | torch.device = "cpu",
                   mixed_precision: bool | None = None) -> Backbone:
    """Build backbone ``name`` with ``state_dict`` (strict) and return activations of ``layer``.

    ``mixed_precision`` (None: on for CUDA devices, never on the CPU) runs the network in bfloat16 autocast,
    channels-last (float16 where the GPU has no bfloat16); activations are float32 either way.

    ``state_dict=None`` leaves random weights (tests only). Unknown names raise ``ValueError`` listing the
    registry; other torchvision classification models can be named ``torchvision:<builder>`` with an
    explicit ``layer``.
    """
    if name.startswith("torchvision:"):
        import torchvision

        builder = getattr(torchvision.models, name.split(":", 1)[1])
        if layer is None:
            raise ValueError(f"backbone {name!r} needs an explicit layer")
        spec = BackboneSpec(lambda: builder(weights=None), layer, None, 0, 0)
    elif name in REGISTRY:
        spec = REGISTRY[name]
    else:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(REGISTRY)} or torchvision:<model>")
    model = spec.build()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    model.eval()
    layer = layer or spec.default_layer
    classifier = None
    if spec.classifier is not None and layer == spec.default_layer:
        classifier = _get_module(model, spec.classifier)
    if name == "efficientnet_lite0":
        trunk: nn.Module = _EfficientNetTrunk(model, layer)
    else:
        from torchvision.models.feature_extraction import create_feature_extractor

        trunk = create_feature_extractor(model, {layer: "out"})
    channels, stride = spec.channels, spec.stride
    if layer != spec.default_layer or channels == 0:
        with torch.inference_mode():
            probe = trunk(torch.zeros(1, 3, 224, 224))
            probe = probe["out"] if isinstance(probe, dict) else probe
        channels, stride = int(probe.shape[1]), int(round(224 / probe.shape[-1]))
    bb = Backbone(name, trunk, layer, channels, stride, classifier).to(device)
    device = torch.device(device)
    if device.type == "cuda" and mixed_precision is not False:
        bb.use_mixed_precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return bb
