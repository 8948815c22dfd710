"""ingest stage: validate, normalize and de-duplicate the source images into one manifest."""

from __future__ import annotations

import time

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_csv, write_json
from brainmri.core.progress import summary
from brainmri.intake import memo as ingest_memo
from brainmri.intake.manifest import build_manifest, check_class_counts, check_usable_counts, ingest_report
from brainmri.intake.phantoms import MARKER
from brainmri.intake.sources import drop_excluded, open_source, scan
from brainmri.intake.subjects import read_subjects, with_subjects
from brainmri.intake.workers import ingested


def ingest(p: Params) -> dict:
    """Run the stage: write normalized images, the manifest and the report; return the report."""
    start = time.monotonic()
    source = p.resolve(p.ingest.source)
    subjects = read_subjects(p)  # first: a bad table stops the stage before any image is decoded
    rows, prints, looks = [], [], []
    with open_source(source, p) as folder, atomic_dir(p.path("ingest_images")) as out:
        files, skipped, quarantined = scan(folder, p.ingest.classes)
        synthetic = (folder / MARKER).is_file()
        n_files = len(files) + len(quarantined)
        files, excluded = drop_excluded(files, p, source)
        memo = ingest_memo.usable(ingest_memo.folder(p))  # earlier runs' work (paths.ingest_cache); made once the source is read
        for row, fp, look in ingested(p, files, quarantined, out, "ingest", memo):  # worker processes for a large set
            rows.append(row)
            prints.append(fp)
            looks.append(look)
        check_class_counts([r["label"] for r in rows], p, source, quarantined=quarantined)
        dd = p.dedupe
        pairs = ingest_memo.PairMemo(memo, dd.max_distance, dd.min_correlation, dd.min_partial_correlation) if memo else None
        manifest = build_manifest(rows, prints, looks, p.ingest.outlier_z, p.dedupe, pairs)
        manifest, by_subject = with_subjects(manifest, subjects, p.ingest.keep_mixed_subjects)
        check_usable_counts(manifest, p, source)  # inside the block: on failure no image is published
    report = ingest_report(p, n_files, skipped, quarantined, excluded, manifest, time.monotonic() - start, synthetic)
    if by_subject is not None:  # only with a table: without one, the report is as it always was
        report["subjects"] = by_subject
    write_csv(p.path("ingest_manifest"), manifest)
    write_json(p.path("ingest_report"), report)
    if memo is not None:
        ingest_memo.prune(memo, set(manifest["sha256"]), pairs)  # the memo keeps only what this run used
    d = report["duplicates"]
    summary(
        "ingest",
        f"{report['n_files']} files -> {report['n_ingested']} ingested, {len(quarantined)} quarantined, "
        f"{len(excluded)} excluded, {len(skipped)} skipped, {len(report['outliers'])} flagged for review; "
        f"{d['n_images_in_duplicate_groups']} images in {d['n_duplicate_groups']} duplicate groups, "
        f"{len(d['conflicts'])} label conflicts"
        + (f"; {by_subject['n_subjects']} subjects, {len(by_subject['mixed'])} under several classes" if by_subject is not None else ""),
    )
    return report
