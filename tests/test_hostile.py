"""Hostile input, round 2: every class of input that once crashed, hung, blew up memory or overwrote a file."""

import hashlib
import io
import json
import re
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from factory import SHARED_DATA, brain, encode, make_project, png16, write_dataset

from brainmri import images
from brainmri.cli import main
from brainmri.config import load_params
from brainmri.errors import DataError, DecodeError
from brainmri.images import decode_bytes, decode_file
from tasks.ingest import ingest

DATA = Path(__file__).parent / "data"
LIMITS = {"max_pixels": 40_000_000, "max_side": 512}


def project(tmp_path, source="data/raw/ds", **ingest_over):
    root = make_project(tmp_path / "proj", {"ingest": {"source": str(source), "min_images_per_class": 2, **ingest_over}})
    return load_params(root / "params.yaml")


# --- one decoding boundary --------------------------------------------------------------------------------


def test_real_images_decode_to_exactly_the_pixels_they_did_before_the_boundary():
    expected = json.loads((DATA / "real_decode_digests.json").read_text())
    assert expected["limits"] == LIMITS and len(expected["digests"]) == 253
    for rel, digest in expected["digests"].items():
        arr = np.asarray(decode_file(SHARED_DATA / rel, **LIMITS, max_bytes=10**9).image)
        assert hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest() == digest, rel


def test_a_bug_in_our_own_conversion_is_a_failure_not_a_quarantined_image(tmp_path, monkeypatch):
    def buggy(arr):
        raise TypeError("a bug of ours")

    monkeypatch.setattr(images, "scale_integer", buggy)
    with pytest.raises(TypeError, match="a bug of ours"):
        decode_bytes(png16(brain(1)), **LIMITS)
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    (ds / "yes" / "sixteen.png").write_bytes(png16(brain(2)))
    with pytest.raises(TypeError, match="a bug of ours"):
        ingest(p)
    assert not p.path("ingest_manifest").exists()


def test_library_failures_of_any_type_become_decode_errors(monkeypatch):
    """zlib.error, struct.error, SyntaxError, MemoryError... raised inside Pillow all become one typed DecodeError."""
    import struct
    import zlib

    from PIL import Image

    data = encode(brain(3), "PNG")
    for exc in (zlib.error("bad"), struct.error("short"), SyntaxError("broken"), ValueError("x"), OSError("y"), MemoryError()):

        def boom(self, exc=exc):
            raise exc

        monkeypatch.setattr(Image.Image, "load", boom)
        with pytest.raises(DecodeError, match="corrupt or truncated PNG data"):
            decode_bytes(data, **LIMITS)


# --- archives: read whole or refused ------------------------------------------------------------------------


def _members():
    return {f"{c}/{c} {i}.jpg": encode(brain(i + 10 * (c == "yes"), tumor=c == "yes"), "JPEG") for c in ("no", "yes") for i in range(3)}


def _zip_bytes(members, method=zipfile.ZIP_DEFLATED, extra=()):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we mean to write
        for name, data in [*members.items(), *extra]:
            zf.writestr(name, data)
    return buf.getvalue()


def _patch_zip(data: bytes, member: bytes, local_off: int, central_off: int, value: int) -> bytes:
    """Set a 2-byte field of one member in both its local header and its central directory entry."""
    buf = bytearray(data)
    for sig, off, name_at in ((b"PK\x03\x04", local_off, 30), (b"PK\x01\x02", central_off, 46)):
        pos = 0
        while (pos := buf.find(sig, pos)) >= 0:
            if buf[pos + name_at : pos + name_at + len(member)] == member:
                struct.pack_into("<H", buf, pos + off, value)
            pos += 4
    return bytes(buf)


