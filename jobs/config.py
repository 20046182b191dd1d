"""The index job's typed configuration: one YAML file drives the whole DAG.

Unknown keys and wrong types are errors (a typo must not silently fall back to a default). Every section
has defaults, so a config needs only ``images`` and ``out``. See ``configs/demo.yaml`` and ``configs/benchmark.yaml``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_LOCAL_FEATURES = 1000  # top-N locals per image when ASMK is on and the config does not say (issue 5)
STAGES = ("extract", "whiten", "graph", "object_saliency", "descriptors", "faiss", "asmk")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass
class RayConfig:
    address: str | None = None          # None/"local": start a local Ray; "auto" or ray://...: join a cluster
    num_cpus: int | None = None         # CPUs of a local Ray
    workers: int | None = None          # extraction actors (default: one per GPU, or CPUs/4)
    cpus_per_worker: float | None = None
    use_gpu: bool | None = None         # None: use GPUs when the cluster has any


@dataclass
class ExtractSection:
    backbone: str = "mobilenet_v2"
    weights: str | None = None          # None: the backbone's offline weights (builtin:<name>)
    layer: str | None = None
    max_side: int = 1024
    scales: list[float] = field(default_factory=lambda: [1.0])
    regions: list[str] = field(default_factory=lambda: ["full", "grid", "fs_egm", "cam"])
    globals: list[str] = field(default_factory=lambda: ["mac", "gem", "spoc", "crow", "cam_ofa", "fs_egm_sum"])
    rmac_levels: int = 3
    fs_rho: float = 5.0
    fs_tau: float = 0.4
    fs_sigma: float = 2.5
    cam_classes: int = 64
    local_features: int | None = None   # top-N local descriptors per image (0: no locals table; None: 1000
                                        # when the asmk stage runs, else 0)
    local_scales: list[float] = field(default_factory=lambda: [1.0])  # scales of the locals; > 1 upscales
    local_dim: int = 128                # PCA dimension of local descriptors
    local_pca_images: int = 200         # images sampled to learn the local PCA
    descriptor_dtype: str = "float16"
    shard_size: int = 64
    batch_size: int = 8


@dataclass
class WhitenSection:
    dim: int = 512                      # output dimension of the learned whitening (<= channels)
    sample: int = 100_000               # region descriptors sampled to learn it
    sources: list[str] = field(default_factory=lambda: ["grid", "fs_egm"])
    pairs: str | None = None            # optional Parquet of matching (image_id, region_id) pairs → Lw whitening


@dataclass
class GraphSection:
    source: str = "fs_egm"              # regions that form the k-NN graph
    k: int = 50
    beta: float = 3.0
    alpha: float = 0.99
    exact_threshold: int = 200_000      # exact k-NN below this many regions, IVF above
    block_rows: int = 50_000
    tol: float = 1e-6


@dataclass
class ObjectSaliencySection:
    k: int = 50                         # neighbours of each patch descriptor among the graph's regions
    patch_side: int = 3                 # side (feature cells) of the square patch R_p around each position
    Theta: float = 2.0
    theta: float = 3.0
    rho: float = 2.0
    tau: float = 0.0
    sigma: float = 2.0


@dataclass
class DescriptorsSection:
    methods: list[str] = field(default_factory=lambda: [
        "mac", "gem", "spoc", "crow", "cam_ofa", "rmac", "fs_egm", "os_egm", "os_egm4"])


@dataclass
class FaissSection:
    methods: list[str] = field(default_factory=lambda: ["gem", "rmac", "fs_egm", "os_egm"])
    regional: list[str] = field(default_factory=lambda: ["fs_egm"])   # region sources indexed for regional search
    factory: str | None = None          # None: chosen from corpus size and memory budget
    memory_budget_gb: float = 16.0
    train_sample: int = 200_000


@dataclass
class AsmkSection:
    codebook_size: int = 1024
    codebook_sample: int = 200_000
    kernels: list[str] = field(default_factory=lambda: ["asmk_star", "r_asmk_star"])
    region_source: str = "fs_egm"
    multiple_assignment: int = 1        # database side: nearest words each local descriptor is added to
    query_multiple_assignment: int = 5  # query side (the asmk package's and the ASMK paper's default)


@dataclass
class ReindexSection:
    rebuild_graph_fraction: float = 0.2  # rebuild graph + centrality when more than this share of images changed
    keep_days: float = 7.0
    keep_min: int = 2
    reuse_whitening: bool = True
    reuse_codebook: bool = True


@dataclass
class IndexConfig:
    images: str = ""
    out: str = ""
    limit: int | None = None             # deterministic subset of N images (the demo); None: the whole corpus
    include: list[str] = field(default_factory=list)  # id glob patterns always kept in a limited subset
    exclude: list[str] = field(default_factory=list)  # id glob patterns never indexed (e.g. query photos)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    ray: RayConfig = field(default_factory=RayConfig)
    extract: ExtractSection = field(default_factory=ExtractSection)
    whiten: WhitenSection = field(default_factory=WhitenSection)
    graph: GraphSection = field(default_factory=GraphSection)
    object_saliency: ObjectSaliencySection = field(default_factory=ObjectSaliencySection)
    descriptors: DescriptorsSection = field(default_factory=DescriptorsSection)
    faiss: FaissSection = field(default_factory=FaissSection)
    asmk: AsmkSection = field(default_factory=AsmkSection)
    reindex: ReindexSection = field(default_factory=ReindexSection)

    def validate(self) -> "IndexConfig":
        if not self.images:
            raise ConfigError("images: required (folder, URI list, Parquet manifest or s3:// prefix)")
        if not self.out:
            raise ConfigError("out: required (output root URI)")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"stages: unknown {bad}; known: {list(STAGES)}")
        if self.extract.descriptor_dtype not in ("float16", "float32"):
            raise ConfigError("extract.descriptor_dtype: float16 or float32")
        if not 0 <= self.graph.alpha < 1:
            raise ConfigError("graph.alpha must be in [0, 1)")
        if self.graph.k < 1 or self.object_saliency.k < 1:
            raise ConfigError("graph.k and object_saliency.k must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit must be >= 1 or null")
        if self.extract.local_features is None:
            self.extract.local_features = DEFAULT_LOCAL_FEATURES if "asmk" in self.stages else 0
        if "asmk" in self.stages and self.extract.local_features <= 0:
            raise ConfigError("stage asmk needs extract.local_features > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (dataclasses, lists, optionals, scalars)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix or 'config'}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> IndexConfig:
    """Load a YAML config, apply dotted-key overrides (``{"extract.max_side": 512}``) and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
        base = Path(path).resolve().parent
        for key in ("images", "out"):  # relative local paths are relative to the config file
            v = data.get(key)
            if isinstance(v, str) and "://" not in v and not Path(v).is_absolute():
                data[key] = str((base / v).resolve())
    for dotted, value in (overrides or {}).items():
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return _build(IndexConfig, data).validate()
