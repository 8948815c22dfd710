"""Hostile input, round 2: every class of input that once crashed, hung, blew up memory or overwrote a file."""

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import fuzzing
import numpy as np
import pandas as pd
import pytest
from factory import SHARED_DATA, brain, encode, make_project, png16, tiny_onnx, write_dataset
from PIL import Image

from brainmri.config import load_params
from brainmri.core.errors import BrainMRIError, DataError, DecodeError, ImageError
from brainmri.deploy.predict import predict
from brainmri.intake import decode as images
from brainmri.intake import headers
from brainmri.intake.decode import decode_bytes, decode_file
from flows.cli import main
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


def _tar_meta(gz=True, **info_fields):
    """A tar whose one extra member carries a hostile header: a GNU long name, pax records, a name with a NUL byte."""
    buf = io.BytesIO()
    fmt = tarfile.GNU_FORMAT if "name" in info_fields else tarfile.PAX_FORMAT
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as tf:
        for name, data in _members().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("yes/extra.jpg")
        for key, value in info_fields.items():
            setattr(info, key, value)
        tf.addfile(info, io.BytesIO(b""))
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
    # tarfile reads a long-name or pax header whole into memory: a 1.5 MB .tar.gz declaring 1.5 GB took 1.65 GB
    "tar long-name header over the cap": ("tar.gz", lambda: _tar_meta(name="no/" + "a" * 70_000 + ".jpg"), "extended header declares"),
    "tar pax header over the cap": ("tar", lambda: _tar_meta(gz=False, pax_headers={"comment": "x" * 70_000}), "extended header declares"),
    "NUL byte in a pax path": ("tar", lambda: _tar_meta(gz=False, pax_headers={"path": "no/a\x00b.jpg"}), "has a NUL byte in its name"),
    "nested 1,500 folders deep": ("zip", lambda: _zip_bytes(_members(), extra=[("no/" + "d/" * 1500 + "x.jpg", b"x")]), "levels deep"),
    "name part too long to write": ("zip", lambda: _zip_bytes(_members(), extra=[("no/" + "a" * 300 + ".jpg", b"x")]), "over 255 bytes"),
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


# --- predict that cannot hurt ---------------------------------------------------------------------------------


@contextlib.contextmanager
def within(seconds: float):
    """Fail instead of hanging: SIGALRM interrupts a blocking read after `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def model(tmp_path):
    return tiny_onnx(tmp_path / "model.onnx")


def test_non_regular_inputs_are_error_rows_never_read(tmp_path, model):
    folder = write_dataset(tmp_path / "in", n=2)
    os.mkfifo(folder / "no" / "pipe.jpg")
    os.symlink(folder / "no" / "pipe.jpg", folder / "yes" / "link to pipe.jpg")
    os.symlink("/dev/zero", folder / "yes" / "zeros.jpg")
    os.symlink(folder / "no", folder / "yes" / "link to folder")
    os.mkfifo(tmp_path / "named.png")
    with within(20):
        frame = predict(model, [str(folder), str(tmp_path / "named.png"), "/dev/zero"], tmp_path / "out.csv")
    errors = dict(zip(frame["path"].map(lambda s: s.rsplit("/", 1)[-1]), frame["error"], strict=True))
    assert len(frame) == 4 + 6 and sum(e == "" for e in errors.values()) == 4
    assert "named pipe" in errors["pipe.jpg"] and "named pipe" in errors["link to pipe.jpg"] and "named pipe" in errors["named.png"]
    assert "character device" in errors["zeros.jpg"] and "character device" in errors["zero"]
    assert "a folder" in errors["link to folder"]
    saved = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert saved["path"].tolist() == frame["path"].tolist()


def test_truncated_and_mangled_images_give_error_rows_and_an_output_file(tmp_path, model):
    folder = write_dataset(tmp_path / "in", n=2)
    good = encode(brain(4), "PNG")
    (folder / "no" / "cut.png").write_bytes(good[:90])
    (folder / "no" / "cut.webp").write_bytes(encode(brain(4), "WEBP")[:60])
    (folder / "no" / "cut.bmp").write_bytes(encode(brain(4), "BMP")[:300])
    frame = predict(model, [str(folder)], tmp_path / "out.json")
    rows = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert len(rows) == len(frame) == 7
    assert {r["path"].rsplit("/", 1)[-1] for r in rows if r["error"]} == {"cut.png", "cut.webp", "cut.bmp"}


def test_out_is_a_new_file_and_replaces_only_a_regular_file_with_overwrite(tmp_path, model, capsys):
    folder = write_dataset(tmp_path / "in", n=2)
    out = tmp_path / "out.csv"
    out.write_text("keep me\n")
    args = ["predict", "--model", str(model), "--out", str(out), str(folder)]
    assert main(args) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    assert main([*args, "--overwrite"]) == 0 and pd.read_csv(out).shape == (4, 4)
    assert "predict: 4 images" in capsys.readouterr().err  # its one summary line
    os.link(model, tmp_path / "model-link.csv")  # the model under another name
    (folder / "no" / "stray.csv").write_text("an input\n")
    (tmp_path / "dir.csv").mkdir()
    os.mkfifo(tmp_path / "fifo.csv")
    os.symlink(out, tmp_path / "link.csv")
    refused = {
        "model-link.csv": "is the model itself",
        "in/no/stray.csv": "is the input",
        "dir.csv": "is a folder",
        "fifo.csv": "is a named pipe",
        "link.csv": "is a symbolic link",
        "params.yaml": "must end in .csv or .json",
        "model.onnx": "must end in .csv or .json",
        "in/no/no 0.jpg/out.csv": "cannot be written there",  # a parent that is a file
        "o" * 250 + ".csv": "a name of 254 bytes; at most 241",  # failed after predicting, in mkstemp (name + '.tmp')
        "o" * 300 + ".csv": "a name of 304 bytes",
    }
    for name, message in refused.items():
        target = tmp_path / name
        before = None
        with contextlib.suppress(OSError):  # a name too long to look up
            before = target.read_bytes() if target.is_file() and not target.is_symlink() and name != "fifo.csv" else None
        with within(20):
            code = main(["predict", "--model", str(model), "--out", str(target), "--overwrite", str(folder)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        if before is not None:
            assert target.read_bytes() == before, name
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_nested_deeper_than_the_interpreter_recurses_is_walked(tmp_path, model):
    """Python 3.11's os.walk recurses: 1,200 levels raised RecursionError."""
    folder = tmp_path / "in"
    deep = str(folder)
    os.mkdir(deep)
    for _ in range(1200):  # one level at a time: pathlib's and os.makedirs's parents=True recurse too
        deep += "/d"
        os.mkdir(deep)
    (Path(deep) / "scan.png").write_bytes(encode(brain(3), "PNG"))
    (folder / "top.png").write_bytes(encode(brain(4), "PNG"))
    try:
        frame = predict(model, [str(folder)], tmp_path / "out.csv")
        assert [Path(p).name for p in frame["path"]] == ["top.png", "scan.png"] and not frame["error"].any()
    finally:  # one level at a time: shutil.rmtree recurses too, and pytest's clean-up of old temporary folders would fail
        os.remove(os.path.join(deep, "scan.png"))
        while deep != str(folder):
            os.rmdir(deep)
            deep = os.path.dirname(deep)


