"""ingest_external stage: an independent labelled set (external.source), read by exactly ingest's rules, less every
image that duplicates an ingested one, so that "external" means external. The external@MODEL stages score what is left.

A source with nothing in it but hidden files means no external set: the stage still runs (DVC has no conditional
stages) and records that, and every external@MODEL stage and the report say so. Anything else is read by ingest's
rules, with ingest's errors: both class folders, images directly inside them.
"""

from __future__ import annotations

import time

import pandas as pd

from brainmri.config import Params
from brainmri.core.errors import DataError
from brainmri.core.files import atomic_dir, write_csv, write_json
from brainmri.core.progress import summary
from brainmri.intake.decode import save_png
from brainmri.intake.duplicates import fingerprint
from brainmri.intake.ingested import match_ingested
from brainmri.intake.manifest import external_report
from brainmri.intake.phantoms import MARKER
from brainmri.intake.sources import decoded, image_id, listing, open_source, scan

COLUMNS = ["image_id", "source_path", "label", "image", "sha256", "group", "duplicate_of", "used"]


def ingest_external(p: Params) -> dict:
    """Run the stage: write the external images, their manifest and a report; return the report."""
    start = time.monotonic()
    source = p.resolve(p.external.source)
    if not source.exists():
        raise DataError(
            f"external set not found at {source} (external.source in params.yaml): point it at a folder or archive of "
            f"class folders {p.ingest.classes}, or at an empty folder for no external set"
        )
    rows, prints, quarantined, skipped, n_files, synthetic = [], [], [], [], 0, False
    with open_source(source, p, "external.source") as folder, atomic_dir(p.path("external_images")) as out:
        configured = any(not name.startswith(".") for name in listing(folder))  # anything else: scan's own errors
        if configured:
            files, skipped, quarantined = scan(folder, p.ingest.classes)
            synthetic = (folder / MARKER).is_file()
            n_files = len(files) + len(quarantined)
            for f, dec in decoded(p, files, quarantined, "ingest_external"):
                iid = image_id(f"external/{f.source_path}")
                save_png(dec.image, out / f"{iid}.png")
                prints.append(fingerprint(dec.image, dec.sha256, p.dedupe.hash_size))
                rows.append({"image_id": iid, "source_path": f.source_path, "label": f.label, "image": f"{iid}.png", "sha256": dec.sha256})
        manifest = pd.DataFrame(rows, columns=COLUMNS[:5])
        manifest["group"], manifest["duplicate_of"] = match_ingested(p, manifest, prints)
        manifest["used"] = manifest["duplicate_of"] == ""
        for name in manifest.loc[~manifest["used"], "image"]:
            (out / name).unlink()  # a copy of a training, validation or test image: not scored, not kept
    manifest = manifest.sort_values("source_path", kind="stable").reset_index(drop=True)
    report = external_report(p, configured, synthetic, n_files, quarantined, skipped, manifest, time.monotonic() - start)
    write_csv(p.path("external_manifest"), manifest[COLUMNS])
    write_json(p.path("external_report"), report)
    if not configured:
        summary("ingest_external", f"no external set: {source} holds nothing but hidden files")
    else:
        summary(
            "ingest_external",
            f"{n_files} files -> {len(manifest)} decoded, {len(quarantined)} quarantined; "
            f"{report['n_duplicates_of_ingested']} duplicate an ingested image and are left out; {report['n_used']} scored"
            + (" (SYNTHETIC: a check of the mechanics only)" if synthetic else ""),
        )
    return report
