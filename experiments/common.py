"""What the experiment scripts share: data locations, the index config, the backbone and per-image activations.

Every script reads the same typed config as ``jobs.index`` (``--config``, default ``configs/benchmark.yaml``,
plus ``--set key=value`` overrides), so a benchmark measures the parameters an index is built with instead of
a copy of them. Data default to the museum-landmarks folder next to the repository.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import yaml
from PIL import Image

from pipeline.backbone import Backbone, build_backbone
from pipeline.config import IndexConfig, load_config
from pipeline.extract import ExtractConfig, scaled_sizes
from pipeline.preprocess import to_network_input
from storage.images import decode_image
from storage.weights import load_state_dict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"
DEFAULT_CONFIG = REPO / "configs" / "benchmark.yaml"
CACHE_ROOT = REPO / "runs" / "cache"  # runs/ is git-ignored
# ``images`` and ``out`` are required by the index config but unused by the experiments (they take their data
# from --data / --images and write no index run): placeholders keep load_config's validation unchanged
_UNUSED = {"images": "unused-by-experiments", "out": "unused-by-experiments"}


def add_config_args(ap: argparse.ArgumentParser, default: Path | None = DEFAULT_CONFIG) -> None:
    """``--config`` (YAML of jobs.index; ``none`` for the package defaults) and repeated ``--set key=value``."""
    ap.add_argument("--config", default=str(default) if default else "none",
                    help=f"index config whose parameters are measured (default: {default.name if default else 'none'};"
                         " 'none' = the dataclass defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set extract.max_side=1024 (YAML value)")


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` -> ``{"a.b": 1}`` with YAML-typed values (as ``jobs.index --set``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(val)
    return out


def index_config(path: str | Path | None, sets: Iterable[str] = (), **overrides: Any) -> IndexConfig:
    """The index config of ``path`` (None / ``none``: defaults) with ``--set`` items and keyword overrides
    (``extract__max_side=512`` -> ``extract.max_side``; None values are ignored) applied, validated."""
    ov: dict[str, Any] = dict(_UNUSED)
    ov.update(parse_sets(sets))
    ov.update({k.replace("__", "."): v for k, v in overrides.items() if v is not None})
    file = None if path is None or str(path).lower() == "none" else Path(path)
    return load_config(file, ov)


def config_from_args(args: argparse.Namespace, **flag_overrides: Any) -> IndexConfig:
    """:func:`index_config` of a parsed ``--config`` / ``--set``; explicit flags win over both."""
    return index_config(args.config, args.set, **flag_overrides)


def set_threads(n: int) -> None:
    """Torch and FAISS threads (BLAS / OpenMP env vars only act when set before numpy loads: see the scripts)."""
    import faiss

    torch.set_num_threads(max(1, n))
    faiss.omp_set_num_threads(max(1, n))


def pick_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or None / ``auto`` (CUDA when available)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    return torch.device(name)


def load_backbone(cfg: ExtractConfig, device: torch.device | str = "cpu") -> Backbone:
    """The config's backbone with its weights (the offline builtin ones unless ``extract.weights`` says)."""
    spec = cfg.weights_spec
    return build_backbone(cfg.backbone, load_state_dict(spec) if spec else None, cfg.layer, device=device)


def classifier_of(bb: Backbone) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, bias) for CAMs, when the chosen layer feeds the classifier."""
    return None if bb.classifier_weight is None else (bb.classifier_weight, bb.classifier_bias)


def read_image(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Decode an image file; ``max_side``: JPEG draft decoding as the extract stage does (the result keeps at
    least that side; :func:`original_hw` is the full-resolution size pixel boxes refer to)."""
    return decode_image(Path(path).read_bytes(), max_side=max_side)


def original_hw(image: Image.Image) -> tuple[int, int]:
    """(H, W) of the full-resolution, EXIF-oriented image, also after draft decoding."""
    w, h = image.info.get("original_size", image.size)
    return int(h), int(w)


def image_path(data: Path, image_id: str) -> Path:
    """museum-landmarks layout: ``<data>/jpg/<id>.jpg``."""
    return Path(data) / "jpg" / f"{image_id}.jpg"


@torch.inference_mode()
def activations(bb: Backbone, image: Image.Image, cfg: ExtractConfig) -> list[torch.Tensor]:
    """Activation maps of ``image`` at every scale of ``cfg.forward_scales`` (as the extract stage and the query
    encoder compute them: resized from the image to each scale's exact size, see ``scaled_sizes``)."""
    device = next(bb.parameters()).device
    out = []
    for w, h in scaled_sizes(image.width, image.height, cfg):
        x = to_network_input(image, size=(w, h)).to(device)
        out.append(bb(x[None])[0])
    return out


def gnd_boxes(gnd_path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    """Query id -> (n, 4) float pixel boxes of every entry of ``gnd.json`` with a box (repeated query ids are
    united: a photo with two paintings is listed twice); only ids starting with ``prefix``."""
    if not Path(gnd_path).exists():
        return {}
    gnd = json.loads(Path(gnd_path).read_text())
    out: dict[str, list] = {}
    for qid, g in zip(gnd["qimlist"], gnd["gnd"]):
        if qid.startswith(prefix) and g.get("bbx") is not None:
            out.setdefault(qid, []).append(g["bbx"])
    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in sorted(out.items())}


def check_data(data: Path) -> Path:
    """``data`` when it holds a ``gnd.json``, else a clear exit."""
    if not (Path(data) / "gnd.json").exists():
        raise SystemExit(f"dataset not found: {data} (no gnd.json); pass --data")
    return Path(data)


def write_json(path: str | os.PathLike | None, obj: Any) -> None:
    """Results as JSON (numpy scalars become floats); nothing when ``path`` is None."""
    if path:
        Path(path).write_text(json.dumps(obj, indent=2, default=float))


__all__ = ["REPO", "DEFAULT_DATA", "DEFAULT_CONFIG", "CACHE_ROOT", "add_config_args", "parse_sets", "index_config",
           "config_from_args", "set_threads", "pick_device", "load_backbone", "classifier_of", "read_image",
           "original_hw", "image_path", "activations", "gnd_boxes", "check_data", "write_json"]
