"""Lets ``actors.*`` be imported where Ray is not installed (the GPU image runs ``experiments.gpu_check`` with its
own Python, which has torch but no Ray). Import it before any ``actors`` module; it does nothing when Ray is
there. Only the mapper classes are usable then: anything that would start Ray raises a clear error.
"""
from __future__ import annotations

import importlib.util
import sys
import types


def _missing(*_args, **_kwargs):
    raise RuntimeError("Ray is not installed here: experiments.ray_stub stands in for it (mappers only)")


if importlib.util.find_spec("ray") is None and "ray" not in sys.modules:
    ray = types.ModuleType("ray")
    util = types.ModuleType("ray.util")
    util.ActorPool = _missing
    ray.util = util
    for name in ("init", "remote", "get", "kill", "is_initialized", "cluster_resources"):
        setattr(ray, name, _missing)
    sys.modules["ray"], sys.modules["ray.util"] = ray, util
