"""A synthetic corpus at table level: what the ``extract`` stage would write for N images, without images.

    python -m experiments.synth_corpus --out /work/runs/scale/n10000 --images 10000 [--config configs/scale.yaml]

For every shard of N images it writes the ``images``, ``regions``, ``globals``, ``locals``, ``keypoints`` and
``errors`` tables with the real schemas (``storage.schemas``) and file layout (``storage.tables.TableStore``),
commits the shard as extraction does (``StageManifest.commit``), writes the corpus manifest
(``storage.run.write_corpus_manifest``, ids ``synth_0000042``, URIs ``synth://...`` that are never read), the
run's ``config.json``, a local PCA artefact, and records the ``extract`` stage as done in ``run.json`` with the
hash the engine computes, so ``jobs.index`` (or ``experiments.scale_dag``) runs every later stage unchanged and
never redoes extraction. Shards are independent and deterministic (seeded by shard and image index), so a
killed generator resumes from its committed shards.

What is realistic and what is not:
* per-image counts and sizes are drawn from the real museum-landmarks index at 512 px (3,530 images; see
  ``experiments/data/demo_image_stats.json``): image and feature-map sizes, R-MAC grid regions per level,
  FS.EGM regions, 5 CAM regions and the locals per image (mean 174, cap 300); locals can be scaled by a stated
  ``locals_fraction`` and keypoints (XFeat: 1,024 per image, 64-d float16) set by count;
* descriptors have the real widths (1,280 channels of MobileNetV2 ``features.18``; locals 128-d after PCA) and
  value ranges (regional MACs in [0, 6] with ~20 % zeros, like ReLU6 maps; globals L2-normalised);
* content is clustered so that objects recur: an image shows one object drawn from a power-law popularity over
  ``N / images_per_object`` objects, or (``distractor_fraction``) an object of its own; its regions mix the
  object's latent code with the image background in proportion to their overlap with the object box, its
  locals are drawn from the object's visual patterns, so the k-NN graph, Katz, ASMK and FAISS see repeated
  objects and distractors. Everything is generated through a 64-d latent code and a fixed 1,280 x 64 basis plus
  full-width noise, so it is not a model of real image statistics beyond these properties.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actors.engine import corpus_version, params_hash, stage_params
from jobs.index import DAG
from pipeline.config import IndexConfig, config_from_dict, load_config
from storage.arrays import save_arrays
from storage.corpus import assign_shards
from storage.layout import RunLayout, shard_label
from storage.run import RunManifest, read_corpus_manifest, save_run_config, write_corpus_manifest
from storage.schemas import (ERRORS_SCHEMA, SCHEMA_VERSION, descriptor_array, descriptor_type, globals_schema,
                             images_schema, locals_schema, regions_schema)
from storage.tables import StageManifest, TableStore
from storage.uri import exists

log = logging.getLogger("synth")
STATS = Path(__file__).with_name("data") / "demo_image_stats.json"
LATENT = 64                       # latent code width of objects, backgrounds and regions
BANK_ROWS = 4096                  # rows of the shared full-width noise bank
N_WORDS = 4096                    # "true" visual words the locals / keypoints are drawn around
PATTERNS = 256                    # visual patterns per object
CAM_THRESHOLDS = (0.01, 0.1, 0.2, 0.3, 0.4)
ID_WIDTH = 7


def keypoints_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """Learned local features (XFeat 64-d / ALIKED 128-d): one row per keypoint, position in original-image
    pixels. Defined here until ``storage.schemas`` has its own (the lead reconciles the two)."""
    return pa.schema([
        ("image_id", pa.string()), ("keypoint_id", pa.int32()), ("x", pa.float32()), ("y", pa.float32()),
        ("score", pa.float32()), ("descriptor", descriptor_type(dim, dtype)),
    ], metadata={b"schema_version": str(SCHEMA_VERSION).encode(), b"table": b"keypoints"})


@dataclass(frozen=True)
class SynthSpec:
    """What to generate (besides the index config, which gives region sources, globals, shard size, dtype)."""

    n_images: int
    seed: int = 0
    channels: int = 1280              # MobileNetV2 features.18
    local_dim: int = 128              # locals after the local PCA
    locals_fraction: float = 1.0      # of the real per-image count (stated in the results when < 1)
    keypoints: int = 1024             # per image (XFeat's default top-k); 0: no keypoints table
    keypoint_dim: int = 64
    images_per_object: float = 8.0    # mean images showing one recurring object
    distractor_fraction: float = 0.4  # images whose object appears nowhere else


def image_id(i: int) -> str:
    return f"synth_{i:0{ID_WIDTH}d}"


def image_index(iid: str) -> int:
    return int(iid.rsplit("_", 1)[1])


# ------------------------------------------------------------------------------------------ deterministic noise
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 arrays; wrap-around multiplication is intended)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_uniform(seed: int, stream: int, ids: np.ndarray, k: int) -> np.ndarray:
    """(len(ids), k) uniforms in [0, 1), a pure function of (seed, stream, id, column)."""
    ids = np.asarray(ids, dtype=np.uint64).reshape(-1, 1)
    base = _mix(np.array([seed * 1_000_003 + stream], dtype=np.uint64))
    with np.errstate(over="ignore"):
        x = _mix(base ^ _mix(ids * np.uint64(k) + np.arange(k, dtype=np.uint64)[None]))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def hashed_normal(seed: int, stream: int, ids: np.ndarray, k: int) -> np.ndarray:
    """(len(ids), k) standard normals (Box-Muller on :func:`hashed_uniform`), float32."""
    u = hashed_uniform(seed, stream, ids, 2 * k)
    r = np.sqrt(-2.0 * np.log(np.maximum(u[:, :k], 1e-300)))
    return (r * np.cos(2 * np.pi * u[:, k:])).astype(np.float32)


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Bases:
    """The fixed random matrices of a seed: channel basis, noise bank, word banks (built once per process)."""

    def __init__(self, seed: int, channels: int, local_dim: int, keypoint_dim: int) -> None:
        rng = np.random.default_rng([seed, 0])
        self.B = (rng.standard_normal((LATENT, channels)) / np.sqrt(LATENT)).astype(np.float32)
        self.bank = rng.standard_normal((BANK_ROWS, channels)).astype(np.float32)
        self.cam = rng.standard_normal((LATENT, 256)).astype(np.float32)
        self.crow = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        # per-channel offset and gain: channels differ in how often they fire and how strongly, as in the real
        # maps (zeros per channel 4-56 %, channel means 0.3-3.2 against the real 0.4-3.4)
        self.offset = rng.normal(0.8, 0.6, channels).astype(np.float32)
        self.gain = np.exp(rng.normal(0.3, 0.5, channels)).astype(np.float32)
        # PCA-reduced locals: decreasing variance along the dimensions (the real per-dimension std falls from
        # 0.30 to ~0.05 over the 128 dimensions)
        self.local_profile = ((np.arange(local_dim) + 1.0) ** -0.4).astype(np.float32)
        self.words = _l2n(rng.standard_normal((N_WORDS, local_dim))).astype(np.float32)
        self.kp_words = _l2n(rng.standard_normal((N_WORDS, keypoint_dim))).astype(np.float32)
        self._torch: dict[str, Any] | None = None

    def torch(self) -> dict[str, Any]:
        """The arrays :func:`activations` uses, as torch tensors (for the simulated maps of object saliency)."""
        if self._torch is None:
            import torch

            self._torch = {k: torch.from_numpy(getattr(self, k)) for k in ("B", "bank", "offset", "gain")}
        return self._torch


def activations(bases: "Bases", lat: np.ndarray, noise_rows: np.ndarray) -> np.ndarray:
    """ReLU6-like map values (float32, [0, 6], ~24 % zeros) from latent codes (n, LATENT) and noise-bank rows."""
    y = lat @ bases.B + 0.25 * bases.bank[noise_rows]
    y += bases.offset
    y *= bases.gain
    return np.clip(y, 0.0, 6.0, out=y)


# ------------------------------------------------------------------------------------------ per-image plan
class Stats:
    """The real per-image distribution (sizes, regions per source and level, locals)."""

    def __init__(self, path: Path = STATS) -> None:
        data = json.loads(path.read_text())
        rows = np.asarray(data["rows"], dtype=np.int64)
        self.columns = data["columns"][:-1]
        self.values = rows[:, :-1]
        self.cum = np.cumsum(rows[:, -1]) / rows[:, -1].sum()

    def draw(self, u: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.cum) - 1)
        return {c: self.values[idx, j] for j, c in enumerate(self.columns)}


def image_plan(spec: SynthSpec, idx: np.ndarray, stats: Stats) -> dict[str, np.ndarray]:
    """Per-image scalars of images ``idx``, a pure function of (seed, index): sizes, counts, object, box."""
    u = hashed_uniform(spec.seed, 1, idx, 8)
    plan = stats.draw(u[:, 0])
    n_objects = max(1, int(round(spec.n_images * (1 - spec.distractor_fraction) / spec.images_per_object)))
    recurring = u[:, 1] >= spec.distractor_fraction
    popular = np.minimum((n_objects * u[:, 2] ** 2).astype(np.int64), n_objects - 1)  # power-law popularity
    plan["object"] = np.where(recurring, popular, n_objects + idx)
    w, h = u[:, 3] * 0.4 + 0.3, u[:, 4] * 0.4 + 0.3                  # object box, unit coordinates
    cx, cy = 0.5 + (u[:, 5] - 0.5) * (1 - w), 0.5 + (u[:, 6] - 0.5) * (1 - h)
    plan["box"] = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    plan["n_locals"] = np.round(plan["n_loc"] * spec.locals_fraction).astype(np.int64)
    return plan


def _overlap(boxes: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Share of each unit box (R, 4) covered by the object box (4,)."""
    iw = np.clip(np.minimum(boxes[:, 2], obj[2]) - np.maximum(boxes[:, 0], obj[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], obj[3]) - np.maximum(boxes[:, 1], obj[1]), 0, None)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
    return iw * ih / area


