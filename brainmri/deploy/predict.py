"""`brainmri predict`: run an exported ONNX model on image files and folders, without TensorFlow.

Each image goes through the same decoding as ingest (format from content, EXIF, every mode to RGB, the same size
cap) and the same preprocessing as training (brainmri.intake.preprocess); threshold, class names and limits come from the
model's metadata, written by the export stage and validated here when the model is loaded.

A binary model's row is path, probability (of the positive class), label (at the threshold), error. An N-class model
(metadata `classes`) gives one column per class, prob_<class>, and the arg-max class as label; in JSON its row holds
`probabilities`, {class: probability}. Its output must be (n, K) for its K classes, each row in 0..1 summing to 1.

It cannot hurt: a file that is not a regular file (a named pipe, a device, a link to one) gets an error row and
is never read; images are decoded and run in batches, so memory does not grow with the number of inputs (only
the small result rows do); `--out` is written as a new file and replaces an existing regular file only with
`overwrite`, and never the model, an input, a folder, a link or a special file; its CSV cells cannot run as
spreadsheet formulas. The model runs in a worker process under a memory cap and time limits (brainmri.deploy.sandbox),
so a hostile graph fails by name; Ctrl-C, SIGTERM and SIGHUP end predict at once, with no temporary file left.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import signal
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.core import machine
from brainmri.core.errors import BrainMRIError, ImageError
from brainmri.core.files import _UMASK, formula_safe
from brainmri.deploy import metadata, sandbox
from brainmri.deploy.runtimes import openvino_config
from brainmri.intake.archives import printable
from brainmri.intake.decode import KINDS, decode_file
from brainmri.intake.preprocess import square

COLUMNS = ["path", "probability", "label", "error"]  # a binary model's rows; an N-class model's: prob_<class> per class
PROB_PREFIX = "prob_"  # an N-class model's probability column for each class: prob_<class>
SUM_TOLERANCE = 1e-2  # how far an N-class model's row of probabilities may sum from 1: OpenVINO bf16 carries 8
# significant bits (a relative 0.4% per value), fp32 and the float int8 head stay within 1e-6
OUT_SUFFIXES = (".csv", ".json")
BATCH_PIXELS = 16 * 256 * 256  # images a batch times their pixels: 16 up to 256 px, fewer above (1 at 1024 px)
STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # end predict as Ctrl-C does: the worker killed, no temporary file left


class NothingScoredError(BrainMRIError):
    """predict could score none of its inputs."""


@dataclass
class Model:
    """A loaded, validated model: its worker process (brainmri.deploy.sandbox), its metadata, and what runs it."""

    worker: sandbox.Worker
    size: int
    threshold: float
    positive: str
    negative: str
    limits: dict
    classes: tuple[str, ...] | None = None  # an N-class model's class names, in its output columns' order

    @property
    def prob_columns(self) -> list[str]:
        """The probability columns of an output row: one for a binary model, prob_<class> per class for an N-class one."""
        return ["probability"] if self.classes is None else [f"{PROB_PREFIX}{c}" for c in self.classes]

    @property
    def columns(self) -> list[str]:
        return COLUMNS if self.classes is None else ["path", *self.prob_columns, "label", "error"]

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.worker.run(x) if self.classes is None else self.worker.run(x, len(self.classes))

    def close(self) -> None:
        self.worker.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(model: str | Path, runtime: str = "onnxruntime", threads: int = 0, bounds: dict | None = None) -> Model:
    """Open an exported model in a worker process and check its metadata, its input shape and a probe run on one black
    image; one sentence on anything wrong. ONNX Runtime reads and checks the file in any case; `runtime`
    (brainmri.deploy.runtimes.RUNTIMES) is what then runs it. `bounds`: the worker's memory and seconds (sandbox.Worker)."""
    model = Path(model)
    config = openvino_config(runtime, threads)  # an unknown runtime, or bf16 on a CPU without it: before any work
    _check_model_file(model)
    worker = sandbox.Worker(model, **(bounds or {}))
    try:
        info = worker.open(threads)
        try:
            meta = metadata.read(info["meta"])
        except metadata.MetadataError as exc:
            raise metadata.MetadataError(f"{printable(str(model))}: {exc}") from None
        _check_input_output(model, info, meta.size)
        if meta.classes is not None:
            _check_output_width(model, info, meta.classes)
        if meta.int8_reduce_range is False:
            _warn_without_vnni(model, meta.cpu_flags)
        if config is not None:
            worker.compile(config)
        m = Model(worker, meta.size, meta.threshold, meta.positive, meta.negative, meta.limits, meta.classes)
        _run(m, np.zeros((1, meta.size, meta.size, 3), np.float32), "a probe of one black image")
        worker.check_resident()
    except BaseException:
        worker.close()
        raise
    return m


