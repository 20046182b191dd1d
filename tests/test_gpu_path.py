"""The pieces of the GPU extraction path that run anywhere: header probe (the bomb guard before device decoding),
EXIF orientation of a decoded tensor, the tensor twin of the network input, the backbone's mixed-precision
switch (never on the CPU), and the synthetic photos of ``experiments.gpu_check``. The device itself is exercised
by ``experiments/gpu_check.sh`` on a GPU machine (and by the CUDA test below when one is present).
"""
from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from actors.extract import ImageShardMapper, ImageStageSpec
from experiments.gpu_check import SIZES, synthetic_jpegs
from pipeline.backbone import build_backbone
from pipeline.extract import ExtractConfig
from pipeline.preprocess import orient, tensor_to_network_input, to_network_input
from storage.images import ImageError, decode_image, probe_image
from tests.helpers_images import ORIENTATION_TAG, bad_files, encode, odd_files, sample_jpeg, textured_rgb

torch.set_num_threads(1)


def _jpeg(width: int, height: int, orientation: int = 1, mode: str = "RGB") -> bytes:
    img = Image.fromarray(textured_rgb(width, height)).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION_TAG] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def test_probe_reads_the_header_without_decoding() -> None:
    head = probe_image(_jpeg(64, 40, orientation=6))
    assert (head.format, head.mode, head.width, head.height, head.orientation) == ("JPEG", "RGB", 64, 40, 6)
    assert head.oriented_size == (40, 64) and head.device_decodable
    assert probe_image(_jpeg(64, 40, mode="L")).device_decodable
    assert not probe_image(_jpeg(64, 40, mode="CMYK")).device_decodable
    assert not probe_image(encode(Image.new("RGB", (20, 20)), "PNG")).device_decodable


def test_probe_fails_like_the_decoder() -> None:
    """Same reason codes as decode_image for what a header shows; a bomb is refused before any pixel."""
    data = _jpeg(200, 100)
    for bad, reason in ((b"", "empty"), (b"not an image at all", "not_image")):
        with pytest.raises(ImageError) as probed:
            probe_image(bad)
        with pytest.raises(ImageError) as decoded:
            decode_image(bad)
        assert probed.value.reason == decoded.value.reason == reason
    with pytest.raises(ImageError) as exc:
        probe_image(data, max_pixels=200 * 100 - 1)
    assert exc.value.reason == "too_large"
    assert probe_image(data, max_pixels=200 * 100).width == 200


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillow_exif_transpose(orientation: int) -> None:
    data = _jpeg(24, 16, orientation)
    stored = Image.open(io.BytesIO(data))
    stored.load()
    expected = np.asarray(ImageOps.exif_transpose(stored))
    got = orient(torch.from_numpy(np.array(stored.convert("RGB"))).permute(2, 0, 1), orientation)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)
    assert tuple(got.shape[1:][::-1]) == probe_image(data).oriented_size


def test_tensor_input_matches_the_pillow_input() -> None:
    """Same size: the same numbers as the CPU path; resized: the same picture up to the resampling filters."""
    img = Image.fromarray(textured_rgb(320, 240))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    assert torch.allclose(tensor_to_network_input(x, (320, 240)), to_network_input(img, 320), atol=1e-6)
    small_t, small_p = tensor_to_network_input(x, (160, 120)), to_network_input(img, 160)
    assert small_t.shape == small_p.shape == (3, 120, 160)
    assert float((small_t - small_p).abs().mean()) < 0.05  # normalised units (~4 grey levels / 255 / 0.22)
    grey = torch.full((1, 10, 12), 128, dtype=torch.uint8)
    assert tensor_to_network_input(grey, (12, 10)).shape == (3, 10, 12)


def test_mixed_precision_is_never_used_on_the_cpu() -> None:
    bb = build_backbone("mobilenet_v2", None)
    assert bb.amp_dtype is None
    x = torch.randn(1, 3, 64, 64)
    ref = bb(x)
    bb.use_mixed_precision(torch.bfloat16)  # CUDA inputs only: a CPU input keeps the float32 path
    conv = next(p for p in bb.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out = bb(x)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)


