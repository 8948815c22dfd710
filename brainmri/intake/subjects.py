"""Patient-level groups: the subjects table (ingest.subjects) that joins each image to its subject (patient), read with
the checks a hostile file needs, and the groups that keep a subject's images together with their duplicates.

Groups are the connected components of "same subject" and "duplicate": the manifest's `group`, which split, CV and
the bootstrap already keep whole, is widened to them, so those stages keep a subject's images together unchanged."""

from __future__ import annotations

import csv
import io
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from brainmri.config import Params
from brainmri.core.errors import DataError
from brainmri.core.progress import log
from brainmri.intake.duplicates import components

SOURCE_PATH, SUBJECT = "source_path", "subject"  # the columns: source_path as ingest's manifest writes it
MAX_TABLE_BYTES = 32_000_000  # a table for 30,000 images is about 1.5 MB; the cap bounds what is read into memory
MAX_ROWS = 200_000  # well above the largest sets in view (7,023 and 30,000 images); more rows than that is not a table of one set
MAX_ID_CHARS = 256  # a subject id is a patient number or code; a longer one is a wrong column, and it is written into every report
MAX_LISTED = 100  # unmatched table paths listed in the report; the count says how many there are


@dataclass(frozen=True)
class Subjects:
    table: str  # ingest.subjects, as params give it
    of: dict[str, str]  # source_path -> subject id
    n_rows: int  # data rows read (a path listed twice with the same subject counts twice)
    path: Path  # the file read, for errors


def read_subjects(p: Params) -> Subjects | None:
    """The subjects table ingest.subjects names, or None when it names none ('')."""
    if not p.ingest.subjects:
        return None
    path = p.resolve(p.ingest.subjects)
    of, n_rows = parse_table(table_text(path), path)
    return Subjects(p.ingest.subjects, of, n_rows, path)


