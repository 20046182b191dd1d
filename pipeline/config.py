"""One typed configuration tree, from the command line down to the algorithms.

Every algorithm owns the frozen dataclass of its parameters next to its code (``pipeline.extract.ExtractConfig``,
``pipeline.egm.EGMParams``, ``pipeline.knn_graph.GraphConfig``, ``pipeline.katz.KatzConfig``, ...).
:class:`IndexConfig` composes them, one section per stage, and :func:`build` is the single loader that turns
a YAML/JSON mapping (a config file, ``--set`` overrides, or the ``config.json`` a run stores) into that tree:
unknown keys and wrong types are errors that name the key, so a typo never falls back to a default silently.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.asmk import AsmkIndexConfig
from pipeline.descriptors import DescriptorsConfig
from pipeline.diffusion import DiffusionStageConfig
from pipeline.errors import ConfigError
from pipeline.extract import ExtractConfig
from pipeline.faiss_index import FaissConfig
from pipeline.katz import KatzConfig
from pipeline.knn_graph import GraphConfig
from pipeline.matching import MATCHER_EXTRACTOR
from pipeline.object_saliency import ObjectSaliencyConfig
from pipeline.rpn_regions import RPN_SOURCE, RegionSourceConfig
from pipeline.verification import VerifyConfig
from pipeline.whitening import WhitenConfig

DEFAULT_LOCAL_FEATURES = 1000  # top-N locals per image when ASMK is on and the config does not say (issue 5)
STAGES = ("extract", "whiten", "graph", "object_saliency", "descriptors", "faiss", "asmk", "diffusion")
# every stage the DAG knows, in order: the optional ``rpn`` pass (regions.source: rpn) runs before the descriptors
ALL_STAGES = STAGES[:4] + ("rpn",) + STAGES[4:]


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide the Ray stages run."""

    address: str | None = None          # None/"local": start a local Ray; "auto" or ray://...: join a cluster
    num_cpus: int | None = None         # CPUs of a local Ray
    workers: int | None = None          # extraction actors (default: one per GPU, or CPUs/4)
    cpus_per_worker: float | None = None
    use_gpu: bool | None = None         # None: use GPUs when the cluster has any


@dataclass(frozen=True)
class ReindexConfig:
    """Nightly re-indexing policy (``jobs.reindex``)."""

    rebuild_graph_fraction: float = 0.2  # rebuild graph + centrality when more than this share of images changed
    keep_days: float = 7.0
    keep_min: int = 2
    reuse_whitening: bool = True
    reuse_codebook: bool = True


@dataclass(frozen=True)
class LeaseConfig:
    """The lease an index or reindex job holds on its output (one writer at a time; a dead driver's lease is
    taken over once its heartbeat is older than ``ttl_s``)."""

    ttl_s: float = 120.0
    heartbeat_s: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError(f"need 0 < heartbeat_s < ttl_s (got {self.heartbeat_s}, {self.ttl_s})")


