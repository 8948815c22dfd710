"""ingest stage: validate, normalize and de-duplicate the source images into one manifest."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from brainmri.config import Params
from brainmri.core.errors import DataError, ImageError
from brainmri.core.files import atomic_dir, write_csv, write_json
from brainmri.core.progress import progress, summary
from brainmri.intake import archives
from brainmri.intake.decode import decode_file, save_png
from brainmri.intake.duplicates import fingerprint, group_ids
from brainmri.intake.outliers import features, score
from brainmri.intake.phantoms import MARKER

SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "icon\r"})
EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "MPO": {".jpg", ".jpeg", ".mpo"},
    "PNG": {".png"},
    "BMP": {".bmp"},
    "TIFF": {".tif", ".tiff"},
    "GIF": {".gif"},
    "WEBP": {".webp"},
}


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
    present = []
    for name in listing(folder):
        path = folder / name
        if name == MARKER:
            continue
        if is_hidden(name):
            skipped.append({"source_path": archives.printable(name), "reason": "hidden or system file"})
        elif path.is_symlink():
            raise DataError(f"{archives.printable(name)!r} in {folder} is a symbolic link; class folders must be real folders")
        elif not path.is_dir():
            raise DataError(
                f"{archives.printable(name)!r} in {folder}: unexpected file at the top level; expected only the class folders {classes}"
            )
        elif name not in classes:
            raise DataError(
                f"unknown class folder {archives.printable(name)!r} in {folder}; expected {classes} (set ingest.classes in params.yaml)"
            )
        else:
            present.append(name)
    for label in classes:
        if label not in present:
            raise DataError(f"class folder {label!r} is missing from {folder}; expected {classes}")
        n_before = len(files) + len(quarantined)
        for name in listing(folder / label):
            rel, path = f"{label}/{name}", folder / label / name
            shown = escaped(archives.printable(rel))
            if is_hidden(name):
                skipped.append({"source_path": shown, "reason": "hidden or system file"})
            elif path.is_symlink():
                quarantined.append({"source_path": shown, "reason": "symbolic link; links are not followed"})
            elif path.is_dir():
                raise DataError(f"nested folder {shown!r} in {folder}: put the images directly inside the class folders")
            elif archives.printable(rel) != rel:
                quarantined.append({"source_path": shown, "reason": "file name is not valid UTF-8"})
            elif has_control(name):
                reason = "file name holds control characters (shown as \\xNN); they cannot round-trip through the CSV manifest"
                quarantined.append({"source_path": shown, "reason": reason})
            elif not path.is_file():
                quarantined.append({"source_path": shown, "reason": "not a regular file"})
            else:
                files.append(SourceFile(rel, path, label))
        if len(files) + len(quarantined) == n_before:
            raise DataError(f"class folder {label!r} in {folder} holds no images")
    return files, skipped, quarantined


@contextlib.contextmanager
def open_source(source: Path, p: Params, param: str = "ingest.source"):
    """Yield the folder that holds the class folders: the source itself, or a safely extracted archive.
    `param` names the params key the source came from, in errors."""
    if not source.exists():
        raise DataError(
            f"dataset not found at {source} ({param} in params.yaml): put the class folders "
            f"{p.ingest.classes} there, or point {param} at a folder or .zip/.tar.gz archive"
        )
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


def ingest(p: Params) -> dict:
    """Run the stage: write normalized images, the manifest and the report; return the report."""
    start = time.monotonic()
    source = p.resolve(p.ingest.source)
    rows, prints, looks = [], [], []
    with open_source(source, p) as folder, atomic_dir(p.path("ingest_images")) as out:
        files, skipped, quarantined = scan(folder, p.ingest.classes)
        synthetic = (folder / MARKER).is_file()
        n_files = len(files) + len(quarantined)
        files, excluded = drop_excluded(files, p, source)
        for f, dec in decoded(p, files, quarantined, "ingest"):
            iid = image_id(f.source_path)
            save_png(dec.image, out / f"{iid}.png")
            prints.append(fingerprint(dec.uncropped, dec.sha256, p.dedupe.hash_size))
            looks.append(features(dec.uncropped))  # label-independent appearance, for the outlier screen (it finds the head itself)
            rows.append(
                {
                    "image_id": iid,
                    "source_path": f.source_path,
                    "label": f.label,
                    "image": f"{iid}.png",
                    "sha256": dec.sha256,
                    "format": dec.format,
                    "extension_ok": Path(f.source_path).suffix.lower() in EXTENSIONS.get(dec.format, ()),
                    "extension": Path(f.source_path).suffix,  # as written: the real set's classes differ in '.JPG' against '.jpg'
                    "mode": dec.mode,
                    "width": dec.width,
                    "height": dec.height,
                    "file_bytes": dec.file_bytes,
                    "exif": dec.has_exif,
                    "exif_rotated": dec.exif_rotated,
                    "norm_width": dec.image.width,
                    "norm_height": dec.image.height,
                    "note": dec.note,
                }
            )
        per_class = Counter(r["label"] for r in rows)
        short = {c: per_class.get(c, 0) for c in p.ingest.classes if per_class.get(c, 0) < p.ingest.min_images_per_class}
        if short:
            raise DataError(
                f"too few usable images in {source}: {short} "
                f"(ingest.min_images_per_class = {p.ingest.min_images_per_class}); see the quarantine reasons"
            )
    manifest = pd.DataFrame(rows)
    manifest = manifest.join(score(pd.DataFrame(looks), p.ingest.outlier_z))
    dd = p.dedupe
    manifest["group"] = group_ids(manifest["sha256"].tolist(), prints, dd.max_distance, dd.min_correlation, dd.min_partial_correlation)
    labels_per_group = manifest.groupby("group")["label"].nunique()
    manifest["conflict"] = manifest["group"].map(labels_per_group > 1)
    manifest = manifest.sort_values("source_path", kind="stable").reset_index(drop=True)
    report = _report(p, n_files, skipped, quarantined, excluded, manifest, time.monotonic() - start, synthetic)
    write_csv(p.path("ingest_manifest"), manifest)
    write_json(p.path("ingest_report"), report)
    d = report["duplicates"]
    summary(
        "ingest",
        f"{report['n_files']} files -> {report['n_ingested']} ingested, {len(quarantined)} quarantined, "
        f"{len(excluded)} excluded, {len(skipped)} skipped, {len(report['outliers'])} flagged for review; "
        f"{d['n_images_in_duplicate_groups']} images in {d['n_duplicate_groups']} duplicate groups, "
        f"{len(d['conflicts'])} label conflicts",
    )
    return report


def _report(p, n_files, skipped, quarantined, excluded, manifest, elapsed, synthetic: bool) -> dict:
    sizes = manifest.groupby("group").size()
    dup_groups = sizes[sizes > 1]
    conflicts = [
        {"group": g, "members": sorted(m["source_path"]), "labels": sorted(set(m["label"]))}
        for g, m in manifest[manifest["conflict"]].groupby("group")
    ]
    return {
        "source": str(p.ingest.source),
        "synthetic": synthetic,
        "n_files": n_files,
        "n_ingested": len(manifest),
        "n_quarantined": len(quarantined),
        "quarantined": sorted(quarantined, key=lambda q: q["source_path"]),
        "n_excluded": len(excluded),
        "excluded": sorted(excluded, key=lambda q: q["source_path"]),
        "outlier_z": p.ingest.outlier_z,
        "outliers": [
            {"source_path": r.source_path, "label": r.label, "image": r.image, "score": r.outlier_score, "feature": r.outlier_feature}
            for r in manifest[manifest["outlier"]].sort_values("outlier_score", ascending=False).itertuples()
        ],
        "n_skipped": len(skipped),
        "skipped": sorted(skipped, key=lambda q: q["source_path"]),
        "per_class": {c: int((manifest["label"] == c).sum()) for c in p.ingest.classes},
        "positive_class": p.ingest.positive_class,
        "formats": dict(Counter(manifest["format"])),
        "modes": dict(Counter(manifest["mode"])),
        "notes": [{"source_path": s, "note": n} for s, n in zip(manifest["source_path"], manifest["note"], strict=True) if n],
        "extension_mismatch": sorted(manifest.loc[~manifest["extension_ok"].astype(bool), "source_path"]),
        "duplicates": {
            "n_groups": int(len(sizes)),
            "n_duplicate_groups": int(len(dup_groups)),
            "n_images_in_duplicate_groups": int(dup_groups.sum()),
            "n_exact_duplicate_files": int(manifest["sha256"].duplicated().sum()),
            "largest_group": int(sizes.max()) if len(sizes) else 0,
            "conflicts": conflicts,
        },
        "elapsed_s": round(elapsed, 2),
    }
