"""What an image file's header declares, checked before Pillow parses it (`refuse_bloated`).

Pillow keeps each JPEG APP or comment segment, each unknown PNG chunk, each GIF comment block and one entry per TIFF
strip or tile while it opens a file, and decodes a BMP's run-length data two bytes at a time in Python, so a small
file could take memory or time far beyond its size (measured, one file each: 5 million empty JPEG segments of 25 MB,
714 MB and 15 s; 1.7 million empty PNG chunks of 20 MB, 252 MB; a 42 MB GIF comment of 2-byte blocks, 1.9 GB; a
36 MB TIFF of 1 x 1 tiles, 49 s and 3 GB; 200 MB of RLE end-of-line escapes, 29 s; a 200 MB PNG EXIF chunk, 1.6 GB).
Each check reads only the lengths and counts in the headers and refuses with one sentence. Written by hand: Pillow
offers no limit on any of them.
"""

from __future__ import annotations

import struct

import numpy as np

from brainmri.core.errors import ImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_JPEG_SCANS = 100  # a progressive JPEG decodes every scan over the whole image: 2,000 repeated 120-byte scans (a 259 KB
# file) took 45 s at 36 MP, so a file under the byte cap could take hours. Encoders write 1 (baseline) to about 10 (every
# real scan here: at most 10, EXIF thumbnails included); libjpeg-turbo's own tools offer the same kind of limit (-maxscans)
MAX_JPEG_MARKERS = 10_000  # segments walked to count a JPEG's scans: real files have 10-60 (progressive ones the most)
MAX_HEADER_PARTS = 10_000  # PNG chunks besides image data, GIF extension blocks before the first image: real files carry
# a handful (text, colour profile, time; a GIF's application and comment blocks), an ICC profile of 1 MB 4,000 blocks
MAX_PNG_CHUNKS = 1_000_000  # chunks of any kind: encoders write image data in chunks of 8 KB or more (30,000 for 250 MB)
MAX_META_BYTES = 16 << 20  # one metadata block (EXIF, XMP, ICC profile, text): real ones are under 1 MB, an ICC profile
# a few MB at most; a PNG eXIf chunk of 200 MB took 1.6 GB to decode with its orientation applied
MIN_TILE_PIXELS = 64  # a TIFF's tiles or strips cover at least this many pixels on average (8 x 8): the spec asks tiles of
# 16 x 16 or more and a strip of at least one row; 1 x 1 tiles made Pillow list 9 million tiles
MAX_TIFF_ENTRIES = 65_535  # tags in a TIFF directory: classic TIFF cannot hold more
TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
TIFF_PARTS = (273, 279, 324, 325)  # strip and tile offsets and byte counts: long by nature, counted, not capped by bytes