def table_text(path: Path) -> str:
    """The table's text; anything that stops it being read is one DataError sentence naming the file."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a named pipe would block the read
            raise DataError(f"{path}: the subjects table (ingest.subjects) is not a regular file")
        if st.st_size > MAX_TABLE_BYTES:
            raise DataError(f"{path}: the subjects table is {st.st_size} bytes; at most {MAX_TABLE_BYTES} are read")
        with open(path, "rb") as f:
            raw = f.read(MAX_TABLE_BYTES + 1)
    except FileNotFoundError:
        raise DataError(f"{path}: subjects table not found (ingest.subjects in params.yaml); put it there, or set '' for none") from None
    except OSError as exc:
        raise DataError(f"{path}: the subjects table cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_TABLE_BYTES:  # it grew while being read
        raise DataError(f"{path}: the subjects table is over {MAX_TABLE_BYTES} bytes")
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as spreadsheet programs write, is no part of the header
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: the subjects table is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None


def parse_table(text: str, path: Path) -> tuple[dict[str, str], int]:
    """{source_path: subject} from the table's CSV text and the number of data rows; a bad row is a DataError naming its line."""
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    of: dict[str, str] = {}
    line_of: dict[str, int] = {}
    n_rows = 0
    try:
        where = _columns(next(reader, None), path)
        for row in reader:
            if reader.line_num > 2 * MAX_ROWS + 1:  # blank lines too: 30 million of them took 7.5 s to skip
                raise DataError(f"{path}: the subjects table has over {2 * MAX_ROWS} lines")
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            n_rows += 1
            if n_rows > MAX_ROWS:
                raise DataError(f"{path}: the subjects table has over {MAX_ROWS} rows")
            source_path, subject = _row(row, where, reader.line_num, path)
            if of.get(source_path, subject) != subject:
                raise DataError(
                    f"{path}: line {reader.line_num}: {source_path[:200]!r} is listed with two subjects, "
                    f"{of[source_path][:80]!r} (line {line_of[source_path]}) and {subject[:80]!r}"
                )
            of[source_path] = subject
            line_of.setdefault(source_path, reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: not readable as CSV ({exc})") from None
    if not n_rows:  # else every image would silently have no subject
        raise DataError(f"{path}: the subjects table has a header but no rows; list each image, or set ingest.subjects to '' for none")
    return of, n_rows


def _columns(header: list[str] | None, path: Path) -> tuple[int, int]:
    """The positions of the source_path and subject columns in the header row."""
    if header is None:
        raise DataError(f"{path}: the subjects table is empty; it needs a header row naming the columns {SOURCE_PATH} and {SUBJECT}")
    names = [h.strip() for h in header]
    for col in (SOURCE_PATH, SUBJECT):
        if names.count(col) != 1:
            found = ", ".join(repr(n[:40]) for n in names[:10])
            problem = "lacks" if col not in names else "repeats"
            raise DataError(f"{path}: the subjects table's header {problem} the column {col!r} (columns: {found}); it needs one of each")
    return names.index(SOURCE_PATH), names.index(SUBJECT)


def _row(row: list[str], where: tuple[int, int], line: int, path: Path) -> tuple[str, str]:
    """(source_path, subject) of one data row, both present and the id short and printable."""
    if len(row) <= max(where):
        raise DataError(f"{path}: line {line}: {len(row)} fields, too few to hold the columns {SOURCE_PATH} and {SUBJECT}")
    source_path, subject = row[where[0]], row[where[1]].strip()  # the path as written: a file name may end in a space
    if not source_path.strip():
        raise DataError(f"{path}: line {line}: empty {SOURCE_PATH}")
    if not subject:
        raise DataError(f"{path}: line {line}: empty subject id for {source_path[:200]!r}")
    if len(subject) > MAX_ID_CHARS:
        raise DataError(f"{path}: line {line}: a subject id of {len(subject)} characters (at most {MAX_ID_CHARS})")
    bad = next((c for c in subject if not c.isprintable()), None)  # control characters, and spaces other than ' '
    if bad is not None:
        raise DataError(f"{path}: line {line}: the subject id {subject[:80]!r} holds a control or invisible character (U+{ord(bad):04X})")
    return source_path, subject


def subject_groups(keys: list[str], groups: list[str], subjects: list[str]) -> list[str]:
    """A group id per image: images joined, transitively, by a shared duplicate group or a shared subject ('' joins
    nothing). An image without a subject keeps its duplicate group's id: the id derives from the members' keys."""
    first: dict[tuple[str, str], int] = {}
    pairs = []
    for i, tags in enumerate(zip(groups, subjects, strict=True)):
        for kind, tag in zip(("duplicate", "subject"), tags, strict=True):
            if tag:
                j = first.setdefault((kind, tag), i)
                if j != i:
                    pairs.append((j, i))
    return components(keys, pairs)


def with_subjects(manifest: pd.DataFrame, subjects: Subjects | None, keep_mixed: bool) -> tuple[pd.DataFrame, dict | None]:
    """The manifest with each image's subject ('' when the table lists none), its duplicate group kept as
    `duplicate_group`, `group` widened to the components of subject and duplicate, and `conflict` set for the images
    of a subject filed under different classes unless `keep_mixed`; and the report's account. No table: unchanged."""
    if subjects is None:
        return manifest, None
    subjects = _matched(subjects, set(manifest["source_path"]))
    m = manifest.copy()
    m[SUBJECT] = m["source_path"].map(subjects.of).fillna("")
    if not (m[SUBJECT] != "").any():  # as a table of no rows: else every image would silently have no subject
        example = next(iter(subjects.of))[:200]
        raise DataError(
            f"{subjects.path}: none of the subjects table's {subjects.n_rows} rows names an ingested image (e.g. {example!r}); "
            "write each path as the ingest manifest's source_path column does: class folder, '/', file name"
        )
    m["duplicate_group"] = m["group"]
    m["group"] = subject_groups(m["sha256"].tolist(), m["group"].tolist(), m[SUBJECT].tolist())
    listed = m[SUBJECT] != ""
    classes = m[listed].groupby(SUBJECT)["label"].nunique()
    m["mixed_subject"] = m[SUBJECT].isin(classes[classes > 1].index) & listed
    if not keep_mixed:
        m["conflict"] = m["conflict"].astype(bool) | m["mixed_subject"]
    told = subjects_report(m, subjects, keep_mixed)
    warn(told)
    return m, told


def _matched(subjects: Subjects, paths: set[str]) -> Subjects:
    """`subjects` with a table path that names no image as written, but does without its surrounding spaces (a
    table written as 'path , subject'), taken as that image's: a path naming an image as written is matched first,
    so a file whose name ends in a space is told from its neighbour; two rows giving one image two subjects stop."""
    of = {k: v for k, v in subjects.of.items() if k in paths}
    for k, v in subjects.of.items():
        bare = k.strip()
        if k in paths:
            continue
        if bare not in paths:
            of[k] = v  # names no image: the report lists it
        elif of.setdefault(bare, v) != v:  # two rows for one image: refused, as two subjects on one path are
            two = f"{of[bare][:80]!r} and {v[:80]!r}"
            raise DataError(f"{subjects.path}: {k[:200]!r} and another row name the image {bare[:200]!r} with two subjects, {two}")
    return replace(subjects, of=of)


def subjects_report(m: pd.DataFrame, subjects: Subjects, keep_mixed: bool) -> dict:
    """ingest report's "subjects": the table, how many images it names, the paths it lists that name no ingested
    image, and each subject filed under more than one class with its images."""
    listed = m[SUBJECT] != ""
    unmatched = sorted(set(subjects.of) - set(m["source_path"]))
    mixed = [
        {"subject": s, "labels": sorted(set(g["label"])), "members": sorted(g["source_path"]), "kept": keep_mixed}
        for s, g in m[m["mixed_subject"]].groupby(SUBJECT)
    ]
    return {
        "table": subjects.table,
        "n_rows": subjects.n_rows,
        "n_subjects": int(m.loc[listed, SUBJECT].nunique()),
        "n_images_with_subject": int(listed.sum()),
        "n_images_without_subject": int((~listed).sum()),  # each its own subject: its group is its duplicate group
        "n_unmatched": len(unmatched),  # table paths naming no ingested image (absent, quarantined, excluded or misspelt)
        "unmatched": [u[:300] for u in unmatched[:MAX_LISTED]],  # a path is at most 300 characters here: the report stays small
        "n_groups": int(m["group"].nunique()),
        "keep_mixed_subjects": keep_mixed,
        "mixed": mixed,
        "n_images_refused": 0 if keep_mixed else sum(len(x["members"]) for x in mixed),
    }


def warn(told: dict) -> None:
    """One warning line each for subjects filed under several classes and for table paths that name no ingested image."""
    if told["mixed"]:
        names = ", ".join(f"{x['subject'][:40]!r} ({'/'.join(x['labels'])})" for x in told["mixed"][:10])
        more = f" and {len(told['mixed']) - 10} more" if len(told["mixed"]) > 10 else ""
        fate = "kept (ingest.keep_mixed_subjects)" if told["keep_mixed_subjects"] else f"refused: {told['n_images_refused']} images"
        log.warning("ingest: %d subjects filed under more than one class, %s: %s%s", len(told["mixed"]), fate, names, more)
    if told["n_unmatched"]:
        log.warning(
            "ingest: %d paths of the subjects table %s name no ingested image, e.g. %r (the report's subjects.unmatched lists them)",
            told["n_unmatched"],
            told["table"],
            told["unmatched"][0][:200],
        )
