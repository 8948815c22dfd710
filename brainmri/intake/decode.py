"""Decode any supported image file into the one normalized form: 8-bit RGB, EXIF-upright, size-capped.

This module is the one decoding boundary. `decode_file` is everything from a path to 8-bit RGB pixels:
- our own disk: a path that is not a regular file, or larger than the byte cap, is refused unread (ImageError);
  an OSError while reading it is a fault of our disk and propagates (the flow may retry it);
- the image library: every exception that Pillow or one of its plugins raises (OSError, SyntaxError,
  ValueError, struct.error, zlib.error, MemoryError...) on the file's content becomes a DecodeError, which ingest
  quarantines and predict reports in an error row. Only the library calls sit inside `_library`; our own
  conversion code does not, so a bug of ours still surfaces as a failure instead of a quarantined image.

High-bit-depth rule (README, "What each stage does"): integer data that fits 16 bits is scaled by the bit range
it actually uses (a 12-bit scan in a 16-bit container by 255/4095, never left nearly black); integer data
beyond 16 bits (32-bit TIFFs) is scaled by its own min..max range, with a note; float data is scaled by its
min..max range, and an image with any NaN or infinite pixel is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from brainmri.core.errors import DecodeError, ImageError
from brainmri.intake import headers, signatures

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "GIF", "WEBP"})
INTEGER_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
SWAPPED = re.compile(r";(16|32|64)B")  # a big-endian raw mode of 16 bits or more left after Pillow's own libtiff swap (`_native`)
# raw modes in which Pillow reads a 16-bit colour or gray-and-alpha file's high bytes alone, and the layout of the
# same bytes that gives the low ones (`wide`)
WIDE_RAW = {"RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B", "RGBA;16B": "RGBA;16L", "RGBA;16L": "RGBA;16B", "LA;16B": "RGBA"}
WIDE_RAW |= {f"{m};16N": f"{m};16{'B' if sys.byteorder == 'little' else 'L'}" for m in ("RGB", "RGBA")}  # libtiff's: native order
CHUNK = 1 << 20
# zlib level of every PNG the stages write: on 60 real scans and 80 scale-set images level 2 wrote files within 2% of
# level 6's size (smaller on the phantoms) in a quarter of the time (5.5 against 20.7 ms a real scan, EPYC): at 6 the
# PNG was a third of ingest's per-image work. Lossless at every level: the pixels are the same
PNG_LEVEL = 2
BLOCK_PIXELS = 1 << 20  # pixels per block of rows when high bit depths go to 8 bits: 8 MB of float64 at a time
MAX_ASPECT = 10  # a slice ten times longer than wide is no MRI slice (the real set's most elongated: 1.79); resampling a
# 1 x 40,000,000 PNG (78 KB) to max_side built filter tables as long as its long side: 3.2 GB for one file
UNREADABLE = frozenset({errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP})  # the file's own fault: a reason, not a
# retry; a file that vanished (ENOENT: a set still syncing) or a disk error fails the run, which can then be retried
ROTATING = frozenset(range(2, 9))  # EXIF orientations that flip or turn the image; 1 is upright, anything else is invalid
KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
KINDS[stat.S_IFDIR] = "a folder"
BACKGROUND = 24  # 8-bit level below which a pixel counts as background when cropping to the content
BORDER_MARGIN = 10  # ...or this far above the image border's median level: some scans sit on gray (25), not black, film
BORDER_BAND = 0.03  # that level is the median of a band this deep (a share of the shorter side, at least 3 px) along the
# edges, not of the outermost pixels alone: 12 real scans carry a thin white frame line, whose level (122-255) set the
# threshold above the head, so the crop took a panel letter, a tumour or part of a head, or nothing (benchmarks/crops.py)
PAPER = 200  # a border level above this is a white page or slide the scan was pasted on (3 real scans: 254-255), far
# above any film (black, or gray at 25); a head that fills its view puts its skull in the band (a real one: 161)
CLOSING = 2  # binary-closing iterations that bridge dark gaps splitting one head into pieces (without it, real pairs were lost)
THIN = 3  # binary-opening iterations: a region with nothing left after it (text strokes, edge stripes under ~7 px) is a mark
MIN_PART = 0.05  # a thick region at least this share of the largest is head too (a head split by a dark gap); smaller blobs are not


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # normalized: mode RGB, EXIF orientation applied, cropped to the head if asked, longest side <= max_side
    sha256: str  # of the original file's bytes
    format: str  # detected from the content, not the file name
    mode: str  # original PIL mode
    width: int  # original size, before orientation and downscaling
    height: int
    exif_rotated: bool
    note: str = ""  # how unusual pixel data was mapped to 8 bits (32-bit integer range), else empty
    file_bytes: int = 0  # size of the original file
    has_exif: bool = False  # the file carries EXIF tags (recorded for the shortcut audit: the real set's classes differ in it)
    uncropped: Image.Image | None = None  # `image` before the crop to the head (duplicate fingerprints use this view)
    head: tuple[int, int, int, int] | None = None  # `head_box` of `uncropped` when the crop to the head was asked, else None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def _library(fmt: str | None):
    """Turn anything the image library raises on a file's content into a DecodeError; silence its warnings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "possibly corrupt EXIF" and the like: the pixels decide
            yield
    except ImageError:  # our own refusal inside the block (`wide`, `_white_is_zero`): its reason, not "corrupt"
        raise
    except Exception as exc:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error, zlib.error...
        raise DecodeError(f"corrupt or truncated {fmt or 'image'} data: {_reason(exc)}") from None


