"""Data of ``experiments.bench_asmk``: the museum-landmarks tracks and a feature cache of local descriptors.

Local features are computed by the extract stage's own function (:func:`pipeline.extract.extract_features`)
with the index config's ``extract`` section restricted to what ASMK needs: the locals (``local_features`` per
image over ``local_scales``, at ``max_side``) and the ``asmk.region_source`` regions of the scale-1 map (FS.EGM
by default: the regions of the D2R / R-ASMK variants). Database images are decoded as the stage decodes them
(JPEG draft mode, boxes and positions in original pixels); queries with a box are cropped to it first
(Revisited-Oxford protocol), as the query encoder does. The PCA of the locals is learned like the stage's
(``local_pca_images`` images, at most ``LOCAL_PCA_SAMPLE_PER_IMAGE`` random locals each, ``local_dim``
dimensions).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actors.extract import LOCAL_PCA_SAMPLE_PER_IMAGE
from experiments.common import activations, classifier_of, image_path, load_backbone, original_hw, read_image
from pipeline.extract import ExtractConfig, extract_features
from pipeline.local_features import apply_pca, learn_pca
from service.encoder import crop

TRACKS = {"root": "gnd.json", "in-photos": "in-photos/gnd.json", "no-box": "no-box/gnd.json"}


@dataclass
class Track:
    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]

    @property
    def q_keys(self) -> list[str]:
        return [image_key(q, g.get("bbx")) for q, g in zip(self.qimlist, self.gnd)]

    def composition(self) -> str:
        fam: dict[str, int] = {}
        for i in self.imlist:
            f = ("distractor" if i.startswith("distractor") else "painting" if i.startswith("painting")
                 else "painting photo" if i.startswith("qsd") else "landmark")
            fam[f] = fam.get(f, 0) + 1
        return ", ".join(f"{v} {k}s" for k, v in fam.items())


def image_key(image_id: str, bbx=None) -> str:
    """Cache key of an image (whole) or of a query crop."""
    if bbx is None:
        return image_id
    return image_id + "@" + ",".join(f"{float(v):.2f}" for v in bbx)


def distractor_rank(data: Path) -> dict[str, int]:
    """Position of every distractor in one random order (seed 0): ``--distractors N`` keeps the first N, and
    features are extracted in this order, so a smaller database is a prefix of a larger one's cache."""
    root = json.loads((data / TRACKS["root"]).read_text())["imlist"]
    pool = sorted(i for i in root if i.startswith("distractor"))
    return {pool[j]: r for r, j in enumerate(np.random.default_rng(0).permutation(len(pool)))}


def _renumber(gl: list[dict], new: dict[int, int]) -> list[dict]:
    return [{**x, **{k: [new[j] for j in x.get(k, []) if j in new] for k in ("easy", "hard", "junk")}} for x in gl]


def load_tracks(data: Path, names: list[str], limit: tuple[int, int] | None, distractors: int | None
                ) -> list[Track]:
    """The tracks' ground truth; ``distractors``: keep only that many distractor images (the same random
    ones, seed 0, in every track), with the gnd indices renumbered; ``limit``: first DB images / Q queries."""
    keep_d: set[str] | None = None
    if distractors is not None:
        keep_d = {d for d, r in distractor_rank(data).items() if r < distractors}
    out = []
    for name in names:
        g = json.loads((data / TRACKS[name]).read_text())
        imlist, qimlist, gl = g["imlist"], g["qimlist"], g["gnd"]
        if keep_d is not None:
            kept = [j for j, i in enumerate(imlist) if not i.startswith("distractor") or i in keep_d]
            gl = _renumber(gl, {j: n for n, j in enumerate(kept)})
            imlist = [imlist[j] for j in kept]
        if limit:
            ndb, nq = limit
            imlist, qimlist = imlist[:ndb], qimlist[:nq]
            gl = _renumber(gl[:nq], {j: j for j in range(ndb)})
        out.append(Track(name, imlist, qimlist, gl))
    return out


