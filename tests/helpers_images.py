"""Generators of broken and unusual image files for the decoding, fault-tolerance and S3 tests.

Everything is built in memory from a fixed seed (no network, no data copied into the repository); the real
photos are read from the shared museum-landmarks folder, which the callers skip on when it is absent.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks" / "jpg"

# A fixed mix of real photos: paintings, landmark photos (Lund) and Caltech-101 distractors.
REAL_PHOTO_IDS = (
    [f"painting_{i:05d}" for i in (0, 7, 42, 101, 150, 233)]
    + [f"lund_{i:04d}" for i in (0, 5, 11, 17, 23)]
    + ["distractor_BACKGROUND_Google_image_0001", "distractor_BACKGROUND_Google_image_0012",
       "distractor_BACKGROUND_Google_image_0021", "distractor_BACKGROUND_Google_image_0027",
       "distractor_BACKGROUND_Google_image_0031"]
)

ORIENTATION_TAG = 0x0112


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """Bytes of ``img`` saved as ``fmt``."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def textured_rgb(width: int = 256, height: int = 192, seed: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 image with gradients and noise (so JPEG scan data is long)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def sample_jpeg(width: int = 256, height: int = 192, seed: int = 0) -> bytes:
    """A valid baseline JPEG."""
    return encode(Image.fromarray(textured_rgb(width, height, seed)), "JPEG", quality=90)


# ------------------------------------------------------------------------------------------- broken files
def truncated_jpeg(fraction: float = 0.5) -> bytes:
    """The first ``fraction`` of a valid JPEG (cut inside the entropy-coded scan)."""
    data = sample_jpeg()
    return data[: int(len(data) * fraction)]


def corrupt_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose headers (SOI, tables, SOF, SOS) are intact but whose scan data is random bytes."""
    data = bytearray(sample_jpeg())
    sos = data.find(b"\xff\xda")
    assert sos > 0
    start = sos + 64
    rng = np.random.default_rng(seed)
    data[start:-2] = rng.integers(0, 256, len(data) - 2 - start, dtype=np.uint8).tobytes()
    return bytes(data)


def jpeg_magic_then_garbage(seed: int = 0, n: int = 4096) -> bytes:
    """JPEG SOI/APP0 marker bytes followed by random garbage (no valid segment at all)."""
    rng = np.random.default_rng(seed)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def text_file() -> bytes:
    """A plain text file (as found in real folders: README, notes)."""
    return b"This folder holds the museum photos.\nNothing to see here.\n"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_bomb(width: int = 12000, height: int = 9000) -> bytes:
    """A 1-bit black PNG of ``width`` x ``height`` (108 MP by default) that is ~13 KB on disk.

    Written chunk by chunk with zlib so that generating it never holds the full image in memory.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    comp = zlib.compressobj(9)
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte 0 + packed zero bits
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def tiny_png(side: int = 8) -> bytes:
    """A valid image too small for the network (the job records it as ``unsupported``)."""
    return encode(Image.fromarray(textured_rgb(side, side, seed=3)), "PNG")