def read_capped(path: str | Path, max_bytes: int) -> bytes:
    """A regular file's bytes, refused unread if it is anything else or larger than `max_bytes`.

    The size is checked before reading and again while reading (a file can grow, or its size can lie on some
    file systems), so memory never holds more than `max_bytes`. Special files are judged by os.stat, which
    follows links, and opened with O_NONBLOCK, so a named pipe or a device is never read and never blocks.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"not a regular file ({KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')}); not read")
        if st.st_size > max_bytes:
            raise ImageError(f"{st.st_size} bytes is over the cap ingest.max_file_bytes={max_bytes}; not read")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in UNREADABLE:
            raise  # an I/O error of the disk: the run fails and can be retried, the image is not quarantined for it
        raise ImageError(f"cannot be read: {exc.strerror}") from None
    with open(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else between stat and open
            raise ImageError("not a regular file (replaced while being opened); not read")
        chunks, total = [], 0
        while chunk := f.read(min(CHUNK, max_bytes + 1 - total)):
            total += len(chunk)
            if total > max_bytes:
                raise ImageError(f"grew past the cap ingest.max_file_bytes={max_bytes} while being read; not read")
            chunks.append(chunk)
    return b"".join(chunks)


def _open(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[int, int], object, str | None]:
    """The image, decoded under the caps; its size as stored, a TIFF's EXIF orientation (None for any other format):
    Pillow turns a TIFF as it loads it and drops the tag, so both are read before; and the raw mode of its tiles
    (None when they differ), which `wide` needs and loading clears. A big-endian TIFF that libtiff decoded in the
    wrong byte order comes back put right (`_native`)."""
    headers.refuse_bloated(data, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageError(f"decompression bomb refused: {exc}") from None
        except UnidentifiedImageError:
            raise ImageError(signatures.describe(data) or f"not a recognised image (first bytes {data[:8]!r})") from None
        except Exception as exc:  # any other library failure while reading the header
            raise DecodeError(f"corrupt or truncated image header: {_reason(exc)}") from None
    if img.format not in SUPPORTED_FORMATS:
        supported = ", ".join(sorted(SUPPORTED_FORMATS))
        raise ImageError(signatures.describe(data) or f"unsupported image format {img.format}; supported: {supported}")
    width, height = img.size
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise ImageError(f"{width}x{height} pixels is over {MAX_ASPECT} times longer than wide; no MRI slice is shaped so")
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} = {width * height} pixels is over the cap ingest.max_pixels={max_pixels}")
    if width < 1 or height < 1:
        raise ImageError(f"{img.format} declares {width}x{height} pixels; an image needs at least one")
    with _library(img.format):
        orientation = img.getexif().get(0x0112, 1) if img.format == "TIFF" else None
        raws = {_rawmode(t.args) for t in img.tile}
        swapped = sys.byteorder == "little" and any(t[0] == "libtiff" and SWAPPED.search(_rawmode(t.args) or "") for t in img.tile)
        img.load()
        img = _native(img, next(iter(raws))) if swapped and len(raws) == 1 else img
    if orientation is not None and _turns(orientation) and orientation not in (2, 3, 4):  # Pillow gave the turned size
        width, height = height, width
    return img, (width, height), orientation, raws.pop() if len(raws) == 1 else None


def _native(img: Image.Image, raw: str) -> Image.Image:
    """libtiff hands back a compressed TIFF's samples in the machine's byte order, and Pillow swaps the 16-bit
    unsigned raw modes to match but not the signed 16-bit, 32-bit or float ones (I;16BS, I;32BS, F;32BF), which it
    then reads as big-endian: a CT-like int16 LZW TIFF from ImageJ (MM) came out as noise. Swapped back here."""
    arr = np.asarray(img)
    fixed = arr.astype(np.int16).byteswap().astype(np.int32) if raw.startswith("I;16") else arr.byteswap()
    out = Image.fromarray(fixed)
    out.format, out.info = img.format, img.info
    return out


def _border_level(a: np.ndarray) -> float:
    k = max(3, round(BORDER_BAND * min(a.shape)))
    return float(np.median(np.concatenate([a[:k].ravel(), a[-k:].ravel(), a[:, :k].ravel(), a[:, -k:].ravel()])))


def head_mask(img: Image.Image) -> np.ndarray | None:
    """The head as a boolean mask of `img`: the largest connected bright region (scipy.ndimage.label) that is not a thin
    mark, with any other thick region at least MIN_PART of its size; None when nothing is bright. Content cropping
    boxes it; saliency measures how much of a model's attention falls inside it (holes filled: the ventricles are head).
    A scan pasted on white (a page, a slide) is looked for inside the largest region darker than the white; when that
    region has no film of its own around the head, it is the head."""
    from scipy import ndimage

    a = np.asarray(img.convert("L"))
    level = _border_level(a)
    if level <= PAPER:
        return _bright_regions(a, level)
    labels, n = ndimage.label(a < level - BORDER_MARGIN)
    if n == 0:
        return None
    dark = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    ys, xs = np.nonzero(dark)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    inner = a[y0:y1, x0:x1]
    inner_level = _border_level(inner)
    if inner_level > PAPER:  # the head itself lies on the white, no film around it: the dark region is the head
        return ndimage.binary_fill_holes(dark)
    found = _bright_regions(inner, inner_level)
    if found is None:
        return None
    out = np.zeros(a.shape, bool)
    out[y0:y1, x0:x1] = found
    return out


def _bright_regions(a: np.ndarray, level: float) -> np.ndarray | None:
    from scipy import ndimage

    mask = closing(a > max(BACKGROUND, level + BORDER_MARGIN), CLOSING)
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    thick = np.bincount(labels[opening(mask, THIN)], minlength=n + 1) > 0
    thick[0] = False  # the background
    if not thick.any():  # nothing but thin marks (a line drawing): fall back on every region
        thick = sizes > 0
        thick[0] = False
    return (thick & (sizes >= MIN_PART * sizes[thick].max()))[labels]


def _erode(mask: np.ndarray, times: int) -> np.ndarray:
    """`times` erosions by the 4-neighbour cross, outside the image counting as background."""
    for _ in range(times):
        out = np.zeros_like(mask)
        m = mask
        out[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        mask = out
    return mask


def _dilate(mask: np.ndarray, times: int) -> np.ndarray:
    """`times` dilations by the 4-neighbour cross; nothing grows in from outside the image."""
    for _ in range(times):
        out = mask.copy()
        out[1:] |= mask[:-1]
        out[:-1] |= mask[1:]
        out[:, 1:] |= mask[:, :-1]
        out[:, :-1] |= mask[:, 1:]
        mask = out
    return mask


# Written by hand: scipy.ndimage.binary_closing/binary_opening(mask, iterations=k) with their default cross give these
# same pixels (tests/test_images.py checks it on random masks; every real image's head mask was compared), but run a
# general structuring-element loop: 30-40 ms per 512 x 512 mask against 3-4 ms for these shifted ANDs and ORs, and
# head_mask runs 5 to 7 times per ingested image (the fingerprint's views and turns)
def closing(mask: np.ndarray, times: int) -> np.ndarray:
    """scipy.ndimage.binary_closing(mask, iterations=times) with the default cross: dilate, then erode."""
    return _erode(_dilate(mask, times), times)


def opening(mask: np.ndarray, times: int) -> np.ndarray:
    """scipy.ndimage.binary_opening(mask, iterations=times) with the default cross: erode, then dilate."""
    return _dilate(_erode(mask, times), times)


def content_crop(img: Image.Image) -> Image.Image:
    """Crop to the head, so padding, re-crops and marks in the margin change neither fingerprints nor model inputs.

    The head is `head_mask`'s region. A box around every bright pixel would also take in burned-in margin text
    (window/level numbers, a panel letter) or a white stripe at the edge, and then two crops of one scan no longer
    line up: two such real pairs straddled train and test.
    """
    box = head_box(img)
    return img if box is None else img.crop(box)


def head_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of `head_mask`'s region, what content_crop keeps; None when no head is found."""
    keep = head_mask(img)
    if keep is None:
        return None
    ys, xs = np.flatnonzero(keep.any(1)), np.flatnonzero(keep.any(0))  # the rows and columns it touches: no pixel list
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def decode_bytes(data: bytes, *, max_pixels: int, max_side: int, crop_to_content: bool = False) -> Decoded:
    """Decode image bytes; raise ImageError (DecodeError when the library failed) with a one-line reason.

    `crop_to_content` (ingest.crop_to_content, carried into exported models' metadata) cuts the dark border away
    after the downscaling: the real set's classes differ in their framing, a shortcut the audit stage measures.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    img, (width, height), turned, raw = _open(data, max_pixels)
    fmt, mode = img.format, img.mode
    with _library(fmt):
        exif = img.getexif()
        rotated = _turns(exif.get(0x0112, 1) if turned is None else turned)
        upright = ImageOps.exif_transpose(wide(data, img, raw) or img)
        tags = getattr(img, "tag_v2", {}) if fmt == "TIFF" else {}  # none after `_native`
        if upright.mode in INTEGER_MODES and tags.get(262) == 0:
            upright = _white_is_zero(upright, tags.get(258))
        if upright.mode == "L" and _first(tags.get(339)) == 2:  # signed 8-bit (MATLAB's Tiff writes it): Pillow reads
            upright = Image.fromarray(np.asarray(upright).view(np.int8).astype(np.int32))  # unsigned; as the int16 rule
    rgb, note = to_rgb_noted(upright, fmt)
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    full, box = rgb, None
    if crop_to_content:  # after the downscale; the fingerprint crops the uncropped view to this same box (ingest passes it)
        box = head_box(rgb)
        rgb = rgb if box is None else rgb.crop(box)
    return Decoded(rgb, digest, fmt, mode, width, height, rotated, note, len(data), len(exif) > 0, full, box)


def _first(value):
    """A TIFF tag's value, or the first of its per-sample values."""
    return value[0] if isinstance(value, tuple) and value else value