def _check_model_file(model: Path) -> None:
    """Refuse anything but an existing regular .onnx file, before ONNX Runtime opens it."""
    if model.suffix.lower() != ".onnx":
        raise BrainMRIError(f"{model}: --model must be an exported .onnx file (Keras and other model files are not accepted)")
    try:
        exists, regular = model.exists(), model.is_file()
    except OSError as exc:  # Python 3.11's exists() raises for a name too long, a folder it may not enter...
        raise BrainMRIError(f"{printable(str(model))}: the model cannot be opened: {exc.strerror or exc}") from None
    if not exists:
        raise BrainMRIError(f"{model}: model file not found")
    if not regular:  # a named pipe would block the loader, a device would feed it forever
        raise BrainMRIError(f"{model}: the model is not a regular file")


def _check_input_output(model: Path, info: dict, size: int) -> None:
    """One float input of shape (batch, size, size, 3), its batch dimension free, and a float output, as export makes them."""
    inputs, outputs = info["inputs"], info["outputs"]
    if len(inputs) != 1 or inputs[0][1] != "tensor(float)" or len(inputs[0][2]) != 4:
        shapes = ", ".join(f"{printable(str(n))[:40]} {t} {s}" for n, t, s in inputs[:4])
        raise BrainMRIError(f"{model}: expected one float input of shape (batch, {size}, {size}, 3), got {shapes[:300]}")
    shape = inputs[0][2]
    if any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (size, size, 3), strict=True)):
        raise BrainMRIError(f"{model}: input shape {shape} does not match metadata input_size={size} with 3 colours")
    if isinstance(shape[0], int):
        raise BrainMRIError(f"{model}: input shape {shape} fixes the batch at {shape[0]}; an exported model takes any batch")
    if not outputs or outputs[0][1] != "tensor(float)":
        kinds = [(printable(str(n))[:40], t) for n, t, _ in outputs[:4]]
        raise BrainMRIError(f"{model}: expected a float probability output, got {kinds}")


def _check_output_width(model: Path, info: dict, classes: tuple[str, ...]) -> None:
    """An N-class model's output: (batch, K) with K the number of its metadata's classes, where the graph fixes it."""
    shape = info["outputs"][0][2]
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != len(classes)):
        raise BrainMRIError(
            f"{model}: output shape {[printable(str(d))[:20] for d in shape[:8]]} does not match the {len(classes)} classes "
            "of its metadata; expected (batch, number of classes)"
        )


def _warn_without_vnni(model: Path, flags: str) -> None:
    """Warn when an int8 model with 8-bit weights meets a CPU without VNNI."""
    if not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(machine.cpu_flags()):
        logging.getLogger("brainmri").warning(
            "%s: int8 with 8-bit weights, chosen on a CPU with VNNI (%s); this CPU has no VNNI, where u8 x s8 products "
            "can saturate and cost accuracy: export again here, or with export.reduce_range: true",
            model,
            flags or "?",
        )


def _run(model: Model, x: np.ndarray, where: str) -> np.ndarray:
    """Probabilities for one batch, checked: one finite value in 0..1 per image (binary), or a row of them per image
    summing to 1 (N classes: _run_classes)."""
    if model.classes is not None:
        return _run_classes(model, x, where)
    out = np.asarray(model.run(x), dtype=np.float64).reshape(-1)
    if out.size != len(x):
        raise BrainMRIError(f"model gives {out.size} values for {len(x)} images (at {where}); expected one probability per image")
    if not np.all(np.isfinite(out) & (out >= 0) & (out <= 1)):
        raise BrainMRIError(f"model output is not a probability in 0..1 (got {out[~((out >= 0) & (out <= 1))][:3]} at {where})")
    return out


def _run_classes(model: Model, x: np.ndarray, where: str) -> np.ndarray:
    """An N-class model's probabilities for one batch, checked: shape (n, K), finite, in 0..1, each row summing to 1."""
    k = len(model.classes)
    out = np.asarray(model.run(x), dtype=np.float64)
    if out.shape != (len(x), k):
        expected = f"expected ({len(x)}, {k}), one probability per class"
        raise BrainMRIError(f"model gives an output of shape {out.shape} for {len(x)} images (at {where}); {expected}")
    inside = np.isfinite(out) & (out >= 0) & (out <= 1)
    if not np.all(inside):
        raise BrainMRIError(f"model output is not a probability in 0..1 (got {out[~inside][:3]} at {where})")
    sums = out.sum(axis=1)
    off = np.abs(sums - 1) > SUM_TOLERANCE
    if np.any(off):
        raise BrainMRIError(f"model's class probabilities sum to {sums[off][:3]} for an image, not 1 (at {where})")
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
        try:
            folder, present = path.is_dir(), path.exists() or path.is_symlink()
        except OSError as exc:  # Python 3.11's is_dir() raises for a name too long, a folder it may not enter...
            raise BrainMRIError(f"input {printable(item)} cannot be opened: {exc.strerror or exc}") from None
        if folder:  # named directly: walked even through a link; links inside are not followed
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
        elif present:
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
        _fill(m, [rows[i] for i in index], _run(m, np.stack(arrays).astype(np.float32), printable(str(files[index[0]]))))
        arrays.clear()
        index.clear()

    for f in files:
        row = {"path": printable(str(f)), **dict.fromkeys(m.prob_columns), "label": None, "error": ""}
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
    return pd.DataFrame(rows, columns=m.columns), rows


