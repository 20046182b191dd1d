"""The image stages' mapper: read → decode → forward → per-image features → table rows, one shard at a time.

An :class:`ImageShardMapper` lives inside a runner actor (``actors.runner``). It loads the backbone once (on
its GPU when it has one); for each shard it reads and decodes images in background threads while the network
runs, batches images of equal input size, computes each image's features with its *compute* function (a
``pipeline`` function: :func:`pipeline.extract.extract_features` for extraction,
:meth:`pipeline.object_saliency.ObjectSaliencyComputer.features` for object saliency), and writes the rows
with :class:`storage.shard_writer.ShardTables`. A bad image becomes an ``errors`` row with its reason and the
shard goes on. The ``extract`` stage itself (local PCA first, then every shard) is :func:`run_extract_stage`.

Overlap: decoding runs ``decode_threads`` ahead of the network, and batches are mapped by ``lanes`` threads,
each running the forward pass *and* the per-image features of its batch (on a GPU each lane has its own CUDA
stream), while the actor's thread adds the finished rows in corpus order, so the tables do not depend on the
number of lanes. On the CPU each lane gets ``torch_threads // lanes`` intra-op threads: two single-threaded
lanes keep two cores busy with convolutions *and* with the many small per-image operations (CAM, EGM,
pooling), which one two-threaded lane leaves to one core between forward passes; numpy's BLAS is limited to one
thread (its spinning workers otherwise compete with torch's). Float results depend on torch's intra-op thread
count (reduction order), as they always did: ``lanes=1`` reproduces the single-lane results bit for bit.

On a GPU, plain RGB / grayscale JPEGs are decoded on the device (``torchvision.io.decode_jpeg``, one batched
call per group of ``batch_size`` images) after the header has passed the same bomb guard as Pillow's path
(:func:`storage.images.probe_image`), and resized and normalised there; any other file, and any JPEG the device
decoder rejects, goes through Pillow as on the CPU.
Batches of CPU-decoded inputs are staged in pinned memory and copied asynchronously.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import traceback
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from threadpoolctl import threadpool_limits

from actors.common import ActorResources, Progress, StageFailed
from actors.runner import ShardResult, run_on_one, run_shards
from pipeline.backbone import build_backbone
from pipeline.cam_aggregation import learn_cam_whitening, whitening_sample
from pipeline.extract import ExtractConfig, ImageFeatures, cam_whitening_sample, extract_features, scaled_sizes
from pipeline.keypoints import DESCRIPTOR_DIMS, MIN_INPUT_SIDE, Keypoints, build_keypoint_extractor
from pipeline.local_features import apply_pca, learn_pca
from pipeline.preprocess import orient, tensor_to_network_input, to_network_input
from pipeline.whitening import Whitening
from storage.arrays import load_arrays, save_arrays
from storage.corpus import rows_by_shard, subset_ids
from storage.images import DEFAULT_MAX_PIXELS, ImageError, ImageHeader, decode_image, probe_image
from storage.keypoint_weights import load_keypoint_weights
from storage.layout import RunLayout
from storage.shard_writer import IMAGE_TABLES, ShardTables
from storage.tables import TableStore
from storage.uri import exists, read_bytes, redact
from storage.weights import load_state_dict

log = logging.getLogger("indexer")

# (activation maps per forward scale, original image (h, w)) -> features; a pipeline function
ComputeFn = Callable[[list[torch.Tensor], tuple[int, int]], ImageFeatures]
# what a lane returns per image: the decoded record, its features or None, an (reason, detail) error or None
LaneResult = list[tuple["_Decoded", ImageFeatures | None, tuple[str, str] | None]]


@dataclass(frozen=True)
class LocalPCA:
    """PCA of local descriptors learned on a sample of images before they are written reduced."""

    mean: np.ndarray
    projection: np.ndarray

    def apply(self, X: np.ndarray) -> np.ndarray:
        return apply_pca(X, self.mean, self.projection)

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])


@dataclass
class ImageStageSpec:
    """Plain data every actor of an image stage needs."""

    root: str
    stage: str
    extract: ExtractConfig
    tables: tuple[str, ...] = IMAGE_TABLES
    local_pca: LocalPCA | None = None
    cam_whitening: Whitening | None = None
    torch_threads: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch: int = 6
    lanes: int = 0              # batches mapped at once (forward + features), one thread each; 0: auto
    decode_threads: int = 0     # reader/decoder threads; 0: auto (2 on the CPU, 4 with a GPU)
    device_decode: bool = True  # decode JPEGs on the GPU when the mapper has one

    def lane_plan(self, cuda: bool) -> tuple[int, int]:
        """(lanes, torch intra-op threads per lane). Auto: on the CPU two single-threaded lanes (fewer when the
        actor has one thread), on a GPU two lanes on their own CUDA streams."""
        threads = self.torch_threads or torch.get_num_threads()
        lanes = self.lanes or (2 if cuda else max(1, min(2, threads)))
        return lanes, max(1, threads // lanes)

    def decode_plan(self, cuda: bool) -> int:
        return self.decode_threads or (4 if cuda else 2)


@dataclass
class _Decoded:
    row: dict[str, Any]
    image_hw: tuple[int, int] = (0, 0)
    inputs: list[torch.Tensor] = field(default_factory=list)
    n_bytes: int = 0
    sha1: str = ""
    error: tuple[str, str] | None = None
    rgb: np.ndarray | None = None               # (H, W, 3) uint8 for the learned keypoints (freed once used)
    keypoints: Keypoints | None = None
    kp_error: tuple[str, str] | None = None     # the image's keypoints failed (its other rows are kept)


class ImageShardMapper:
    """Maps one shard of image rows (``image_id``, ``uri``, ``shard``) to the stage's tables."""

    def __init__(self, spec: ImageStageSpec, compute: ComputeFn | None = None) -> None:
        self.spec = spec
        self.config = spec.extract
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        weights = self.config.weights_spec
        self.backbone = build_backbone(self.config.backbone, load_state_dict(weights) if weights else None,
                                       self.config.layer, device=self.device)
        self.classifier = None
        if self.backbone.classifier_weight is not None:
            self.classifier = (self.backbone.classifier_weight, self.backbone.classifier_bias)
        self.compute: ComputeFn = compute or (
            lambda acts, hw: extract_features(acts, self.config, hw, self.classifier, spec.cam_whitening))
        self.store = TableStore(spec.root)
        cuda = self.device.type == "cuda"
        # decoders: torch's element-wise ops there (normalisation) single-threaded, their results are the same
        self.pool = ThreadPoolExecutor(max_workers=spec.decode_plan(cuda), thread_name_prefix="decode",
                                       initializer=torch.set_num_threads, initargs=(1,))
        self.n_lanes, self.lane_threads = spec.lane_plan(cuda)
        self._tls = threading.local()
        self.lane_pool = ThreadPoolExecutor(max_workers=self.n_lanes, thread_name_prefix="lane",
                                            initializer=self._init_lane)
        self._device_decode = cuda and spec.device_decode
        if self._device_decode:  # torchvision >= 0.29 deprecates its decoders (for torchcodec): once per call
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        self.decoded_on_device = 0  # images the GPU decoded (the rest went through Pillow), for reports
        self._count_lock = threading.Lock()
        # numpy's BLAS (local PCA, EGM) single-threaded: same results, and no spinning workers next to torch's
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        self.kp_extractor, self.keypoint_dim = self._keypoint_extractor()
        if cuda:
            torch.cuda.synchronize(self.device)  # weights copied on the default stream before lanes use their own

    def _keypoint_extractor(self) -> tuple[Any, int | None]:
        """The learned keypoint extractor (xfeat / aliked, on the mapper's device) and the keypoints table's
        descriptor width; ``cnn`` keypoints are the pass's locals (no extractor); None when not written."""
        kcfg = self.config.keypoints
        if not kcfg.enabled or "keypoints" not in self.spec.tables:
            return None, None
        if kcfg.name == "cnn":
            if self.config.n_locals <= 0:
                return None, None
            return None, self.spec.local_pca.dim if self.spec.local_pca is not None else self.backbone.channels
        ex = build_keypoint_extractor(kcfg.extractor_config(), self.device, state_dict=load_keypoint_weights(kcfg.name))
        return ex, DESCRIPTOR_DIMS[kcfg.name]

    def _init_lane(self) -> None:
        # torch's intra-op thread count is per thread with OpenMP: the actor's own thread keeps torch_threads
        torch.set_num_threads(self.lane_threads)
        if self.device.type == "cuda":
            self._tls.stream = torch.cuda.Stream(self.device)

    # ---------------------------------------------------------------- reader (background threads)
    def _decode(self, row: dict[str, Any]) -> _Decoded:
        """Read and decode one image into its network inputs (or its error)."""
        return self._decode_many([row])[0]

    def _decode_many(self, rows: list[dict[str, Any]]) -> list[_Decoded]:
        """Read and decode a group of images: on a GPU the plain JPEGs among them in one batched device call (the
        device decoder serialises its callers), everything else with Pillow."""
        items = [self._read(r) for r in rows]
        on_device: list[tuple[_Decoded, ImageHeader, bytes]] = []
        for d, data in items:
            if data is None:
                continue
            if getattr(self, "_device_decode", False):
                try:
                    head = probe_image(data, self.spec.max_pixels)  # the bomb guard, before any pixel is decoded
                except ImageError as exc:
                    d.error = (exc.reason, exc.detail)
                    continue
                # truncated files (no end-of-image marker) go to Pillow, which names the problem
                if head.device_decodable and data.rstrip(b"\0").endswith(b"\xff\xd9"):
                    on_device.append((d, head, data))
                    continue
            self._decode_pil(d, data)
        if on_device:
            images = self._device_decode_jpegs([data for _, _, data in on_device])
            for (d, head, data), img in zip(on_device, images):
                if img is None or not self._device_inputs(d, head, img):
                    self._decode_pil(d, data)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # ready before a lane's stream reads them
        return [d for d, _ in items]

    def _read(self, row: dict[str, Any]) -> tuple[_Decoded, bytes | None]:
        d = _Decoded(row=row)
        try:
            data = read_bytes(row["uri"])
        except FileNotFoundError:
            d.error = ("missing", f"no such file or object: {redact(row['uri'])}")
            return d, None
        except Exception as exc:  # noqa: BLE001 - recorded as the image's error, the shard goes on
            d.error = ("missing", redact(f"{type(exc).__name__}: {exc}"))
            return d, None
        d.n_bytes, d.sha1 = len(data), hashlib.sha1(data).hexdigest()
        return d, data

    def _decode_pil(self, d: _Decoded, data: bytes) -> None:
        try:
            img = decode_image(data, max_pixels=self.spec.max_pixels, max_side=self.config.decode_side)
        except ImageError as exc:
            d.error = (exc.reason, exc.detail)
            return
        except Exception as exc:  # noqa: BLE001
            d.error = ("corrupt", f"{type(exc).__name__}: {exc}")
            return
        ow, oh = img.info.get("original_size", img.size)  # full resolution even when JPEG draft decoding shrank img
        d.image_hw = (oh, ow)
        if min(img.width, img.height) < 16:
            d.error = ("unsupported", f"image too small: {img.width}x{img.height} pixels")
            return
        for w, h in scaled_sizes(img.width, img.height, self.config):
            d.inputs.append(to_network_input(img, size=(w, h)))
        if getattr(self, "kp_extractor", None) is not None:
            self._keypoint_image(d, img, data)

    def _keypoint_image(self, d: _Decoded, img: Any, data: bytes) -> None:
        """The RGB array the keypoints are extracted from: the decoded image, or a second decode at the keypoints'
        side when it is larger than the network's (the network's inputs stay exactly what they were)."""
        side = self.config.keypoint_side
        try:
            if side > self.config.decode_side and max(img.info.get("original_size", img.size)) > max(img.size):
                img = decode_image(data, max_pixels=self.spec.max_pixels, max_side=side)
            d.rgb = np.asarray(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - the image's other rows are kept
            d.kp_error = ("corrupt", f"keypoints: {type(exc).__name__}: {exc}")

    def _device_decode_jpegs(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """uint8 (3, H, W) tensors on the GPU, None for a file the device decoder rejects (Pillow then decodes it,
        or names its problem)."""
        from torchvision.io import ImageReadMode, decode_jpeg  # heavy and optional: only with a GPU

        tensors = [torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in datas]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except Exception:  # noqa: BLE001 - one bad file fails the batched call: decode one by one to find it
            pass
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
            except Exception:  # noqa: BLE001 - e.g. a JPEG variant nvjpeg does not support
                out.append(None)
        return out

    def _device_inputs(self, d: _Decoded, head: ImageHeader, img: torch.Tensor) -> bool:
        """Network inputs of a device-decoded image (resized and normalised there); False: leave it to Pillow."""
        img = orient(img, head.orientation)
        ow, oh = head.oriented_size
        if tuple(img.shape) != (3, oh, ow):
            return False
        d.image_hw = (oh, ow)
        if min(ow, oh) < 16:
            d.error = ("unsupported", f"image too small: {ow}x{oh} pixels")
            return True
        d.inputs = [tensor_to_network_input(img, (w, h)) for w, h in scaled_sizes(ow, oh, self.config)]
        if getattr(self, "kp_extractor", None) is not None:
            d.rgb = img.permute(1, 2, 0).contiguous().cpu().numpy()
        with self._count_lock:
            self.decoded_on_device += 1
        return True

    def _decoded_stream(self, rows: list[dict[str, Any]]) -> Iterator[_Decoded]:
        """Decode ahead of the network by ``prefetch`` images (at least a batch per lane), preserving order; on a GPU
        in groups of a batch (one device decoder call each)."""
        window = max(1, self.spec.prefetch, self.config.batch_size * getattr(self, "n_lanes", 1))
        group = self.config.batch_size if getattr(self, "_device_decode", False) else 1
        groups = [rows[i:i + group] for i in range(0, len(rows), group)]
        ahead = max(1, -(-window // group))
        futures = [self.pool.submit(self._decode_many, g) for g in groups[:ahead]]
        for i in range(len(groups)):
            if i + ahead < len(groups):
                futures.append(self.pool.submit(self._decode_many, groups[i + ahead]))
            yield from futures[i].result()
            futures[i] = None  # type: ignore[call-overload]  # free decoded tensors early

    def _batches(self, rows: list[dict[str, Any]]) -> Iterator[tuple[list[_Decoded], list[_Decoded]]]:
        """Yield (good images of equal input size, failed images) groups in corpus order."""
        pending: list[_Decoded] = []
        for d in self._decoded_stream(rows):
            if d.error is not None:
                yield [], [d]
                continue
            key = [tuple(t.shape) for t in d.inputs]
            if pending and ([tuple(t.shape) for t in pending[0].inputs] != key
                            or len(pending) >= self.config.batch_size):
                yield pending, []
                pending = []
            pending.append(d)
        if pending:
            yield pending, []

    # ---------------------------------------------------------------- forward
    @torch.inference_mode()
    def _forward(self, batch: list[_Decoded]) -> list[list[torch.Tensor]]:
        """Activations per image per scale; one forward per scale for a batch of equal-size inputs."""
        per_image: list[list[torch.Tensor]] = [[] for _ in batch]
        for s in range(len(batch[0].inputs)):
            x = self._stack([d.inputs[s] for d in batch])
            acts = self.backbone(x)
            for i in range(len(batch)):
                per_image[i].append(acts[i])
        return per_image

    def _stack(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """One batch tensor on the mapper's device: CPU inputs staged in pinned memory for an asynchronous copy,
        device inputs (decoded on the GPU) marked as used by the current stream."""
        if self.device.type != "cuda":
            return torch.stack(inputs)
        stream = torch.cuda.current_stream(self.device)
        if all(t.device.type == "cpu" for t in inputs):
            staged = torch.empty((len(inputs), *inputs[0].shape), dtype=inputs[0].dtype, pin_memory=True)
            return torch.stack(inputs, out=staged).to(self.device, non_blocking=True)
        parts = []
        for t in inputs:
            if t.device.type == "cuda":
                t.record_stream(stream)  # allocated on a decoder's stream: not reused before this one is done
            else:
                t = t.pin_memory().to(self.device, non_blocking=True)
            parts.append(t)
        return torch.stack(parts)

    def _lane(self, batch: list[_Decoded]) -> LaneResult:
        """Forward one batch and compute its images' features (in a lane thread, on its CUDA stream if any)."""
        stream = getattr(self._tls, "stream", None)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                acts = self._forward(batch)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one odd-sized batch
                return [(d, None, ("internal", f"forward failed: {type(exc).__name__}: {exc}")) for d in batch]
            self._keypoints(batch)
            out: LaneResult = []
            for d, a in zip(batch, acts):
                try:
                    out.append((d, self.compute(a, d.image_hw), None))
                except Exception as exc:  # noqa: BLE001 - recorded, the shard goes on
                    out.append((d, None, ("internal",
                                          f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=2)}")))
            return out

    def _keypoints(self, batch: list[_Decoded]) -> None:
        """Learned keypoints of a batch (one batched call, image by image when it fails), on the mapper's device;
        an image whose keypoints fail or that is too small for them gets ``kp_error`` (its other rows are kept)."""
        todo = [d for d in batch if d.rgb is not None and d.kp_error is None]
        if getattr(self, "kp_extractor", None) is None or not todo:
            return
        sizes = [(d.image_hw[1], d.image_hw[0]) for d in todo]
        try:
            kps: list[Keypoints | None] = list(self.kp_extractor.extract_batch([d.rgb for d in todo], sizes))
        except Exception:  # noqa: BLE001 - find the image that fails
            kps = []
            for d, size in zip(todo, sizes):
                try:
                    kps.append(self.kp_extractor.extract(d.rgb, size))
                except Exception as exc:  # noqa: BLE001 - recorded as the image's keypoints error
                    d.kp_error = ("internal", f"keypoints: {type(exc).__name__}: {exc}")
                    kps.append(None)
        for d, kp in zip(todo, kps):
            d.rgb = None
            if kp is None:
                continue
            w, h = d.image_hw[1], d.image_hw[0]
            if len(kp) == 0 and min(w, h) * min(1.0, self.config.keypoints.max_side / max(w, h)) < MIN_INPUT_SIDE:
                d.kp_error = ("unsupported", f"keypoints: image too small ({w}x{h} pixels)")
            else:  # a flat image may have none: no rows, not an error (verification finds no inliers)
                d.keypoints = kp

    # ---------------------------------------------------------------- writer
    def _add(self, rows: ShardTables, d: _Decoded, f: ImageFeatures) -> None:
        iid = d.row["image_id"]
        ph, pw = tuple(d.inputs[0].shape[1:])
        rows.add_image({"image_id": iid, "uri": redact(d.row["uri"]), "shard": int(d.row["shard"]),
                        "width": d.image_hw[1], "height": d.image_hw[0], "proc_width": pw, "proc_height": ph,
                        "feat_width": f.feat_hw[1], "feat_height": f.feat_hw[0], "bytes": d.n_bytes,
                        "sha1": d.sha1, "backbone": getattr(self.backbone, "name", ""),
                        "layer": getattr(self.backbone, "layer", ""), "act_mean": f.act_mean,
                        "act_max": f.act_max}, f.sparsity)
        rows.add_regions(iid, f.region_source, f.region_level, f.region_boxes, f.region_score, f.region_saliency,
                         f.region_desc)
        rows.add_globals(iid, f.globals)
        if f.local_desc is not None and len(f.local_desc):
            desc = self.spec.local_pca.apply(f.local_desc) if self.spec.local_pca is not None else f.local_desc
            rows.add_locals(iid, f.local_xy, f.local_scale, f.local_strength, desc)
        if getattr(self, "keypoint_dim", None) is None:
            return
        if self.kp_extractor is None and f.local_desc is not None and len(f.local_desc):  # cnn: the locals
            kd = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
            rows.add_keypoints(iid, f.local_xy, f.local_strength, kd)
        elif d.keypoints is not None:
            rows.add_keypoints(iid, d.keypoints.xy, d.keypoints.scores, d.keypoints.descriptors)
        elif d.kp_error is not None:
            rows.add_error(iid, d.row["uri"], f"{self.spec.stage}.keypoints", *d.kp_error)

    def __call__(self, shard: int | str, rows_in: list[dict[str, Any]]) -> ShardResult:
        """Extract one shard and write its tables (the runner commits it)."""
        stage = self.spec.stage
        local_dim = None
        if self.config.n_locals > 0 and "locals" in self.spec.tables:
            local_dim = self.spec.local_pca.dim if self.spec.local_pca is not None else self.backbone.channels
        rows = ShardTables(self.spec.tables, self.backbone.channels, self.config.descriptor_dtype, local_dim,
                           getattr(self, "keypoint_dim", None), self.config.keypoints.descriptor_dtype)
        # batches in flight on the lanes and failed images, in corpus order: rows are added in that order
        queue: deque[Future | list[_Decoded]] = deque()

        def add_next() -> None:
            item = queue.popleft()
            if isinstance(item, list):
                for d in item:
                    rows.add_error(d.row["image_id"], d.row["uri"], stage, *d.error)  # type: ignore[misc]
                return
            for d, feats, err in item.result():
                if err is not None:
                    rows.add_error(d.row["image_id"], d.row["uri"], stage, *err)
                else:
                    self._add(rows, d, feats)  # type: ignore[arg-type]

        lanes_busy = self.n_lanes + 1
        for good, bad in self._batches(rows_in):
            if bad:
                queue.append(bad)
            if good:
                queue.append(self.lane_pool.submit(self._lane, good))
            # one batch more than lanes waits in the pool, so that a lane never idles while rows are added
            while queue and (isinstance(queue[0], list) or sum(isinstance(q, Future) for q in queue) > lanes_busy):
                add_next()
        while queue:
            add_next()
        files = rows.write(self.store, stage, shard)
        return ShardResult(files, {"images": rows.n_images, "errors": len(rows.errors)},
                           [e["reason"] for e in rows.errors])

    def sample_learning_data(self, rows: list[dict[str, Any]], local_ids: set[str], per_image: int
                             ) -> dict[str, np.ndarray]:
        """What the learned-before-extraction artefacts are fitted on (no writes): raw local descriptors of the
        rows in ``local_ids`` (``per_image`` each) and the top CAM class vector of every row."""
        rng = np.random.default_rng(0)
        locals_, cams = [], []
        for good, _ in self._batches(rows):
            if not good:
                continue
            for d, a in zip(good, self._forward(good)):
                if self.config.cam_whitened:
                    cams.append(cam_whitening_sample(a[0], self.classifier))
                if d.row["image_id"] not in local_ids or self.config.n_locals <= 0:
                    continue
                f = extract_features(a, replace(self.config, globals=(), regions=()), d.image_hw, None)
                if f.local_desc is not None and len(f.local_desc):
                    take = rng.choice(len(f.local_desc), min(per_image, len(f.local_desc)), replace=False)
                    locals_.append(f.local_desc[take])
        C = self.backbone.channels
        return {"locals": np.concatenate(locals_) if locals_ else np.zeros((0, C), np.float32),
                "cam": np.concatenate(cams) if cams else np.zeros((0, C), np.float32)}


@dataclass
class ExtractMapperFactory:
    """Builds an extraction mapper inside an actor (picklable)."""

    spec: ImageStageSpec

    def __call__(self) -> ImageShardMapper:
        return ImageShardMapper(self.spec)


LOCAL_PCA_SAMPLE_PER_IMAGE = 200


def _stored(uri: str, params: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """A learned artefact, if it exists and was learned with ``params`` (else it is learned again)."""
    if not exists(uri):
        return None
    arrays = load_arrays(uri)
    return arrays if str(arrays.get("params", "")) == json.dumps(params, sort_keys=True) else None


def learn_before_extraction(spec: ImageStageSpec, manifest: pa.Table, resources: ActorResources) -> ImageStageSpec:
    """The artefacts extraction needs before its first shard, learned on a stable sample of the corpus in one
    pass of the backbone: the PCA of local descriptors and the per-class CAM whitening (seed 004's order)."""
    cfg, layout = spec.extract, RunLayout(spec.root)
    pca_params = {"images": cfg.local_pca_images, "dim": cfg.local_dim, "scales": list(cfg.local_scales),
                  "max_side": cfg.max_side, "backbone": cfg.backbone, "weights": cfg.weights}
    cam_params = {"images": cfg.cam_pca_images, "dim": cfg.cam_pca_dim, "max_side": cfg.max_side,
                  "backbone": cfg.backbone, "weights": cfg.weights}
    pca = _stored(layout.artefact("local_pca"), pca_params) if cfg.n_locals > 0 else None
    cam = _stored(layout.artefact("cam_whitening"), cam_params) if cfg.cam_whitened else None
    need_pca, need_cam = cfg.n_locals > 0 and pca is None, cfg.cam_whitened and cam is None
    if need_pca or need_cam:
        all_ids = manifest.column("image_id").to_pylist()
        local_ids = set(subset_ids(all_ids, cfg.local_pca_images, seed=1)) if need_pca else set()
        ids = local_ids | (set(subset_ids(all_ids, cfg.cam_pca_images, seed=1)) if need_cam else set())
        rows = [r for r in manifest.to_pylist() if r["image_id"] in ids]
        what = " and ".join(w for w, need in (("the local PCA", need_pca), ("the CAM whitening", need_cam)) if need)
        log.info("[extract] learning %s on %d sample images first (one backbone pass, no progress lines)",
                 what, len(rows))
        t0 = time.time()
        sample = run_on_one(spec.root, spec.stage, ExtractMapperFactory(spec), resources, "sample_learning_data",
                            rows, local_ids, LOCAL_PCA_SAMPLE_PER_IMAGE)
        log.info("[extract] sample pass: %d images in %.0f s", len(rows), time.time() - t0)
        if need_pca:
            X = sample["locals"]
            if len(X) < 2:
                raise StageFailed("local PCA: no local descriptors in the sample (all sample images failed?)")
            mean, projection = learn_pca(X, dim=min(cfg.local_dim, X.shape[1], len(X) - 1))
            save_arrays(layout.artefact("local_pca"), mean=mean, projection=projection, sample=np.int64(len(X)),
                        params=np.array(json.dumps(pca_params, sort_keys=True)))
            pca = load_arrays(layout.artefact("local_pca"))
        V = whitening_sample(sample["cam"][:, None, :], n_pca=1) if need_cam and len(sample["cam"]) else None
        if V is not None and len(V) >= 8:  # one top class vector per image (N_pca = 1), dead ones dropped
            white = learn_cam_whitening(V, dim=int(min(cfg.cam_pca_dim, V.shape[1], max(2, len(V) // 4))))
            save_arrays(layout.artefact("cam_whitening"), **white.to_arrays(), sample=np.int64(len(V)),
                        params=np.array(json.dumps(cam_params, sort_keys=True)))
            cam = load_arrays(layout.artefact("cam_whitening"))
    return replace(spec, local_pca=None if pca is None else LocalPCA(pca["mean"].astype(np.float32),
                                                                     pca["projection"].astype(np.float32)),
                   cam_whitening=None if cam is None else Whitening.from_arrays(cam))


def run_image_stage(spec: ImageStageSpec, manifest: pa.Table, resources: ActorResources,
                    factory: Callable[[], ImageShardMapper], label: str | None = None) -> dict[str, Any]:
    """Run an image stage over every uncommitted shard of ``manifest``; counts, error reasons and rate."""
    shards = rows_by_shard(manifest)
    progress = Progress(label or spec.stage, sum(len(r) for r in shards.values()))
    out = run_shards(spec.root, spec.stage, shards, factory, resources, progress)
    out.pop("rows", None)
    out["images_per_second"] = out.pop("per_second", 0.0)
    return out


def run_extract_stage(root: str, config: ExtractConfig, manifest: pa.Table, resources: ActorResources,
                      lanes: int = 0) -> dict[str, Any]:
    """The ``extract`` stage: the artefacts learned before it (local PCA, CAM whitening), then every shard of the
    corpus (``lanes``: see :class:`ImageStageSpec`, 0 = auto)."""
    spec = learn_before_extraction(ImageStageSpec(root, "extract", config, torch_threads=resources.torch_threads,
                                                  lanes=lanes), manifest, resources)
    extra: dict[str, Any] = {}
    if spec.local_pca is not None:
        extra["pca_dim"] = spec.local_pca.dim
    if spec.cam_whitening is not None:
        extra["cam_whitening_dim"] = spec.cam_whitening.out_dim
    out = run_image_stage(spec, manifest, resources, ExtractMapperFactory(spec))
    if out["images"] == 0 and out["skipped_shards"] == 0:
        raise StageFailed(f"extract: no image could be processed ({out['errors']} errors: {out['error_reasons']})")
    return {**out, **extra}


__all__ = ["ImageShardMapper", "ImageStageSpec", "LocalPCA", "ExtractMapperFactory", "run_extract_stage",
           "run_image_stage", "learn_before_extraction", "StageFailed"]
