"""Decoding untrusted image bytes into RGB with clear, recordable failure reasons.

Every failure raises :class:`ImageError` with a short ``reason`` code (stored in the ``errors`` table) and a
human-readable ``detail``. Handled cases: empty, truncated, corrupt and non-image files, decompression bombs
(more than ``max_pixels``), EXIF orientation, CMYK, 16-bit, float, grayscale, palette and alpha images.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
# JPEG colour modes a device decoder (nvjpeg through torchvision) turns into RGB; CMYK/YCCK and others go to Pillow
DEVICE_JPEG_MODES = ("RGB", "L")

# we enforce our own pixel limit from the header, so Pillow's global bomb check is not relied upon
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An image could not be decoded; ``reason`` is a short code, ``detail`` explains."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB (alpha composited on white, 16-bit/float rescaled, CMYK converted)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        else:
            arr = arr * (255.0 / hi)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV ...


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> Image.Image:
    """Decode image bytes to an EXIF-oriented RGB image.

    ``max_side`` lets JPEG decoding use DCT scaling (draft mode) when the network input will be smaller,
    which is several times faster on large photos; the result still has at least ``max_side`` pixels on its
    longest side whenever the original had. ``result.info["original_size"]`` is the full-resolution
    (width, height) after EXIF orientation, which pixel coordinates in the tables refer to.
    """
    if not data:
        raise ImageError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError("corrupt", f"invalid size {w}x{h}")
            if w * h > max_pixels:
                raise ImageError("too_large",
                                 f"{w}x{h} = {w * h / 1e6:.1f} MP exceeds the {max_pixels / 1e6:.0f} MP limit")
            if max_side is not None and img.format == "JPEG" and max(w, h) > 2 * max_side:
                scale = max_side / max(w, h)
                img.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
            swapped = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            rgb.info["original_size"] = (h, w) if swapped else (w, h)
            return rgb
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not_image", str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        reason = "truncated" if ("truncated" in msg.lower() or isinstance(exc, EOFError)) else "corrupt"
        raise ImageError(reason, f"{type(exc).__name__}: {msg}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder bug is recorded, never crashes the job
        raise ImageError("corrupt", f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image says, read without decoding its pixels."""

    format: str          # Pillow's format name ("JPEG", "PNG", ...)
    mode: str            # Pillow mode of the stored pixels ("RGB", "L", "CMYK", ...)
    width: int           # stored (not yet EXIF-oriented) size
    height: int
    orientation: int     # EXIF orientation tag, 1 when absent or invalid

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation: what :func:`decode_image`'s ``original_size`` reports."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)

    @property
    def device_decodable(self) -> bool:
        """A plain RGB / grayscale JPEG, which a GPU decoder handles; anything else is decoded by Pillow."""
        return self.format == "JPEG" and self.mode in DEVICE_JPEG_MODES


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Read an image's header only, with the same failure reasons as :func:`decode_image` for what the header
    reveals (``empty``, ``not_image``, ``corrupt`` size, ``too_large``): the bomb guard of any decoder that
    does not go through Pillow (a GPU JPEG decoder), checked before a single pixel is decoded."""
    if not data:
        raise ImageError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError("corrupt", f"invalid size {w}x{h}")
            if w * h > max_pixels:
                raise ImageError("too_large",
                                 f"{w}x{h} = {w * h / 1e6:.1f} MP exceeds the {max_pixels / 1e6:.0f} MP limit")
            orientation = img.getexif().get(0x0112, 1)
            orientation = int(orientation) if orientation in range(1, 9) else 1
            return ImageHeader(str(img.format), str(img.mode), int(w), int(h), orientation)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not_image", str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a broken header is the image's error, never the job's
        raise ImageError("corrupt", f"{type(exc).__name__}: {exc}") from None