def _fill(m: Model, rows: list[dict], out: np.ndarray) -> None:
    """Each row's probability and label: at the threshold for a binary model, the arg-max class for an N-class one."""
    if m.classes is None:
        for row, prob in zip(rows, out, strict=True):
            row["probability"] = round(float(prob), 6)
            row["label"] = m.positive if prob >= m.threshold else m.negative
        return
    for row, probs in zip(rows, out, strict=True):
        row.update({col: round(float(v), 6) for col, v in zip(m.prob_columns, probs, strict=True)})
        row["label"] = m.classes[int(np.argmax(probs))]  # ties go to the first class in the metadata's order


@contextlib.contextmanager
def _stopped_by_signals():
    """SIGTERM and SIGHUP raise KeyboardInterrupt here, as Ctrl-C does, so that the clean-up runs (the worker killed,
    the temporary output removed) and the command line says so in one line; the handlers before are restored after."""

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    old = {name: signal.signal(getattr(signal, name), stop) for name in STOP_SIGNALS}
    try:
        yield
    finally:
        for name, handler in old.items():
            signal.signal(getattr(signal, name), handler)


def _write(tmp: Path, out: Path, model: Path, runtime: str, m: Model, frame: pd.DataFrame, rows: list[dict]) -> None:
    """The rows as JSON, or as CSV with every text field quoted and formula-safe (brainmri.core.files.formula_safe)."""
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
    if out.suffix.lower() == ".json":
        if m.classes is None:
            doc = {"model": str(model), "runtime": runtime, "threshold": m.threshold, "predictions": rows}
        else:
            doc = {"model": str(model), "runtime": runtime, "classes": list(m.classes), "predictions": _json_rows(m, rows)}
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    else:
        # every text field quoted: Python's csv quotes a path holding '\n' but not one holding '\r', which a reader
        # then takes for a line end (found by tests/fuzzing.py); quoted, every path reads back exactly
        formula_safe(frame).to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8", quoting=csv.QUOTE_NONNUMERIC)


def _json_rows(m: Model, rows: list[dict]) -> list[dict]:
    """An N-class model's rows for JSON: the class probabilities as one object, {class: probability} (null for a file
    that could not be scored)."""
    out = []
    for row in rows:
        probs = {c: row[col] for c, col in zip(m.classes, m.prob_columns, strict=True)}
        scored = row["label"] is not None
        out.append({"path": row["path"], "probabilities": probs if scored else None, "label": row["label"], "error": row["error"]})
    return out


def predict(
    model: str | Path,
    inputs: list[str],
    out: str | Path,
    batch: int = 16,
    overwrite: bool = False,
    runtime: str = "onnxruntime",
    bounds: dict | None = None,
) -> pd.DataFrame:
    """Score `inputs` with `model` into `out`; NothingScoredError (after writing `out`) when no input could be scored.
    `batch` images a call, fewer for inputs above 256 px (BATCH_PIXELS); `bounds`: the worker's (sandbox.Worker)."""
    model, out = Path(model), Path(out)
    with _stopped_by_signals(), load(model, runtime, bounds=bounds) as m:
        files = collect(inputs)
        key = check_out(out, overwrite, model, files)
        try:  # the output's temporary file first: a folder we may not write to fails before any image is read
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        except OSError as exc:
            raise BrainMRIError(f"--out {out}: cannot be written there ({exc.strerror or exc})") from None
        os.close(fd)
        tmp = Path(name)
        try:
            frame, rows = _predict_files(m, files, max(1, min(batch, BATCH_PIXELS // m.size**2)))
            _write(tmp, out, model, runtime, m, frame, rows)
            _publish(tmp, out, key)
        finally:
            tmp.unlink(missing_ok=True)
    failed = int((frame["error"] != "").sum())
    if not len(frame):
        raise NothingScoredError(f"no input file was found, so nothing was scored ({out} lists none)")
    if failed == len(frame):
        raise NothingScoredError(f"none of the {len(frame)} inputs could be scored ({failed} failed; each one's reason is in {out})")
    return frame