def _grid_boxes(level: int, count: int, aspect: float) -> np.ndarray:
    """``count`` R-MAC squares of level ``level`` in unit coordinates of an image of ``aspect`` = w / h."""
    side = 2.0 / (level + 1)
    sw, sh = (side / aspect, side) if aspect >= 1 else (side, side * aspect)
    nx = max(1, int(round(np.sqrt(count * max(aspect, 1 / aspect)))))
    nx = nx if aspect >= 1 else max(1, -(-count // nx))
    ny = max(1, -(-count // nx))
    xs = np.linspace(0, max(0.0, 1 - sw), nx)
    ys = np.linspace(0, max(0.0, 1 - sh), ny)
    g = np.array([(x, y) for y in ys for x in xs][:count]).reshape(-1, 2)
    return np.concatenate([g, g + [min(sw, 1.0), min(sh, 1.0)]], axis=1)


def region_layout(plan: dict[str, np.ndarray], j: int, sources: tuple[str, ...]) -> tuple[list[str], np.ndarray,
                                                                                         np.ndarray, np.ndarray]:
    """(source per region, level, unit boxes, score) of image ``j`` of the plan, in extraction's order."""
    obj = plan["box"][j]
    aspect = plan["width"][j] / plan["height"][j]
    src: list[str] = []
    lev, boxes, score = [], [], []
    if "full" in sources:
        src.append("full"), lev.append(0), boxes.append([[0, 0, 1, 1]]), score.append([1.0])
    if "grid" in sources:
        for level in (1, 2, 3):
            n = int(plan[f"grid{level}"][j])
            if n:
                src += ["grid"] * n
                lev += [level] * n
                boxes.append(_grid_boxes(level, n, aspect))
                score.append(np.ones(n))
    if "fs_egm" in sources:
        n = max(1, int(plan["fs_egm0"][j]))
        pad = np.linspace(0, 0.15, n)[:, None] * [1, 1, -1, -1]
        src += ["fs_egm"] * n
        lev += [0] * n
        boxes.append(np.clip(obj[None] + pad * (obj[2] - obj[0]), 0, 1))
        score.append(np.r_[1.0, np.linspace(0.9, 0.5, n - 1)] if n > 1 else [1.0])
    if "cam" in sources:
        grow = np.array([0.6, 0.45, 0.3, 0.15, 0.0])[:, None] * [-1, -1, 1, 1]
        src += ["cam"] * len(CAM_THRESHOLDS)
        lev += list(range(len(CAM_THRESHOLDS)))
        boxes.append(np.clip(obj[None] + grow * (obj[2] - obj[0]), 0, 1))
        score.append(CAM_THRESHOLDS)
    return src, np.asarray(lev, np.int16), np.concatenate(boxes).astype(np.float64), np.concatenate(score)


# ------------------------------------------------------------------------------------------ one shard
def _region_descriptors(bases: Bases, lat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Regional MACs from latent codes plus full-width noise, in [0, 6] (float32)."""
    return activations(bases, lat, rng.integers(BANK_ROWS, size=len(lat)))


def _per_image_sum(X: np.ndarray, rows_img: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, X.shape[1]), np.float32)
    np.add.at(out, rows_img, _l2n(X))
    return out


def _globals(bases: Bases, methods: tuple[str, ...], X: np.ndarray, src: np.ndarray, rimg: np.ndarray,
             z_obj: np.ndarray, z_bg: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Raw globals of the shard's images as extraction stores them (per method, (n, C), zero-padded)."""
    n, C = len(z_obj), X.shape[1]
    full = np.zeros((n, C), np.float32)
    first = np.flatnonzero(np.r_[True, rimg[1:] != rimg[:-1]])   # first region of each image: its full view
    full[rimg[first]] = X[first]
    noise = np.abs(bases.bank[rng.integers(BANK_ROWS, size=n)])
    out = {}
    for m in methods:
        if m == "mac":
            out[m] = _l2n(full)
        elif m == "gem":
            out[m] = _l2n(full ** 1.5 + 0.2 * noise)
        elif m == "spoc":
            out[m] = _l2n(full + 0.5 * noise)
        elif m == "crow":
            out[m] = _l2n(full * bases.crow)
        elif m in ("cam_ofa", "cam_ona"):
            cam = np.zeros((n, C), np.float32)
            cam[:, :256] = _l2n((0.8 * z_obj + 0.6 * z_bg) @ bases.cam)
            out[m] = cam
        elif m.endswith("_sum") and (src == m[:-4].replace("_ofa", "")).any():
            s = m[:-4].replace("_ofa", "")                           # cam_ofa_sum <- cam, fs_egm_sum <- fs_egm
            out[m] = _per_image_sum(X[src == s], rimg[src == s], n)
    return out


def _visual_words(bases_words: np.ndarray, bank: np.ndarray, obj: np.ndarray, from_obj: np.ndarray,
                  seed: int, rng: np.random.Generator, profile: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised local descriptors: an object's patterns (word + fixed offset) or random words, plus noise."""
    L, D = len(obj), bases_words.shape[1]
    key = obj.astype(np.uint64) * np.uint64(PATTERNS) + rng.integers(PATTERNS, size=L).astype(np.uint64)
    h = _mix(key ^ _mix(np.array([seed + 77], np.uint64)))
    word = np.where(from_obj, (h % np.uint64(N_WORDS)).astype(np.int64), rng.integers(N_WORDS, size=L))
    X = bases_words[word]
    X += rng.standard_normal((L, D), dtype=np.float32) * np.float32(0.3 / np.sqrt(D))
    sel = np.flatnonzero(from_obj)
    rows = ((h[sel] >> np.uint64(20)) % np.uint64(BANK_ROWS)).astype(np.int64)
    X[sel] += bank[rows, :D] * np.float32(0.5 / np.sqrt(D))
    if profile is not None:
        X *= profile
    X *= bases_words.dtype.type(1) / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


def _points(plan: dict[str, np.ndarray], counts: np.ndarray, obj_share: float, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image row per point, in-object flag, pixel xy) of ``counts[j]`` points per image."""
    rows = np.repeat(np.arange(len(counts)), counts)
    inside = rng.random(len(rows)) < obj_share
    box = np.where(inside[:, None], plan["box"][rows], [[0.0, 0.0, 1.0, 1.0]])
    u = rng.random((len(rows), 2))
    xy = np.stack([box[:, 0] + u[:, 0] * (box[:, 2] - box[:, 0]), box[:, 1] + u[:, 1] * (box[:, 3] - box[:, 1])], 1)
    xy *= np.stack([plan["width"][rows], plan["height"][rows]], 1)
    return rows, inside, xy.astype(np.float32)


def shard_tables(spec: SynthSpec, cfg: IndexConfig, bases: Bases, stats: Stats, shard: int, idx: np.ndarray
                 ) -> dict[str, pa.Table]:
    """Every table extraction writes for the images ``idx`` of one shard (plus ``keypoints``)."""
    ex, C, dt = cfg.extract, spec.channels, cfg.extract.descriptor_dtype
    rng = np.random.default_rng([spec.seed, 100, shard])
    plan = image_plan(spec, idx, stats)
    n = len(idx)
    ids = np.array([image_id(int(i)) for i in idx])
    z_obj = hashed_normal(spec.seed, 10, plan["object"], LATENT)
    z_bg = hashed_normal(spec.seed, 11, idx, LATENT)
    src_l, lev_l, box_l, score_l, rimg_l, omega_l = [], [], [], [], [], []
    for j in range(n):
        s, lv, b, sc = region_layout(plan, j, ex.regions)
        src_l += s
        lev_l.append(lv), box_l.append(b), score_l.append(sc), rimg_l.append(np.full(len(s), j))
        omega_l.append(_overlap(b, plan["box"][j]))
    src, rimg, omega = np.array(src_l), np.concatenate(rimg_l), np.concatenate(omega_l)[:, None]
    lat = (0.3 + 0.9 * omega) * z_obj[rimg] + (1 - 0.6 * omega) * z_bg[rimg] + 0.35 * rng.standard_normal(
        (len(rimg), LATENT)).astype(np.float32)
    X = _region_descriptors(bases, lat.astype(np.float32), rng)
    boxes = np.concatenate(box_l) * np.stack([plan["width"], plan["height"]] * 2, 1)[rimg]
    region_id = np.concatenate([np.arange(len(r)) for r in rimg_l]).astype(np.int32)
    regions = pa.table({
        "image_id": pa.array(ids[rimg]), "region_id": region_id, "source": pa.array(src),
        "level": np.concatenate(lev_l), **{k: boxes[:, i].astype(np.float32) for i, k in enumerate(
            ("x0", "y0", "x1", "y1"))}, "score": np.concatenate(score_l).astype(np.float32),
        "saliency": np.clip(rng.normal(0.65, 0.08, len(rimg)), 0.08, 1.0).astype(np.float32),
        "descriptor": descriptor_array(X, dt)}, schema=regions_schema(C, dt))
    g = _globals(bases, ex.globals, X, src, rimg, z_obj, z_bg, rng)
    gm = list(g)
    G = np.stack([g[m] for m in gm], 1).reshape(n * len(gm), C)
    globals_ = pa.table({"image_id": pa.array(np.repeat(ids, len(gm))), "method": pa.array(gm * n),
                         "descriptor": descriptor_array(G, dt)}, schema=globals_schema(C, dt))
    out = {"images": _images_table(plan, ids, idx, shard, C, rng), "regions": regions, "globals": globals_}
    if ex.n_locals > 0:
        counts = np.minimum(plan["n_locals"], ex.n_locals)
        rows, inside, xy = _points(plan, counts, 0.6, rng)
        D = _visual_words(bases.words, bases.bank, plan["object"][rows], inside, spec.seed, rng,
                          bases.local_profile)
        out["locals"] = pa.table({
            "image_id": pa.array(ids[rows]), "local_id": _ranks(counts), "x": xy[:, 0], "y": xy[:, 1],
            "scale": rng.choice(np.array([1.0, 1.4142], np.float32), len(rows)),
            "strength": rng.random(len(rows)).astype(np.float32), "descriptor": descriptor_array(D, dt)},
            schema=locals_schema(spec.local_dim, dt))
    if spec.keypoints > 0:
        counts = np.full(n, spec.keypoints)
        rows, inside, xy = _points(plan, counts, 0.6, rng)
        D = _visual_words(bases.kp_words, bases.bank, plan["object"][rows] + 10**9, inside, spec.seed, rng)
        out["keypoints"] = pa.table({
            "image_id": pa.array(ids[rows]), "keypoint_id": _ranks(counts), "x": xy[:, 0], "y": xy[:, 1],
            "score": rng.random(len(rows)).astype(np.float32), "descriptor": descriptor_array(D, "float16")},
            schema=keypoints_schema(spec.keypoint_dim, "float16"))
    out["errors"] = ERRORS_SCHEMA.empty_table()
    return out


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0..count-1 for every image, concatenated (int32)."""
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return (np.arange(int(counts.sum())) - starts).astype(np.int32)


def _images_table(plan: dict[str, np.ndarray], ids: np.ndarray, idx: np.ndarray, shard: int, C: int,
                  rng: np.random.Generator) -> pa.Table:
    w, h = plan["width"], plan["height"]
    s = np.minimum(1.0, 512.0 / np.maximum(w, h))
    sparsity = (rng.beta(4, 2, (len(ids), C)) * 1.0).astype(np.float16)
    return pa.table({
        "image_id": pa.array(ids), "uri": pa.array([f"synth://{i}.jpg" for i in ids]),
        "shard": np.full(len(ids), shard, np.int32), "width": w.astype(np.int32), "height": h.astype(np.int32),
        "proc_width": np.round(w * s).astype(np.int32), "proc_height": np.round(h * s).astype(np.int32),
        "feat_width": plan["feat_width"].astype(np.int32), "feat_height": plan["feat_height"].astype(np.int32),
        "bytes": (w * h * 0.35).astype(np.int64), "sha1": pa.array([hashlib.sha1(i.encode()).hexdigest() for i in ids]),
        "backbone": pa.array(["mobilenet_v2"] * len(ids)), "layer": pa.array(["features.18"] * len(ids)),
        "act_sparsity": pa.FixedSizeListArray.from_arrays(pa.array(sparsity.reshape(-1)), C),
        "act_mean": rng.normal(0.6, 0.05, len(ids)).astype(np.float32), "act_max": np.full(len(ids), 6.0, np.float32),
    }, schema=images_schema(C))


# ------------------------------------------------------------------------------------------ the corpus
_WORKER: dict[str, Any] = {}


def _write_shard(job: tuple[dict[str, Any], dict[str, Any], int, int, int]) -> dict[str, Any]:
    """Generate, write and commit one shard (runs in a worker process; bases built once per process)."""
    spec_d, cfg_d, shard, start, stop = job
    spec, cfg = SynthSpec(**spec_d), config_from_dict(cfg_d)
    key = json.dumps([spec_d["seed"], spec.channels, spec.local_dim, spec.keypoint_dim])
    if _WORKER.get("key") != key:
        _WORKER.update(key=key, bases=Bases(spec.seed, spec.channels, spec.local_dim, spec.keypoint_dim),
                       stats=Stats())
    t0 = time.time()
    tables = shard_tables(spec, cfg, _WORKER["bases"], _WORKER["stats"], shard, np.arange(start, stop))
    store = TableStore(cfg.out)
    files = {name: store.write(name, "extract", shard, t) for name, t in tables.items()}
    rows = {name: t.num_rows for name, t in tables.items()}
    StageManifest(cfg.out, "extract").commit(shard, files, images=stop - start, errors=0, seconds=time.time() - t0,
                                             synthetic=True)
    return {"shard": shard, "rows": rows}


def corpus_table(n: int, shard_size: int) -> pa.Table:
    """The corpus manifest of N synthetic images (ids sorted, consecutive shards of ``shard_size``)."""
    ids = [image_id(i) for i in range(n)]
    corpus = pa.table({"image_id": pa.array(ids), "uri": pa.array([f"synth://{i}.jpg" for i in ids]),
                       "size": pa.array(np.full(n, -1, np.int64)), "version": pa.array([""] * n)})
    return assign_shards(corpus, shard_size)


def scale_config(root: str, config: str | None, overrides: dict[str, Any] | None = None) -> IndexConfig:
    """The index config of a synthetic run: ``images`` is the run's own corpus manifest (a Parquet listing that
    ``storage.corpus.list_corpus`` accepts), ``out`` the run."""
    return load_config(config, {"images": RunLayout(root).corpus_manifest, "out": root, "limit": None,
                                **(overrides or {})})


def _record_extract(cfg: IndexConfig, manifest: pa.Table, result: dict[str, Any], seconds: float) -> None:
    """``run.json``'s extract entry with the hash :func:`actors.engine.run_pipeline` computes, so a later
    ``jobs.index`` with the same config finds extraction up to date."""
    cv = corpus_version(manifest)
    phash = params_hash([stage_params(DAG[0], cfg), cv])
    RunManifest(cfg.out).record("extract", {
        "status": "done", "params_hash": phash, "parameters": stage_params(DAG[0], cfg)["params"],
        "input_version": cv, "output_version": params_hash([phash, "synthetic"]), "result": result,
        "seconds": seconds, "peak_rss_bytes": 0})


def _local_pca(cfg: IndexConfig, spec: SynthSpec) -> None:
    """A local PCA artefact (random orthonormal projection) like the one extraction learns."""
    uri = RunLayout(cfg.out).artefact("local_pca")
    if cfg.extract.n_locals <= 0 or exists(uri):
        return
    q, _ = np.linalg.qr(np.random.default_rng([spec.seed, 5]).standard_normal((spec.channels, spec.local_dim)))
    save_arrays(uri, mean=np.zeros(spec.channels, np.float32), projection=q.astype(np.float32),
                sample=np.int64(0), params=np.array(json.dumps({"synthetic": True})))


def generate(cfg: IndexConfig, spec: SynthSpec, workers: int = 1) -> dict[str, Any]:
    """Write the synthetic corpus of ``spec`` under ``cfg.out`` (resumes: committed shards are kept)."""
    t0 = time.time()
    manifest = corpus_table(spec.n_images, cfg.extract.shard_size)
    previous = read_corpus_manifest(cfg.out)
    if previous is None or previous.column("image_id").to_pylist() != manifest.column("image_id").to_pylist() \
            or previous.column("shard").to_pylist() != manifest.column("shard").to_pylist():
        StageManifest(cfg.out, "extract").reset()
        write_corpus_manifest(cfg.out, manifest)
    save_run_config(cfg.out, cfg.to_dict())
    _local_pca(cfg, spec)
    shard_col = manifest.column("shard").to_numpy()
    bounds = np.flatnonzero(np.r_[True, shard_col[1:] != shard_col[:-1], True])
    done = set(StageManifest(cfg.out, "extract").committed())
    jobs = [(asdict(spec), cfg.to_dict(), int(shard_col[a]), int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])
            if shard_label(int(shard_col[a])) not in done]
    rows: dict[str, int] = {}
    last = time.time()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for k, out in enumerate(pool.map(_write_shard, jobs, chunksize=1)):
            for name, r in out["rows"].items():
                rows[name] = rows.get(name, 0) + r
            if time.time() - last > 30 or k == len(jobs) - 1:
                last = time.time()
                log.info("[synth] %d/%d shards written (%.0f s)", k + 1, len(jobs), time.time() - t0)
    result = {"images": spec.n_images, "shards": len(bounds) - 1, "written_shards": len(jobs), "rows": rows,
              "synthetic": asdict(spec)}
    _record_extract(cfg, manifest, result, time.time() - t0)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the run's root (local path or URI)")
    ap.add_argument("--images", type=int, required=True, help="number of synthetic images")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "scale.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--locals-fraction", type=float, default=1.0)
    ap.add_argument("--keypoints", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    import yaml

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ov = {k.strip(): yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    cfg = scale_config(args.out, args.config, ov)
    spec = SynthSpec(args.images, seed=args.seed, locals_fraction=args.locals_fraction, keypoints=args.keypoints)
    print(json.dumps(generate(cfg, spec, args.workers), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