def _white_is_zero(img: Image.Image, bits) -> Image.Image:
    """A 16-bit gray TIFF stored MinIsWhite (photometric 0: a DICOM MONOCHROME1 export, a film digitiser), inverted
    as the TIFF spec says (2^bits - 1 is black). Pillow inverts 1- and 8-bit ones itself but reads 16-bit ones as
    stored, a negative image; wider ones are refused by name rather than guessed."""
    bits = int(_first(bits) or 0)
    if not img.mode.startswith("I;16") or not 1 <= bits <= 16:
        raise ImageError(f"a {bits}-bit MinIsWhite (photometric 0) TIFF is not supported; save it as MinIsBlack")
    arr = np.asarray(img).astype(np.int32)
    black = 2 ** max(8, int(arr.max()).bit_length()) - 1  # the bit range used, as `scale_integer`: 12-bit data in 16 bits
    return Image.fromarray(black - arr)


def _turns(orientation) -> bool:
    """Whether ImageOps.exif_transpose turns the image for this EXIF orientation: it looks the value up by equality, so
    a rational 6/1 turns it as 6 does (the record said False while the pixels were turned); an invalid value turns
    nothing."""
    try:
        return orientation in ROTATING
    except TypeError:  # an unhashable value (a list): no turn
        return False


def decode_file(path: str | Path, *, max_pixels: int, max_side: int, max_bytes: int, crop_to_content: bool = False) -> Decoded:
    return decode_bytes(read_capped(path, max_bytes), max_pixels=max_pixels, max_side=max_side, crop_to_content=crop_to_content)