def refuse_bloated(data: bytes, max_pixels: int) -> None:
    """Raise ImageError for a header that declares more parts, or larger metadata, than any image of its kind carries."""
    if data[:2] == b"\xff\xd8" and jpeg_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise ImageError(f"a JPEG of more than {MAX_JPEG_SCANS} scans (start-of-scan markers) is refused")
    if data[:8] == PNG_SIGNATURE and _png_extra_chunks(data) > MAX_HEADER_PARTS:
        raise ImageError(f"a PNG of more than {MAX_HEADER_PARTS} chunks besides its image data is refused")
    if data[:6] in (b"GIF87a", b"GIF89a") and _gif_header_blocks(data) > MAX_HEADER_PARTS:
        raise ImageError(
            f"a GIF of more than {MAX_HEADER_PARTS} extension blocks (extensions and their sub-blocks) before its first image is refused"
        )
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _check_tiff(data, max_pixels)
    if data[:2] == b"BM":
        _check_bmp_rle(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _check_webp(data)


def _too_big(kind: str, name: str, size: int) -> ImageError:
    return ImageError(f"a {kind} whose {name} holds {size} bytes is refused (metadata over {MAX_META_BYTES >> 20} MB)")


def _png_extra_chunks(data: bytes) -> int:
    """Chunks other than image data (IDAT), walked by their lengths up to IEND or, in an animated PNG, up to the
    second frame's control chunk (Pillow reads the first frame alone); stops once past MAX_HEADER_PARTS. A file of
    more than MAX_PNG_CHUNKS chunks in all, or a chunk besides image data over MAX_META_BYTES, is refused."""
    pos, n, chunks, image = 8, 0, 0, False
    while pos + 8 <= len(data) and n <= MAX_HEADER_PARTS:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND" or (kind == b"fcTL" and image):
            break
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise ImageError(f"a PNG of more than {MAX_PNG_CHUNKS} chunks is refused")
        if kind not in (b"IDAT", b"fdAT") and length > MAX_META_BYTES:
            raise _too_big("PNG", f"{kind.decode('latin-1')!r} chunk", length)
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


def _check_tiff(data: bytes, max_pixels: int) -> None:
    """The first directory of a TIFF (classic or BigTIFF; Pillow opens that image alone): its size under the pixel cap,
    its strips or tiles no more than MIN_TILE_PIXELS allows for it, no tag's data over MAX_META_BYTES. A directory
    that cannot be read is left to Pillow to refuse."""
    o = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    head, entry, count_fmt, value_at = (8, 20, "Q", 12) if big else (2, 12, "H", 8)
    if len(data) < 16:
        return
    at = struct.unpack_from(o + ("Q" if big else "I"), data, 8 if big else 4)[0]
    if at + head > len(data):
        return
    n = struct.unpack_from(o + count_fmt, data, at)[0]
    if n > MAX_TIFF_ENTRIES:
        raise ImageError(f"a TIFF directory of {n} tags is refused (at most {MAX_TIFF_ENTRIES})")
    tags: dict[int, tuple[int, int]] = {}  # tag: (count, first value when it is a short or long held in the entry)
    for pos in range(at + head, min(at + head + n * entry, len(data) - entry + 1), entry):
        tag, kind, count = struct.unpack_from(o + ("HHQ" if big else "HHI"), data, pos)
        size = count * TIFF_TYPE_BYTES.get(kind, 1)
        if tag not in TIFF_PARTS and size > MAX_META_BYTES:
            raise _too_big("TIFF", f"tag {tag}", size)
        number = {3: "H", 4: "I", 16: "Q"}.get(kind) if big or kind != 16 else None  # short, long, BigTIFF's long8
        first = struct.unpack_from(o + number, data, pos + value_at)[0] if number else 0
        tags.setdefault(tag, (count, first))  # a repeated tag: the first counts, as Pillow reads it
    width, height = tags.get(256, (0, 0))[1], tags.get(257, (0, 0))[1]
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} = {width * height} pixels is over the cap ingest.max_pixels={max_pixels}")
    planes = tags.get(277, (1, 1))[1] if tags.get(284, (1, 1))[1] == 2 else 1  # separate planes: parts per sample
    parts = max(tags.get(273, (0, 0))[0], tags.get(324, (0, 0))[0])
    allowed = max(1, width * height // MIN_TILE_PIXELS, height) * max(1, planes)
    if parts > allowed:
        raise ImageError(f"a {width}x{height} TIFF of {parts} strips or tiles is refused (at most {allowed} for its size)")


def _check_bmp_rle(data: bytes) -> None:
    """A run-length BMP's data no longer than a loose encoding of its pixels needs: four bytes a pixel (a run of one,
    or a pixel and a delta escape past the next), an end-of-line escape a row, and a V5 header's colour profile after
    the pixels (Pillow's decoder walks every two bytes in Python; 200 MB of end-of-line escapes took 29 s)."""
    if len(data) < 34 or (header := struct.unpack_from("<I", data, 14)[0]) < 40:  # the core header has no compression
        return
    offset = struct.unpack_from("<I", data, 10)[0]
    width, height = struct.unpack_from("<ii", data, 18)
    compression = struct.unpack_from("<I", data, 30)[0]
    if compression not in (1, 2):  # RLE8, RLE4
        return
    profile = struct.unpack_from("<I", data, 14 + 116)[0] if header >= 124 and len(data) >= 14 + 120 else 0
    need = 4 * abs(width) * abs(height) + 2 * abs(height) + 64 + profile
    if len(data) - offset > need:
        raise ImageError(f"a {width}x{abs(height)} run-length BMP of {len(data) - offset} bytes of data is refused (at most {need})")


def _check_webp(data: bytes) -> None:
    """A WebP's metadata chunks (EXIF, XMP, ICC profile) under MAX_META_BYTES each."""
    pos = 12
    while pos + 8 <= len(data):
        kind, size = struct.unpack_from("<4sI", data, pos)
        if kind in (b"EXIF", b"XMP ", b"ICCP") and size > MAX_META_BYTES:
            raise _too_big("WebP", f"{kind.decode('latin-1').strip()!r} chunk", size)
        pos += 8 + size + (size & 1)  # chunks are padded to even lengths


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
