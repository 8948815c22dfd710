"""Files a user may really bring that are not plain 8-bit images.

Formats the decoder does not read are named, with what to do (DICOM, NIfTI, MATLAB, archives, documents); valid but
unusual encodings decode to the pixels the file shows (16-bit MinIsWhite and signed 8-bit TIFFs, big-endian compressed
TIFFs, an alpha of zero everywhere, 16-bit transparency). Each file is built in its format's real layout (the
libraries that write them where the environment has one), so a test fails if a signature or field is misplaced."""

import gzip
import io
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
from factory import brain, encode, write_dataset
from PIL import Image
from test_ingest import project

from brainmri.core.errors import DataError, ImageError
from brainmri.intake.decode import decode_bytes
from brainmri.intake.signatures import describe
from tasks.ingest import ingest

LIMITS = {"max_pixels": 10_000_000, "max_side": 512}
PIXELS = brain(2).astype(np.uint16)


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One little-endian explicit-VR data element (PS3.5 7.1.2), short or long length form as the VR asks."""
    if len(value) % 2:
        value += b"\x00"
    head = struct.pack("<HH", group, element) + vr
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def dicom(preamble: bool = True) -> bytes:
    """An MR slice as a scanner writes it: preamble, DICM, file meta (group 0002), then the image's elements."""
    meta = _element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1")  # explicit VR little endian
    body = (
        _element(0x0008, 0x0060, b"CS", b"MR")
        + _element(0x0028, 0x0010, b"US", struct.pack("<H", PIXELS.shape[0]))
        + _element(0x0028, 0x0011, b"US", struct.pack("<H", PIXELS.shape[1]))
        + _element(0x7FE0, 0x0010, b"OW", PIXELS.tobytes())
    )
    group = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta))) + meta
    return (b"\x00" * 128 + b"DICM" + group + body) if preamble else body


def nifti(order: str = "<") -> bytes:
    """A NIfTI-1 single file (.nii): the 348-byte header, 4 bytes of extension flags, then the voxels."""
    head = bytearray(348)
    struct.pack_into(order + "i", head, 0, 348)
    struct.pack_into(order + "8h", head, 40, 3, *PIXELS.shape, 1, 1, 1, 1, 1)  # dim: a 3-D volume of one slice
    struct.pack_into(order + "h", head, 70, 512)  # datatype uint16
    head[344:348] = b"n+1\x00"
    return bytes(head) + b"\x00" * 4 + PIXELS.astype(order + "u2").tobytes()


def matlab_v5() -> bytes:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, {"cjdata": {"image": PIXELS, "label": 1, "PID": "100360"}})
    return buf.getvalue()


def hdf5(tmp_path, matlab: bool) -> bytes:
    """An HDF5 file; as MATLAB 7.3 writes one, with its 512-byte text header before the HDF5 signature."""
    import h5py

    path = tmp_path / "slice.h5"
    with h5py.File(path, "w", userblock_size=512 if matlab else 0) as f:
        f["cjdata/image"] = PIXELS
    data = bytearray(path.read_bytes())
    if matlab:
        text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Dec  7 12:00:00 2026 HDF5 schema 1.00 ."
        data[: len(text)] = text
    return bytes(data)


def npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, PIXELS)
    return buf.getvalue()


def zipped() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("yes/a.png", encode(brain(1), "PNG"))
    return buf.getvalue()


def tarred() -> bytes:
    buf, data = io.BytesIO(), encode(brain(1), "PNG")
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("yes/a.png")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def heif() -> bytes:
    """An ISO base media file's first box, as a HEIC photo starts."""
    return struct.pack(">I", 24) + b"ftypheic" + struct.pack(">I", 0) + b"mif1heic" + b"\x00" * 64