def _rawmode(args) -> str | None:
    """A tile's raw mode: its arguments (PNG), or their first (TIFF: raw mode, stride, orientation)."""
    return args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else None


def wide(data: bytes, img: Image.Image, raw: str | None) -> Image.Image | None:
    """A 16-bit colour (RGB, RGBA) or gray-and-alpha PNG or TIFF in 8 bits by the rule of 16-bit gray
    (`scale_integer`: by the bit range its samples use, all channels alike; alpha, always full range, by 65535), with
    `img`'s EXIF and XMP; None for any other image.

    Pillow reads such a file's high bytes alone (into RGB or RGBA), so a 12-bit scan stored in 16 bits came out nearly
    black (at most 15 of 255) and was scored as such. Its decoders unpack the same rows into another raw layout of
    the same width, though: the low bytes (a 16-bit sample's other byte: ;16L for ;16B and back), or for PNG's gray
    and alpha all four bytes of a pixel as RGBA (WIDE_RAW). `img` is the file already decoded under the pixel cap, `raw`
    the raw mode it was read in (`_open`): only a 16-bit one is decoded again."""
    if img.format not in ("PNG", "TIFF") or img.mode not in ("RGB", "RGBA") or raw is None or ";16" not in raw:
        return None
    planes = img.format == "TIFF" and img.tag_v2.get(284) == 2  # libtiff unpacks separate planes itself
    if raw not in WIDE_RAW or planes:
        raise ImageError(
            f"16-bit colour samples in a layout read only by their high bytes ({raw}{', separate planes' if planes else ''}): "
            "a 12-bit scan would come out nearly black; save it as 16-bit gray or 8-bit colour"
        )
    with _library(img.format):
        again = Image.open(io.BytesIO(data))
        swap = WIDE_RAW[raw]
        again.tile = [t._replace(args=swap if isinstance(t.args, str) else (swap, *t.args[1:])) for t in again.tile]
        again.load()
        low = np.asarray(again)
        if raw == "LA;16B":  # high and low byte of gray, then of alpha
            full = (low[..., 0::2].astype(np.uint16) << 8) | low[..., 1::2]
        else:
            full = (np.asarray(img).astype(np.uint16) << 8) | low
    alpha = full.shape[-1] in (2, 4)
    clear = img.info.get("transparency")
    if not alpha and isinstance(clear, tuple) and len(clear) == 3:  # an RGB16 PNG's tRNS colour: transparent, on black,
        full = np.where((full == np.array(clear, np.uint16)).all(-1, keepdims=True), 0, full)  # out of the scaling range
    colour, _ = scale_integer(full[..., :-1] if alpha else full)
    if alpha:
        colour = np.concatenate([colour, _by_rows(full[..., -1:], lambda a: np.rint(a / 257.0))], axis=-1)
    out = Image.fromarray(colour)  # LA, RGB or RGBA by its 2, 3 or 4 channels
    out.info.update({k: v for k, v in img.info.items() if k != "transparency"})  # EXIF and XMP: its orientation applies
    return out


