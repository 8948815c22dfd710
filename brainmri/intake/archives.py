"""Safe extraction of a dataset archive (.zip, .tar, .tar.gz, .tgz): read whole, or refused with one sentence.

Hostile members are refused by name: paths out of the folder, links, devices, duplicate names, encrypted or
unsupported-method zip members, members over the byte caps. Every exception of the archive libraries (zipfile,
tarfile, zlib, bz2, lzma, gzip, struct) becomes a DataError naming the archive and the member. A tar whose
headers stop early (tarfile silently treats a damaged header in the middle as the end) is refused, so an archive
is never half-ingested. Members are streamed to disk under ingest.max_file_bytes each and
ingest.archive_max_bytes in all, counting real bytes: declared sizes can lie.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import shutil
import stat
import struct
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from brainmri.core.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
CHUNK = 1 << 20
MAX_TAR_META = 1 << 16  # bytes of a tar's GNU long-name or pax header: tarfile reads its declared size whole into memory
# before any member cap counts it (a 1.5 MB .tar.gz declaring 1.5 GB took 1.65 GB); a path is at most 4,096 bytes
MAX_NAME_PART = 255  # bytes of one file or folder name: the usual file-system limit, checked before anything is written
MAX_DEPTH = 32  # folders a member may sit in: a dataset needs 2 (class/file); 1,500 overflowed pathlib's recursive mkdir
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def printable(name: str) -> str:
    """A file name as text even when its bytes are not valid UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def _library(archive: Path, where: str):
    """Turn anything the archive libraries raise while reading into one sentence naming the archive and member."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, tarfile.ReadError, zlib.error, lzma.LZMAError, EOFError, OSError...
        raise DataError(f"{archive.name}: {where} cannot be read ({_first_line(exc)}); refusing the whole archive") from None


class _Members:
    """Counts and caps: member count, bytes per member and in all; refuses duplicate names and names that clash."""

    def __init__(self, archive: Path, max_members: int, max_bytes: int, max_file_bytes: int):
        self.archive, self.max_members, self.max_bytes, self.max_file_bytes = archive, max_members, max_bytes, max_file_bytes
        self.members = self.bytes = 0
        self.files: set[str] = set()

    def check(self, name: str, declared: int = 0) -> PurePosixPath:
        self.members += 1
        if self.members > self.max_members:
            raise DataError(f"{self.archive.name}: more than {self.max_members} members (ingest.archive_max_members); refusing it")
        shown = printable(name)
        if name != shown:
            raise DataError(f"{self.archive.name}: member {shown!r} has a name that is not valid UTF-8")
        if "\x00" in name:
            raise DataError(f"{self.archive.name}: member {shown!r} has a NUL byte in its name")
        if any(len(part.encode()) > MAX_NAME_PART for part in name.replace("\\", "/").split("/")):
            raise DataError(
                f"{self.archive.name}: member {shown[:80]!r}... has a name part over {MAX_NAME_PART} bytes, too long for a file name"
            )
        norm = name.replace("\\", "/")
        pure = PurePosixPath(norm)
        if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
            raise DataError(f"{self.archive.name}: member {shown!r} has an absolute path; refusing to extract outside the data folder")
        if len(pure.parts) > MAX_DEPTH:
            raise DataError(f"{self.archive.name}: member {shown[:80]!r}... is nested {len(pure.parts)} levels deep (at most {MAX_DEPTH})")
        if ".." in pure.parts:
            raise DataError(f"{self.archive.name}: member {shown!r} climbs out of the archive with '..'; refusing to extract it")
        if declared > self.max_file_bytes:
            raise DataError(
                f"{self.archive.name}: member {shown!r} declares {declared} bytes, over ingest.max_file_bytes={self.max_file_bytes}"
            )
        return pure

    def claim(self, pure: PurePosixPath) -> None:
        """Refuse a second file member with the same path: one would silently overwrite the other."""
        key = str(pure)
        if key in self.files:
            raise DataError(f"{self.archive.name}: member {key!r} appears twice; refusing an archive with duplicate names")
        self.files.add(key)

    def copy(self, archive: Path, src, dest: Path, name: str) -> None:
        """Stream one member to `dest` under both caps; library errors name the member, our disk's OSErrors propagate."""
        shown = printable(name)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            out = open(dest, "xb")  # noqa: SIM115 - closed below; 'x': a clash with an earlier member is refused, not overwritten
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise DataError(f"{archive.name}: member {shown!r} clashes with another member's path; refusing the archive") from None
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            raise DataError(f"{archive.name}: member {shown[:80]!r}... has a path too long to write here") from None
        with out:
            size = 0
            while True:
                with _library(archive, f"member {shown!r}"):
                    chunk = src.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                self.bytes += len(chunk)
                if size > self.max_file_bytes:
                    raise DataError(f"{archive.name}: member {shown!r} is larger than ingest.max_file_bytes={self.max_file_bytes}")
                if self.bytes > self.max_bytes:
                    raise DataError(
                        f"{archive.name}: unpacks to more than {self.max_bytes} bytes at member {shown!r} "
                        "(ingest.archive_max_bytes); refusing a possible decompression bomb"
                    )
                out.write(chunk)

    def mkdir(self, archive: Path, dest: Path, name: str) -> None:
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise DataError(f"{archive.name}: folder member {printable(name)!r} clashes with a file member; refusing the archive") from None
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            raise DataError(f"{archive.name}: folder member {printable(name)[:80]!r}... has a path too long to write here") from None


