"""`brainmri predict`: run an exported ONNX model on image files and folders, without TensorFlow.

Each image goes through the same decoding as ingest (format from content, EXIF, every mode to RGB, the same size
cap) and the same preprocessing as training (brainmri.intake.preprocess); threshold, class names and limits come from the
model's metadata, written by the export stage and validated here when the model is loaded.

It cannot hurt: a file that is not a regular file (a named pipe, a device, a link to one) gets an error row and
is never read; images are decoded and run in batches, so memory does not grow with the number of inputs (only
the small result rows do); `--out` is written as a new file and replaces an existing regular file only with
`overwrite`, and never the model, an input, a folder, a link or a special file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.core import machine
from brainmri.core.errors import BrainMRIError, ImageError
from brainmri.core.files import _UMASK
from brainmri.deploy.onnxrt import metadata, session
from brainmri.intake.archives import printable
from brainmri.intake.decode import KINDS, decode_file
from brainmri.intake.preprocess import square

COLUMNS = ["path", "probability", "label", "error"]
OUT_SUFFIXES = (".csv", ".json")
MAX_FILE_BYTES = 250_000_000  # ingest.max_file_bytes's default, for models whose metadata does not carry it
MAX_INPUT_SIZE = 1024  # every backbone here takes 224 px or less; 1024 bounds a batch at 16 x 1024^2 x 3 float32 = 200 MB


@dataclass(frozen=True)
class Model:
    """A loaded, validated model: its session, its input's name, its metadata, and what runs it."""

    sess: object
    input: str
    size: int
    threshold: float
    positive: str
    negative: str
    limits: dict
    run: object = None  # image batch -> raw outputs, on the chosen runtime (brainmri.deploy.runtimes); None: the session