CASES = {
    "DICOM": (lambda t: dicom(), "a DICOM file"),
    "DICOM without preamble": (lambda t: dicom(preamble=False), "a DICOM file"),
    "NIfTI": (lambda t: nifti(), "NIfTI or Analyze volume"),
    "NIfTI big-endian": (lambda t: nifti(">"), "NIfTI or Analyze volume"),
    "NIfTI gzipped": (lambda t: gzip.compress(nifti()), "gzip-compressed file"),
    "NRRD": (lambda t: b"NRRD0004\ntype: uint16\ndimension: 2\nsizes: 4 4\nencoding: raw\n\n" + b"\x00" * 32, "NRRD volume"),
    "MATLAB 5": (lambda t: matlab_v5(), "MATLAB .mat file"),
    "MATLAB 7.3": (lambda t: hdf5(t, matlab=True), "MATLAB .mat file"),
    "HDF5": (lambda t: hdf5(t, matlab=False), "an HDF5 file"),
    "NumPy": (lambda t: npy(), "NumPy array file"),
    "zip": (lambda t: zipped(), "a zip archive inside a class folder"),
    "tar": (lambda t: tarred(), "a tar archive inside a class folder"),
    "xz": (lambda t: b"\xfd7zXZ\x00\x00\x04" + b"\x00" * 40, "compressed archive"),
    "PDF": (lambda t: b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "a PDF document"),
    "HEIC": (lambda t: heif(), "HEIF or AVIF image"),
    "SVG": (lambda t: b'\xef\xbb\xbf<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "XML, SVG or HTML"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_known_format_is_named_with_what_to_do(tmp_path, case):
    make, named = CASES[case]
    with pytest.raises(ImageError, match=named) as caught:
        decode_bytes(make(tmp_path), **LIMITS)
    assert "\n" not in str(caught.value) and "first bytes" not in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [b"hello, not an image at all", b"\x08\x00\x00\x00" + b"\x00" * 400, b"\\\x01\x00\x00short", b"PK\x01\x02", bytes(range(256)) * 2],
)
def test_other_bytes_keep_the_generic_reason(data):
    """Near misses (a group-0008 start without a VR, 348 without a header's length, a zip's middle) are not named."""
    assert describe(data) is None
    with pytest.raises(ImageError, match=r"not a recognised image \(first bytes"):
        decode_bytes(data, **LIMITS)


def test_real_images_are_not_named(tmp_path):
    """No signature matches an image the decoder reads: the check runs only after Pillow gave up, but must not fire early."""
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"):
        data = encode(brain(3), fmt)
        assert describe(data) is None or describe(data).startswith(f"a {fmt} "), fmt  # a TIFF or JPEG layout Pillow lacks
        decode_bytes(data, **LIMITS)


def test_a_class_folder_of_dicom_files_stops_naming_dicom(tmp_path):
    """The stop for too few images names the commonest quarantine reason, not just 'see the reasons'."""
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3, classes=("yes",))
    (ds / "no").mkdir()
    for k in range(4):
        (ds / "no" / f"IM{k:04d}.dcm").write_bytes(dicom())
    with pytest.raises(DataError, match=r"'no': 0.*4 of 4 quarantined files: a DICOM file, not a 2-D image file: export"):
        ingest(p)


def _tiff16(stored: np.ndarray, photometric: int) -> bytes:
    """A little-endian, uncompressed, one-strip 16-bit gray TIFF with the given photometric interpretation."""
    h, w = stored.shape
    pixels = stored.astype("<u2").tobytes()
    tags = [
        (256, 3, w),
        (257, 3, h),
        (258, 3, 16),
        (259, 3, 1),
        (262, 3, photometric),
        (273, 4, 0),
        (277, 3, 1),
        (278, 3, h),
        (279, 4, len(pixels)),
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    offset = 8 + ifd_size
    tags[5] = (273, 4, offset)
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", t, k, 1) + struct.pack("<I" if k == 4 else "<HH", v, *([] if k == 4 else [0])) for t, k, v in tags
    )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + pixels


@pytest.mark.parametrize("bits", [16, 12])
def test_a_sixteen_bit_min_is_white_tiff_is_not_read_as_a_negative(bits):
    """A MONOCHROME1-style export (0 white, the bit range's top black) decodes to the same pixels as the MinIsBlack
    file, full 16-bit data or 12-bit data in 16 bits (inverted against 4095, not 65535: 12 gray levels were left)."""
    top = 2**bits - 1
    shown = np.rint(brain(4).astype(np.float64) * top / 255).astype(np.uint16)  # black background, the whole range
    black = np.asarray(decode_bytes(_tiff16(shown, 1), **LIMITS).image)
    white = np.asarray(decode_bytes(_tiff16(top - shown, 0), **LIMITS).image)
    assert black[0, 0, 0] < 20 and black.max() > 150  # the reference is what it should be: a bright head on black
    assert np.array_equal(white, black)


