"""Hostile input, round 2: every class of input that once crashed, hung, blew up memory or overwrote a file."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from factory import SHARED_DATA, brain, encode, make_project, png16, write_dataset

from brainmri import images
from brainmri.config import load_params
from brainmri.errors import DecodeError
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