def _zip_entries_over(archive: Path, cap: int) -> bool:
    """Whether the zip directory lists more than `cap` entries, counted by walking their fixed 46-byte headers (three
    lengths each give the next) in a memory map: zipfile.ZipFile builds every entry's ZipInfo before any cap can
    count them, so a 60 MB directory of a million entries took 475 MB and 6.6 s. A directory too damaged to walk is
    left to ZipFile to refuse. Uses zipfile's own end-record reader (_EndRecData and its field numbers, private but
    unchanged since Python 2.6): no public call says where the directory is."""
    with open(archive, "rb") as f:
        end = zipfile._EndRecData(f)
        if end is None:
            return False  # no end record: not a zip, ZipFile says so
        size, start = end[zipfile._ECD_SIZE], end[zipfile._ECD_LOCATION] - end[zipfile._ECD_SIZE]
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # the zip64 end record and locator sit between
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
        if start < 0 or size < 46:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            pos, n, stop = start, 0, min(start + size, len(data))
            while pos + 46 <= stop and data[pos : pos + 4] == b"PK\x01\x02":
                n += 1
                if n > cap:
                    return True
                name, extra, comment = struct.unpack_from("<HHH", data, pos + 28)
                pos += 46 + name + extra + comment
    return False


def _extract_zip(archive: Path, dest: Path, m: _Members) -> None:
    with _library(archive, "the zip directory"):
        if _zip_entries_over(archive, m.max_members):
            raise DataError(f"{archive.name}: more than {m.max_members} members (ingest.archive_max_members); refusing it")
        zf = zipfile.ZipFile(archive)
    with zf:
        infos = zf.infolist()
        for info in infos:  # every member is checked before any is written
            shown = printable(info.filename)
            pure = m.check(info.filename, 0 if info.is_dir() else info.file_size)
            if stat.S_IFMT(info.external_attr >> 16) == stat.S_IFLNK:
                raise DataError(f"{archive.name}: member {info.filename!r} is a symbolic link; links are refused")
            if info.flag_bits & 0x1:
                raise DataError(f"{archive.name}: member {shown!r} is encrypted; encrypted archives are not supported")
            if info.compress_type not in ZIP_METHODS:
                raise DataError(
                    f"{archive.name}: member {shown!r} uses zip compression method {info.compress_type}, which is not supported "
                    f"(supported: {', '.join(ZIP_METHODS.values())})"
                )
            if not info.is_dir():
                m.claim(pure)
        for info in infos:
            pure = PurePosixPath(info.filename.replace("\\", "/"))
            if info.is_dir():
                m.mkdir(archive, dest / pure, info.filename)
                continue
            with _library(archive, f"member {printable(info.filename)!r}"):
                src = zf.open(info)
            with src:
                m.copy(archive, src, dest / pure, info.filename)


class _CappedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing a long-name or pax header that declares more than MAX_TAR_META bytes before
    reading it. Overrides the private _proc_member (stable since Python 3.2): tarfile has no public hook there."""

    META = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, tf):
        if self.type in self.META and self.size > MAX_TAR_META:
            raise tarfile.HeaderError(f"an extended header declares {self.size} bytes (at most {MAX_TAR_META})")
        return super()._proc_member(tf)


def _extract_tar(archive: Path, dest: Path, m: _Members) -> None:
    with _library(archive, "the tar header"):
        tf = tarfile.open(archive, mode="r:*", tarinfo=_CappedTarInfo)
    with tf:
        previous = "the first member"
        while True:
            with _library(archive, f"the header after {previous}"):
                member = tf.next()
            if member is None:
                break
            shown = printable(member.name)
            previous = f"member {shown!r}"
            pure = m.check(member.name, member.size if member.isfile() else 0)
            if member.issym() or member.islnk():
                raise DataError(f"{archive.name}: member {shown!r} is a link to {printable(member.linkname)!r}; links are refused")
            if member.isdir():
                m.mkdir(archive, dest / pure, member.name)
                continue
            if not member.isfile():
                raise DataError(f"{archive.name}: member {shown!r} is not a regular file or folder; refusing it")
            m.claim(pure)
            with _library(archive, previous):
                src = tf.extractfile(member)
            m.copy(archive, src, dest / pure, member.name)
        _check_tar_end(archive, tf, m, previous)


def _check_tar_end(archive: Path, tf: tarfile.TarFile, m: _Members, previous: str) -> None:
    """tarfile ends its listing quietly at a damaged header; what follows the last member must be zeros or nothing."""
    where = f"the data after {previous}"
    with _library(archive, where):
        tf.fileobj.seek(tf.offset)
        while chunk := tf.fileobj.read(CHUNK):
            if chunk.count(0) != len(chunk):
                raise DataError(
                    f"{archive.name}: a damaged header follows {previous} (at byte {tf.offset}); "
                    "refusing the archive rather than ingesting part of it"
                )
            m.bytes += len(chunk)
            if m.bytes > m.max_bytes:
                raise DataError(f"{archive.name}: unpacks to more than {m.max_bytes} bytes (ingest.archive_max_bytes); refusing it")


def extract(archive: Path, dest: Path, max_members: int, max_bytes: int, max_file_bytes: int) -> None:
    """Extract `archive` into the empty folder `dest` whole; on any refusal or failure, remove what was written and raise."""
    members = _Members(archive, max_members, max_bytes, max_file_bytes)
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, dest, members)
        else:
            _extract_tar(archive, dest, members)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
