"""Decode any supported image file into the one normalized form: 8-bit RGB, EXIF-upright, size-capped."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from brainmri.errors import ImageError

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "GIF", "WEBP"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # normalized: mode RGB, EXIF orientation applied, longest side <= max_side
    sha256: str  # of the original file's bytes
    format: str  # detected from the content, not the file name
    mode: str  # original PIL mode
    width: int  # original size, before orientation and downscaling
    height: int
    exif_rotated: bool


def decode_bytes(data: bytes, *, max_pixels: int, max_side: int) -> Decoded:
    """Decode image bytes; raise ImageError with a one-line reason when they cannot be used."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageError(f"decompression bomb refused: {exc}") from None
        except UnidentifiedImageError:
            raise ImageError(f"not a recognised image (first bytes {data[:8]!r})") from None
        if img.format not in SUPPORTED_FORMATS:
            raise ImageError(f"unsupported image format {img.format}; supported: {', '.join(sorted(SUPPORTED_FORMATS))}")
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(f"{width}x{height} = {width * height} pixels is over the cap ingest.max_pixels={max_pixels}")
        try:
            img.load()
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for corrupt data
            raise ImageError(f"corrupt or truncated {img.format} data: {exc}") from None
    fmt, mode = img.format, img.mode
    orientation = img.getexif().get(0x0112, 1)
    upright = ImageOps.exif_transpose(img)
    rgb = to_rgb(upright)
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return Decoded(rgb, digest, fmt, mode, width, height, orientation not in (0, 1))


def decode_file(path: str | Path, *, max_pixels: int, max_side: int) -> Decoded:
    return decode_bytes(Path(path).read_bytes(), max_pixels=max_pixels, max_side=max_side)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: transparency composited on black, 16-bit scaled, CMYK via its profile."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr8 = np.zeros(arr.shape, np.uint8) if hi <= lo else np.rint(255 * (arr - lo) / (hi - lo)).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken embedded profile: fall back to Pillow's plain conversion
    return img.convert("RGB")


def save_png(img: Image.Image, path: str | Path) -> None:
    """Save losslessly; the output bytes depend only on the pixels."""
    img.save(path, format="PNG", compress_level=6)


def load_rgb(path: str | Path) -> Image.Image:
    """Load a normalized PNG written by ingest or augment."""
    with Image.open(path) as img:
        return img.convert("RGB")
