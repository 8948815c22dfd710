"""Safe extraction of a dataset archive (.zip, .tar, .tar.gz, .tgz): hostile members are refused by name."""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from brainmri.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
CHUNK = 1 << 20


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def printable(name: str) -> str:
    """A file name as text even when its bytes are not valid UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_name(archive: Path, name: str) -> PurePosixPath:
    shown = printable(name)
    if name != shown:
        raise DataError(f"{archive.name}: member {shown!r} has a name that is not valid UTF-8")
    norm = name.replace("\\", "/")
    pure = PurePosixPath(norm)
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise DataError(f"{archive.name}: member {shown!r} has an absolute path; refusing to extract outside the data folder")
    if ".." in pure.parts:
        raise DataError(f"{archive.name}: member {shown!r} climbs out of the archive with '..'; refusing to extract it")
    return pure


class _Budget:
    def __init__(self, archive: Path, max_members: int, max_bytes: int):
        self.archive, self.max_members, self.max_bytes = archive, max_members, max_bytes
        self.members = self.bytes = 0

    def member(self):
        self.members += 1
        if self.members > self.max_members:
            raise DataError(f"{self.archive.name}: more than {self.max_members} members (ingest.archive_max_members); refusing it")

    def add(self, n: int, name: str):
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise DataError(
                f"{self.archive.name}: unpacks to more than {self.max_bytes} bytes at member {printable(name)!r} "
                "(ingest.archive_max_bytes); refusing a possible decompression bomb"
            )


def _copy_limited(src, dest: Path, budget: _Budget, name: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            budget.add(len(chunk), name)  # count real bytes: a declared size can lie
            out.write(chunk)


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.member()
            pure = _check_name(archive, info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise DataError(f"{archive.name}: member {info.filename!r} is a symbolic link; links are refused")
            if info.is_dir():
                (dest / pure).mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as src:
                _copy_limited(src, dest / pure, budget, info.filename)


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive, mode="r:*") as tf:
        for member in tf:
            budget.member()
            pure = _check_name(archive, member.name)
            if member.issym() or member.islnk():
                raise DataError(
                    f"{archive.name}: member {printable(member.name)!r} is a link to {printable(member.linkname)!r}; links are refused"
                )
            if member.isdir():
                (dest / pure).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise DataError(f"{archive.name}: member {printable(member.name)!r} is not a regular file or folder; refusing it")
            src = tf.extractfile(member)
            _copy_limited(src, dest / pure, budget, member.name)


def extract(archive: Path, dest: Path, max_members: int, max_bytes: int) -> None:
    """Extract `archive` into the empty folder `dest`; on any refusal, remove what was written and raise DataError."""
    budget = _Budget(archive, max_members, max_bytes)
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, dest, budget)
        else:
            _extract_tar(archive, dest, budget)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise DataError(f"{archive.name}: not a readable archive: {exc}") from None
    except DataError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
