"""decode_image / read_bytes on broken and unusual inputs: every failure is an ImageError with the right reason,
every odd-but-valid image becomes the right RGB pixels."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from storage.images import ImageError, decode_image
from storage.uri import read_bytes
from tests import helpers_images as H

ROOT = Path(__file__).resolve().parents[1]


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kwargs)
    return info.value.reason


def test_valid_jpeg_baseline():
    img = decode_image(H.sample_jpeg(256, 192))
    assert img.mode == "RGB" and img.size == (256, 192)


def test_zero_byte():
    assert _reason(b"") == "empty"


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.95])
def test_truncated_jpeg(fraction):
    assert _reason(H.truncated_jpeg(fraction)) == "truncated"


def test_truncated_jpeg_with_draft_decoding():
    # the fast path (DCT scaling for a small network input) must report truncation the same way
    data = H.sample_jpeg(1024, 768)
    assert _reason(data[: len(data) // 2], max_side=200) == "truncated"


def test_corrupt_scan_with_valid_jpeg_header():
    assert _reason(H.corrupt_jpeg()) == "corrupt"


def test_jpeg_magic_followed_by_garbage_is_an_error():
    # only the SOI/APP0 magic is valid: any decode failure reason is acceptable, a crash or an image is not
    assert _reason(H.jpeg_magic_then_garbage()) in {"corrupt", "truncated", "not_image"}


def test_text_file():
    assert _reason(H.text_file()) == "not_image"


def test_missing_uri(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "nope.jpg"))
    with pytest.raises(FileNotFoundError):
        read_bytes((tmp_path / "nope.jpg").as_uri())


def test_decompression_bomb_reason():
    data = H.png_bomb(12000, 9000)
    assert len(data) < 100_000  # small on disk, 108 MP when decoded
    assert _reason(data) == "too_large"
    # a custom limit applies in both directions
    assert _reason(H.sample_jpeg(200, 100), max_pixels=200 * 100 - 1) == "too_large"
    assert decode_image(H.sample_jpeg(200, 100), max_pixels=200 * 100).size == (200, 100)


def _peak_rss_growth_kb(bomb: Path, max_pixels: int) -> tuple[int, str]:
    """Peak-RSS growth (KiB) of a fresh interpreter while decoding ``bomb``, and the outcome."""
    code = textwrap.dedent(f"""
        import resource
        from storage.images import ImageError, decode_image
        data = open({str(bomb)!r}, "rb").read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_image(data, max_pixels={max_pixels})
            outcome = "decoded"
        except ImageError as exc:
            outcome = exc.reason
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(after - before, outcome)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=ROOT, check=True).stdout.split()
    return int(out[0]), out[1]


def test_decompression_bomb_memory_stays_low(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(H.png_bomb(12000, 9000))
    growth_kb, outcome = _peak_rss_growth_kb(bomb, 100_000_000)
    assert outcome == "too_large"
    # decoding would need >= 108 MB (one byte per pixel) plus the RGB copy; rejecting from the header needs ~0
    assert growth_kb < 20 * 1024, f"peak RSS grew by {growth_kb} KiB while rejecting a decompression bomb"


def test_cmyk_jpeg_colours():
    cmyk, expected = H.cmyk_quadrants(64)
    img = decode_image(H.cmyk_jpeg(64))
    assert img.mode == "RGB" and img.size == (64, 64)
    got = np.asarray(img).astype(int)
    # compare the quadrant interiors (JPEG ringing at the edges between quadrants)
    for ys, xs in [(slice(4, 28), slice(4, 28)), (slice(4, 28), slice(36, 60)),
                   (slice(36, 60), slice(4, 28)), (slice(36, 60), slice(36, 60))]:
        assert np.abs(got[ys, xs] - expected[ys, xs]).max() <= 12, (ys, xs, got[ys, xs][0, 0])


def test_gray16_png_scaled_not_clipped():
    values = H.gray16_values()
    img = decode_image(H.gray16_png())
    assert img.mode == "RGB" and img.size == (64, 48)
    got = np.asarray(img)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    expected = np.rint(values.astype(np.float64) * 255.0 / 65535.0)
    np.testing.assert_array_equal(got[..., 0], expected)
    # hand-computed probes: 1000 -> 3.89 -> 4, 30000 -> 116.7 -> 117, 32768 -> 127.5 -> 128, 65000 -> 252.9 -> 253
    np.testing.assert_array_equal(got[0, :6, 0], [0, 4, 117, 128, 253, 255])
    # a clipping conversion would saturate everything above 255 → the ramp must use the whole range
    assert len(np.unique(got[..., 0])) > 200


def test_grayscale_png():
    img = decode_image(H.gray_png())
    assert img.mode == "RGB" and img.size == (64, 48)
    got = np.asarray(img)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], H.gray_values())


def test_palette_with_transparency_composited_on_white():
    got = np.asarray(decode_image(H.palette_transparent_png()))
    assert got.shape == (48, 64, 3)
    assert (got[:, :32] == 255).all()  # transparent red → white background
    assert (got[:, 32:] == (0, 0, 255)).all()  # opaque blue kept


def test_rgba_composited_on_white():
    got = np.asarray(decode_image(H.rgba_png())).astype(int)
    # red at alpha 128 over white: 255 * (1 - 128/255) = 127 in G and B
    assert np.abs(got[:, :32] - (255, 127, 127)).max() <= 1
    assert (got[:24, 32:] == (0, 0, 255)).all()
    assert (got[24:, 32:] == 255).all()  # fully transparent green → white


def test_exif_orientation_6_rotates():
    img = decode_image(H.exif_rotated_jpeg(96, 48, 6))
    assert img.size == (48, 96)  # (width, height) swapped
    a = np.asarray(img).astype(int)
    # the red top-left block of the stored image is displayed at the top-right
    assert np.abs(a[4, 44] - (255, 0, 0)).max() < 40
    assert np.abs(a[4, 3] - (230, 230, 230)).max() < 40
    assert np.abs(a[92, 44] - (230, 230, 230)).max() < 40


def test_draft_decoding_reports_original_oriented_size():
    # DCT-scaled decoding may return a smaller image; pixel coordinates refer to the full-size oriented image
    img = decode_image(H.exif_rotated_jpeg(800, 400, 6), max_side=100)
    assert max(img.size) < 800 and max(img.size) >= 100
    assert img.width < img.height  # rotated
    assert img.info["original_size"] == (400, 800)
    plain = decode_image(H.sample_jpeg(1024, 768), max_side=256)
    assert plain.size[0] < 1024 and plain.info["original_size"] == (1024, 768)
