"""ingest_external stage: an independent labelled set (external.source), read by exactly ingest's rules, less every
image that duplicates an ingested one, so that "external" means external. The external@MODEL stages score what is left.

A source with nothing in it but hidden files means no external set: the stage still runs (DVC has no conditional
stages) and records that, and every external@MODEL stage and the report say so. Anything else is read by ingest's
rules, with ingest's errors: both class folders, images directly inside them.
"""

from __future__ import annotations

import time

import pandas as pd
from PIL import Image

from brainmri.config import Params
from brainmri.core.errors import DataError
from brainmri.core.files import atomic_dir, write_csv, write_json
from brainmri.core.progress import summary
from brainmri.intake.decode import save_png
from brainmri.intake.duplicates import fingerprint, group_ids
from brainmri.intake.phantoms import MARKER
from tasks.ingest import decoded, image_id, listing, open_source, scan

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
        manifest["group"], manifest["duplicate_of"] = _against_ingested(p, manifest, prints)
        manifest["used"] = manifest["duplicate_of"] == ""
        for name in manifest.loc[~manifest["used"], "image"]:
            (out / name).unlink()  # a copy of a training, validation or test image: not scored, not kept
    manifest = manifest.sort_values("source_path", kind="stable").reset_index(drop=True)
    used = manifest[manifest["used"]]
    report = {
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
        "seconds": round(time.monotonic() - start, 1),
    }
    write_csv(p.path("external_manifest"), manifest[COLUMNS])
    write_json(p.path("external_report"), report)
    if not configured:
        summary("ingest_external", f"no external set: {source} holds nothing but hidden files")
    else:
        summary(
            "ingest_external",
            f"{n_files} files -> {len(manifest)} decoded, {len(quarantined)} quarantined; "
            f"{report['n_duplicates_of_ingested']} duplicate an ingested image and are left out; {len(used)} scored"
            + (" (SYNTHETIC: a check of the mechanics only)" if synthetic else ""),
        )
    return report


def _against_ingested(p: Params, manifest: pd.DataFrame, prints: list) -> tuple[list[str], list[str]]:
    """Each external image's duplicate group (joined with the ingested images by ingest's own detector: equal bytes,
    perceptual hash and thumbnail correlation both close, or one a copy of the other cropped into the head) and the
    ingested image it duplicates ('' if none)."""
    if manifest.empty:
        return [], []
    if not p.path("ingest_manifest").is_file():
        raise DataError(f"{p.path('ingest_manifest')} not found: run the ingest stage before ingest_external (dvc repro orders them)")
    ingested = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
    theirs = []
    for name, sha in zip(ingested["image"], ingested["sha256"], strict=True):
        with Image.open(p.path("ingest_images") / name) as img:  # both sides normalized by the same decoder
            theirs.append(fingerprint(img, sha, p.dedupe.hash_size))
    keys = [*ingested["sha256"], *manifest["sha256"]]
    dd = p.dedupe
    groups = group_ids(keys, [*theirs, *prints], dd.max_distance, dd.min_correlation, dd.min_partial_correlation)
    first = {}
    for g, src in zip(groups[: len(ingested)], ingested["source_path"], strict=True):
        first.setdefault(g, src)
    mine = groups[len(ingested) :]
    return mine, [first.get(g, "") for g in mine]