def _tar_bytes(members, gz=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _corrupt_deflate(data: bytes, member: bytes) -> bytes:
    buf = bytearray(data)
    pos = buf.find(member) + len(member)  # first byte of the member's compressed data (no extra field)
    for i in range(pos + 5, pos + 40):
        buf[i] ^= 0x5A
    return bytes(buf)


def _damaged_tar_header(data: bytes) -> bytes:
    buf = bytearray(data)
    second = buf.find(b"no/no 1.jpg")
    buf[second + 148 : second + 156] = b"garbage!"  # the checksum field of the second header
    return bytes(buf)


ARCHIVES = {
    "corrupt deflate data": ("zip", lambda: _corrupt_deflate(_zip_bytes(_members()), b"no/no 1.jpg"), "'no/no 1.jpg' cannot be read"),
    "corrupt lzma data": (
        "zip",
        lambda: _corrupt_deflate(_zip_bytes(_members(), zipfile.ZIP_LZMA), b"no/no 1.jpg"),
        "member 'no/no 1.jpg' cannot be read",
    ),
    "encrypted member": ("zip", lambda: _patch_zip(_zip_bytes(_members()), b"yes/yes 2.jpg", 6, 8, 0x1), "'yes/yes 2.jpg' is encrypted"),
    "unsupported method": (
        "zip",
        lambda: _patch_zip(_zip_bytes(_members()), b"no/no 0.jpg", 8, 10, 99),
        "'no/no 0.jpg' uses zip compression method 99, which is not supported",
    ),
    "duplicate names": ("zip", lambda: _zip_bytes(_members(), extra=[("no/no 1.jpg", b"other")]), "'no/no 1.jpg' appears twice"),
    "file and folder clash": ("zip", lambda: _zip_bytes(_members(), extra=[("no/no 1.jpg/inner.jpg", b"x")]), "clashes with"),
    "truncated zip": ("zip", lambda: _zip_bytes(_members())[:-200], "the zip directory cannot be read"),
    "damaged tar header mid-archive": ("tar", lambda: _damaged_tar_header(_tar_bytes(_members())), "header follows member .no.no 0.jpg"),
    "corrupt gzip data": ("tar.gz", lambda: _flip_middle(_tar_bytes(_members(), gz=True)), "cannot be read"),
    "truncated tar.gz": ("tar.gz", lambda: _tar_bytes(_members(), gz=True)[:-300], "cannot be read"),
    "member over max_file_bytes": ("zip", lambda: _zip_bytes(_members(), extra=[("yes/big.jpg", bytes(9000))]), "declares 9000 bytes"),
}


def _flip_middle(data: bytes) -> bytes:
    buf = bytearray(data)
    for i in range(len(buf) // 2, len(buf) // 2 + 16):
        buf[i] ^= 0xFF
    return bytes(buf)


@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_damaged_archives_are_refused_whole_with_one_sentence(tmp_path, case, capsys):
    kind, build, message = ARCHIVES[case]
    p = project(tmp_path, source=f"data/raw/bad.{kind}", max_file_bytes=8000)
    archive = p.resolve(p.ingest.source)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(build())
    with pytest.raises(DataError, match=re.escape(message) if "'" in message else message) as exc:
        ingest(p)
    text = str(exc.value)
    assert text.startswith(f"bad.{kind}: ") and "\n" not in text  # names the archive, one sentence
    assert not p.path("ingest_manifest").exists()  # nothing half-ingested
    assert not list(p.path("ingest_manifest").parent.glob(".extract-*"))
    assert main(["--params", str(p.root / "params.yaml"), "-q", "ingest"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_intact_archives_still_ingest_whole(tmp_path):
    for kind, data in (("zip", _zip_bytes(_members(), zipfile.ZIP_LZMA)), ("tar.gz", _tar_bytes(_members(), gz=True))):
        p = project(tmp_path / kind, source=f"data/raw/ok.{kind}")
        archive = p.resolve(p.ingest.source)
        archive.parent.mkdir(parents=True)
        archive.write_bytes(data)
        assert ingest(p)["n_ingested"] == 6