@dataclass
class Features:
    """Per-key local features, concatenated: rows ``start[i]:start[i]+count[i]`` belong to ``keys[i]``."""

    keys: list[str]
    des: np.ndarray
    xy: np.ndarray
    start: np.ndarray
    count: np.ndarray
    image_hw: np.ndarray
    feat_hw: np.ndarray
    boxes: np.ndarray
    box_start: np.ndarray
    box_count: np.ndarray

    def __post_init__(self) -> None:
        self.pos = {k: i for i, k in enumerate(self.keys)}

    def gather(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Descriptors, positions and per-row image index (0..len(keys)-1) of ``keys`` in that order, plus
        their region boxes with the owning image index."""
        p = np.array([self.pos[k] for k in keys], dtype=np.int64)
        cnt, st = self.count[p], self.start[p]
        rows = np.repeat(st - np.cumsum(cnt) + cnt, cnt) + np.arange(int(cnt.sum()))
        bc, bs = self.box_count[p], self.box_start[p]
        brows = np.repeat(bs - np.cumsum(bc) + bc, bc) + np.arange(int(bc.sum()))
        return {"rows": rows, "des": self.des[rows], "xy": self.xy[rows], "ids": np.repeat(np.arange(len(keys)), cnt),
                "boxes": self.boxes[brows], "box_image": np.repeat(np.arange(len(keys)), bc),
                "image_hw": self.image_hw[p], "feat_hw": self.feat_hw[p]}


def feature_config(extract: ExtractConfig, region_source: str = "fs_egm") -> ExtractConfig:
    """The config's extract section reduced to the locals and the regions of ``region_source``."""
    if extract.n_locals <= 0:
        raise SystemExit("extract.local_features must be > 0 for the ASMK benchmark")
    return dataclasses.replace(extract, regions=(region_source,), globals=())


class Extractor:
    """Raw (pre-PCA) local features and region pixel boxes (the config's only region source) of one cache key,
    through the stage's function."""

    def __init__(self, data: Path, crops: dict[str, tuple[str, object]], cfg: ExtractConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        self.data, self.crops, self.cfg = data, crops, cfg
        self.bb = load_backbone(cfg)
        self.classifier = classifier_of(self.bb)

    def __call__(self, key: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int], tuple[int, int], np.ndarray]:
        image_id, bbx = self.crops[key]
        path = image_path(self.data, image_id)
        if bbx is None:
            img = read_image(path, self.cfg.decode_side)
            hw = original_hw(img)
        else:
            img = crop(read_image(path), bbx)
            hw = (img.height, img.width)
        acts = activations(self.bb, img, self.cfg)
        f = extract_features(acts, self.cfg, hw, self.classifier)
        boxes = f.region_boxes  # one source only (feature_config)
        return (np.asarray(f.local_desc, np.float32), np.asarray(f.local_xy, np.float32), hw, f.feat_hw,
                np.asarray(boxes, np.float32).reshape(-1, 4))


def cache_tag(cfg: ExtractConfig) -> str:
    """One cache entry per feature parameter set."""
    spec = json.dumps([cfg.backbone, cfg.weights, cfg.layer, cfg.max_side, list(cfg.forward_scales),
                       list(cfg.local_scales), cfg.n_locals, cfg.local_dim, cfg.local_pca_images,
                       list(cfg.regions), dataclasses.asdict(cfg.fs), list(cfg.cam_thresholds), cfg.rmac_levels])
    return f"ms{cfg.max_side}_n{cfg.n_locals}_d{cfg.local_dim}_{hashlib.sha1(spec.encode()).hexdigest()[:10]}"


def learn_or_load_pca(path: Path, extract: Extractor, pool: list[str], cfg: ExtractConfig
                      ) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, tuple]]:
    """The locals' PCA (cached), learned as the stage does on ``local_pca_images`` images of ``pool``; also the
    raw features extracted for it (reused by the cache)."""
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return (z["mean"], z["projection"]), {}
    rng = np.random.default_rng(0)
    sample = rng.choice(len(pool), min(cfg.local_pca_images, len(pool)), replace=False)
    t = time.perf_counter()
    raw = {image_key(pool[i]): extract(image_key(pool[i])) for i in sample}
    parts = [f[0][rng.choice(len(f[0]), min(LOCAL_PCA_SAMPLE_PER_IMAGE, len(f[0])), replace=False)]
             for f in raw.values() if len(f[0])]
    X = np.concatenate(parts)
    pca = learn_pca(X, dim=min(cfg.local_dim, X.shape[1], len(X) - 1))
    np.savez(path, mean=pca[0], projection=pca[1])
    print(f"[features] PCA {pca[1].shape} from {len(sample)} database images in {time.perf_counter() - t:.0f}s",
          flush=True)
    return pca, raw


