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
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from brainmri.core.errors import DecodeError, ImageError

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "GIF", "WEBP"})
INTEGER_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHUNK = 1 << 20
# zlib level of every PNG the stages write: on 60 real scans and 80 scale-set images level 2 wrote files within 2% of
# level 6's size (smaller on the phantoms) in a quarter of the time (5.5 against 20.7 ms a real scan, EPYC): at 6 the
# PNG was a third of ingest's per-image work. Lossless at every level: the pixels are the same
PNG_LEVEL = 2
BLOCK_PIXELS = 1 << 20  # pixels per block of rows when high bit depths go to 8 bits: 8 MB of float64 at a time
MAX_JPEG_SCANS = 100  # a progressive JPEG decodes every scan over the whole image: 2,000 repeated 120-byte scans (a 259 KB
# file) took 45 s at 36 MP, so a file under the byte cap could take hours. Encoders write 1 (baseline) to about 10 (every
# real scan here: at most 10, EXIF thumbnails included); libjpeg-turbo's own tools offer the same kind of limit (-maxscans)
MAX_ASPECT = 10  # a slice ten times longer than wide is no MRI slice (the real set's most elongated: 1.79); resampling a
# 1 x 40,000,000 PNG (78 KB) to max_side built filter tables as long as its long side: 3.2 GB for one file
MAX_JPEG_MARKERS = 10_000  # segments walked to count a JPEG's scans: real files have 10-60 (progressive ones the most)
MAX_HEADER_PARTS = 10_000  # PNG chunks besides image data, GIF extension blocks before the first image: real files carry
# a handful (text, colour profile, time; a GIF's application and comment blocks), an ICC profile of 1 MB 4,000 blocks
MAX_PNG_CHUNKS = 1_000_000  # chunks of any kind: encoders write image data in chunks of 8 KB or more (30,000 for 250 MB)
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


def _open(data: bytes, max_pixels: int) -> Image.Image:
    _refuse_bloated_header(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageError(f"decompression bomb refused: {exc}") from None
        except UnidentifiedImageError:
            raise ImageError(f"not a recognised image (first bytes {data[:8]!r})") from None
        except Exception as exc:  # any other library failure while reading the header
            raise DecodeError(f"corrupt or truncated image header: {_reason(exc)}") from None
    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(f"unsupported image format {img.format}; supported: {', '.join(sorted(SUPPORTED_FORMATS))}")
    width, height = img.size
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise ImageError(f"{width}x{height} pixels is over {MAX_ASPECT} times longer than wide; no MRI slice is shaped so")
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} = {width * height} pixels is over the cap ingest.max_pixels={max_pixels}")
    if width < 1 or height < 1:
        raise ImageError(f"{img.format} declares {width}x{height} pixels; an image needs at least one")
    with _library(img.format):
        img.load()
    return img


def _refuse_bloated_header(data: bytes) -> None:
    """Refuse, before Pillow parses it, a header of more segments, chunks or blocks than any image carries: Pillow keeps
    each JPEG APP or comment segment, each unknown PNG chunk and each GIF comment block while it opens the file, so a
    small file took memory far beyond its size (5 million empty JPEG segments of 25 MB: 714 MB and 15 s; 1.7 million
    empty PNG chunks of 20 MB: 252 MB; a 42 MB GIF comment of 2-byte blocks: 1.9 GB). Written by hand: Pillow has no
    limit on them, and only the lengths in each header are read."""
    if data[:2] == b"\xff\xd8" and jpeg_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise ImageError(f"a JPEG of more than {MAX_JPEG_SCANS} scans (start-of-scan markers) is refused")
    if data[:8] == PNG_SIGNATURE and _png_extra_chunks(data) > MAX_HEADER_PARTS:
        raise ImageError(f"a PNG of more than {MAX_HEADER_PARTS} chunks besides its image data is refused")
    if data[:6] in (b"GIF87a", b"GIF89a") and _gif_header_blocks(data) > MAX_HEADER_PARTS:
        raise ImageError(
            f"a GIF of more than {MAX_HEADER_PARTS} extension blocks (extensions and their sub-blocks) before its first image is refused"
        )


def _png_extra_chunks(data: bytes) -> int:
    """Chunks other than image data (IDAT), walked by their lengths up to IEND or, in an animated PNG, up to the
    second frame's control chunk (Pillow reads the first frame alone); stops once past MAX_HEADER_PARTS. A file of
    more than MAX_PNG_CHUNKS chunks in all is refused: walking them is all either reader does with empty ones."""
    pos, n, chunks, image = 8, 0, 0, False
    while pos + 8 <= len(data) and n <= MAX_HEADER_PARTS:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND" or (kind == b"fcTL" and image):
            break
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise ImageError(f"a PNG of more than {MAX_PNG_CHUNKS} chunks is refused")
        image |= kind == b"IDAT"
        n += kind != b"IDAT"
        pos += 12 + length  # length, type, data, CRC
    return n


def _gif_header_blocks(data: bytes) -> int:
    """Extensions before a GIF's first image (what Pillow reads to open it) and their sub-blocks; stops past the cap."""
    pos, n = 13, 0  # after the header and the logical screen descriptor
    if len(data) > 10 and data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)  # the global colour table
    while pos + 1 < len(data) and data[pos] == 0x21 and n <= MAX_HEADER_PARTS:  # an extension: label, then sub-blocks
        n, pos = n + 1, pos + 2  # an empty extension counts too
        while pos < len(data) and data[pos] and n <= MAX_HEADER_PARTS:
            n, pos = n + 1, pos + 1 + data[pos]
        pos += 1  # the block terminator
    return n