@dataclass(frozen=True)
class IndexConfig:
    """The index job's whole configuration: corpus, output, stages and one section per stage."""

    images: str = ""
    out: str = ""
    limit: int | None = None             # deterministic subset of N images (the demo); None: the whole corpus
    include: tuple[str, ...] = ()        # id glob patterns always kept in a limited subset
    exclude: tuple[str, ...] = ()        # id glob patterns never indexed (e.g. query photos)
    stages: tuple[str, ...] = STAGES
    ray: RayConfig = field(default_factory=RayConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    whiten: WhitenConfig = field(default_factory=WhitenConfig)
    regions: RegionSourceConfig = field(default_factory=RegionSourceConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    katz: KatzConfig = field(default_factory=KatzConfig)
    object_saliency: ObjectSaliencyConfig = field(default_factory=ObjectSaliencyConfig)
    descriptors: DescriptorsConfig = field(default_factory=DescriptorsConfig)
    faiss: FaissConfig = field(default_factory=FaissConfig)
    asmk: AsmkIndexConfig = field(default_factory=AsmkIndexConfig)
    diffusion: DiffusionStageConfig = field(default_factory=DiffusionStageConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)   # +sv at query time (matcher, MAGSAC, fusion)
    reindex: ReindexConfig = field(default_factory=ReindexConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)

    def validated(self) -> "IndexConfig":
        """Cross-section checks and stage-dependent defaults; returns the completed config."""
        if not self.images:
            raise ConfigError("images: required (folder, URI list, Parquet manifest or s3:// prefix)")
        if not self.out:
            raise ConfigError("out: required (output root URI)")
        bad = [s for s in self.stages if s not in ALL_STAGES]
        if bad:
            raise ConfigError(f"stages: unknown {bad}; known: {list(ALL_STAGES)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit must be >= 1 or null")
        cfg = self
        cnn_asmk = "asmk" in cfg.stages and cfg.asmk.locals == "cnn"
        if cfg.extract.local_features is None:
            n = DEFAULT_LOCAL_FEATURES if cnn_asmk else 0
            cfg = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, local_features=n))
        if cnn_asmk and cfg.extract.local_features <= 0:
            raise ConfigError("stage asmk needs extract.local_features > 0 (or asmk.locals: xfeat|aliked)")
        if "asmk" in cfg.stages and cfg.asmk.locals != "cnn" and cfg.asmk.locals != cfg.extract.keypoints.name:
            raise ConfigError(f"asmk.locals: {cfg.asmk.locals} needs extract.keypoints.name: {cfg.asmk.locals} "
                              f"(got {cfg.extract.keypoints.name})")
        for key, name in (("verify.matcher.name", cfg.verify.matcher.name),
                          ("verify.rescore_matcher", cfg.verify.rescore_matcher)):
            needs = MATCHER_EXTRACTOR.get(name)
            if needs is not None and cfg.extract.keypoints.name not in (needs, "none"):
                raise ConfigError(f"{key}: {name} matches {needs} keypoints; extract.keypoints.name is "
                                  f"{cfg.extract.keypoints.name}")
        if cfg.extract.keypoints.name == "cnn" and cfg.extract.local_features <= 0:
            raise ConfigError("extract.keypoints.name: cnn keypoints are the locals: needs extract.local_features > 0")
        if cfg.whiten.kind == "learned":   # its own globals and FAISS snapshot, next to the PCA-whitened rmac
            cfg = with_methods(cfg, ("rmac_learned",))
        if cfg.regions.source == RPN_SOURCE:  # the rpn pass, R-MAC over its proposals, and regional:rpn
            methods = ("rmac_rpn", "rmac_learned_rpn") if cfg.whiten.kind == "learned" else ("rmac_rpn",)
            cfg = with_methods(cfg, methods)
            stages = set(cfg.stages) | ({RPN_SOURCE} if "descriptors" in cfg.stages else set())
            regional = cfg.faiss.regional + (() if RPN_SOURCE in cfg.faiss.regional else (RPN_SOURCE,))
            cfg = dataclasses.replace(cfg, stages=tuple(s for s in ALL_STAGES if s in stages),
                                      faiss=dataclasses.replace(cfg.faiss, regional=regional))
        return cfg

    @property
    def graph_beta(self) -> float:
        """``beta`` of ``s(v, u) = max(v.u, 0)^beta``: shared by the graph and object saliency (eq. 14)."""
        return self.graph.beta

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (tuples as lists); :func:`config_from_dict` reads it back."""
        return to_plain(self)


def with_methods(cfg: IndexConfig, methods: tuple[str, ...]) -> IndexConfig:
    """``cfg`` with ``methods`` added to the final descriptors and to the FAISS global indexes (when absent)."""
    def add(have: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(have) + tuple(m for m in methods if m not in have)

    descriptors = dataclasses.replace(cfg.descriptors, methods=add(cfg.descriptors.methods))
    return dataclasses.replace(cfg, descriptors=descriptors,
                               faiss=dataclasses.replace(cfg.faiss, methods=add(cfg.faiss.methods)))


# ------------------------------------------------------------------------------------------------ loader
def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts and lists (what YAML and JSON hold)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (dataclasses, lists, tuples, optionals, scalars)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {tp}")
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
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


def _field_default(cls: type, name: str) -> Any:
    """The default value of dataclass field ``name`` (its factory called), or None when it has none."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def build(cls: type, data: Mapping[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys and wrong types raise :class:`ConfigError` naming
    the key; values the dataclass itself refuses (``__post_init__``) are reported the same way. ``base``: an
    instance whose values the mapping overrides (default: the class defaults).

    A nested section given in part (``verify.matcher.max_keypoints``) overrides the field's own default instance,
    not the nested class's defaults: ``verify.matcher`` defaults to the tuned MNN (cosine 0.75), and building it
    from ``MatcherConfig()`` silently reset the threshold to 0.82 whenever one of its keys was set."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, Mapping):
            default = getattr(base, k) if base is not None else _field_default(cls, k)
            kwargs[k] = build(hints[k], v, key, default if isinstance(default, hints[k]) else None)
        else:
            kwargs[k] = _coerce(v, hints[k], key)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> IndexConfig:
    """Load a YAML config, apply dotted-key overrides (``{"extract.max_side": 512}``) and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
        base = Path(path).resolve().parent
        for key in ("images", "out"):  # relative local paths are relative to the config file
            v = data.get(key)
            if isinstance(v, str) and "://" not in v and not Path(v).is_absolute():
                data[key] = str((base / v).resolve())
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return build(IndexConfig, data).validated()


def config_from_dict(data: Mapping[str, Any]) -> IndexConfig:
    """The config a run stored (``config.json``), read back through the same loader."""
    return build(IndexConfig, data)


__all__ = ["IndexConfig", "RayConfig", "ReindexConfig", "LeaseConfig", "ConfigError", "STAGES", "ALL_STAGES",
           "DEFAULT_LOCAL_FEATURES", "load_config", "config_from_dict", "build", "to_plain"]
