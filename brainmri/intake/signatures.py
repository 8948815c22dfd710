"""What a file is when it is not an image the decoder reads: named from its first bytes, with what to do instead.

MRI arrives as DICOM series, NIfTI volumes, MATLAB files (the figshare set of Cheng et al. is 3,064 .mat files),
or in archives and documents, and a quarantine line such as "not a recognised image (first bytes b'\\x00\\x00...')"
tells the user nothing. Each signature is the format's own magic number, at the offset its specification puts it.
Written by hand: Pillow names only formats it can open, and a general file-type library (libmagic) is a native
dependency for a dozen byte comparisons.
"""

from __future__ import annotations

import struct

# Explicit-VR value representations: a DICOM stream written without its 128-byte preamble (old ACR-NEMA style)
# starts with a group 0002 or 0008 element; its VR letters tell it from random bytes
DICOM_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split())
CONVERT = "export its slices as PNG first (for example with pydicom, nibabel or dcm2niix)"


def describe(data: bytes) -> str | None:
    """A one-line name for a format ingest and `predict` do not read, with what to do; None when it is not known."""
    for known in (_medical, _container, _unread_kind, _document):
        if (found := known(data)) is not None:
            return found
    return None


def _medical(data: bytes) -> str | None:
    if data[128:132] == b"DICM" or _bare_dicom(data):
        return f"a DICOM file, not a 2-D image file: {CONVERT}"
    if _nifti(data):
        return f"a NIfTI or Analyze volume, not a 2-D image file: {CONVERT}"
    if data[:4] == b"NRRD":
        return f"an NRRD volume, not a 2-D image file: {CONVERT}"
    if data.startswith(b"MATLAB 5.0 MAT-file") or data.startswith(b"MATLAB 7.3 MAT-file"):
        return "a MATLAB .mat file (the figshare brain-tumour set comes so): save each slice as PNG, one folder per class"
    if data[:8] == b"\x89HDF\r\n\x1a\n":
        return "an HDF5 file (or a MATLAB 7.3 .mat file): save each slice as PNG, one folder per class"
    if data[:6] == b"\x93NUMPY":
        return "a NumPy array file (.npy): save each slice as PNG, one folder per class"
    return None


def _bare_dicom(data: bytes) -> bool:
    """A DICOM stream without preamble: a group 0002 or 0008 element in little-endian explicit VR."""
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[4:6] in DICOM_VRS


def _nifti(data: bytes) -> bool:
    """NIfTI-1 or Analyze 7.5 (a 348-byte header, either byte order), or NIfTI-2 (540 bytes, magic at 4)."""
    if len(data) >= 348 and (struct.unpack("<i", data[:4])[0] == 348 or struct.unpack(">i", data[:4])[0] == 348):
        return True
    return len(data) >= 12 and data[4:8] in (b"n+2\x00", b"ni2\x00") and struct.unpack("<i", data[:4])[0] in (540, 0x1C020000)


def _container(data: bytes) -> str | None:
    if data[:2] == b"\x1f\x8b":
        return "a gzip-compressed file (a .nii.gz volume or a .tar.gz archive?): give archives as ingest.source, volumes as PNG slices"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "a zip archive inside a class folder: give the archive itself as ingest.source, or extract it"
    if data[257:262] == b"ustar":
        return "a tar archive inside a class folder: give the archive itself as ingest.source, or extract it"
    if data[:6] == b"7z\xbc\xaf\x27\x1c" or data[:6] == b"Rar!\x1a\x07" or data[:3] == b"BZh" or data[:6] == b"\xfd7zXZ\x00":
        return "a compressed archive (7z, RAR, bzip2 or xz), which ingest does not open: extract it, or repack it as .zip or .tar.gz"
    return None


def _unread_kind(data: bytes) -> str | None:
    """A TIFF or JPEG Pillow could not identify: a sample layout or coding it does not read."""
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return (
            "a TIFF this decoder cannot open: a sample layout it does not read (such as 64-bit or 16-bit float, "
            "16-bit gray with alpha, big-endian 32-bit) or a damaged header; save it as 16-bit gray or 8-bit"
        )
    if data[:3] == b"\xff\xd8\xff":
        return (
            "a JPEG this decoder cannot open: a coding it does not read (12-bit, or lossless as in DICOM) or a damaged "
            "header; save it as 16-bit PNG or 8-bit JPEG"
        )
    return None


def _document(data: bytes) -> str | None:
    head = data[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if data[:4] == b"%PDF":
        return "a PDF document, not an image: save its pages or figures as PNG"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"heif", b"mif1", b"msf1", b"avif", b"avis"):
        return "a HEIF or AVIF image, which this build does not decode: save it as PNG or JPEG"
    if head.startswith((b"<?xml", b"<svg", b"<!doctype html", b"<html")):
        return "an XML, SVG or HTML document, not a raster image"
    return None