def jpeg_scans(data: bytes, stop: int) -> int:
    """Start-of-scan markers of a JPEG's first image, counted by walking its segments as a decoder does: bytes inside a
    segment (a comment or EXIF thumbnail holding FF DA) are no markers. Stops once past `stop`."""
    n, pos = 0, 2  # after the start-of-image marker
    for _ in range(MAX_JPEG_MARKERS):
        at = _next_marker(data, pos)
        if at < 0 or n > stop or data[at + 1] == 0xD9:  # the end of the first image: Pillow decodes only that one
            return n
        code, pos = data[at + 1], at + 2
        if code != 0x01 and pos + 2 <= len(data):  # TEM has no length; a cut-off length ends the file
            n += code == 0xDA
            pos += max(2, int.from_bytes(data[pos : pos + 2], "big"))  # the segment; entropy-coded data follows an SOS
    raise ImageError(f"a JPEG of more than {MAX_JPEG_MARKERS} markers is refused")


def _next_marker(data: bytes, pos: int, chunk: int = 1 << 20) -> int:
    """Where the next marker's FF is: an FF followed by a code, not by stuffing (00), a fill FF or a restart marker
    (D0-D7), which entropy-coded data holds. Between segments the marker is usually right at `pos`: taken at once (a
    megabyte's search for each of 10,000 tiny segments took 3.8 s). Else vectorized, 4 KB first, then a megabyte at
    a time: on a 100 MB flood of FF 00 pairs a regular expression took 10 s, this 1.6 s (2 loaded cores)."""
    if pos < len(data) - 1 and data[pos] == 0xFF and data[pos + 1] not in (0x00, 0xFF) and not 0xD0 <= data[pos + 1] <= 0xD7:
        return pos
    size = 4096  # the first look is short: most searches end within a few bytes
    while pos < len(data) - 1:
        a = np.frombuffer(data, np.uint8, count=min(size + 1, len(data) - pos), offset=pos)
        code = a[1:]
        hits = np.flatnonzero((a[:-1] == 0xFF) & (code != 0) & (code != 0xFF) & ((code < 0xD0) | (code > 0xD7)))
        if len(hits):
            return pos + int(hits[0])
        pos, size = pos + size, min(chunk, size * 16)
    return -1


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
    img = _open(data, max_pixels)
    fmt, mode = img.format, img.mode
    width, height = img.size
    with _library(fmt):
        exif = img.getexif()
        orientation = exif.get(0x0112, 1)
        rotated = isinstance(orientation, int) and orientation in ROTATING  # an invalid value turns nothing
        upright = ImageOps.exif_transpose(wide_png(data, img) if is_wide_png(data) else img)
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


def decode_file(path: str | Path, *, max_pixels: int, max_side: int, max_bytes: int, crop_to_content: bool = False) -> Decoded:
    return decode_bytes(read_capped(path, max_bytes), max_pixels=max_pixels, max_side=max_side, crop_to_content=crop_to_content)


def is_wide_png(data: bytes) -> bool:
    """A PNG of 16-bit colour (RGB, RGBA) or gray with alpha, by its header (IHDR's bit depth and colour type)."""
    return data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)


def wide_png(data: bytes, img: Image.Image) -> Image.Image:
    """A 16-bit colour or gray-and-alpha PNG (`is_wide_png`) in 8 bits by the rule of 16-bit gray (`scale_integer`: by
    the bit range its samples use, all channels alike; alpha, always full range, by 65535), with `img`'s EXIF.

    Pillow reads such a file's high bytes alone (into RGB or RGBA), so a 12-bit scan stored in 16 bits came out nearly
    black (at most 15 of 255) and was scored as such. Its PNG decoder unfilters the same rows into other raw layouts of
    the same width, though: the low bytes (RGB;16L, RGBA;16L read big-endian samples' second bytes), or for gray and
    alpha all four bytes of a pixel as RGBA. `img` is the file already decoded under the pixel cap (`_open`)."""
    with _library("PNG"):
        again = Image.open(io.BytesIO(data))
        tile = again.tile[0]
        raw = tile.args  # Pillow's raw mode for the file: RGB;16B, RGBA;16B or LA;16B
        again.tile = [tile._replace(args="RGBA" if raw == "LA;16B" else raw.replace(";16B", ";16L"))]
        again.load()
        low = np.asarray(again)
        if raw == "LA;16B":  # high and low byte of gray, then of alpha
            wide = (low[..., 0::2].astype(np.uint16) << 8) | low[..., 1::2]
        else:
            wide = (np.asarray(img).astype(np.uint16) << 8) | low
    alpha = wide.shape[-1] in (2, 4)
    colour, _ = scale_integer(wide[..., :-1] if alpha else wide)
    if alpha:
        colour = np.concatenate([colour, _by_rows(wide[..., -1:], lambda a: np.rint(a / 257.0))], axis=-1)
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
        arr8, note = (scale_float(arr), "") if mode == "F" else scale_integer(arr)
        return Image.fromarray(arr8, "L").convert("RGB"), note
    if mode == "CMYK":
        return _cmyk_to_rgb(img, fmt), ""
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        with _library(fmt):
            rgba = img.convert("RGBA")
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


def save_png(img: Image.Image, path: str | Path) -> None:
    """Save losslessly; the output bytes depend only on the pixels (and zlib's version, pinned in requirements.lock)."""
    img.save(path, format="PNG", compress_level=PNG_LEVEL)


def load_rgb(path: str | Path) -> Image.Image:
    """Load a normalized PNG written by ingest or augment."""
    with Image.open(path) as img:
        return img.convert("RGB")