def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name → (content, the ``errors.reason`` the job must record) for every broken kind."""
    return {
        "bad_empty.jpg": (b"", "empty"),
        "bad_truncated.jpg": (truncated_jpeg(), "truncated"),
        "bad_corrupt.jpg": (corrupt_jpeg(), "corrupt"),
        "bad_text.jpg": (text_file(), "not_image"),
        "bad_notes.txt": (text_file(), "not_image"),
        "bad_bomb.png": (png_bomb(), "too_large"),
        "bad_tiny.png": (tiny_png(), "unsupported"),
    }


# ------------------------------------------------------------------------------------------- odd but valid
def cmyk_quadrants(side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """CMYK quadrants (cyan, magenta / yellow, black) and the RGB each must become."""
    h = side // 2
    cmyk = np.zeros((side, side, 4), np.uint8)
    rgb = np.zeros((side, side, 3), np.uint8)
    for (ys, xs), c, r in [((slice(0, h), slice(0, h)), (255, 0, 0, 0), (0, 255, 255)),
                           ((slice(0, h), slice(h, side)), (0, 255, 0, 0), (255, 0, 255)),
                           ((slice(h, side), slice(0, h)), (0, 0, 255, 0), (255, 255, 0)),
                           ((slice(h, side), slice(h, side)), (0, 0, 0, 255), (0, 0, 0))]:
        cmyk[ys, xs] = c
        rgb[ys, xs] = r
    return cmyk, rgb


def cmyk_jpeg(side: int = 64) -> bytes:
    return encode(Image.fromarray(cmyk_quadrants(side)[0], "CMYK"), "JPEG", quality=95)


def gray16_values(width: int = 64, height: int = 48) -> np.ndarray:
    """uint16 ramp over the full 0..65535 range, with a few exact probe values in the first row."""
    ramp = np.linspace(0, 65535, width * height).round().astype(np.uint16).reshape(height, width)
    ramp[0, :6] = [0, 1000, 30000, 32768, 65000, 65535]
    return ramp


def gray16_png(width: int = 64, height: int = 48) -> bytes:
    return encode(Image.fromarray(gray16_values(width, height)), "PNG")  # uint16 → mode I;16


def gray_values(width: int = 64, height: int = 48) -> np.ndarray:
    return (np.arange(width * height) % 256).astype(np.uint8).reshape(height, width)


def gray_png(width: int = 64, height: int = 48) -> bytes:
    return encode(Image.fromarray(gray_values(width, height)), "PNG")


def palette_transparent_png(width: int = 64, height: int = 48) -> bytes:
    """Palette image: left half index 0 (red, fully transparent), right half index 1 (blue, opaque)."""
    idx = np.zeros((height, width), np.uint8)
    idx[:, width // 2:] = 1
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    return encode(img, "PNG", transparency=0)


def rgba_png(width: int = 64, height: int = 48) -> bytes:
    """RGBA: left half red at alpha 128, top-right opaque blue, bottom-right fully transparent green."""
    a = np.zeros((height, width, 4), np.uint8)
    a[:, : width // 2] = (255, 0, 0, 128)
    a[: height // 2, width // 2:] = (0, 0, 255, 255)
    a[height // 2:, width // 2:] = (0, 255, 0, 0)
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def exif_rotated_jpeg(width: int = 96, height: int = 48, orientation: int = 6) -> bytes:
    """A ``width`` x ``height`` JPEG with a red top-left block and an EXIF orientation tag.

    Orientation 6 means "rotate 90° clockwise to display": the decoded image is ``height`` x ``width``
    with the red block at the top-right.
    """
    a = np.full((height, width, 3), 230, np.uint8)
    a[: height // 4, : width // 4] = (255, 0, 0)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[ORIENTATION_TAG] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def odd_files() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """File name → (content, (width, height) after EXIF orientation) of valid but unusual images."""
    return {
        "odd_cmyk.jpg": (cmyk_jpeg(64), (64, 64)),
        "odd_gray16.png": (gray16_png(), (64, 48)),
        "odd_gray.png": (gray_png(), (64, 48)),
        "odd_palette.png": (palette_transparent_png(), (64, 48)),
        "odd_rgba.png": (rgba_png(), (64, 48)),
        "odd_exif6.jpg": (exif_rotated_jpeg(96, 48, 6), (48, 96)),
    }


# ------------------------------------------------------------------------------------------- folders
def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Write ``name → bytes`` into ``folder`` (created); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in files.items():
        p = folder / name
        p.write_bytes(data)
        out.append(p)
    return out


def real_photos(ids: tuple[str, ...] | list[str] = REAL_PHOTO_IDS) -> list[Path]:
    """Paths of the given real photos (callers check :data:`DATA_DIR` exists first)."""
    return [DATA_DIR / f"{i}.jpg" for i in ids]


def link_real_photos(folder: Path, ids: tuple[str, ...] | list[str] = REAL_PHOTO_IDS) -> list[Path]:
    """Symlink real photos into ``folder`` (no copies of the data set)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in real_photos(ids):
        dst = folder / src.name
        dst.symlink_to(src)
        out.append(dst)
    return out


def stem(name: str) -> str:
    """Image id the corpus lister gives a file name (extension dropped)."""
    return name.rsplit(".", 1)[0]


# ------------------------------------------------------------------------------------------- running the job
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def job_env(**extra: str) -> dict[str, str]:
    """Environment of a ``python -m jobs.index`` subprocess: local Ray without token auth."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env.update({"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(PROJECT_ROOT),
                "RAY_DEDUP_LOGS": "0"})
    env.update(extra)
    return env


def index_command(images: str, out: str, *args: str) -> list[str]:
    """argv of the index job (extraction stage only)."""
    import sys

    return [sys.executable, "-m", "jobs.index", "--images", images, "--out", out, "--stages", "extract", *args]