def test_a_folder_predict_cannot_list_is_an_error_row_saying_so(tmp_path, model, monkeypatch):
    from brainmri.deploy import predict as predict_module

    folder = write_dataset(tmp_path / "in", n=2)
    real_scandir = os.scandir

    def forbidden(path):  # as a folder of another user with mode 000 (the tests may run as root)
        if str(path).endswith("/no"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(predict_module.os, "scandir", forbidden)
    frame = predict(model, [str(folder)], tmp_path / "out.csv")
    errors = dict(zip(frame["path"].map(lambda p: Path(p).name), frame["error"], strict=True))
    assert errors["no"] == "a folder that cannot be listed; not read" and len(frame) == 3


def test_an_empty_input_is_refused_not_read_as_this_folder(tmp_path, model):
    with pytest.raises(BrainMRIError, match="an input is an empty string"):
        predict(model, [""], tmp_path / "out.csv")


BAD_META = {
    "threshold above 1": ({"threshold": 2.0}, "threshold='2.0' is outside"),
    "threshold NaN": ({"threshold": "nan"}, "threshold='nan' is outside"),
    "threshold negative": ({"threshold": -0.1}, "threshold='-0.1' is outside"),
    "input size huge": ({"input_size": 100_000}, "input_size='100000' is outside"),
    "input size text": ({"input_size": "big"}, "input_size='big' is not an integer"),
    "same classes": ({"negative_class": "yes"}, "must be two different non-empty names"),
    "max_side negative": ({"max_side": -1}, "max_side='-1' is outside"),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_wrong_model_metadata_is_one_clear_error_at_load(tmp_path, case):
    meta, message = BAD_META[case]
    bad = tiny_onnx(tmp_path / "bad.onnx", meta=meta)
    with pytest.raises(BrainMRIError, match=re.escape(message)):
        predict(bad, [str(tmp_path)], tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_input_shape_that_disagrees_with_the_metadata_is_refused_at_load(tmp_path):
    bad = tiny_onnx(tmp_path / "bad.onnx", shape=["batch", 64, 64, 3])  # metadata says 32
    with pytest.raises(BrainMRIError, match=re.escape("does not match metadata input_size=32")):
        predict(bad, [str(tmp_path)], tmp_path / "out.csv")
    bad = tiny_onnx(tmp_path / "bad2.onnx", shape=["batch", 32, 32, 3, 1])
    with pytest.raises(BrainMRIError, match="expected one float input of shape"):
        predict(bad, [str(tmp_path)], tmp_path / "out.csv")


# predict's peak traced memory on one folder, after a warm-up call (imports, caches), in a fresh interpreter:
# tracemalloc counts every thread's allocations, and a thread another test left running would count too
PEAK = """
import sys, tracemalloc
from brainmri.deploy.predict import predict
model, folder, out = sys.argv[1:4]
predict(model, [folder], out + ".warm.csv", batch=8)  # predict never overwrites a file: its own
tracemalloc.start()
frame = predict(model, [folder], out, batch=8)
print(tracemalloc.get_traced_memory()[1], len(frame), int((frame["error"] == "").all()))
"""


def test_predict_memory_does_not_grow_with_the_number_of_inputs(tmp_path, model):
    one = encode(brain(5, size=(256, 256)), "PNG")

    def peak(n):
        folder = tmp_path / f"n{n}"
        folder.mkdir()
        (folder / "0.png").write_bytes(one)
        for i in range(1, n):
            os.link(folder / "0.png", folder / f"{i}.png")
        cmd = [sys.executable, "-c", PEAK, str(model), str(folder), str(tmp_path / f"n{n}.csv")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        top, rows, ok = (int(v) for v in res.stdout.split()[-3:])
        assert rows == n and ok, res.stdout
        return top

    small, large = peak(16), peak(320)
    # 304 more inputs held at once would add 304 x 32 x 32 x 3 x (1 + 4) bytes = 4.7 MB (uint8 and float32 copies);
    # what grows here is only the result rows (the code before streaming measured 0.3 MB -> 6.2 MB)
    assert large - small < 1_000_000, (small, large)


# --- configuration that cannot explode ----------------------------------------------------------------------

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def _params_file(tmp_path, content) -> Path:
    root = make_project(tmp_path / "proj")
    path = root / "params.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif content == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_text(path.read_text() + content)
    return path


PARAMS = {
    "billion laughs": (LAUGHS, "YAML alias *a refused"),
    "alias of a section": ("copy: &c {x: 1}\nother: *c\n", "YAML alias *c refused"),
    "latin-1 bytes": (b"seed: 1\nname: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 17)"),
    "nested 5000 deep": ("deep: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 64 levels deep"),
    "2 MB": (b"# " + b"x" * 2_000_000 + b"\n", "is too large for a parameters file"),
    "named pipe": ("fifo", "not a regular file"),
    "folder": ("folder", "not a regular file"),
    "python tag": ("evil: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(PARAMS))
def test_hostile_params_files_are_one_sentence_within_seconds(tmp_path, case, capsys):
    content, message = PARAMS[case]
    path = _params_file(tmp_path, content)
    with within(10):
        code = main(["--params", str(path), "params"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# --- high-bit-depth and float images: one rule ----------------------------------------------------------------


def _tiff(arr) -> bytes:
    return encode(Image.fromarray(arr), "TIFF")


def test_twelve_bit_data_in_a_sixteen_bit_container_is_scaled_by_the_bits_it_uses():
    arr = brain(11)
    twelve = (arr.astype(np.uint16) * 16).clip(0, 4095)  # 12-bit scanner data, max 4080
    dec = decode_bytes(encode(Image.fromarray(twelve), "PNG"), **LIMITS)
    got = np.asarray(dec.image)[..., 0].astype(int)
    assert dec.mode == "I;16" and got.max() > 150 > 15 >= np.rint(twelve.max() / 257)  # 1/257 would leave it nearly black
    assert np.abs(got - np.rint(twelve.astype(float) * 255 / 4095)).max() == 0 and dec.note == ""


def _wide_png(arr: np.ndarray, extra: bytes = b"") -> bytes:
    """A 16-bit PNG of `arr` (height, width, 2 to 4 channels of uint16), written here: Pillow cannot write one;
    `extra` chunks before the image data."""
    height, width, channels = arr.shape
    header = struct.pack(">IIBBBBB", width, height, 16, {2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)  # filter 0 on every row
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + extra + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND")


@pytest.mark.parametrize("channels", ["RGB", "RGBA", "LA"])
def test_twelve_bit_colour_and_gray_alpha_pngs_read_as_the_same_gray_one(channels):
    """Pillow reads a 16-bit colour or gray-and-alpha PNG's high bytes alone: 12-bit data came out at most 15 of 255
    and was scored so. They decode to the 16-bit gray PNG's pixels, and a transparent half goes black."""
    twelve = (brain(11).astype(np.uint16) * 16).clip(0, 4095)
    gray = np.asarray(decode_bytes(encode(Image.fromarray(twelve), "PNG"), **LIMITS).image)
    opaque = np.full(twelve.shape, 65535, np.uint16)
    stacks = {"RGB": [twelve] * 3, "RGBA": [twelve] * 3 + [opaque], "LA": [twelve, opaque]}
    dec = decode_bytes(_wide_png(np.stack(stacks[channels], axis=-1)), **LIMITS)
    assert np.array_equal(np.asarray(dec.image), gray) and gray.max() > 150 and dec.format == "PNG"
    if channels != "RGB":
        half = opaque.copy()
        half[:, : half.shape[1] // 2] = 0
        see = np.asarray(decode_bytes(_wide_png(np.stack([*stacks[channels][:-1], half], axis=-1)), **LIMITS).image)
        assert see[:, : half.shape[1] // 2].max() == 0 and np.array_equal(see[:, half.shape[1] // 2 :], gray[:, half.shape[1] // 2 :])


@pytest.mark.parametrize("where", ["exif", "xmp"])
def test_a_sixteen_bit_colour_png_is_turned_as_its_orientation_says(where):
    """The full-depth pixels are a new image: the file's EXIF and XMP orientation still apply, as to 16-bit gray."""
    twelve = (brain(12).astype(np.uint16) * 16).clip(0, 4095)
    if where == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        turn = _png_chunk(b"eXIf", exif.tobytes())
    else:
        xmp = (
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
        )
        turn = _png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp)
    gray = encode(Image.fromarray(twelve), "PNG")
    want = decode_bytes(gray[:33] + turn + gray[33:], **LIMITS)
    got = decode_bytes(_wide_png(np.stack([twelve] * 3, axis=-1), turn), **LIMITS)
    assert want.exif_rotated and got.exif_rotated and want.image.size == (twelve.shape[0], twelve.shape[1])
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))


def _tiff_of(entries: list[tuple[int, int, int, bytes]], order: str = "<", tail: bytes = b"") -> bytes:
    """A classic TIFF of one directory: `entries` (tag, type, count, the value's bytes, or an offset's when longer
    than 4), then `tail` at byte 8 + the directory's size. Written here: Pillow writes no 16-bit colour or tiled TIFF."""
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8)
    ifd = struct.pack(order + "H", len(entries))
    for tag, kind, count, value in sorted(entries, key=lambda e: e[0]):  # stable: a repeated tag keeps its order
        ifd += struct.pack(order + "HHI", tag, kind, count) + value.ljust(4, b"\0")
    return head + ifd + struct.pack(order + "I", 0) + tail


def _tiff16(arr: np.ndarray, order: str = "<", deflate: bool = False) -> bytes:
    """A 16-bit RGB or RGBA TIFF of `arr` (height, width, 3 or 4 channels of uint16), one strip, raw or deflated."""
    height, width, channels = arr.shape
    strip = arr.astype(order + "u2").tobytes()
    strip = zlib.compress(strip) if deflate else strip
    n = 10 + (channels == 4)
    bits_at = 8 + 2 + 12 * n + 4  # the bits per sample, then the strip, after the directory
    strip_at = bits_at + 2 * channels

    def long(v: int) -> bytes:
        return struct.pack(order + "I", v)

    def short(v: int) -> bytes:
        return struct.pack(order + "H", v)

    entries = [
        (256, 4, 1, long(width)),
        (257, 4, 1, long(height)),
        (258, 3, channels, long(bits_at)),
        (259, 3, 1, short(8 if deflate else 1)),
        (262, 3, 1, short(2)),
        (273, 4, 1, long(strip_at)),
        (277, 3, 1, short(channels)),
        (278, 4, 1, long(height)),
        (279, 4, 1, long(len(strip))),
        (284, 3, 1, short(1)),
    ] + ([(338, 3, 1, short(2))] if channels == 4 else [])
    return _tiff_of(entries, order, struct.pack(order + "H" * channels, *[16] * channels) + strip)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("deflate", [False, True])
@pytest.mark.parametrize("channels", [3, 4])
def test_twelve_bit_colour_tiffs_read_as_the_same_gray_one(order, deflate, channels):
    """The 16-bit colour PNG's defect in TIFF too: Pillow kept each sample's high byte (little- or big-endian, raw or
    through libtiff), so 12-bit data came out at most 15 of 255."""
    twelve = (brain(13).astype(np.uint16) * 16).clip(0, 4095)
    gray = np.asarray(decode_bytes(encode(Image.fromarray(twelve), "TIFF"), **LIMITS).image)
    arr = np.stack([twelve] * 3 + [np.full(twelve.shape, 65535, np.uint16)] * (channels - 3), axis=-1)
    got = np.asarray(decode_bytes(_tiff16(arr, order, deflate), **LIMITS).image)
    assert np.array_equal(got, gray) and gray.max() > 150


def test_a_sixteen_bit_colour_tiff_of_separate_planes_is_refused_not_darkened():
    """libtiff unpacks separate colour planes itself and ignores the raw layout that gives the low bytes: such a file
    is refused by name rather than read by its high bytes (a 12-bit scan nearly black)."""
    twelve = (brain(14).astype(np.uint16) * 16).clip(0, 4095)
    planes = [zlib.compress(twelve.astype("<u2").tobytes()) for _ in range(3)]
    at = 8 + 2 + 12 * 11 + 4  # after the directory: bits, strip offsets, strip byte counts, then the planes
    offsets = [at + 36 + sum(map(len, planes[:i])) for i in range(3)]  # after bits (6), offsets, counts (12 each), formats (6)
    h, w = twelve.shape
    data = _tiff_of(
        [(256, 4, 1, struct.pack("<I", w)), (257, 4, 1, struct.pack("<I", h)), (258, 3, 3, struct.pack("<I", at)),
         (259, 3, 1, struct.pack("<H", 8)), (262, 3, 1, struct.pack("<H", 2)), (273, 4, 3, struct.pack("<I", at + 6)),
         (277, 3, 1, struct.pack("<H", 3)), (278, 4, 1, struct.pack("<I", h)), (279, 4, 3, struct.pack("<I", at + 18)),
         (284, 3, 1, struct.pack("<H", 2)), (339, 3, 3, struct.pack("<I", at + 30))],
        tail=struct.pack("<3H", 16, 16, 16) + struct.pack("<3I", *offsets) + struct.pack("<3I", *map(len, planes))
        + struct.pack("<3H", 1, 1, 1) + b"".join(planes),
    )  # fmt: skip
    with pytest.raises(ImageError, match="16-bit colour samples in a layout read only by their high bytes .*separate planes"):
        decode_bytes(data, **LIMITS)


def test_a_tiff_turned_by_its_orientation_says_so():
    """Pillow turns a TIFF while loading it and drops the tag: the record said not turned, the size was the turned one."""
    arr = brain(6)  # 64 x 72: a turn shows in the size
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF", tiffinfo={274: 6})
    dec = decode_bytes(buf.getvalue(), **LIMITS)
    assert dec.exif_rotated and (dec.width, dec.height) == (arr.shape[1], arr.shape[0]) and dec.image.size == arr.shape


def _rle8_bmp(width: int, height: int, rows: bytes) -> bytes:
    """A run-length 8-bit BMP of gray palette whose data is `rows`."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


def _fails_if_opened(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the image library opened a file its header should have refused")

    monkeypatch.setattr(images.Image, "open", never)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tiff tiles", "a 300x300 TIFF of 90000 strips or tiles is refused (at most 1406 for its size)"),
        ("tiff xmp", "a TIFF whose tag 700 holds 17000000 bytes is refused (metadata over 16 MB)"),
        ("tiff size", "40000x40000 = 1600000000 pixels is over the cap"),
        ("bmp rle", "a 64x64 run-length BMP of 300000 bytes of data is refused (at most 16576)"),
        ("tiff repeated", "a 300x300 TIFF of 90000 strips or tiles is refused"),
        ("png exif", "a PNG whose 'eXIf' chunk holds 17000000 bytes is refused"),
        ("webp exif", "a WebP whose 'EXIF' chunk holds 17000000 bytes is refused"),
    ],
)
def test_a_header_declaring_more_than_its_image_needs_is_refused_unparsed(monkeypatch, case, message):
    """A TIFF of 1 x 1 tiles made Pillow list one entry per tile (36 MB: 49 s, 3 GB); 200 MB of RLE end-of-line
    escapes took 29 s; a 200 MB EXIF chunk 1.6 GB. Each is refused from its header, the library never opening it."""
    if case == "tiff tiles":
        n = 300 * 300
        arrays = struct.pack("<" + "I" * n, *[8] * n)
        data = _tiff_of(
            [(256, 4, 1, struct.pack("<I", 300)), (257, 4, 1, struct.pack("<I", 300)), (258, 3, 1, b"\x08\0"), (262, 3, 1, b"\x01\0"),
             (322, 4, 1, struct.pack("<I", 1)), (323, 4, 1, struct.pack("<I", 1)),
             (324, 4, n, struct.pack("<I", 8 + 2 + 12 * 8 + 4)), (325, 4, n, struct.pack("<I", 8 + 2 + 12 * 8 + 4 + 4 * n))],
            tail=arrays + struct.pack("<" + "I" * n, *[1] * n),
        )  # fmt: skip
    elif case == "tiff repeated":  # the same tiles, then each offsets tag again with one entry: Pillow reads the first
        n, at = 300 * 300, 8 + 2 + 12 * 10 + 4
        data = _tiff_of(
            [(256, 4, 1, struct.pack("<I", 300)), (257, 4, 1, struct.pack("<I", 300)), (258, 3, 1, b"\x08\0"), (262, 3, 1, b"\x01\0"),
             (322, 4, 1, struct.pack("<I", 1)), (323, 4, 1, struct.pack("<I", 1)),
             (324, 4, n, struct.pack("<I", at)), (325, 4, n, struct.pack("<I", at + 4 * n)),
             (324, 4, 1, struct.pack("<I", at)), (325, 4, 1, struct.pack("<I", 1))],
            tail=struct.pack("<" + "I" * n, *[8] * n) + struct.pack("<" + "I" * n, *[1] * n),
        )  # fmt: skip
    elif case == "tiff xmp":
        data = _tiff_of([(256, 4, 1, struct.pack("<I", 8)), (257, 4, 1, struct.pack("<I", 8)), (700, 1, 17_000_000, struct.pack("<I", 8))])
    elif case == "tiff size":
        data = _tiff_of([(256, 4, 1, struct.pack("<I", 40_000)), (257, 4, 1, struct.pack("<I", 40_000)), (273, 4, 40_000, b"\0" * 4)])
    elif case == "bmp rle":
        data = _rle8_bmp(64, 64, b"\x00\x00" * 150_000)  # end-of-line escapes that move nothing
    elif case == "png exif":
        plain = encode(brain(3), "PNG")
        data = plain[:33] + _png_chunk(b"eXIf", bytes(17_000_000)) + plain[33:]
    else:
        plain = encode(brain(3), "WEBP", lossless=True)
        body = plain[12:] + b"EXIF" + struct.pack("<I", 17_000_000) + bytes(17_000_000)
        data = b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body
    _fails_if_opened(monkeypatch)
    with pytest.raises(ImageError, match=re.escape(message)):
        decode_bytes(data, **LIMITS)


def test_an_honest_run_length_bmp_and_a_rational_orientation_decode_as_they_say():
    """The run-length bound admits real encodings (here a run per pixel, the longest there is); an EXIF orientation
    stored as the rational 6/1 turns the pixels, and the record says so."""
    rows = b"".join(b"".join(bytes((1, (x * 4 + y) % 256)) for x in range(64)) + b"\x00\x00" for y in range(64)) + b"\x00\x01"
    got = np.asarray(decode_bytes(_rle8_bmp(64, 64, rows), **LIMITS).image)[..., 0]
    assert got.shape == (64, 64) and np.array_equal(got[::-1], (np.arange(64)[None] * 4 + np.arange(64)[:, None]) % 256)
    skipping = b"".join(b"\x01\xff\x00\x02\x01\x00" * 32 + b"\x00\x00" for _ in range(64)) + b"\x00\x01"  # a pixel, skip one
    assert decode_bytes(_rle8_bmp(64, 64, skipping), **LIMITS).image.size == (64, 64)  # 3 bytes a pixel: still admitted
    exif = _tiff_of([(0x0112, 5, 1, struct.pack("<I", 8 + 2 + 12 + 4))], tail=struct.pack("<II", 6, 1))  # RATIONAL 6/1
    dec = decode_bytes(encode(Image.fromarray(brain(5)), "PNG", exif=exif), **LIMITS)
    assert dec.exif_rotated and dec.image.size == (brain(5).shape[0], brain(5).shape[1])


def test_a_name_too_long_for_the_system_is_one_sentence_for_input_and_model(tmp_path, model):
    """Python 3.11's is_dir() and exists() raise for a name over 255 bytes rather than answering False."""
    with pytest.raises(BrainMRIError, match="cannot be opened: File name too long"):
        predict(model, [str(tmp_path / ("a" * 256))], tmp_path / "out.csv")
    with pytest.raises(BrainMRIError, match="the model cannot be opened: File name too long"):
        predict(tmp_path / ("a" * 256 + ".onnx"), [str(tmp_path)], tmp_path / "out2.csv")
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out2.csv").exists()


@pytest.mark.parametrize("offset", [0, -(2**30)])
def test_thirty_two_bit_integers_are_scaled_by_their_range_with_a_note(offset):
    arr = brain(12).astype(np.int64) * 1_000_000 + offset  # values up to 2.5e8: far beyond 16 bits, some negative
    dec = decode_bytes(_tiff(arr.astype(np.int32)), **LIMITS)
    got = np.asarray(dec.image)[..., 0]
    expect = np.rint(255 * (arr - arr.min()) / (arr.max() - arr.min()))
    assert dec.mode == "I" and np.array_equal(got, expect) and got.max() == 255 and got.min() == 0  # no saturation
    assert "do not fit 16 bits; scaled by their range" in dec.note


def test_constant_integers_outside_sixteen_bits_are_black_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it divided by a zero range
        dec = decode_bytes(_tiff(np.full((40, 30), 100_000, np.int32)), **LIMITS)
    assert np.asarray(dec.image).max() == 0 and "all 100000" in dec.note


def _progressive_jpeg(extra_scans: int, side: int = 64) -> bytes:
    """A progressive JPEG whose last scan is repeated `extra_scans` more times: valid, and each scan is decoded over
    the whole image (2,000 of them, 259 KB at 6000 x 6000 px, took 45 s)."""
    data = encode(Image.fromarray(np.pad(brain(5), 8)).resize((side, side)), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra_scans + b"\xff\xd9"


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding():
    assert decode_bytes(_progressive_jpeg(0), **LIMITS).format == "JPEG"  # an ordinary progressive file: about 10 scans
    assert decode_bytes(_progressive_jpeg(80), **LIMITS).format == "JPEG"  # under the cap: decoded
    with within(5), pytest.raises(ImageError, match=r"a JPEG of more than 100 scans"):
        decode_bytes(_progressive_jpeg(200, side=4000), **LIMITS)


def test_scans_are_counted_as_markers_not_as_bytes():
    """A valid JPEG whose comment holds 150 FF DA byte pairs was refused as a scan bomb: a comment is no scan."""
    data = encode(brain(7), "JPEG", quality=90)
    comment = b"\xff\xfe" + (2 + 300).to_bytes(2, "big") + b"\xff\xda" * 150
    dec = decode_bytes(data[:2] + comment + data[2:], **LIMITS)
    assert dec.format == "JPEG" and np.array_equal(np.asarray(dec.image), np.asarray(decode_bytes(data, **LIMITS).image))
    thumbnail = encode(brain(8), "JPEG", progressive=True)  # a progressive thumbnail inside an APP segment: its scans are not ours
    app = b"\xff\xe1" + (2 + len(thumbnail) * 20).to_bytes(2, "big") + thumbnail * 20
    assert decode_bytes(data[:2] + app + data[2:], **LIMITS).format == "JPEG"


def test_a_flood_of_stuffed_bytes_is_walked_at_c_speed():
    data = encode(brain(9), "JPEG", quality=90)
    flood = data[:-2] + b"\xff\x00" * 10_000_000 + data[-2:]  # 20 MB of entropy-coded stuffing: no marker among it
    with within(10):
        try:
            decode_bytes(flood, **LIMITS)
        except ImageError:
            pass  # the library may call the padding corrupt; what matters is the time and a one-line reason


@pytest.mark.parametrize("size", [(1, 40_000_000), (40_000_000, 1), (6000, 5)])
def test_a_long_thin_image_is_refused_from_its_header(size):
    """A 78 KB PNG of 1 x 40,000,000 pixels took 3.2 GB in ingest and predict: resampling built filter tables as long
    as its long side. No slice is ten times longer than wide; the header says so before any pixel is decoded."""
    img = Image.new("L", size)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    with within(5), pytest.raises(ImageError, match=r"over 10 times longer than wide"):
        decode_bytes(buf.getvalue(), **LIMITS)


def test_only_a_real_exif_turn_counts_as_rotated():
    img = Image.fromarray(brain(6))
    for orientation, turned in ((1, False), (6, True), (9, False), (65535, False)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        assert decode_bytes(encode(img, "JPEG", exif=exif.tobytes()), **LIMITS).exif_rotated is turned, orientation


def test_a_file_we_may_not_read_is_one_reason_not_a_traceback(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "x.jpg"
    path.write_bytes(encode(brain(4), "JPEG"))
    real_open = os.open

    def forbidden(f, *args, **kw):  # as a file of another user with mode 000 (the tests may run as root)
        if f == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(f))
        return real_open(f, *args, **kw)

    monkeypatch.setattr(images.os, "open", forbidden)
    with pytest.raises(ImageError, match="cannot be read: Permission denied"):
        decode_file(path, max_bytes=10**6, **LIMITS)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_float_images_with_non_finite_pixels_are_refused(bad):
    arr = brain(13).astype(np.float32) / 7
    assert np.asarray(decode_bytes(_tiff(arr), **LIMITS).image)[..., 0].max() == 255  # finite: scaled by range
    arr[3, 4] = bad
    with pytest.raises(ImageError, match="1 of 4608 float pixels are NaN or infinite"):
        decode_bytes(_tiff(arr), **LIMITS)


def test_ingest_quarantines_non_finite_floats_and_notes_rescaled_integers(tmp_path):
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    inf = brain(14).astype(np.float32)
    inf[0, 0] = np.inf
    (ds / "yes" / "float inf.tif").write_bytes(_tiff(inf))
    (ds / "no" / "int32.tif").write_bytes(_tiff(brain(15).astype(np.int32) * 100_000))
    report = ingest(p)
    reasons = {q["source_path"]: q["reason"] for q in report["quarantined"]}
    assert list(reasons) == ["yes/float inf.tif"] and "NaN or infinite" in reasons["yes/float inf.tif"]
    assert [n["source_path"] for n in report["notes"]] == ["no/int32.tif"]
    m = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False).set_index("source_path")
    assert "scaled by their range" in m.loc["no/int32.tif", "note"] and m.loc["no/no 0.jpg", "note"] == ""


# --- names and sizes at ingest ----------------------------------------------------------------------------------

CONTROL = [chr(c) for c in [*range(1, 0x20), 0x7F]]  # every control character a POSIX file name can hold (not NUL)
ODD_BUT_FINE = ['comma, "quoted"', "  spaces  ", "NA", "null", "#hash", "1e5", "line\u2028sep", "nel\u0085", "=cmd()", "x" * 240]


def test_control_characters_in_names_are_quarantined_and_later_stages_read_exactly_the_rows_written(tmp_path):
    from tasks.split import split

    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    img = encode(brain(16, size=(40, 44)), "PNG")
    for i, c in enumerate(CONTROL):
        (ds / ("yes" if i % 2 else "no") / f"bad{c}name {i}.png").write_bytes(img)
    for i, name in enumerate(ODD_BUT_FINE):
        (ds / ("yes" if i % 2 else "no") / f"{name}.png").write_bytes(encode(brain(100 + i, size=(40, 44)), "PNG"))
    (ds / "no" / os.fsdecode(b"latin1 \xe9\xff.png")).write_bytes(img)
    report = ingest(p)
    reasons = {q["source_path"]: q["reason"] for q in report["quarantined"]}
    assert len(reasons) == len(CONTROL) + 1 and report["n_files"] == report["n_ingested"] + len(reasons) + report["n_skipped"]
    assert all("control characters" in reasons[f"{'yes' if i % 2 else 'no'}/bad\\x{ord(c):02x}name {i}.png"] for i, c in enumerate(CONTROL))
    assert "not valid UTF-8" in reasons["no/latin1 \\xe9\\xff.png"]
    written = {f"{'yes' if i % 2 else 'no'}/{n}.png" for i, n in enumerate(ODD_BUT_FINE)} | {
        f"{c}/{c} {i}.jpg" for c in ("no", "yes") for i in range(3)
    }
    manifest = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
    assert set(manifest["source_path"]) == written and len(manifest) == len(written)
    split(p)
    rows = pd.read_csv(p.path("split_manifest"), keep_default_na=False)
    kept = set(manifest.loc[~manifest["conflict"].astype(bool), "source_path"])
    assert len(rows) == len(kept) and set(rows["source_path"]) == kept


def test_a_one_gigabyte_file_is_quarantined_unread(tmp_path):
    p = project(tmp_path, max_file_bytes=5_000_000)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    with open(ds / "yes" / "huge.png", "wb") as f:
        f.write(encode(brain(17), "PNG"))
        f.truncate(1 << 30)  # sparse: a gigabyte on paper, nothing on disk
    tracemalloc.start()
    report = ingest(p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report["quarantined"] == [
        {"source_path": "yes/huge.png", "reason": "1073741824 bytes is over the cap ingest.max_file_bytes=5000000; not read"}
    ]
    assert peak < 50_000_000


def test_a_file_whose_size_lies_is_cut_off_while_reading(tmp_path, monkeypatch):
    path = tmp_path / "grows.png"
    path.write_bytes(bytes(50_000))
    real_stat = os.stat

    def lying_stat(p, *a, **kw):
        st = real_stat(p, *a, **kw)
        return os.stat_result((st.st_mode, *st[1:6], 10, *st[7:])) if str(p) == str(path) else st

    monkeypatch.setattr(images.os, "stat", lying_stat)
    with pytest.raises(ImageError, match="grew past the cap ingest.max_file_bytes=20000 while being read"):
        images.read_capped(path, 20_000)


def test_a_zip_bomb_with_lying_sizes_is_refused_with_bounded_memory(tmp_path):
    p = project(tmp_path, source="data/raw/bomb.zip", max_file_bytes=1_000_000)
    archive = p.resolve(p.ingest.source)
    archive.parent.mkdir(parents=True)
    honest = _zip_bytes(_members(), extra=[("yes/bomb.jpg", bytes(200_000_000))])  # 200 MB of zeros, about 200 KB zipped
    archive.write_bytes(honest)
    with pytest.raises(DataError, match="'yes/bomb.jpg' declares 200000000 bytes, over ingest.max_file_bytes=1000000"):
        ingest(p)
    # the same bomb declaring 1,000 bytes: the stream stops at the declared size and the CRC check refuses it
    lying = bytearray(honest)
    for sig, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        pos = lying.find(sig + b"", 0)
        while pos >= 0:
            if lying[pos + name_at : pos + name_at + 12] == b"yes/bomb.jpg":
                struct.pack_into("<I", lying, pos + size_at, 1000)
            pos = lying.find(sig, pos + 4)
    archive.write_bytes(bytes(lying))
    tracemalloc.start()
    with pytest.raises(DataError, match="'yes/bomb.jpg' cannot be read"):
        ingest(p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 30_000_000


def _zip_directory(entries: int) -> bytes:
    """A zip whose directory lists `entries` empty stored members (zip64 past 65,535), all pointing at one local header."""
    first = b"yes/0.png"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, len(first), 0) + first
    directory = b"".join(
        struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0) + name
        for name in (b"yes/%d.png" % i for i in range(entries))
    )
    if entries <= 0xFFFF:
        return local + directory + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, entries, entries, len(directory), len(local), 0)
    zip64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, entries, entries, len(directory), len(local))
    locator = struct.pack("<IIQI", 0x07064B50, 0, len(local) + len(directory), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return local + directory + zip64 + locator + end


@pytest.mark.parametrize("entries", [60, 70_000])
def test_a_zip_directory_over_the_member_cap_is_refused_before_zipfile_reads_it(tmp_path, monkeypatch, entries):
    """zipfile builds every directory entry's object before any cap counts them (a million entries: 475 MB): the
    entries are counted from their headers first, zip64 directories included."""
    from brainmri.intake import archives

    archive = tmp_path / "many.zip"
    archive.write_bytes(_zip_directory(entries))
    assert len(zipfile.ZipFile(archive).infolist()) == entries  # a directory zipfile itself reads as listing them all

    def never(*args, **kwargs):
        raise AssertionError("zipfile.ZipFile opened a directory over the cap")

    monkeypatch.setattr(archives.zipfile, "ZipFile", never)
    with pytest.raises(DataError, match=f"many.zip: more than {entries - 1} members"):
        archives.extract(archive, tmp_path / "out", entries - 1, 10**9, 10**6)
    assert not (tmp_path / "out").exists()
    assert not archives._zip_entries_over(archive, entries)  # at the cap: left to zipfile, as before


def _png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bloated(kind: str, parts: int) -> bytes:
    """A valid image whose header carries `parts` empty JPEG segments, private PNG chunks, PNG image-data chunks,
    GIF comment blocks or empty GIF extensions."""
    fmt = kind.split()[0]
    data = encode(brain(3), fmt)
    if kind == "JPEG":
        return data[:2] + b"\xff\xe5\x00\x02" * parts + data[2:]  # empty APP5 segments
    if kind == "PNG":
        return data[:33] + _png_chunk(b"prVt") * parts + data[33:]  # after the signature and IHDR
    if kind == "PNG data":
        at = data.find(b"IDAT") - 4
        return data[:at] + _png_chunk(b"IDAT") * parts + data[at:]  # empty image-data chunks: no pixel bytes
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the screen descriptor and colour table
    if kind == "GIF":
        return data[:at] + b"\x21\xfe" + b"\x01x" * parts + b"\x00" + data[at:]  # a comment of 1-byte blocks
    return data[:at] + b"\x21\xfe\x00" * parts + data[at:]  # empty comments


@pytest.mark.parametrize(
    ("kind", "under", "over", "message"),
    [
        ("JPEG", 9_000, 20_000, "a JPEG of more than 10000 markers is refused"),
        ("PNG", 9_000, 20_000, "a PNG of more than 10000 chunks besides its image data"),
        ("PNG data", 9_000, 1_000_001, "a PNG of more than 1000000 chunks is refused"),
        ("GIF", 9_000, 20_000, "a GIF of more than 10000 extension blocks"),
        ("GIF empty", 9_000, 20_000, "a GIF of more than 10000 extension blocks"),
    ],
)
def test_a_header_of_too_many_parts_is_refused_before_the_image_library_parses_it(monkeypatch, kind, under, over, message):
    """Pillow keeps every JPEG APP or comment segment, unknown PNG chunk and GIF comment block while it opens a file
    (5 million empty JPEG segments: 714 MB, 15 s), and walks empty ones one by one: they are counted from their
    headers first, and the file refused without the library. Under the cap the same file decodes to the plain one's
    pixels."""
    plain = np.asarray(decode_bytes(encode(brain(3), kind.split()[0]), **LIMITS).image)
    assert np.array_equal(np.asarray(decode_bytes(_bloated(kind, under), **LIMITS).image), plain)

    def never(*args, **kwargs):
        raise AssertionError("the image library opened a file over the header cap")

    monkeypatch.setattr(images.Image, "open", never)
    with pytest.raises(ImageError, match=message):
        decode_bytes(_bloated(kind, over), **LIMITS)


def test_an_animated_png_of_many_frames_is_not_a_bloated_header():
    """A frame's control and data chunks are no header: Pillow reads the first frame alone, and so does the count."""
    frames = [Image.fromarray(np.full((40, 40), i % 251, np.uint8)) for i in range(5_001)]  # 10,002 frame chunks
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    assert decode_bytes(buf.getvalue(), **LIMITS).image.size == (40, 40)


def test_segments_are_walked_header_to_header_not_searched(monkeypatch):
    """Between segments the next marker sits where the last one ended: it is taken there, not searched for through
    the rest of the file (9,990 comments before 1.2 MB of image data took 3.8 s)."""
    data = encode(brain(4), "JPEG", quality=90)
    comments = data[:2] + b"\xff\xfe\x00\x03x" * 9_990 + data[2:] + bytes(1_200_000)
    searched = []
    real = headers.np.frombuffer
    monkeypatch.setattr(headers.np, "frombuffer", lambda *a, **k: searched.append(k.get("count")) or real(*a, **k))
    assert headers.jpeg_scans(comments, headers.MAX_JPEG_SCANS) == 1  # a baseline JPEG: one scan
    assert len(searched) <= 4, len(searched)  # only for the end of the entropy-coded data
    monkeypatch.setattr(headers.np, "frombuffer", real)
    assert np.array_equal(np.asarray(decode_bytes(comments, **LIMITS).image), np.asarray(decode_bytes(data, **LIMITS).image))


# --- fuzzing: seeded mutations of the real images, each case under a timeout and a memory cap -------------------


def test_the_fuzzer_covers_every_format_and_mutation_and_is_reproducible():
    seeds = fuzzing.corpus()
    kinds = [fuzzing.mutate(seeds, 16, i)[0] for i in range(600)]
    truncated = {k.split(":")[0] for k in kinds if k.split(":")[1].startswith("truncate")}
    assert truncated >= {*fuzzing.FORMATS, "ORIGINAL"}
    used = {m for k in kinds for m in k.split(":")[1].split("+")}
    assert used == {m.__name__.strip("_") for m in fuzzing.MUTATORS}
    assert fuzzing.mutate(seeds, 16, 123) == fuzzing.mutate(seeds, 16, 123)


def test_fuzzed_images_through_the_decoding_boundary_never_fail(tmp_path):
    result = fuzzing.run_batch(16, 0, 600, "decode", tmp_path, timeout=300)
    assert result["failures"] == [] and result["ok"] + result["refused"] == 600
    assert result["ok"] > 50 and result["refused"] > 50  # both paths exercised


def test_fuzzed_files_with_hostile_names_through_ingest_split_and_predict_lose_no_row(tmp_path):
    result = fuzzing.run_batch(16, 0, 300, "pipeline", tmp_path, timeout=300)
    assert result["failures"] == []
    assert result["ingested"] > 4 and result["quarantined"] > 100 and result["predict_errors"] > 100


# --- image files cut short and malformed metadata: quarantined in ingest, only our own disk's faults retried ------


def _png_with_chunk(kind: bytes, body: bytes, good_crc: bool = True) -> bytes:
    data = encode(brain(20), "PNG")
    crc = zlib.crc32(kind + body) ^ (0 if good_crc else 1)
    return data[:33] + struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc) + data[33:]


def test_truncated_images_and_malformed_metadata_are_quarantined_by_ingest(tmp_path, capsys):
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    arr = brain(21, tumor=True)
    for fmt, cut in (("JPEG", 300), ("PNG", 60), ("WEBP", 40), ("BMP", 200), ("TIFF", 500), ("GIF", 100)):
        (ds / "yes" / f"cut.{fmt.lower()}").write_bytes(encode(arr, fmt)[:cut])
    (ds / "no" / "text bad crc.png").write_bytes(_png_with_chunk(b"tEXt", b"key\x00value", good_crc=False))
    (ds / "no" / "iccp bad zlib.png").write_bytes(_png_with_chunk(b"iCCP", b"icc\x00\x00" + b"\x78\x9c garbage"))
    (ds / "no" / "exif garbage.png").write_bytes(_png_with_chunk(b"eXIf", b"MM\x00*\xff\xff\xff\xff" + bytes(20)))
    assert main(["--params", str(p.root / "params.yaml"), "-q", "ingest"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    report = json.loads(p.path("ingest_report").read_text())
    reasons = {q["source_path"]: q["reason"] for q in report["quarantined"]}
    assert {f"yes/cut.{f}" for f in ("jpeg", "png", "webp", "bmp", "tiff", "gif")} <= set(reasons)
    assert "text bad crc" in " ".join(reasons) and all("\n" not in r for r in reasons.values())
    assert report["n_files"] == report["n_ingested"] + report["n_quarantined"] == 6 + 6 + 3


def test_an_io_error_of_our_own_disk_is_not_quarantined_but_raised_for_a_retry(tmp_path, monkeypatch):
    import errno

    p = project(tmp_path)
    write_dataset(p.resolve("data/raw/ds"), n=3)
    real_open = os.open

    def failing_open(path, flags, *args, **kw):
        if str(path).endswith("yes 1.jpg"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(images.os, "open", failing_open)
    with pytest.raises(OSError, match="Input/output error"):
        ingest(p)


def test_an_image_or_class_folder_we_may_not_read_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    """As files of another user with mode 000 (the tests may run as root, who reads anything): an image is quarantined
    with the reason, a class folder stops ingest with one sentence; neither is an I/O failure worth a retry."""
    import errno

    from brainmri.intake import sources as ingest_module

    p = project(tmp_path)
    write_dataset(p.resolve("data/raw/ds"), n=3)
    real_open, real_listdir = os.open, os.listdir

    def forbidden_open(path, flags, *args, **kw):
        if str(path).endswith("yes 1.jpg"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(images.os, "open", forbidden_open)
    report = ingest(p)
    assert {q["source_path"]: q["reason"] for q in report["quarantined"]} == {"yes/yes 1.jpg": "cannot be read: Permission denied"}

    def forbidden_listdir(path):
        if str(path).endswith("/no"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(ingest_module.os, "listdir", forbidden_listdir)
    with pytest.raises(DataError, match=r"ds/no cannot be listed: Permission denied"):
        ingest(p)


# --- counts after conflicts, sources that cannot be opened (issue 32) ---------------------------------------------


def test_a_set_filed_under_both_classes_stops_ingest_and_publishes_nothing(tmp_path):
    """Every image filed under both classes passed ingest (the class minimum was counted before conflicts were
    dropped); split then wrote 0/0/0 with exit 0 and train crashed later with a KeyError."""
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=6)
    for f in (ds / "no").iterdir():
        (ds / "yes" / f"copy of {f.name}").write_bytes(f.read_bytes())
    for f in list((ds / "yes").iterdir()):
        if not f.name.startswith("copy of"):
            (ds / "no" / f"copy of {f.name}").write_bytes(f.read_bytes())
    with pytest.raises(DataError, match=r"too few usable images .* once 24 images in duplicate groups with conflicting labels"):
        ingest(p)
    assert not p.path("ingest_images").exists() and not p.path("ingest_manifest").exists()


def test_split_refuses_a_manifest_whose_classes_are_all_conflicts(tmp_path):
    from tasks.split import split

    p = project(tmp_path)
    write_dataset(p.resolve("data/raw/ds"), n=6)
    ingest(p)
    m = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
    m.assign(conflict=m["label"] == "yes").to_csv(p.path("ingest_manifest"), index=False)  # as if every tumour were in conflict
    with pytest.raises(DataError, match=r"too few usable images to split: \{'no': 6, 'yes': 0\}|\{'yes': 0\}"):
        split(p)
    assert not p.path("split_manifest").exists()


def test_a_source_that_cannot_be_opened_is_one_sentence(tmp_path):
    p = project(tmp_path)
    loop = p.resolve("data/raw/ds")
    loop.parent.mkdir(parents=True, exist_ok=True)
    loop.symlink_to(loop)  # a link to itself: ELOOP
    with pytest.raises(DataError, match=r"ingest.source .* cannot be opened: Too many levels of symbolic links"):
        ingest(p)


# --- lineage on hostile paths and lock files (issue 32) --------------------------------------------------------

LOCK = """schema: '2.0'
stages:
  ingest:
    cmd: brainmri ingest
    deps:
    - path: data/raw/ds
      md5: aa
    outs:
    - path: data/ingest/manifest.csv
      md5: bb
  split:
    cmd: brainmri split
    deps:
    - path: data/ingest/manifest.csv
      md5: bb
    outs:
    - path: data/split/split.csv
      md5: cc
"""


def _lineage_cli(root: Path, target: str, capsys) -> tuple[int, str]:
    code = main(["--params", str(root / "params.yaml"), "lineage", str(root / target)])  # an absolute target stays one
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("lock", "target", "message"),
    [
        (LOCK, "/etc/passwd", "outside the project"),
        (LOCK, "../elsewhere/model.onnx", "outside the project"),
        ("<<<<<<< HEAD\n" + LOCK + "=======\nstages: {}\n>>>>>>> theirs\n", "data/split/split.csv", "dvc.lock: not valid YAML"),
        (LOCK.replace("path: data/raw/ds", "path: data/split/split.csv"), "data/split/split.csv", "in a cycle"),
        ("stages: [1, 2]\n", "data/split/split.csv", "not a lock file as DVC writes it"),
        (LOCK.replace("    - path: data/raw/ds\n      md5: aa\n", "    - 7\n"), "data/split/split.csv", "not a lock file as DVC writes it"),
    ],
)
def test_lineage_of_hostile_targets_and_lock_files_is_one_sentence(tmp_path, capsys, lock, target, message):
    root = make_project(tmp_path / "proj")
    (root / "dvc.lock").write_text(lock)
    code, err = _lineage_cli(root, target, capsys)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_lineage_through_a_data_folder_that_is_a_symlink_to_another_disk(tmp_path):
    from brainmri.provenance.lineage import lineage

    root = make_project(tmp_path / "proj")
    (root / "dvc.lock").write_text(LOCK)
    elsewhere = tmp_path / "other-disk" / "data"
    (elsewhere / "split").mkdir(parents=True)
    (elsewhere / "split" / "split.csv").write_text("x\n")
    (root / "data").symlink_to(elsewhere)
    info = lineage(root, root / "data" / "split" / "split.csv", with_metrics=False)
    assert [s["stage"] for s in info["chain"]] == ["split", "ingest"] and info["target"] == "data/split/split.csv"


def test_a_second_writer_never_deletes_the_first_writers_temporary_folder(tmp_path):
    """Two `brainmri ingest` runs at once: the second deleted the first's temporary folder while it was being written."""
    from brainmri.core.files import atomic_dir

    out = tmp_path / "images"
    with atomic_dir(out) as first:
        (first / "a.png").write_bytes(b"a")
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:  # a live writer's folder, as another process names it
            theirs = tmp_path / f".images.{sleeper.pid}-abcd.tmp"
            theirs.mkdir()
            dead = tmp_path / ".images.999999999-dead.tmp"  # a killed run's leftover
            dead.mkdir()
            with atomic_dir(out) as second:
                (second / "b.png").write_bytes(b"b")
            assert theirs.is_dir() and first.is_dir() and not dead.exists()
        finally:
            sleeper.kill()
            sleeper.wait()
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # the last writer to finish wins, whole
