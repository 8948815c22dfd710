"""ingest's manifest: one row per decoded image, its duplicate groups and label conflicts, and the stage's report."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from brainmri.config import Dedupe, Params
from brainmri.core.errors import DataError
from brainmri.intake.decode import Decoded
from brainmri.intake.grouping import group_ids
from brainmri.intake.outliers import score
from brainmri.intake.sources import SourceFile

EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "MPO": {".jpg", ".jpeg", ".mpo"},
    "PNG": {".png"},
    "BMP": {".bmp"},
    "TIFF": {".tif", ".tiff"},
    "GIF": {".gif"},
    "WEBP": {".webp"},
}


FILE_FIELDS = ("sha256", "format", "mode", "width", "height", "file_bytes", "exif", "exif_rotated", "norm_width", "norm_height", "note")


def file_fields(dec: Decoded) -> dict:
    """What the file's bytes decide of its manifest row (the ingest memo keeps these per file)."""
    return {
        "sha256": dec.sha256,
        "format": dec.format,
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


def manifest_row(f: SourceFile, fields: dict, iid: str) -> dict:
    """One manifest row: where the image came from, its class and content hash, and what the file was like."""
    head = {"image_id": iid, "source_path": f.source_path, "label": f.label, "image": f"{iid}.png"}
    suffix = Path(f.source_path).suffix  # as written: the real set's classes differ in '.JPG' against '.jpg'
    named = {"extension_ok": suffix.lower() in EXTENSIONS.get(fields["format"], ()), "extension": suffix}
    return {**head, "sha256": fields["sha256"], "format": fields["format"], **named, **{k: fields[k] for k in FILE_FIELDS[2:]}}


def check_class_counts(labels: list[str], p: Params, source: Path, after: str = "", quarantined: list[dict] | None = None) -> None:
    """Stop when a class has fewer usable images than ingest.min_images_per_class; `after` says what was already dropped,
    and the commonest reason among `quarantined` is named (a folder of DICOM files has one)."""
    per_class = Counter(labels)
    short = {c: per_class.get(c, 0) for c in p.ingest.classes if per_class.get(c, 0) < p.ingest.min_images_per_class}
    if short:
        commonest = Counter(q["reason"] for q in quarantined or []).most_common(1)
        why = f"; {commonest[0][1]} of {len(quarantined)} quarantined files: {commonest[0][0]}" if commonest else ""
        raise DataError(
            f"too few usable images in {source}{after}: {short} "
            f"(ingest.min_images_per_class = {p.ingest.min_images_per_class}){why or ('' if after else '; see the quarantine reasons')}"
        )


def check_usable_counts(manifest: pd.DataFrame, p: Params, source: Path) -> None:
    """The class minimum again once label conflicts are dropped (split drops them): a set filed under both classes
    passed the first count, and split then wrote 0/0/0 images."""
    usable = manifest.loc[~manifest["conflict"].astype(bool), "label"].tolist()
    dropped = len(manifest) - len(usable)
    which = "duplicate groups or subjects" if "mixed_subject" in manifest else "duplicate groups"  # subjects: with a table
    check_class_counts(usable, p, source, f" once {dropped} images in {which} with conflicting labels are dropped" if dropped else "")


def build_manifest(rows: list[dict], prints: list, looks: list, outlier_z: float, dd: Dedupe, memo=None) -> pd.DataFrame:
    """The rows with their outlier scores, duplicate groups and label conflicts, sorted by source path; `memo`
    (`memo.PairMemo`) holds the pairs judged by an earlier run."""
    manifest = pd.DataFrame(rows)
    manifest = manifest.join(score(pd.DataFrame(looks), outlier_z))
    keys = manifest["sha256"].tolist()
    manifest["group"] = group_ids(
        keys, prints, dd.max_distance, dd.min_correlation, dd.min_partial_correlation, memo, dd.neighbours, dd.exact_up_to
    )
    labels_per_group = manifest.groupby("group")["label"].nunique()
    manifest["conflict"] = manifest["group"].map(labels_per_group > 1)
    return manifest.sort_values("source_path", kind="stable").reset_index(drop=True)


def ingest_report(p, n_files, skipped, quarantined, excluded, manifest, elapsed, synthetic: bool) -> dict:
    """ingest's report.json: counts, every file set aside and why, outliers, formats, duplicate groups and conflicts."""
    by = "duplicate_group" if "duplicate_group" in manifest else "group"  # with a subjects table, group holds subjects too
    sizes = manifest.groupby(by).size()
    dup_groups = sizes[sizes > 1]
    mixed = manifest.groupby(by)["label"].transform("nunique") > 1  # without a table, exactly the conflict column
    conflicts = [
        {"group": g, "members": sorted(m["source_path"]), "labels": sorted(set(m["label"]))} for g, m in manifest[mixed].groupby(by)
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


def external_report(
    p: Params, configured: bool, synthetic: bool, n_files: int, quarantined: list, skipped: list, manifest, elapsed: float
) -> dict:
    """ingest_external's report.json: configured or not, counts, quarantined files, duplicates of ingested images."""
    used = manifest[manifest["used"]]
    return {
        "configured": configured,
        "source": p.external.source,
        "synthetic": synthetic,
        "n_files": n_files,
        "n_decoded": int(len(manifest)),
        "n_quarantined": len(quarantined),
        "quarantined": quarantined,
        "n_skipped": len(skipped),
        "n_duplicates_of_ingested": int((~manifest["used"]).sum()),
        "duplicates_of_ingested": manifest.loc[~manifest["used"], ["source_path", "duplicate_of"]].to_dict(orient="records"),
        "n_used": int(len(used)),
        "per_class": {c: int((used["label"] == c).sum()) for c in p.ingest.classes},
        "n_groups": int(used["group"].nunique()),
        "seconds": round(elapsed, 1),
    }