def _number(model: Path, meta: dict, key: str, kind: type, lo: float, hi: float, default=None):
    raw = meta.get(key, default)
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise BrainMRIError(f"{model}: metadata {key}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not lo <= value <= hi:  # NaN fails this too
        raise BrainMRIError(f"{model}: metadata {key}={raw!r} is outside {lo}..{hi}")
    return value


def load(model: str | Path, runtime: str = "onnxruntime", threads: int = 0) -> Model:
    """Open an exported model and check its metadata and input shape; one sentence on anything wrong. ONNX Runtime
    reads and checks the file in any case; `runtime` (brainmri.deploy.runtimes.RUNTIMES) is what then runs it."""
    model = Path(model)
    _check_model_file(model)
    sess = session(model)
    meta = metadata(sess)
    size, threshold, pos, neg = _read_metadata(model, meta)
    limits = {
        "max_pixels": _number(model, meta, "max_pixels", int, 1, 1_000_000_000, 40_000_000),  # as ingest did
        "max_side": _number(model, meta, "max_side", int, 1, 65_535, 512),
        "max_bytes": _number(model, meta, "max_file_bytes", int, 1, 10**12, MAX_FILE_BYTES),
        "crop_to_content": meta.get("crop_to_content", "False") == "True",  # as ingest normalized the training images
    }
    _check_input_output(model, sess, size)
    if meta.get("int8_reduce_range") == "False":
        _warn_without_vnni(model, meta)
    run = None
    if runtime != "onnxruntime":
        from brainmri.deploy.runtimes import runner

        run = runner(model, runtime, threads)
    return Model(sess, sess.get_inputs()[0].name, size, threshold, pos, neg, limits, run)


def _check_model_file(model: Path) -> None:
    """Refuse anything but an existing regular .onnx file, before ONNX Runtime opens it."""
    if model.suffix.lower() != ".onnx":
        raise BrainMRIError(f"{model}: --model must be an exported .onnx file (Keras and other model files are not accepted)")
    if not model.exists():
        raise BrainMRIError(f"{model}: model file not found")
    if not model.is_file():  # a named pipe would block the loader, a device would feed it forever
        raise BrainMRIError(f"{model}: the model is not a regular file")


def _read_metadata(model: Path, meta: dict) -> tuple[int, float, str, str]:
    """The input size, threshold and class names export wrote into the model, checked."""
    missing = [k for k in ("input_size", "threshold", "positive_class", "negative_class") if k not in meta]
    if missing:
        raise BrainMRIError(f"{model}: not exported by brainmri (metadata lacks {', '.join(missing)})")
    size = _number(model, meta, "input_size", int, 32, MAX_INPUT_SIZE)
    threshold = _number(model, meta, "threshold", float, 0.0, 1.0)  # training's Youden threshold lies in 0..1
    pos, neg = meta["positive_class"], meta["negative_class"]
    if not pos.strip() or not neg.strip() or pos == neg:
        raise BrainMRIError(f"{model}: metadata classes {pos!r} and {neg!r} must be two different non-empty names")
    return size, threshold, pos, neg


def _check_input_output(model: Path, sess, size: int) -> None:
    """One float input of shape (batch, size, size, 3) and a float output, as export makes them."""
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 4:
        shapes = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise BrainMRIError(f"{model}: expected one float input of shape (batch, {size}, {size}, 3), got {shapes}")
    dims = inputs[0].shape[1:]
    if any(isinstance(d, int) and d != want for d, want in zip(dims, (size, size, 3), strict=True)):
        raise BrainMRIError(f"{model}: input shape {inputs[0].shape} does not match metadata input_size={size} with 3 colours")
    if not outputs or outputs[0].type != "tensor(float)":
        raise BrainMRIError(f"{model}: expected a float probability output, got {[(o.name, o.type) for o in outputs]}")


def _warn_without_vnni(model: Path, meta: dict) -> None:
    """Warn when an int8 model with 8-bit weights meets a CPU without VNNI."""
    if not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(machine.cpu_flags()):
        logging.getLogger("brainmri").warning(
            "%s: int8 with 8-bit weights, chosen on a CPU with VNNI (%s); this CPU has no VNNI, where u8 x s8 products "
            "can saturate and cost accuracy: export again here, or with export.reduce_range: true",
            model,
            meta.get("int8_chosen_on_cpu_flags", "?"),
        )


def _run(model: Model, x: np.ndarray, where: Path) -> np.ndarray:
    """Probabilities for one batch, checked: one finite value in 0..1 per image."""
    raw = model.run(x) if model.run is not None else model.sess.run(None, {model.input: x})[0]
    out = np.asarray(raw, dtype=np.float64).reshape(-1)
    if out.size != len(x):
        raise BrainMRIError(f"model gives {out.size} values for {len(x)} images (at {where}); expected one probability per image")
    if not np.all(np.isfinite(out) & (out >= 0) & (out <= 1)):
        raise BrainMRIError(f"model output is not a probability in 0..1 (got {out[~((out >= 0) & (out <= 1))][:3]} at {where})")
    return out


def collect(inputs: list[str]) -> list[Path]:
    """Files named directly, plus every non-hidden entry under the folders named (recursively), in sorted order.

    Links to folders and folders that cannot be listed are kept as entries, so they get an error row instead of
    vanishing; links are never followed into folders. The walk keeps its own stack: Python 3.11's os.walk recurses,
    and a folder nested 1,200 deep overflowed it.
    """
    out = []
    for item in inputs:
        if not item:
            raise BrainMRIError("an input is an empty string; name a file or folder ('.' for this folder)")
        path = Path(item)
        if path.is_dir():  # named directly: walked even through a link; links inside are not followed
            unlistable: list[Path] = []
            stack = [path]
            while stack:
                folder = stack.pop()
                try:
                    with os.scandir(folder) as it:
                        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
                except OSError:
                    unlistable.append(folder)
                    continue
                subs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
                out += [Path(e.path) for e in entries if not e.is_dir(follow_symlinks=False)]
                stack += reversed(subs)  # depth first, in name order, as os.walk goes
            out += unlistable
        elif path.exists() or path.is_symlink():
            out.append(path)
        else:
            raise BrainMRIError(f"input {printable(item)} does not exist")
    return out


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


MAX_OUT_NAME = 255 - 14  # the file-name limit less the temporary name's additions ('.' + name + '.XXXXXXXX.tmp')


def check_out(out: Path, overwrite: bool, model: Path, files: list[Path]) -> tuple[int, int] | None:
    """Refuse an --out that is not a new file or (with overwrite) a replaceable regular one; its identity if it exists."""
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise BrainMRIError(f"--out {out}: must end in .csv or .json")
    if len(out.name.encode()) > MAX_OUT_NAME:
        raise BrainMRIError(f"--out {out.name[:40]}...: a name of {len(out.name.encode())} bytes; at most {MAX_OUT_NAME}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # before any work: a parent that cannot be a folder fails now
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BrainMRIError(f"--out {out}: cannot be written there ({exc.strerror or exc})") from None
    if stat.S_ISLNK(st.st_mode):
        raise BrainMRIError(f"--out {out} is a symbolic link; name a regular file or a new one")
    if not stat.S_ISREG(st.st_mode):
        raise BrainMRIError(f"--out {out} is {KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')}; it is never replaced")
    if not overwrite:
        raise BrainMRIError(f"--out {out} already exists; pass --overwrite to replace it")
    key = (st.st_dev, st.st_ino)
    if key == _identity(model):
        raise BrainMRIError(f"--out {out} is the model itself; it is never replaced")
    for f in files:
        if key == _identity(f):
            raise BrainMRIError(f"--out {out} is the input {f}; an input is never replaced")
    return key


def _publish(tmp: Path, out: Path, key: tuple[int, int] | None) -> None:
    """Move the finished `tmp` onto `out`: as a new file when `key` is None, else onto the same regular file we checked."""
    if key is None:
        try:
            os.link(tmp, out)  # atomic create-if-absent: fails if something appeared at `out` meanwhile
        except FileExistsError:
            raise BrainMRIError(f"--out {out} appeared while predicting; it was not replaced") from None
        return
    st = os.lstat(out) if os.path.lexists(out) else None
    if st is not None and (not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != key):
        raise BrainMRIError(f"--out {out} was replaced by something else while predicting; it was not replaced")
    os.replace(tmp, out)


def _predict_files(m: Model, files: list[Path], batch: int) -> tuple[pd.DataFrame, list[dict]]:
    """One row per file: its probability and label, or why it could not be read."""
    rows, arrays, index = [], [], []

    def flush():
        for i, prob in zip(index, _run(m, np.stack(arrays).astype(np.float32), files[index[0]]), strict=True):
            rows[i]["probability"] = round(float(prob), 6)
            rows[i]["label"] = m.positive if prob >= m.threshold else m.negative
        arrays.clear()
        index.clear()

    for f in files:
        row = {"path": printable(str(f)), "probability": None, "label": None, "error": ""}
        if f.is_dir() and not f.is_symlink():  # only a folder the walk could not list comes back as an entry
            row["error"] = "a folder that cannot be listed; not read"
            rows.append(row)
            continue
        try:
            dec = decode_file(f, **m.limits)
        except (ImageError, OSError) as exc:  # OSError: the input itself is unreadable (permissions, vanished)
            row["error"] = str(exc) if isinstance(exc, ImageError) else f"cannot be read: {exc.strerror or exc}"
        else:
            arrays.append(square(dec.image, m.size))
            index.append(len(rows))
        rows.append(row)
        if len(arrays) == batch:
            flush()
    if arrays:
        flush()
    return pd.DataFrame(rows, columns=COLUMNS), rows


def predict(
    model: str | Path, inputs: list[str], out: str | Path, batch: int = 16, overwrite: bool = False, runtime: str = "onnxruntime"
) -> pd.DataFrame:
    model, out = Path(model), Path(out)
    m = load(model, runtime)
    files = collect(inputs)
    key = check_out(out, overwrite, model, files)
    try:  # the output's temporary file first: a folder we may not write to fails before any image is read
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise BrainMRIError(f"--out {out}: cannot be written there ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        frame, rows = _predict_files(m, files, batch)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        if out.suffix.lower() == ".json":
            doc = {"model": str(model), "runtime": runtime, "threshold": m.threshold, "predictions": rows}
            tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        else:
            # every text field quoted: Python's csv quotes a path holding '\n' but not one holding '\r', which a reader
            # then takes for a line end (found by tests/fuzzing.py); quoted, every path reads back exactly
            frame.to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8", quoting=csv.QUOTE_NONNUMERIC)
        _publish(tmp, out, key)
    finally:
        tmp.unlink(missing_ok=True)
    return frame