def _save_chunk(path: Path, keys: list[str], feats: list[tuple], pca: tuple[np.ndarray, np.ndarray]) -> None:
    dim = pca[1].shape[1]
    des = [apply_pca(f[0], *pca) if len(f[0]) else np.zeros((0, dim), np.float32) for f in feats]
    np.savez(path, keys=np.array(keys), des=np.concatenate(des).astype(np.float32),
             xy=np.concatenate([f[1] for f in feats]).reshape(-1, 2), count=np.array([len(d) for d in des]),
             image_hw=np.array([f[2] for f in feats]), feat_hw=np.array([f[3] for f in feats]),
             boxes=np.concatenate([f[4] for f in feats]).astype(np.float32).reshape(-1, 4),
             box_count=np.array([len(f[4]) for f in feats]))


def _read_chunks(paths: list[Path], chunks: list[list[str]], keys: list[str]) -> Features:
    parts = []
    for p, ch in zip(paths, chunks):
        with np.load(p, allow_pickle=False) as z:
            parts.append({k: z[k] for k in z.files})
        if list(parts[-1]["keys"]) != ch:
            raise RuntimeError(f"cache {p} does not hold the expected keys")
    count = np.concatenate([p["count"] for p in parts]).astype(np.int64)
    box_count = np.concatenate([p["box_count"] for p in parts]).astype(np.int64)
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("des", "xy", "image_hw", "feat_hw", "boxes")}
    return Features(keys, cat["des"], cat["xy"], np.cumsum(count) - count, count, cat["image_hw"], cat["feat_hw"],
                    cat["boxes"], np.cumsum(box_count) - box_count, box_count)


def load_features(data: Path, tracks: list[Track], pca_pool: list[str], cfg: ExtractConfig, cache: Path,
                  chunk: int, threads: int) -> Features:
    """Features of every database image and query (crop) of ``tracks``; extracted once per key, cached in
    chunks. The PCA is learnt on images of ``pca_pool`` (the full database of the first track, whatever
    ``--distractors`` keeps, so that every database size shares one PCA and one feature cache)."""
    cache.mkdir(parents=True, exist_ok=True)
    tag = cache_tag(cfg)
    crops: dict[str, tuple[str, object]] = {}
    for t in tracks:
        crops.update({image_key(i): (i, None) for i in t.imlist})
        crops.update({image_key(q, g.get("bbx")): (q, g.get("bbx")) for q, g in zip(t.qimlist, t.gnd)})
    rank = distractor_rank(data)
    keys = sorted(crops, key=lambda k: (rank.get(k, -1), k))  # non-distractors first, then in rank order
    chunks = [keys[c:c + chunk] for c in range(0, len(keys), chunk)]
    paths = [cache / f"part_{tag}_{hashlib.sha1(' '.join(ch).encode()).hexdigest()[:16]}.npz" for ch in chunks]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        extract = Extractor(data, crops, cfg, threads)
        pca, raw = learn_or_load_pca(cache / f"pca_{tag}_{tracks[0].name}_{len(pca_pool)}.npz", extract,
                                     pca_pool, cfg)
        t_all, done = time.perf_counter(), 0
        n_todo = sum(len(chunks[i]) for i in todo)
        for i in todo:
            _save_chunk(paths[i], chunks[i], [raw.pop(k) if k in raw else extract(k) for k in chunks[i]], pca)
            done += len(chunks[i])
            left = (time.perf_counter() - t_all) / done * (n_todo - done)
            print(f"[features] {done}/{n_todo} images / query crops extracted (~{left / 60:.0f} min left)",
                  flush=True)
    return _read_chunks(paths, chunks, keys)


__all__ = ["TRACKS", "Track", "Features", "image_key", "distractor_rank", "load_tracks", "feature_config",
           "load_features"]
