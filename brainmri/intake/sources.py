"""A dataset's source files: the class folders (or an archive of them) listed, checked and decoded by ingest's rules.

ingest and ingest_external read their sources through here, so "external" is read exactly as the training data is."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from brainmri.config import Params
from brainmri.core.errors import DataError, ImageError
from brainmri.core.progress import progress
from brainmri.intake import archives
from brainmri.intake.decode import decode_file
from brainmri.intake.phantoms import MARKER

SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "icon\r"})


@dataclass(frozen=True)
class SourceFile:
    source_path: str  # relative to the folder holding the class folders, '/'-separated, exactly as found
    path: Path
    label: str


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def has_control(name: str) -> bool:
    """True for names holding ASCII control characters (tab, CR, NUL...): a CSV manifest cannot carry them faithfully."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)


def escaped(name: str) -> str:
    """`name` with its control characters written as \\xNN, for reports and messages."""
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in name)


def image_id(source_path: str) -> str:
    """A stable id for one source file, independent of listing order and of its content."""
    return hashlib.sha256(source_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def listing(folder: Path) -> list[str]:
    """A folder's entries, sorted; one that may not be listed is a layout error of the data, not a crash to retry."""
    try:
        return sorted(os.listdir(folder))
    except PermissionError as exc:
        raise DataError(f"{folder} cannot be listed: {exc.strerror}") from None


def scan(folder: Path, classes: list[str]) -> tuple[list[SourceFile], list[dict], list[dict]]:
    """List the class folders' files; stop on layout errors, set aside hidden files and unusable names."""
    files, skipped, quarantined = [], [], []
    present = _class_folders(folder, classes, skipped)
    for label in classes:
        if label not in present:
            raise DataError(f"class folder {label!r} is missing from {folder}; expected {classes}")
        n_before = len(files) + len(quarantined)
        for name in listing(folder / label):
            rel, path = f"{label}/{name}", folder / label / name
            shown = escaped(archives.printable(rel))
            if is_hidden(name):
                skipped.append({"source_path": shown, "reason": "hidden or system file"})
            elif why := _unusable(path, rel, name):
                quarantined.append({"source_path": shown, "reason": why})
            elif path.is_dir():
                raise DataError(f"nested folder {shown!r} in {folder}: put the images directly inside the class folders")
            else:
                files.append(SourceFile(rel, path, label))
        if len(files) + len(quarantined) == n_before:
            raise DataError(f"class folder {label!r} in {folder} holds no images")
    return files, skipped, quarantined


def _class_folders(folder: Path, classes: list[str], skipped: list[dict]) -> list[str]:
    """The class folders at the top of `folder` (hidden entries go to `skipped`); anything else is a layout error."""
    present = []
    for name in listing(folder):
        path, shown = folder / name, archives.printable(name)
        if name == MARKER:
            continue
        if is_hidden(name):
            skipped.append({"source_path": shown, "reason": "hidden or system file"})
        elif path.is_symlink():
            raise DataError(f"{shown!r} in {folder} is a symbolic link; class folders must be real folders")
        elif not path.is_dir():
            raise DataError(f"{shown!r} in {folder}: unexpected file at the top level; expected only the class folders {classes}")
        elif name not in classes:
            raise DataError(f"unknown class folder {shown!r} in {folder}; expected {classes} (set ingest.classes in params.yaml)")
        else:
            present.append(name)
    return present


def _unusable(path: Path, rel: str, name: str) -> str | None:
    """Why a class folder's entry cannot be ingested (quarantined with that reason), or None; a folder is for scan to refuse."""
    if path.is_symlink():
        return "symbolic link; links are not followed"
    if path.is_dir():
        return None
    if archives.printable(rel) != rel:
        return "file name is not valid UTF-8"
    if has_control(name):
        return "file name holds control characters (shown as \\xNN); they cannot round-trip through the CSV manifest"
    if not path.is_file():
        return "not a regular file"
    return None


@contextlib.contextmanager
def open_source(source: Path, p: Params, param: str = "ingest.source"):
    """Yield the folder that holds the class folders: the source itself, or a safely extracted archive.
    `param` names the params key the source came from, in errors."""
    try:
        source.stat()
    except FileNotFoundError:
        raise DataError(
            f"dataset not found at {source} ({param} in params.yaml): put the class folders "
            f"{p.ingest.classes} there, or point {param} at a folder or .zip/.tar.gz archive"
        ) from None
    except OSError as exc:  # a name too long, a link loop, a folder we may not enter: the path's fault, one sentence
        raise DataError(f"{param} {str(source)[:200]!r} cannot be opened: {exc.strerror or exc}") from None
    if source.is_dir():
        yield source
        return
    if not archives.is_archive(source):
        raise DataError(f"{source}: {param} must be a folder or a {'/'.join(archives.ARCHIVE_SUFFIXES)} archive")
    work = p.path("ingest_manifest").parent
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=work))
    try:
        archives.extract(source, tmp, p.ingest.archive_max_members, p.ingest.archive_max_bytes, p.ingest.max_file_bytes)
        top = [n for n in os.listdir(tmp) if not is_hidden(n)]
        unwrap = len(top) == 1 and top[0] not in p.ingest.classes and (tmp / top[0]).is_dir()
        yield tmp / top[0] if unwrap else tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drop_excluded(files: list[SourceFile], p: Params, source: Path) -> tuple[list[SourceFile], list[dict]]:
    """Remove the files ingest.exclude names, each recorded with its reason; a name that matches no file is an error."""
    reasons = {e.path: e.reason for e in p.ingest.exclude}
    unknown = sorted(set(reasons) - {f.source_path for f in files})
    if unknown:
        raise DataError(
            f"ingest.exclude names {unknown}, not found among the usable files of {source}; "
            "paths are relative to the folder holding the class folders, e.g. 'yes/Y1.jpg'"
        )
    excluded = [{"source_path": f.source_path, "reason": reasons[f.source_path]} for f in files if f.source_path in reasons]
    return [f for f in files if f.source_path not in reasons], excluded


def decoded(p: Params, files: list[SourceFile], quarantined: list[dict], desc: str):
    """(file, Decoded) for each file that decodes under ingest's limits; the others go to `quarantined` with the reason."""
    for f in progress(files, desc):
        try:
            dec = decode_file(
                f.path,
                max_pixels=p.ingest.max_pixels,
                max_side=p.ingest.max_side,
                max_bytes=p.ingest.max_file_bytes,
                crop_to_content=p.ingest.crop_to_content,
            )
        except ImageError as exc:
            quarantined.append({"source_path": f.source_path, "reason": str(exc)})
            continue
        yield f, dec
