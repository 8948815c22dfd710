"""Atomic writes: every output appears complete or not at all."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
_LIVE: set[Path] = set()  # temporary files and folders being written now, removed by remove_temporaries on an interrupt


def remove_temporaries() -> None:
    """Remove every temporary file and folder still being written: what an interrupted process calls before it exits
    without unwinding (a stage interrupted inside a long TensorFlow call cannot reach its `finally` in time)."""
    for tmp in list(_LIVE):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        _LIVE.discard(tmp)


def _tmp_sibling(path: Path, suffix: str = "", where: Path | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=where or path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, scratch: Path | None = None):
    """Yield a temporary file beside `path` (or in the folder `scratch`, on the same file system); rename it onto
    `path` only if the block succeeds."""
    path = Path(path)
    tmp = _tmp_sibling(path, path.suffix, scratch)
    _LIVE.add(tmp)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _LIVE.discard(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield an empty temporary folder beside `path`; swap it into place only if the block succeeds.

    Temporary folders a killed earlier run left beside `path` are removed first, never one whose process still runs
    (its pid is in the name): a second `brainmri ingest` deleted the first's folder while it was being written.
    """
    path = Path(path)
    with _owned_dir(path.parent, f".{path.name}.", (".tmp", ".old")) as tmp:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def scratch_dir(parent: Path):
    """An empty folder `parent`/.scratch.PID-random.tmp for the block (`_owned_dir`): for files a worker process
    writes on this process's behalf, which removing the folder removes, whatever the worker was doing."""
    return _owned_dir(parent, ".scratch.")


@contextlib.contextmanager
def _owned_dir(parent: Path, prefix: str, leftovers: tuple[str, ...] = (".tmp",)):
    """Yield an empty folder `parent`/PREFIX.PID-random.tmp, removed when the block ends or by `remove_temporaries`
    on an interrupt. Folders of that prefix (and a suffix in `leftovers`) that a killed process left are removed
    first, never one whose process still runs (its pid is in the name)."""
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{glob.escape(prefix)}*"):
        if stale.is_dir() and stale.suffix in leftovers and not _writer_alive(stale.name[len(prefix) :]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", suffix=".tmp", dir=parent))
    _LIVE.add(tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _LIVE.discard(tmp)


def _writer_alive(tail: str) -> bool:
    """Whether the process named at the start of a temporary folder's name ('PID-random.tmp') still runs."""
    pid = tail.split("-", 1)[0]
    return pid.isdigit() and pid_alive(int(pid))  # no pid: an older version's leftover, stale


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonable(obj):
    """`obj` with NaN and infinities replaced by None: JSON has no NaN, and DVC reads these files strictly."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False) + "\n")


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as UTF-8 CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


# the columns of this pipeline's CSV files that hold text however they look: class names ("0", "1", "True", "01"),
# hex ids and hashes, which pandas would otherwise read as numbers or booleans (folders "1" and "01" both as 1)
TEXT_COLUMNS = (
    *("source_path", "label", "actual", "predicted", "image", "image_id", "sha256", "source_image", "subject", "split", "note"),
    *("group", "duplicate_group", "duplicate_of"),
)


def read_manifest(path: str | os.PathLike, also: tuple[str, ...] = ()):
    """A CSV this pipeline wrote (a manifest, predictions) as a pandas DataFrame: empty cells as "", never NaN, and
    TEXT_COLUMNS (and `also`) as text."""
    import pandas as pd

    return pd.read_csv(path, keep_default_na=False, dtype=dict.fromkeys((*TEXT_COLUMNS, *also), str))


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula (OWASP CSV injection)


def formula_safe(frame):
    """A copy of a pandas DataFrame whose text cells that start like a formula are prefixed with a single quote, which
    spreadsheets show as text and do not run; numbers, and text that starts otherwise, are left exactly as they were.
    For CSV files people open, whose cells the pipeline does not read back (a manifest's would then differ)."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    out = frame.copy()
    for column in out.columns:
        values = out[column]
        if not is_numeric_dtype(values) and not is_bool_dtype(values):  # text: object, or pandas' own string type
            out[column] = values.map(lambda v: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_PREFIXES) else v)
    return out


def write_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """A DVC metrics file: flat, numbers only (`dvc metrics show` and `dvc exp show` read it); the full record lives
    beside it as a plain output. A non-number here is our bug, not the data's."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
    if bad:
        raise TypeError(f"{path}: metrics must be numbers: {bad}")
    write_json(path, {k: (None if v != v else v) for k, v in metrics.items()})  # NaN (one-class splits) as null


def write_npz(path: str | os.PathLike, **arrays) -> None:
    """Arrays as a compressed .npz that np.load reads, atomically and byte-reproducibly: np.savez_compressed stamps
    each member with the time of writing, so equal arrays would give a new file (and DVC a changed output) each run."""
    import io
    import zipfile

    import numpy as np

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.asarray(value), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(), zipfile.ZIP_DEFLATED)


def write_verified(folder: Path, key: str, suffix: str, data: bytes, scratch: Path | None = None) -> None:
    """Write `data` atomically as `folder`/<key>-<first 16 hex digits of its sha256><suffix>: an entry of a
    content-addressed cache (features, ONNX bases) that `read_verified` checks against its own name; the temporary
    file in `scratch` when given (`atomic_path`)."""
    with atomic_path(folder / f"{key}-{hashlib.sha256(data).hexdigest()[:16]}{suffix}", scratch) as tmp:
        tmp.write_bytes(data)


def read_verified(folder: Path, key: str, suffix: str, redo: str) -> bytes | None:
    """The bytes of `key`'s entry in `folder` (`write_verified`), or None. An entry whose bytes do not match its name
    (truncated, tampered) is deleted with a warning that says what happens instead (`redo`), never returned."""
    import logging

    for entry in sorted(folder.glob(f"{glob.escape(key)}-*{suffix}")):
        try:
            data = entry.read_bytes()
        except FileNotFoundError:  # another process replaced or dropped it after the listing: not ours to read
            continue
        if entry.name == f"{key}-{hashlib.sha256(data).hexdigest()[:16]}{suffix}":
            return data
        logging.getLogger("brainmri").warning("%s does not match its hash; %s", entry, redo)
        entry.unlink(missing_ok=True)
    return None