def _tiff_mm(values: np.ndarray, fmt: int, deflate: bool) -> bytes:
    """A big-endian (MM, as ImageJ writes) one-strip gray TIFF of `values`' dtype (SampleFormat `fmt`: 1 unsigned, 2
    signed, 3 float), Deflate-compressed (decoded by libtiff) or raw."""
    h, w = values.shape
    pixels = values.astype(values.dtype.newbyteorder(">")).tobytes()
    pixels = zlib.compress(pixels) if deflate else pixels
    tags = [(256, w), (257, h), (258, values.dtype.itemsize * 8), (259, 8 if deflate else 1), (262, 1), (273, 0)]
    tags += [(277, 1), (278, h), (279, len(pixels)), (339, fmt)]
    offset = 8 + 2 + 12 * len(tags) + 4
    tags[5] = (273, offset)
    ifd = struct.pack(">H", len(tags)) + b"".join(struct.pack(">HHII", t, 4, 1, v) for t, v in tags)
    return b"MM\x00*" + struct.pack(">I", 8) + ifd + b"\x00\x00\x00\x00" + pixels


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32])
def test_a_big_endian_compressed_tiff_is_read_in_its_byte_order(dtype):
    """A CT-like signed 16-bit, a 32-bit and a float TIFF in ImageJ's byte order decode as the same file uncompressed
    (libtiff's native-order samples were read as big-endian: noise)."""
    values = (brain(5).astype(np.int32) * 16 - 1024).astype(dtype)  # -1024 .. about 3000, as Hounsfield units
    fmt = 3 if dtype == np.float32 else 2
    raw = np.asarray(decode_bytes(_tiff_mm(values, fmt, deflate=False), **LIMITS).image)
    packed = np.asarray(decode_bytes(_tiff_mm(values, fmt, deflate=True), **LIMITS).image)
    v = values.astype(np.float64)
    expected = np.rint(255 * (v - v.min()) / (v.max() - v.min()))
    assert np.abs(raw[..., 0].astype(int) - expected).max() <= 1  # the raw file is read right: the reference holds
    assert np.array_equal(packed, raw)


def test_a_tiff_layout_the_decoder_does_not_read_is_named():
    """A 64-bit float TIFF (Pillow cannot identify it) is named as a TIFF layout, not 'not a recognised image'."""
    with pytest.raises(ImageError, match=r"^a TIFF this decoder cannot open: a sample layout it does not read"):
        decode_bytes(_tiff_mm(brain(2).astype(np.float64), 3, deflate=False), **LIMITS)


def _bmp_v5(rgba: np.ndarray) -> bytes:
    """A 32-bit BMP with a V5 header and an alpha mask (BI_BITFIELDS), bottom-up BGRA rows, as Windows writes one."""
    h, w = rgba.shape[:2]
    rows = rgba[::-1][..., [2, 1, 0, 3]].tobytes()
    dib = struct.pack("<IiiHHIIiiII", 124, w, h, 1, 32, 3, len(rows), 2835, 2835, 0, 0)
    dib += struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000) + b"BGRs" + b"\0" * 48 + struct.pack("<IIII", 4, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(dib) + len(rows), 0, 0, 14 + len(dib)) + dib + rows


@pytest.mark.parametrize("fmt", ["BMP", "PNG"])
def test_an_alpha_of_zero_everywhere_is_ignored_not_a_black_image(fmt):
    """A 32-bit BMP whose writer left alpha 0 (shown opaque by browsers and Windows) decodes to its colours; so does
    any image whose alpha hides every pixel. A partly transparent image is still put on black."""
    rgb = np.stack([brain(6)] * 3, -1)
    save = _bmp_v5 if fmt == "BMP" else (lambda a: encode(Image.fromarray(a, "RGBA"), "PNG"))
    dec = decode_bytes(save(np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])), **LIMITS)
    assert np.array_equal(np.asarray(dec.image), rgb) and dec.note == "alpha 0 everywhere; ignored"
    half = decode_bytes(save(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])), **LIMITS)
    assert np.asarray(half.image).max() < rgb.max() and half.note == ""


def test_a_signed_eight_bit_tiff_is_read_signed():
    """SampleFormat 2 at 8 bits (-128..127): -1 was read as 255, a bright background; now by the signed rule."""
    values = (brain(7).astype(np.int16) - 128).astype(np.int8)
    got = np.asarray(decode_bytes(_tiff_mm(values, 2, deflate=False), **LIMITS).image)[..., 0]
    v = values.astype(np.float64)
    assert np.abs(got - np.rint(255 * (v - v.min()) / (v.max() - v.min()))).max() <= 1


@pytest.mark.parametrize("channels", [1, 3])
def test_a_sixteen_bit_png_transparent_colour_goes_to_black_as_in_eight_bits(channels):
    """tRNS in a 16-bit gray or RGB PNG marks a white background transparent: put on black, as the 8-bit file is,
    and left out of the bit range (12-bit data beside a transparent 65535 came out at most 11 of 255)."""
    shown = brain(8).astype(np.uint16) * 16  # 12-bit data
    shown[:, :6] = 65535  # a white band, marked transparent
    arr = np.dstack([shown] * channels)
    height, width = shown.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 3: 2}[channels], 0, 0, 0)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    trns = struct.pack(">" + "H" * channels, *[65535] * channels)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tRNS", trns) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    got = np.asarray(decode_bytes(png, **LIMITS).image)
    assert got[:, :6].max() == 0 and np.abs(got[:, 6:, 0].astype(int) - np.rint(shown[:, 6:] / (4095 / 255))).max() <= 1