def _by_rows(arr: np.ndarray, fn) -> np.ndarray:
    """fn over blocks of rows into 8 bits: a 40 MP image never holds a float64 copy of itself (whole, the 16-bit and
    32-bit conversions peaked at 1.1-1.3 GB for one 6320 x 6320 file of 78-250 KB)."""
    out = np.empty(arr.shape, np.uint8)
    step = max(1, BLOCK_PIXELS // max(1, arr.shape[1]))
    for i in range(0, arr.shape[0], step):
        out[i : i + step] = fn(arr[i : i + step])
    return out


def scale_integer(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Integer pixels to 8 bits: by the bit range used if they fit 16 bits, else by their min..max range, noted."""
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 0xFFFF:
        scale = (2 ** max(8, hi.bit_length()) - 1) / 255.0  # 12-bit data in a 16-bit container: scale by 4095, not 65535
        return _by_rows(arr, lambda a: np.clip(np.rint(a / scale), 0, 255)), ""
    if hi == lo:  # one value throughout: no range to scale by
        return np.zeros(arr.shape, np.uint8), f"integer pixels all {lo}, outside 16 bits; mapped to 0"
    arr8 = _by_rows(arr, lambda a: np.rint(255 * (a.astype(np.float64) - lo) / (hi - lo)))
    return arr8, f"integer pixels {lo}..{hi} do not fit 16 bits; scaled by their range to 0..255"


def scale_float(arr: np.ndarray) -> np.ndarray:
    """Float pixels to 8 bits by their min..max range; NaN or infinite pixels are refused."""
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise ImageError(f"{bad} of {arr.size} float pixels are NaN or infinite; a float image needs finite values")
    lo, hi = float(arr.min()), float(arr.max())
    return np.zeros(arr.shape, np.uint8) if hi <= lo else _by_rows(arr, lambda a: np.rint(255 * (a.astype(np.float64) - lo) / (hi - lo)))


def to_rgb(img: Image.Image) -> Image.Image:
    return to_rgb_noted(img)[0]


def to_rgb_noted(img: Image.Image, fmt: str | None = None) -> tuple[Image.Image, str]:
    """Any Pillow mode to 8-bit RGB (transparency composited on black, high bit depths by the rule above), and a note."""
    mode = img.mode
    if mode in INTEGER_MODES or mode == "F":
        with _library(fmt):
            arr = np.asarray(img)  # float32 or 16/32-bit integers: converted a block of rows at a time (_by_rows)
        clear = img.info.get("transparency")
        if isinstance(clear, int):  # a 16-bit gray PNG's tRNS: that value is transparent (black, as in 8 bits), out of the range
            arr = np.where(arr == clear, 0, arr)
        arr8, note = (scale_float(arr), "") if mode == "F" else scale_integer(arr)
        return Image.fromarray(arr8, "L").convert("RGB"), note
    if mode == "CMYK":
        return _cmyk_to_rgb(img, fmt), ""
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        with _library(fmt):
            rgba = img.convert("RGBA")
        if rgba.getextrema()[3] == (0, 0):  # alpha hides every pixel: a writer that leaves it 0 (32-bit BMPs with an
            return rgba.convert("RGB"), "alpha 0 everywhere; ignored"  # alpha mask), not an invisible scan: shown opaque
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB"), ""
    with _library(fmt):
        return img.convert("RGB"), ""


def _cmyk_to_rgb(img: Image.Image, fmt: str | None) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken embedded profile (PyCMSError, OSError, TypeError...): Pillow's plain conversion
            pass
    with _library(fmt):
        return img.convert("RGB")


def save_png(img: Image.Image, path: str | Path | io.BytesIO) -> None:
    """Save losslessly; the output bytes depend only on the pixels (and zlib's version, pinned in requirements.lock)."""
    img.save(path, format="PNG", compress_level=PNG_LEVEL)


def load_rgb(path: str | Path) -> Image.Image:
    """Load a normalized PNG written by ingest or augment."""
    with Image.open(path) as img:
        return img.convert("RGB")