def test_synthetic_photos_come_in_runs_of_equal_size(tmp_path: Path) -> None:
    paths = synthetic_jpegs(tmp_path, 10, run=3, scale=0.05)
    sizes = [Image.open(p).size for p in paths]
    keys = [(max(32, int(w * 0.05)), max(32, int(h * 0.05))) for w, h in SIZES]
    assert sizes == [keys[(i // 3) % len(keys)] for i in range(10)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_decoding_matches_pillow_on_cuda() -> None:
    data = _jpeg(256, 192, orientation=6)
    from torchvision.io import ImageReadMode, decode_jpeg

    got = orient(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                             device="cuda"), probe_image(data).orientation).cpu()
    ref = torch.from_numpy(np.asarray(decode_image(data)).copy()).permute(2, 0, 1)
    assert got.shape == ref.shape
    assert float((got.float() - ref.float()).abs().mean()) < 2.0  # IDCT differences only


def test_network_input_is_the_float32_formula_bit_for_bit() -> None:
    """``to_network_input`` (one conversion pass, in-place normalisation) gives exactly the numbers of the plain
    numpy formula ``(x / 255 - mean) / std`` in float32, now in a contiguous (3, H, W) tensor."""
    img = Image.fromarray(textured_rgb(203, 150, seed=3))
    for side in (203, 120):
        got = to_network_input(img, side)
        small = img.resize(got.shape[1:][::-1], Image.Resampling.BILINEAR, reducing_gap=2.0) if side != 203 else img
        arr = np.asarray(small, dtype=np.float32) / 255.0
        mean = np.array([0.485, 0.456, 0.406], np.float32)
        std = np.array([0.229, 0.224, 0.225], np.float32)
        ref = ((arr - mean) / std).transpose(2, 0, 1)
        assert got.is_contiguous() and got.dtype == torch.float32
        assert np.array_equal(got.numpy().view(np.uint32), np.ascontiguousarray(ref).view(np.uint32))


def test_device_decode_path_on_the_cpu_decoder(tmp_path: Path) -> None:
    """The mapper's device-decoding path (probe, one batched decode_jpeg call, EXIF orientation, tensor resize,
    Pillow fallback), run with torchvision's CPU decoder: every good file gets inputs of the Pillow path's shape
    and close values, every bad file the Pillow path's reason, and only plain complete JPEGs skip Pillow."""
    files = {"plain.jpg": sample_jpeg(200, 150), "wide.jpg": sample_jpeg(300, 120, seed=1),
             **{k: v for k, (v, _) in odd_files().items()}, **{k: v for k, (v, _) in bad_files().items()}}
    rows = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        rows.append({"image_id": name, "uri": str(tmp_path / name), "shard": 0})
    cfg = ExtractConfig(max_side=128, batch_size=4, local_features=0)
    m = ImageShardMapper.__new__(ImageShardMapper)  # only the reader: no backbone
    m.spec, m.config, m.device = ImageStageSpec(str(tmp_path), "extract", cfg), cfg, torch.device("cpu")
    m._count_lock, m.decoded_on_device = threading.Lock(), 0
    m._device_decode = False
    ref = m._decode_many(rows)
    m._device_decode = True
    got = m._decode_many(rows)
    for r, g in zip(ref, got):
        name = r.row["image_id"]
        assert (r.error and r.error[0]) == (g.error and g.error[0]), name
        if r.error is None:
            assert r.image_hw == g.image_hw, name
            assert [t.shape for t in r.inputs] == [t.shape for t in g.inputs], name
            assert float((r.inputs[0] - g.inputs[0]).abs().mean()) < 0.1, name
    device_names = {"plain.jpg", "wide.jpg", "odd_exif6.jpg"}  # CMYK, PNGs and broken files went to Pillow
    assert m.decoded_on_device == len(device_names)
    assert {d.row["image_id"] for d in got if d.error is None} >= device_names
